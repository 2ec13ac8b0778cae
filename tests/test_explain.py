"""Grad-CAM (core.explain, `wbc explain`) on a tiny study of generated images."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core import make_config, run_study
from core.explain import NoCheckpoint, explain_run, gradcam, heat_in_cell
from core.models import create_classifier
from core.config import CLASSES
from core.store import SCHEMAS, Table
from tests.gen_data import make_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = make_dataset(root / "data", train_per_class=8, test_per_class=3)
    cfg = make_config(None, data_dir=str(data), runs_dir=str(root / "runs"), cache_dir=str(root / "cache"),
                      classifier="simple_cnn", pretrained="none", image_sizes=(32,), epochs=2, batch_size=8,
                      variants=("original", "bicubic-x4"), split="random")
    return run_study(cfg)


def test_gradcam_has_the_input_shape_and_follows_the_target_class():
    torch.manual_seed(0)
    net, _ = create_classifier("simple_cnn", 4, "none")
    x = torch.randint(0, 255, (1, 3, 40, 40), dtype=torch.uint8)
    maps = [gradcam(net, x, k) for k in range(4)]
    assert all(m.shape == (40, 40) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1 for m in maps)
    assert any(not np.allclose(maps[0], m) for m in maps[1:])  # another class, another map


def test_heat_in_cell_is_the_share_on_stained_pixels():
    rgb = np.full((32, 32, 3), 230, np.uint8)
    rgb[8:16, 8:16] = (90, 40, 200)  # a violet "nucleus"
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 8:16] = 1.0
    assert heat_in_cell(heat, rgb) == pytest.approx(1.0)
    heat[24:, 24:] = 1.0
    assert 0.3 < heat_in_cell(heat, rgb) < 0.7
    assert heat_in_cell(heat, np.full((32, 32, 3), 230, np.uint8)) is None  # no stained cell in view


def test_explain_run_writes_maps_and_an_index(tiny):
    rows = explain_run(tiny, only_errors=False, limit=3)
    assert len(rows) == 6 and set(rows["role"]) == {"true", "pred"}  # 3 images x (true, predicted class)
    assert all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in rows["cam_path"])
    table = tiny.table(Table.EXPLAIN)
    assert list(table.columns) == SCHEMAS["explain"] and len(table) == 6
    again = explain_run(tiny, variant="bicubic-x4", limit=2)  # another variant: added, not replacing
    assert set(again["variant"]) == {"bicubic-x4"} and len(tiny.table(Table.EXPLAIN)) == 10
    explain_run(tiny, limit=3)  # the same maps again: replaced, not duplicated
    assert len(tiny.table(Table.EXPLAIN)) == 10
    with pytest.raises(ValueError, match="no variant 'x4plus'"):
        explain_run(tiny, variant="x4plus")


def test_a_run_without_checkpoints_says_why_in_one_line(tiny, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(tiny.path, runs / tiny.run_id)
    shutil.rmtree(runs / tiny.run_id / "checkpoints")
    from core.store import RunStore

    with pytest.raises(NoCheckpoint, match="no checkpoint for original seed 0 32px"):
        explain_run(RunStore(runs).get(tiny.run_id), limit=1)
    r = subprocess.run([sys.executable, "-m", "core", "explain", tiny.run_id, "--runs-dir", str(runs), "--limit", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "other results are unaffected" in r.stderr


def test_the_error_detail_shows_why_for_every_variant(tiny, monkeypatch):
    """The Errors page's "why" view: a Grad-CAM per variant for the true and the predicted class."""
    import panel as pn

    monkeypatch.setenv("WBC_DATA_ROOTS", tiny.read_meta()["data"]["root"])  # the dashboard may read the images

    from dashboard.pages.errors import detail_view

    pred = tiny.table(Table.PREDICTIONS)
    row = pred[pred["variant"] == "original"].iloc[0].to_dict()
    view = detail_view(row, str(tiny.path.parent), tiny.path)
    button = next(b for b in view.select(pn.widgets.Button) if "wbc-why-button" in b.css_classes)
    button.clicks += 1
    [why] = [p for p in view.select(pn.pane.HTML) if "wbc-why" in p.css_classes]
    # each variant: its true and its predicted class, or one map where they are the same class (a right model)
    mine = pred[(pred["image_id"] == row["image_id"]) & (pred["seed"] == row["seed"])]
    assert why.object.count("<img src='data:image/png;base64,") == sum(1 if c else 2 for c in mine["correct"])
    assert why.object.count("true = predicted") == int(mine["correct"].sum())
    assert "original" in why.object and "bicubic-x4" in why.object and "heat on the stained cell" in why.object


def test_a_right_prediction_is_explained_with_one_grad_cam(tiny, monkeypatch):
    """Its true and its predicted class are one class: one Grad-CAM, given under both roles (the explain table keeps
    both rows); a wrong prediction has two."""
    import core.explain as E

    calls = []
    real = E.gradcam
    monkeypatch.setattr(E, "gradcam", lambda net, x, k: calls.append(k) or real(net, x, k))
    pred = tiny.table(Table.PREDICTIONS)
    for correct, n in ((True, 1), (False, 2)):
        row = pred[pred["correct"] == correct].iloc[0].to_dict()
        calls.clear()
        maps = E.row_maps(row, E.model_for(tiny, row["variant"], int(row["seed"]), int(row["image_size"])))
        assert len(calls) == n and [m["role"] for m in maps] == ["true", "pred"]
        assert [m["class_label"] for m in maps] == [row["true_label"], row["pred_label"]]
        assert (maps[0]["png"] == maps[1]["png"]) == correct


def test_grad_cam_in_the_dashboard_opens_no_image_outside_its_folders(tiny, tmp_path, monkeypatch):
    """A stored path outside every image folder (a hand-edited or foreign predictions table): the "why" view says
    so in one line and opens nothing, not even to say whether the file exists (fail closed)."""
    import shutil

    import pandas as pd
    import panel as pn

    from core.store import Run
    from dashboard.pages.common import why_view

    outside = tmp_path / "outside"
    outside.mkdir()
    runs = tmp_path / "runs"
    shutil.copytree(tiny.path, runs / tiny.run_id)
    run = Run(runs / tiny.run_id)
    pred = run.table(Table.PREDICTIONS)
    row = pred[pred["variant"] == "original"].iloc[0].to_dict()
    secret = outside / "secret.png"
    shutil.copy(row["path"], secret)  # a real image: only the folder check stands between it and the page
    pred.loc[pred["image_id"] == row["image_id"], "path"] = str(secret)
    pd.DataFrame(pred).to_parquet(run.path / "predictions.parquet")
    monkeypatch.setenv("WBC_DATA_ROOTS", tiny.read_meta()["data"]["root"])
    opened = []  # every file opened for reading while the views are drawn (the checked reader uses os.open)
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append([os.fspath(p)]) or real_open(p, *a, **k))
    view = why_view(str(run.path), {**row, "path": str(secret)})
    variants = sorted(set(pred["variant"]))
    assert len(variants) == 2  # the other variant's image is in its folder: its maps are still drawn
    assert not isinstance(view, pn.pane.Alert) and view.object.count("<img src='data:image/png;base64,") >= 1
    assert "No Grad-CAM for <b>original</b>: " in view.object
    assert "is missing or outside the folders this dashboard may read" in view.object
    assert not any(str(outside) in p for paths in opened for p in paths)  # nothing under outside/ was opened
    assert opened  # the other variant's image was read, through the same reader
    pred.loc[pred["image_id"] == row["image_id"], "enhanced_path"] = None  # both variants now read the outside file
    pd.DataFrame(pred).to_parquet(run.path / "predictions.parquet")
    alert = why_view(str(run.path), {**row, "path": str(secret)})
    assert isinstance(alert, pn.pane.Alert) and alert.alert_type == "warning" and "\n" not in alert.object
    assert alert.object.count("No Grad-CAM for <b>") == 2 and "outside the folders" in alert.object
    assert not any(str(outside) in p for paths in opened for p in paths)
    # the same image in the data folder: the view draws (the check refuses the place, not the image)
    monkeypatch.setenv("WBC_DATA_ROOTS", os.pathsep.join([tiny.read_meta()["data"]["root"], str(outside)]))
    drawn = why_view(str(run.path), row)
    assert "wbc-why" in drawn.css_classes and not isinstance(drawn, pn.pane.Alert)
    assert drawn.object.count("<img src='data:image/png;base64,") >= 2


def test_a_label_outside_the_classes_is_said_on_the_pages_and_by_grad_cam(tiny, tmp_path, monkeypatch):
    """A predictions or confusion table naming a class that is not one of the four: the pages had shown a matrix
    row of zeros without a word (`wbc report` warned); every page that loads it now warns, naming the label, and
    Grad-CAM names the row instead of `tuple.index(x): x not in tuple`."""
    import shutil

    import pandas as pd
    import panel as pn

    from core.explain import row_maps
    from dashboard.app import _extensions
    from dashboard.data import load_table
    from dashboard.pages.confusion import ConfusionPage
    from dashboard.state import AppState

    runs = tmp_path / "runs"
    shutil.copytree(tiny.path, runs / tiny.run_id)
    rd = runs / tiny.run_id
    assert load_table(rd, Table.PREDICTIONS)[1] is None
    pred = pd.read_parquet(rd / "predictions.parquet")
    row = pred.iloc[0].to_dict()
    pred.loc[0, "true_label"] = "baso<b>phil"
    pred.to_parquet(rd / "predictions.parquet")
    conf = pd.read_parquet(rd / "confusion.parquet")
    conf.loc[0, "pred_label"] = "MONO"
    conf.to_parquet(rd / "confusion.parquet")
    _, w = load_table(rd, Table.PREDICTIONS)
    assert w == (f"{tiny.run_id}/predictions.parquet names classes that are not eosinophil, lymphocyte, monocyte, "
                 "neutrophil (e.g. baso<b>phil): per-class figures and confusion matrices leave those rows out")
    assert "MONO" in load_table(rd, Table.CONFUSION)[1]
    _extensions()
    view = ConfusionPage(AppState(runs_dir=str(runs), run_id=tiny.run_id, page="Confusion")).__panel__()
    shown = " ".join(str(a.object) for a in view.select(pn.pane.Alert) if "wbc-warning" in a.css_classes and a.visible)
    assert "names classes that are not" in shown and "MONO" in shown
    with pytest.raises(ValueError, match=r"true_label 'basophil' of image .* is not one of eosinophil"):
        row_maps({**row, "true_label": "basophil"}, None)


# ---------------------------------------------------------------- the study report (core.report)
def test_html_report_is_complete_and_self_contained(tiny, tmp_path):
    import re

    from core.cli import main

    explain_run(tiny, only_errors=True, limit=4)  # Grad-CAM maps the report can show beside the flips
    out = tmp_path / "report.html"
    assert main(["report", tiny.run_id, "--runs-dir", str(tiny.path.parent), "--html", str(out)]) == 0
    text = out.read_text()
    conf = tiny.table(Table.CONFUSION)
    eos = conf[(conf["true_label"] == "eosinophil") & (conf["pred_label"] == "eosinophil")]
    stats = tiny.table(Table.STATS)
    diff = stats[(stats["kind"] == "paired") & (stats["metric"] == "accuracy_diff")]["estimate"].iloc[0]
    wanted = [*CLASSES, *conf["variant"].unique(), f"<td>{int(eos['count'].iloc[0])}</td>", "Replication scorecard",
              "Provenance", "Training curves", "data:image/",
              "difference (points)", f"<td>{round(100 * diff, 1)}</td>"]  # in points, as its summary lines say
    missing = [w for w in wanted if w not in text]  # (a report is megabytes: name what is missing, not the file)
    assert not missing, missing
    markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)  # Bokeh's code mentions a CDN it never uses here
    external = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//[^"' >]*""", markup)
    assert not external, external[:3]  # nothing loads from the network
    assert "<script src" not in text and "Bokeh" in text  # Bokeh's JavaScript is inline


def test_markdown_report_and_a_folder_as_file_name(tiny, tmp_path, capsys):
    from core.cli import main

    assert main(["report", tiny.run_id, "--runs-dir", str(tiny.path.parent), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("# ") and "## Per-class metrics" in md and "| class |" in md
    assert "Leakage check of the validation split: " in md and "validation images" in md  # core.groups.leakage_words
    assert main(["report", tiny.run_id, "--runs-dir", str(tiny.path.parent), "--html", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_stored_markdown_link_stays_text_in_the_markdown_report():
    from core.report import _md

    assert _md("[x](javascript:alert(1)) a\\b <i>") == "\\[x\\](javascript:alert(1)) a\\\\b &lt;i&gt;"


# ---------------------------------------------------------------- what super-resolution changed (core.srchange)
def test_hf_gain_is_zero_for_bicubic_and_signed_for_sharper_or_smoother(tmp_path):
    from PIL import Image, ImageFilter

    from core.srchange import hf_gain

    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
    src.save(tmp_path / "src.png")
    box = (4, 4, 36, 36)
    bic = src.crop(box).resize((128, 128), Image.Resampling.BICUBIC)
    bic.save(tmp_path / "bic.png")
    noisy = np.clip(np.asarray(bic, np.int16) + rng.integers(-20, 20, (128, 128, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "sharp.png")
    bic.filter(ImageFilter.GaussianBlur(2)).save(tmp_path / "smooth.png")
    assert hf_gain(str(tmp_path / "src.png"), box, str(tmp_path / "bic.png")) == pytest.approx(0.0, abs=1e-6)
    assert hf_gain(str(tmp_path / "src.png"), box, str(tmp_path / "sharp.png")) > 0.5
    assert hf_gain(str(tmp_path / "src.png"), box, str(tmp_path / "smooth.png")) < -0.5
    assert hf_gain(str(tmp_path / "src.png"), box, str(tmp_path / "missing.png")) is None


def test_sr_change_of_a_run_and_the_flip_test(tiny, capsys):
    import pandas as pd

    from core.cli import main
    from core.srchange import flip_groups, flip_test

    assert main(["explain", tiny.run_id, "--runs-dir", str(tiny.path.parent), "--sr-change"]) == 0
    change = tiny.table(Table.SR_CHANGE)
    assert set(change["variant"]) == {"bicubic-x4"} and change["hf_gain"].abs().max() < 0.5  # bicubic is bicubic
    groups = flip_groups(tiny.table(Table.PREDICTIONS), change, "original", "bicubic-x4")
    assert set(groups["flip"]) <= {"unchanged", "right -> wrong", "wrong -> right"} and len(groups) > 0
    made = pd.DataFrame({"flip": ["unchanged"] * 20 + ["wrong -> right"] * 6,
                         "hf_gain": list(np.linspace(0, 1, 20)) + [3.0] * 6})
    p, words = flip_test(made)
    assert p < 0.01 and "more added fine detail" in words
    assert flip_test(made.head(21))[0] is None  # one flip: shown, not tested


def test_eos_neu_page_shows_what_super_resolution_changed(tiny, monkeypatch):
    import panel as pn

    monkeypatch.setenv("WBC_DATA_ROOTS", tiny.read_meta()["data"]["root"])  # the dashboard may read the images

    from dashboard.app import _extensions
    from dashboard.pages.eos_neu import EosNeuPage
    from dashboard.state import AppState

    _extensions()  # HoloViews' Bokeh backend, as the app loads it
    state = AppState(runs_dir=str(tiny.path.parent), run_id=tiny.run_id, page="EOS/NEU")
    page = EosNeuPage(state)
    page.only_eos_neu = False
    view = page.__panel__()
    text = " ".join(str(m.object) for m in view.select(pn.pane.Markdown))
    assert "What super-resolution changed" in text and "bicubic-x4" in text
    assert any("wbc-sr-test" in m.css_classes for m in view.select(pn.pane.Markdown))


def test_a_flip_card_click_shows_its_grad_cam(tiny, monkeypatch):
    import panel as pn

    monkeypatch.setenv("WBC_DATA_ROOTS", tiny.read_meta()["data"]["root"])

    from dashboard.gallery import Gallery
    from dashboard.pages.eos_neu import EosNeuPage
    from dashboard.state import AppState

    page = EosNeuPage(AppState(runs_dir=str(tiny.path.parent), run_id=tiny.run_id))
    g = tiny.table(Table.PREDICTIONS).query("variant == 'original'").head(2)
    gallery = Gallery(items=[{"title": "a"}, {"title": "b"}])
    why = page.why_on_click(gallery, g)
    gallery.selected = 1
    [html] = [p for p in why.select(pn.pane.HTML) if "wbc-why" in p.css_classes]
    pred = tiny.table(Table.PREDICTIONS)
    mine = pred[(pred["image_id"] == g.iloc[1]["image_id"]) & (pred["seed"] == g.iloc[1]["seed"])]
    assert html.object.count("<img src='data:image/png;base64,") == sum(1 if c else 2 for c in mine["correct"])


def test_a_large_test_set_is_measured_on_a_button_off_the_ui_thread(tiny, tmp_path, monkeypatch):
    """Above SR_CHANGE_ON_DEMAND enhanced test images the EOS/NEU page does not measure as it draws (minutes for a
    Kaggle TEST): it offers a button, measures off the UI thread with progress, once however many clicks or
    sessions ask, keeps the result in memory (writes nothing), and redraws the section with the measure; images
    outside the data roots are not opened, and the page says how many were left out."""
    import asyncio
    import concurrent.futures
    import shutil
    import threading

    import panel as pn

    import core.srchange
    import dashboard.data as data
    from dashboard.app import _extensions
    from dashboard.pages.eos_neu import EosNeuPage
    from dashboard.state import AppState

    run_dir = tmp_path / "runs" / tiny.run_id
    shutil.copytree(tiny.path, run_dir, ignore=shutil.ignore_patterns("sr_change*"))  # nothing stored yet
    monkeypatch.setattr(data, "SR_CHANGE_ON_DEMAND", 0)  # every test set counts as large
    monkeypatch.setenv("WBC_DATA_ROOTS", str(tmp_path / "elsewhere"))  # first: the images may not be read
    _extensions()

    def run_async(coro):  # on an event loop of its own (the suite may already run one in this thread)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, coro).result()

    def page_for():
        page = EosNeuPage(AppState(runs_dir=str(tmp_path / "runs"), run_id=tiny.run_id, page="EOS/NEU"))
        page.only_eos_neu = False
        return page, page.__panel__()

    def sr_words(view):
        return [m.object for m in view.select(pn.pane.Markdown) if {"wbc-sr-test", "wbc-sr-missing"} & set(m.css_classes)]

    pred = tiny.table(Table.PREDICTIONS)
    n = len(pred.loc[pred["enhanced_path"].notna(), ["variant", "image_id"]].drop_duplicates())  # not one per seed
    page, view = page_for()
    [button] = [b for b in view.select(pn.widgets.Button) if "wbc-sr-measure" in b.css_classes]
    assert f"Measure {n} enhanced test images here" in button.name
    assert any("not measured yet" in w for w in sr_words(view)), sr_words(view)
    run_async(page.measure_now(None))  # every image refused: nothing measured, the reason said
    assert any("may not read this run" in w for w in sr_words(view))

    data._sr_measured.clear()
    monkeypatch.setenv("WBC_DATA_ROOTS", tiny.read_meta()["data"]["root"])
    calls, real = [], core.srchange.sr_change

    def spy(run, on_progress=None, read=None, **kw):
        calls.append(threading.current_thread())
        return real(run, on_progress=on_progress, read=read, **kw)

    monkeypatch.setattr(core.srchange, "sr_change", spy)
    (page, view), (other, _) = page_for(), page_for()  # two sessions click at once

    ui = []

    async def both():
        ui.append(threading.current_thread())  # the thread of the event loop (the UI's)
        await asyncio.gather(page.measure_now(None), other.measure_now(None))

    run_async(both())
    assert len(calls) == 1 and calls[0] is not ui[0]  # measured once, off the UI thread
    assert any("wbc-sr-test" in m.css_classes for m in view.select(pn.pane.Markdown))  # the section redrawn
    assert not (run_dir / "sr_change.parquet").exists()  # kept in memory, not written
    assert not [b for b in view.select(pn.widgets.Button) if "wbc-sr-measure" in b.css_classes]
    assert not any("could not be read" in w for w in sr_words(view))  # every image measured

    # images the dashboard may not open are left out, and the section says how many
    data._sr_measured.clear()
    gone = pred.copy()
    first = gone.index[gone["enhanced_path"].notna()][0]
    gone.loc[gone["image_id"] == gone.loc[first, "image_id"], "enhanced_path"] = "/etc/passwd"
    gone.to_parquet(run_dir / "predictions.parquet")
    page, view = page_for()
    run_async(page.measure_now(None))
    assert set(pred.loc[pred["enhanced_path"].notna(), "variant"]) == {"bicubic-x4"}  # so n is that variant's
    assert any(f"Measured on {n - 1} of its {n} enhanced test images" in w for w in sr_words(view)), sr_words(view)


def test_the_report_reads_no_file_its_tables_point_outside_the_allowed_places(tmp_path):
    """The run's tables are untrusted: a flipped image's path is read only through ``read`` (the dashboard's
    checked reader of its image roots), and a Grad-CAM path only inside the run's explain/ folder: a path outside, a ``..`` escape or a
    link out is left out, never read, so no private file ends up inside a report meant for sharing."""
    import pandas as pd
    from PIL import Image

    from core.fsio import read_within
    from core.regions import BOX_COLUMNS
    from core.report import _flip_images

    run_dir, outside = tmp_path / "runs" / "r1", tmp_path / "private"
    cams_dir, outside_dir = run_dir / "explain" / "bicubic-x4-s0-32", outside
    cams_dir.mkdir(parents=True), outside_dir.mkdir()
    cell, secret_img = tmp_path / "data" / "cell.png", outside / "scan.png"
    cell.parent.mkdir()
    Image.new("RGB", (40, 30), (200, 50, 90)).save(cell)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(secret_img)
    inside_png, secret = cams_dir / "a.png", outside / "id_rsa"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(inside_png)
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    os.symlink(secret, cams_dir / "link.png")
    cam_paths = {"ok": inside_png, "abs": secret, "dotdot": cams_dir / ".." / ".." / ".." / "private" / "id_rsa",
                 "link": cams_dir / "link.png", "missing": cams_dir / "gone.png"}
    rows = [{"image_id": f"TEST/EOSINOPHIL/{k}.jpeg", "true_label": "eosinophil", "pred_label_base": "eosinophil",
             "pred_label_other": "neutrophil", "path": str(cell if k == "ok" else secret_img),
             **dict.fromkeys(BOX_COLUMNS, float("nan"))} for k in cam_paths]
    cams = pd.DataFrame([{"image_id": r["image_id"], "variant": "bicubic-x4", "role": "pred", "cam_path": str(p)}
                         for r, p in zip(rows, cam_paths.values())])
    only_data = lambda p: read_within(p, [(tmp_path / "data").resolve()])  # noqa: E731 - the dashboard's, in small

    shown = _flip_images(pd.DataFrame(rows), "bicubic-x4", cams, run_dir / "explain", read=only_data)
    pngs = [b for b, mime, _ in shown if mime == "image/png"]
    jpegs = [b for b, mime, _ in shown if mime == "image/jpeg"]
    assert pngs == [inside_png.read_bytes()]  # the one Grad-CAM inside explain/; none of the four ways out
    assert len(jpegs) == 1 and not any(b"OPENSSH" in b for b, _, _ in shown)  # the cell, not the private scan
    opened = _flip_images(pd.DataFrame(rows), "bicubic-x4", cams, run_dir / "explain")  # read=None: wbc report
    assert len([1 for _, m, _ in opened if m == "image/jpeg"]) == len(rows)  # every image the run names
    assert [b for b, m, _ in opened if m == "image/png"] == pngs  # Grad-CAM still only from explain/
    # wbc report reads any image its run names, but only regular files of sane size: a device or FIFO named by a
    # hand-made table is left out at once (/dev/zero had been read until memory ran out; a FIFO hung the report)
    os.mkfifo(tmp_path / "data" / "pipe.jpeg")
    odd = pd.DataFrame([{**rows[0], "path": p} for p in ("/dev/zero", str(tmp_path / "data" / "pipe.jpeg"))])
    assert [m for _, m, _ in _flip_images(odd, "bicubic-x4", cams.head(0), run_dir / "explain")] == []
    # an explain/ that is a link makes no other folder the run's own: its Grad-CAM images are left out
    linked = tmp_path / "runs" / "r2"
    linked.mkdir()
    (linked / "explain").symlink_to(outside)
    planted = cams.assign(cam_path=str(linked / "explain" / "id_rsa"))
    assert not [1 for _, m, _ in _flip_images(pd.DataFrame(rows), "bicubic-x4", planted, linked / "explain")
                if m == "image/png"]

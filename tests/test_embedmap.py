"""The embedding map (core.embedmap): layout, cache, the wide frame the Map page plots, and runs without features."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from core import embedmap
from core.store import Run, Table
from fixtures_store import make_fixture_store

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_fixture_store(tmp_path_factory.mktemp("map"), n_runs=1, n_test=60, with_images=False)


@pytest.mark.parametrize("method", embedmap.METHODS)
def test_layout_keeps_clusters_apart(method):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    feats = rng.normal(0, 6, (4, 64))[labels] + rng.normal(0, 1, (160, 64))
    xy = embedmap.layout(feats, method)
    assert xy.shape == (160, 2) and np.isfinite(xy).all()
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.95  # each point's nearest neighbour is of its cluster


def test_map_is_computed_once_then_read_from_the_run(store, monkeypatch):
    run = Run(store["runs_dir"] / store["run_ids"][0])
    df = embedmap.embedding_map(run)
    assert set(df["variant"]) == {"original", "realesrgan-x4plus"} and len(df) == 2 * 60
    assert {"x", "y", "true_label", "pred_label", "correct", "path"} <= set(df.columns) and df["x"].notna().all()
    assert len(run.table(Table.EMBEDDING_MAP)) == 2 * 60
    monkeypatch.setattr(embedmap, "layout", lambda *a, **k: pytest.fail("laid out again"))
    again = embedmap.embedding_map(run)
    assert np.allclose(again.sort_values(["variant", "image_id"])["x"], df.sort_values(["variant", "image_id"])["x"])


def test_wide_has_each_variants_coordinates_and_verdict(store):
    df = embedmap.embedding_map(Run(store["runs_dir"] / store["run_ids"][0]))
    w = embedmap.wide(df)
    assert len(w) == 60 and w["image_id"].is_unique
    for i, v in enumerate(["original", "realesrgan-x4plus"]):
        part = df[df["variant"] == v].set_index("image_id").loc[w["image_id"]]
        assert np.allclose(w[f"x_{i}"], part["x"]) and (w[f"correct_{i}"].to_numpy() == part["correct"].to_numpy()).all()


def test_a_run_without_features_says_why(tmp_path):
    shutil.copytree(FIXTURES / "store-v1", tmp_path / "runs")
    run = Run(next(p for p in (tmp_path / "runs").iterdir() if p.is_dir()))
    with pytest.raises(embedmap.NoEmbeddings, match="no stored features"):
        embedmap.embedding_map(run)


def test_cli_lays_out_the_map_or_says_why_not(store, tmp_path, capsys):
    from core.cli import main

    assert main(["explain", store["run_ids"][0], "--runs-dir", str(store["runs_dir"]), "--map"]) == 0
    assert "map of 60 test images x 2 variant(s)" in capsys.readouterr().out
    shutil.copytree(FIXTURES / "store-v1", tmp_path / "runs")
    rid = next(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert main(["explain", rid, "--runs-dir", str(tmp_path / "runs"), "--map"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no stored features" in err[0]


def test_each_seed_and_size_has_its_own_map(tmp_path):
    from dashboard.data import embedding_map_frame, map_models

    info = make_fixture_store(tmp_path, n_runs=1, n_test=40, seeds=(0, 1), with_images=False)
    rd = info["runs_dir"] / info["run_ids"][0]
    assert map_models(rd) == {"seed 0, 224 px": "0/224", "seed 1, 224 px": "1/224"}
    w0, variants = embedding_map_frame(rd, "pca", 0, 224)
    w1, _ = embedding_map_frame(rd, "pca", 1, 224)
    assert variants == ["original", "realesrgan-x4plus"] and set(w0["seed"]) == {0} and set(w1["seed"]) == {1}
    assert not np.allclose(w0.sort_values("image_id")["x_0"], w1.sort_values("image_id")["x_0"])
    with pytest.raises(embedmap.NoEmbeddings, match="seed 7"):
        embedmap.embedding_map(Run(rd), seed=7)


def test_a_damaged_map_cache_is_laid_out_again_and_bad_features_are_named(tmp_path):
    info = make_fixture_store(tmp_path, n_runs=1, n_test=30, with_images=False)
    run = Run(info["runs_dir"] / info["run_ids"][0])
    (run.path / "embedding_map.parquet").write_bytes(b"not parquet")
    assert len(embedmap.embedding_map(run, method="pca")) == 60  # rebuilt from the features
    assert len(run.table(Table.EMBEDDING_MAP)) == 60
    emb = run.table(Table.EMBEDDINGS)
    emb.loc[0, "feature"] = np.full(16, np.nan, np.float32)
    run.write_table(Table.EMBEDDINGS, emb)
    (run.path / "embedding_map.parquet").unlink()
    with pytest.raises(embedmap.NoEmbeddings, match="embeddings.parquet, original seed 0 224 px: .*not finite"):
        embedmap.embedding_map(run)


def test_map_mode_refuses_grad_cam_options(store, capsys):
    from core.cli import main

    for extra in (["--variant", "original"], ["--limit", "3"], ["--only-errors"], ["--sr-change"]):
        assert main(["explain", store["run_ids"][0], "--runs-dir", str(store["runs_dir"]), "--map", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0], err


def test_a_big_map_selection_shows_every_class_in_it():
    """654 images selected, 59 EOS first then 595 NEU: the 48 cards are taken in turn from each class (the first 48
    rows were all EOS), and the summary says how they were picked."""
    import pandas as pd

    from dashboard.pages.embedmap import MAX_CARDS, card_rows, selection_summary

    rows = pd.DataFrame({"true_label": ["eosinophil"] * 59 + ["neutrophil"] * 595, "image_id": range(654),
                         "correct_0": [True] * 654, "pred_0": ["eosinophil"] * 59 + ["neutrophil"] * 595})
    cards = card_rows(rows, ["original"])
    assert len(cards) == MAX_CARDS and (cards["true_label"] == "eosinophil").sum() == MAX_CARDS // 2
    assert list(cards["image_id"][:4]) == [0, 59, 1, 60]  # in turn, each class in its own order
    assert f"{MAX_CARDS} shown, taken in turn from each class" in selection_summary(rows, ["original"])
    small = rows.iloc[:10]
    assert list(card_rows(small, ["original"])["image_id"]) == list(range(10))


def test_map_says_it_shows_the_main_run_only_when_comparing():
    """Errors and EOS/NEU say so in compare mode; the Map page too, with both run ids escaped."""
    from dashboard.pages.embedmap import MapPage

    note = MapPage.main_only_note("run<b>", "other`x`").object
    assert "main run <code>run&lt;b&gt;</code> only" in note and "<code>other&#96;x&#96;</code>" in note
    assert MapPage.main_only_note("run", None).object == "" and MapPage.main_only_note(None, "x").object == ""


def test_the_map_lasso_selects_once_on_release_and_the_lasso_is_the_drag_tool():
    """Bokeh's lasso sends each mouse move to the server by default; the map's selects on release, so the gallery is
    built once per selection (a browser test read a half-drawn selection's count before this)."""
    from bokeh.models import BoxSelectTool, ColumnDataSource, LassoSelectTool

    from dashboard.pages.embedmap import MapPage

    source = ColumnDataSource({"x_0": [0.0, 1.0], "y_0": [0.0, 1.0], "color": ["red", "blue"], "marker_0": ["circle"] * 2,
                               "size_0": [6, 6], "image_id": ["a", "b"], "true_label": ["x", "y"], "pred_0": ["x", "x"]})
    f = MapPage.panel_figure(source, 0, "original")
    lassos = [t for t in f.tools if isinstance(t, LassoSelectTool)]
    assert len(lassos) == 1 and lassos[0].continuous is False
    assert f.toolbar.active_drag is lassos[0]
    assert any(isinstance(t, BoxSelectTool) for t in f.tools)

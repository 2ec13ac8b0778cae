"""The classifier recipe: input policies, per-image augmentation, TTA, checkpoint choice, validation table,
replication scorecard, seed-averaged intervals and the held-out fallback."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from core import make_config, run_study
from core.config import CLASSES
from core.engine import TrainSettings, augment_batch, dihedral_view, fit, hed_jitter, macro_f1, predict
from core.models import ClassifierSpec, with_spec
from core.enhance import create_enhancer
from core.enhance.cache import enhance_to_cache, load_rgb
from core.regions import BOX_COLUMNS, CELL_CROP, FALLBACK_NOTE, MARGIN, add_regions, find_cell, region_of
from core.scorecard import PAPER_VAL_ACCURACY, scorecard, scorecard_text
from core.stats import _boot_weights, _group_index, compute_stats
from tests.gen_data import make_dataset

TINY = dict(classifier="simple_cnn", pretrained="none", image_sizes=(32,), epochs=2, batch_size=8,
            variants=("original", "bicubic-x4"))


def _smear(w=320, h=240, nucleus=(250, 60), r=18, seed=0) -> np.ndarray:
    """A pink smear with red cells and one violet nucleus centred at ``nucleus`` (None: no white cell)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(np.clip(rng.normal(225, 6, (h, w, 3)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rng.integers(0, w), rng.integers(0, h)
        d.ellipse([x - 20, y - 20, x + 20, y + 20], fill=(215, 160, 165))
    if nucleus:
        cx, cy = nucleus
        d.ellipse([cx - 2 * r, cy - 2 * r, cx + 2 * r, cy + 2 * r], fill=(200, 180, 215))  # cytoplasm
        for ox, oy in ((-r // 2, 0), (r // 2, r // 3)):  # two lobes
            d.ellipse([cx + ox - r // 2 - 4, cy + oy - r // 2 - 4, cx + ox + r // 2 + 4, cy + oy + r // 2 + 4],
                      fill=(105, 60, 190))
    return np.asarray(im)


# ---------------------------------------------------------------- input policy


def test_cell_policy_finds_an_off_centre_nucleus():
    rgb = _smear(nucleus=(250, 60))
    cx, cy = find_cell(rgb)
    assert abs(cx - 250) < 8 and abs(cy - 64) < 10
    box = region_of(rgb, "cell").box
    side = round(CELL_CROP * MARGIN)
    assert box[2] - box[0] == side == box[3] - box[1]
    assert box[0] <= 250 <= box[2] and box[1] <= 60 <= box[3]  # the cell is inside, far from the centre
    assert 0 <= box[0] and box[2] <= 320 and 0 <= box[1] and box[3] <= 240  # shifted inside, not cut


def test_cell_policy_falls_back_to_centre_and_notes_it(tmp_path):
    blank, cell = tmp_path / "blank.png", tmp_path / "cell.png"
    Image.fromarray(_smear(nucleus=None)).save(blank)
    Image.fromarray(_smear(nucleus=(100, 120))).save(cell)
    df = add_regions(pd.DataFrame({"path": [str(blank), str(cell)]}), "cell")
    assert list(df["region_note"]) == [FALLBACK_NOTE, ""]
    b = [int(df.loc[0, c]) for c in BOX_COLUMNS]
    assert (b[0] + b[2]) / 2 == pytest.approx(160, abs=1) and (b[1] + b[3]) / 2 == pytest.approx(120, abs=1)
    full = add_regions(pd.DataFrame({"path": [str(cell)]}), "full")
    assert [int(full.loc[0, c]) for c in BOX_COLUMNS] == [0, 0, 320, 240]


def test_unknown_policy_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="--input-policy: unknown policy 'nucleus'"):
        make_config("quick", input_policy="nucleus").validate()
    r = subprocess.run([sys.executable, "-m", "core", "study", "--input-policy", "nucleus", "--data", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "unknown policy 'nucleus'" in r.stderr


def test_region_enhancement_is_the_box_at_4x(tmp_path):
    """Only the region (plus context) is enhanced; inside the box the pixels equal a full-image enhancement."""
    src = tmp_path / "a.png"
    Image.fromarray(_smear(nucleus=(250, 60))).save(src)
    enh = create_enhancer("bicubic-x4")
    box = (150, 20, 310, 180)
    part = enhance_to_cache([(str(src), "a" * 40, box)], enh, tmp_path / "cache")
    whole = enhance_to_cache([(str(src), "a" * 40)], enh, tmp_path / "cache")
    p, w = part.paths["a" * 40], whole.paths["a" * 40]
    assert p != w  # the box is part of the cache key
    crop, full = load_rgb(p), load_rgb(w)
    assert crop.shape == (640, 640, 3)
    inner = full[20 * 4:180 * 4, 150 * 4:310 * 4].astype(int)
    diff = np.abs(crop.astype(int) - inner)
    assert diff[16:-16, 16:-16].max() <= 1  # away from the image border the region is exact


# ---------------------------------------------------------------- the recipe


def test_per_image_augmentation_gives_each_image_its_own_transform():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 3, 1, 1)
    out = augment_batch(x, 4, torch.Generator().manual_seed(0), jitter=False)
    views = {tuple(o[0].flatten().tolist()) for o in out}
    assert len(views) == 8  # 64 identical images -> all 8 dihedral views occur in one batch
    jit = augment_batch(x * 10, 3, torch.Generator().manual_seed(0), jitter=True)
    assert jit.shape == (64, 3, 3, 3) and 0 <= float(jit.min()) and float(jit.max()) <= 255


def test_zoom_only_augmentation_is_the_jitter_without_its_colour_change():
    """augment=dihedral+zoom: the same dihedral view, zoom and shift as dihedral+jitter, and no gain or offset."""
    from core.engine import TrainSettings, _prepare

    g = torch.Generator().manual_seed(5)
    x = 40 + torch.rand(8, 3, 24, 24, generator=g) * 170  # away from 0 and 255, so no clamp hides a gain
    zoom = augment_batch(x, 20, torch.Generator().manual_seed(0), jitter=True, colour=False)
    full = augment_batch(x, 20, torch.Generator().manual_seed(0), jitter=True)
    assert not torch.allclose(zoom, full)
    for i in range(8):  # full == gain * zoom + offset per image and channel: same geometry, colour apart
        for c in range(3):
            a = torch.stack([zoom[i, c].flatten(), torch.ones(400)], 1)
            coef = torch.linalg.lstsq(a, full[i, c].flatten()[:, None]).solution
            assert 0.9 - 1e-4 <= float(coef[0]) <= 1.1 + 1e-4 and abs(float(coef[1])) <= 12 + 1e-3
            torch.testing.assert_close(a @ coef, full[i, c].flatten()[:, None], atol=1e-3, rtol=0)
    grey = torch.full((4, 3, 24, 24), 128.0)  # a flat image keeps its colour exactly, whatever the geometry
    out = _prepare(grey.to(torch.uint8), TrainSettings(augment="dihedral+zoom", view=20), torch.device("cpu"),
                   torch.Generator().manual_seed(1), train=True)
    assert out.shape == (4, 3, 20, 20) and float((out - 128).abs().max()) < 1e-3
    jit = _prepare(grey.to(torch.uint8), TrainSettings(augment="dihedral+jitter", view=20), torch.device("cpu"),
                   torch.Generator().manual_seed(1), train=True)
    assert float((jit - 128).abs().max()) > 1  # the stain jitter does change it
    u8 = x.to(torch.uint8)  # and the training path routes the option to exactly this: zoom and shift, no colour
    routed = _prepare(u8, TrainSettings(augment="dihedral+zoom", view=20), torch.device("cpu"),
                      torch.Generator().manual_seed(1), train=True)
    torch.testing.assert_close(routed, augment_batch(u8.float(), 20, torch.Generator().manual_seed(1), jitter=True,
                                                     colour=False))
    plain = _prepare(u8, TrainSettings(augment="dihedral", view=20), torch.device("cpu"),
                     torch.Generator().manual_seed(1), train=True)
    assert not torch.allclose(routed, plain)
    make_config("quick", augment="dihedral+zoom").validate()


def test_stain_jitter_in_hed_space_changes_stain_amounts_and_nothing_else():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 10, 10), generator=g).float()
    ones, zeros = torch.ones(6, 3), torch.zeros(6, 3)
    torch.testing.assert_close(hed_jitter(x, ones, zeros), x, atol=1e-3, rtol=0)  # the round trip is exact
    pink = torch.tensor([200.0, 120.0, 180.0]).view(1, 3, 1, 1).repeat(6, 1, 4, 4)  # a stained pixel
    more_eosin = hed_jitter(pink, torch.tensor([[1.0, 1.5, 1.0]]).repeat(6, 1), zeros) - pink
    assert float(more_eosin[:, 1].mean()) < -10  # eosin absorbs green: more of it darkens green most
    # ... and the optical density added is along eosin's vector (0.07, 0.99, 0.11), not another row or column
    od = lambda t: -torch.log((t + 1) / 256)  # noqa: E731
    added = (od(pink + more_eosin) - od(pink))[0, :, 0, 0]
    torch.testing.assert_close(added / added[1], torch.tensor([0.07, 0.99, 0.11]) / 0.99, atol=1e-3, rtol=0)
    # The plain jitter draws what it drew before the stain jitter existed, and the stain jitter is applied on top
    # of it with the two draws that follow (so it changes only colour)
    a = augment_batch(x, 8, torch.Generator().manual_seed(0), jitter=True)
    b = augment_batch(x, 8, torch.Generator().manual_seed(0), jitter=True, hed=True)
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 8, (6,), generator=g)  # replay the draws before the stain jitter's: dihedral view, ...
    for shape in ((6,), (6, 2), (6, 3, 1, 1), (6, 3, 1, 1)):  # ... zoom, shift, gain, offset
        torch.rand(*shape, generator=g)
    scale = 1 + (torch.rand(6, 3, generator=g) * 2 - 1) * 0.2
    shift = (torch.rand(6, 3, generator=g) * 2 - 1) * 0.05
    torch.testing.assert_close(b, hed_jitter(a, scale, shift), atol=1e-3, rtol=0)
    rows = torch.tensor([1, 4])  # a rank holding 2 of the 6 images augments them as one process does
    part = augment_batch(x[rows], 8, torch.Generator().manual_seed(0), jitter=True, rows=rows, n_global=6, hed=True)
    torch.testing.assert_close(part, b[rows])
    with pytest.raises(ValueError, match="unknown augmentation"):
        make_config("quick", augment="dihedral+hed").validate()
    make_config("quick", augment="dihedral+jitter+hed").validate()


def test_tta_averages_the_eight_dihedral_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 4))
    x = torch.randint(0, 255, (5, 3, 12, 12), dtype=torch.uint8)
    with_spec(model, ClassifierSpec("toy", None, "a toy", mean=(0.5,) * 3, std=(0.5,) * 3, head="3"))
    tta = predict(model, x, torch.device("cpu"), tta=8)
    each = np.mean([predict(model, dihedral_view(x, k), torch.device("cpu")) for k in range(8)], 0)
    np.testing.assert_allclose(tta, each, rtol=1e-5, atol=1e-6)
    assert not np.allclose(tta, predict(model, x, torch.device("cpu")))


def test_best_checkpoint_is_chosen_by_validation_macro_f1():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 12)
    x = torch.from_numpy(rng.integers(0, 255, (48, 3, 16, 16)).astype(np.uint8))
    x[:, 0] = torch.from_numpy((y * 60)[:, None, None].repeat(16, 1).repeat(16, 2).astype(np.uint8))
    from core.models import SimpleCNN, get_classifier_spec

    torch.manual_seed(0)
    model = with_spec(SimpleCNN(4, width=8), get_classifier_spec("simple_cnn"))
    res = fit(model, (x, y), (x, y), TrainSettings(epochs=4, batch_size=8, lr=3e-3, patience=9, label_smoothing=0.1), torch.device("cpu"))
    h = pd.DataFrame(res["history"])
    best = h.sort_values(["val_macro_f1", "val_loss"], ascending=[False, True]).iloc[0]
    assert res["best_epoch"] == best["epoch"] and res["best_val_acc"] == best["val_acc"]
    from sklearn.metrics import f1_score

    yt, yp = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    assert macro_f1(yt, yp, 4) == pytest.approx(f1_score(yt, yp, average="macro"))


# ---------------------------------------------------------------- through run(): default grouped split


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=12, test_per_class=4)


def _source_cells(df, **_):
    """The generated images' true source cells (``_K_N``: cell K of its class). core.groups is tuned on real
    cells and sees one group per class in these drawings, so the split logic is tested on the truth."""
    return np.array([f"{lab}-{Path(p).name.split('_')[1]}" for lab, p in zip(df["label"], df["path"])])


@pytest.fixture(scope="module")
def grouped_run(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    cfg = make_config(None, data_dir=str(data_dir), runs_dir=str(root / "runs"), cache_dir=str(root / "cache"),
                      seeds=(0, 1), **TINY)
    assert cfg.split == "grouped" and cfg.input_policy == "cell" and cfg.tta == 8
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("core.groups.assign_groups", _source_cells)
        return run_study(cfg), cfg


def test_run_stores_validation_accuracy_of_the_restored_epoch(grouped_run):
    run, cfg = grouped_run
    val, hist = run.table("validation"), run.table("history")
    assert len(val) == 4 and set(val["split"]) == {"grouped"} and not val["leaky"].any()
    assert (val["n_val"] > 0).all()
    assert val["val_groups_disjoint"].all()
    for r in val.itertuples():
        h = hist[(hist["variant"] == r.variant) & (hist["seed"] == r.seed) & (hist["epoch"] == r.best_epoch)]
        assert r.val_accuracy == pytest.approx(float(h["val_acc"].iloc[0]))
        assert r.val_macro_f1 == pytest.approx(float(h["val_macro_f1"].iloc[0]))
    pred = run.table("predictions")
    assert pred[list(BOX_COLUMNS)].notna().all().all()
    # the generated eosinophils are red, not violet: no nucleus is found and each such image says so
    notes = pred.groupby("true_label")["region_note"].agg(set)
    assert notes["eosinophil"] == {FALLBACK_NOTE} and notes["lymphocyte"] == {""}
    assert run.read_meta()["config"]["input_policy"] == "cell"


def test_scorecard_rows_beside_the_paper(grouped_run):
    run, cfg = grouped_run
    card = scorecard(run.table("validation"), run.table("stats"), "TEST_SIMPLE")
    assert list(card["variant"]) == ["original", "bicubic-x4"]
    orig = card.iloc[0]
    assert orig["paper_val_accuracy"] == PAPER_VAL_ACCURACY["original"] == 0.92
    assert card.iloc[1]["paper_val_accuracy"] is None or pd.isna(card.iloc[1]["paper_val_accuracy"])
    assert orig["seeds"] == 2 and orig["val_split"] == "grouped" and not orig["val_leaky"]
    assert orig["val_accuracy"] == pytest.approx(run.table("validation").query("variant == 'original'")
                                                 ["val_accuracy"].mean())
    assert orig["test_ci_low"] <= orig["test_accuracy"] <= orig["test_ci_high"]
    text = scorecard_text(card)
    assert "paper validation 0.92" in text and "mean of 2 seeds" in text and "leaky" not in text
    assert "bicubic-x4 (32 px, mean of 2 seeds): paper validation - |" in text and "nan" not in text
    leaky = scorecard_text(card.assign(val_split="random", val_leaky=True))
    assert "leaky" in leaky


def test_scorecard_says_no_ci_only_where_the_accuracy_comes_from_predictions():
    val = pd.DataFrame({"variant": ["original"], "image_size": [128], "seed": [0], "split": ["grouped"],
                        "leaky": [False], "n_val": [10], "val_accuracy": [0.8]})
    # a stored model whose CI is missing (older multi-seed runs): its accuracy, no "stopped" words
    stats = pd.DataFrame({"kind": ["ci"], "metric": ["accuracy"], "variant": ["original"], "baseline": [None],
                          "image_size": [128], "seed": [0], "estimate": [0.9], "ci_low": [np.nan],
                          "ci_high": [np.nan], "sd": [np.nan], "p_value": [np.nan], "n": [10]})
    card = scorecard(val, stats, "TEST_SIMPLE")
    assert card["test_from"].tolist() == ["stats"] and card["test_accuracy"].tolist() == [0.9]
    assert "no CI" not in scorecard_text(card)
    # a run stopped before its statistics: the seed mean of the predictions' accuracy (0.5 and 1.0)
    pred = pd.DataFrame({"variant": ["original"] * 4, "image_size": [128] * 4, "seed": [0, 0, 1, 1],
                         "correct": [True, False, True, True]})
    card = scorecard(val, stats.iloc[:0], "TEST_SIMPLE", pred)
    assert card["test_from"].tolist() == ["predictions"] and card["test_accuracy"].tolist() == [0.75]
    assert "0.750 (no CI: the run stopped before its statistics)" in scorecard_text(card)
    assert "test: mean of" not in scorecard_text(card)  # more seeds in the predictions than validation: no words
    # validation and predictions for the same 2 seeds: nothing to add; stopped after seed 0's predictions but
    # with both seeds' validation: say that the test mean is of 1 seed of 2
    val2 = pd.concat([val, val.assign(seed=1, val_accuracy=0.6)])
    assert "test: mean of" not in scorecard_text(scorecard(val2, stats.iloc[:0], "TEST_SIMPLE", pred))
    card = scorecard(val2, stats.iloc[:0], "TEST_SIMPLE", pred[pred["seed"] == 0])
    assert card["test_accuracy"].tolist() == [0.5] and card["val_accuracy"].tolist() == [0.7]
    assert "0.500 (no CI: the run stopped before its statistics) (test: mean of 1 of 2 seeds)" in scorecard_text(card)
    assert scorecard(val, stats.iloc[:0], "TEST_SIMPLE")["test_accuracy"].isna().all()  # no predictions either


def test_seed_averaged_ci_is_computed_not_averaged(grouped_run):
    run, _ = grouped_run
    stats = run.table("stats")
    seeds = stats[(stats["kind"] == "seeds") & (stats["metric"] == "accuracy") & (stats["variant"] == "original")]
    assert len(seeds) == 1
    r = seeds.iloc[0]
    assert r["ci_low"] <= r["estimate"] <= r["ci_high"]
    diff = stats[(stats["kind"] == "seeds") & (stats["metric"] == "accuracy_diff")].iloc[0]
    assert np.isfinite(diff["ci_low"]) and diff["ci_low"] <= diff["estimate"] <= diff["ci_high"]


def test_seed_averaged_ci_matches_a_direct_bootstrap():
    """2 seeds x 30 images in 10 groups: the stored CI equals a hand-written cluster bootstrap of the seed mean."""
    rng = np.random.default_rng(3)
    n, groups = 30, np.repeat(np.arange(10), 3)
    true = rng.choice(CLASSES, n)
    rows = []
    for variant in ("original", "enh"):
        for seed in (0, 1):
            wrong = rng.random(n) < (0.3 if variant == "original" else 0.2)
            pred = np.where(wrong, np.roll(true, 1), true)
            rows.append(pd.DataFrame({"variant": variant, "seed": seed, "image_size": 64,
                                      "image_id": [f"i{k}" for k in range(n)], "true_label": true,
                                      "pred_label": pred, "group_id": groups.astype(str)}))
    p = pd.concat(rows, ignore_index=True)
    stats = compute_stats(p, n_boot=500, seed=7)
    w = _boot_weights(10, 500, 7)  # the resample compute_stats draws (same counts of each group)
    gidx, _, _ = _group_index(p[p["seed"] == 0]["group_id"].iloc[:n], p["image_id"].iloc[:n])

    def acc(variant, seed):
        ok = p[(p["variant"] == variant) & (p["seed"] == seed)]["true_label"].to_numpy() == \
             p[(p["variant"] == variant) & (p["seed"] == seed)]["pred_label"].to_numpy()
        per_group_ok, per_group_n = np.bincount(gidx, ok, 10), np.bincount(gidx, minlength=10)
        return (w @ per_group_ok) / (w @ per_group_n)

    direct = (acc("original", 0) + acc("original", 1)) / 2
    row = stats[(stats["kind"] == "seeds") & (stats["variant"] == "original") & (stats["metric"] == "accuracy")].iloc[0]
    assert row["ci_low"] == pytest.approx(np.percentile(direct, 2.5), abs=1e-6)
    assert row["ci_high"] == pytest.approx(np.percentile(direct, 97.5), abs=1e-6)
    d = (acc("enh", 0) + acc("enh", 1)) / 2 - direct
    drow = stats[(stats["kind"] == "seeds") & (stats["metric"] == "accuracy_diff")].iloc[0]
    assert drow["ci_low"] == pytest.approx(np.percentile(d, 2.5), abs=1e-6)
    per_seed = stats[(stats["kind"] == "ci") & (stats["variant"] == "original") & (stats["metric"] == "accuracy")]
    assert row["ci_low"] != pytest.approx(per_seed["ci_low"].mean(), abs=1e-9)  # not an average of bounds


def test_cli_report_prints_the_scorecard(grouped_run):
    run, cfg = grouped_run
    r = subprocess.run([sys.executable, "-m", "core", "report", run.run_id, "--runs-dir", cfg.runs_dir],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Replication scorecard" in r.stdout and "paper validation 0.92" in r.stdout
    assert "cell region of 144 px" in r.stdout
    from core.groups import leakage_words  # the leakage check in words, not run.json's raw dict

    words = leakage_words(run.read_meta()["data"]["leakage"])
    assert words and f"validation leakage (grouped split): {words}\n" in r.stdout and '"n_leaked"' not in r.stdout


def test_a_test_set_without_a_class_is_noted(tmp_path, monkeypatch):
    """A test folder of three classes is accepted, and run.json's notes (Overview, wbc report) say which class is
    absent and what that does to the macro averages; the log has it as a warning."""
    import shutil

    monkeypatch.setattr("core.groups.assign_groups", _source_cells)
    data = make_dataset(tmp_path / "data", train_per_class=12, test_per_class=3)
    shutil.rmtree(next(p for p in (data / "TEST_SIMPLE").iterdir() if p.name.upper() == "MONOCYTE"))
    cfg = make_config(None, data_dir=str(data), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                      **{**TINY, "variants": ("original",), "epochs": 1})
    run = run_study(cfg)
    notes = run.read_meta()["notes"]
    assert run.status() == "finished" and any(n.startswith("the test set (TEST_SIMPLE) has no monocyte images")
                                              for n in notes), notes
    assert any("warning: the test set" in line for line in run.log_tail(200))


def test_held_out_fallback_is_grouped_whatever_split_says(tmp_path, monkeypatch):
    monkeypatch.setattr("core.groups.assign_groups", _source_cells)
    data = make_dataset(tmp_path / "data", train_per_class=16, test_per_class=0, splits=("TRAIN",))
    cfg = make_config(None, data_dir=str(data), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                      **{**TINY, "variants": ("original",), "split": "random", "epochs": 1})
    run = run_study(cfg)
    meta = run.read_meta()
    assert meta["data"]["test_source"] == "TRAIN held-out (20%, by source cell)"
    sp = run.table("splits")
    test_groups = set(sp[sp["role"] == "test"]["group_id"])
    pool_groups = set(sp[sp["role"] != "test"]["group_id"])
    assert test_groups and not test_groups & pool_groups
    assert run.table("validation")["split"].iloc[0] == "random"  # the validation split is still as asked


# ---------------------------------------------------------------- fit(): stopping, restoring, freezing, SGD
def _toy(n=32, seed=0):
    """Separable 16x16 images: class k has a channel-0 level of 60k."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), n // 4)
    x = torch.from_numpy(rng.integers(0, 255, (n, 3, 16, 16)).astype(np.uint8))
    x[:, 0] = torch.from_numpy((y * 60)[:, None, None].repeat(16, 1).repeat(16, 2).astype(np.uint8))
    return x, y


def _cnn(seed=0):
    from core.models import SimpleCNN, get_classifier_spec

    torch.manual_seed(seed)
    return with_spec(SimpleCNN(4, width=8), get_classifier_spec("simple_cnn"))


def test_fit_stops_early_and_restores_the_best_weights():
    x, y = _toy()
    y_wrong = (y + 1) % 4  # validation labels the training makes ever more wrong: the best epoch is the first
    model = _cnn()
    s = TrainSettings(epochs=8, batch_size=8, lr=3e-3, patience=2, select_by="val_loss", augment="none")
    res = fit(model, (x, y), (x, y_wrong), s, torch.device("cpu"))
    h = pd.DataFrame(res["history"])
    assert len(h) < s.epochs and len(h) == res["best_epoch"] + s.patience  # stopped `patience` epochs after it
    assert res["best_val_loss"] == pytest.approx(h["val_loss"].min())
    restored = model.state_dict()
    assert all(torch.equal(restored[k].cpu(), v) for k, v in res["best_state"].items())  # weights restored


def test_fit_without_validation_runs_every_epoch_and_keeps_the_last():
    """A refit (val None): no early stop, no validation figures, and the last epoch's weights are the result."""
    x, y = _toy()
    model = _cnn()
    s = TrainSettings(epochs=3, batch_size=8, lr=3e-3, patience=1, augment="none")
    res = fit(model, (x, y), None, s, torch.device("cpu"))
    h = pd.DataFrame(res["history"])
    assert list(h["epoch"]) == [1, 2, 3] and res["best_epoch"] == 3 and h["val_acc"].isna().all()
    assert all(torch.equal(model.state_dict()[k].cpu(), v) for k, v in res["best_state"].items())


def test_refit_trains_the_test_model_on_train_and_val_for_the_validated_epochs(data_dir, tmp_path, monkeypatch):
    import core.pipeline as pipeline
    from core.cli import _input_words
    from core.scorecard import REFIT_WORDS

    calls, real_fit = [], pipeline.fit

    def spy(model, train, val, s, device, on_progress=None):
        r = real_fit(model, train, val, s, device, on_progress)
        calls.append({"n": len(train[1]), "val": None if val is None else len(val[1]), "epochs": s.epochs,
                      "best": r["best_epoch"], "state": r["best_state"]})
        return r

    monkeypatch.setattr(pipeline, "fit", spy)
    monkeypatch.setattr("core.groups.assign_groups", _source_cells)
    cfg = make_config(None, data_dir=str(data_dir), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"),
                      **{**TINY, "variants": ("original",), "epochs": 3}, refit=True)
    run = run_study(cfg)
    first, refit = calls
    val = run.table("validation").iloc[0]
    assert first["val"] == val["n_val"] and first["epochs"] == 3 and val["best_epoch"] == first["best"]
    # the second fit: every training and validation image, no validation, for the validated best epoch count
    assert refit["val"] is None and refit["n"] == first["n"] + first["val"] and refit["epochs"] == first["best"]
    assert val["refit_epochs"] == first["best"]
    ckpt = torch.load(run.path / "checkpoints" / "original-s0-32.pt", weights_only=True)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in refit["state"].items())  # the tested model is kept
    card = scorecard(run.table("validation"), run.table("stats"), "TEST_SIMPLE")
    assert card["refit"].all() and REFIT_WORDS in scorecard_text(card)
    assert "refit on training + validation" in _input_words(run.read_meta()["config"])
    assert ckpt["refit_epochs"] == first["best"]
    from core.report import _scorecard

    words = next(b.text for b in _scorecard(run) if b.kind == "p")
    assert REFIT_WORDS in words  # the html/md report says it too


def test_weight_average_is_what_gets_validated_and_kept():
    """--ema: the weights validated, selected and restored are the moving average of every step's weights."""
    x, y = _toy()
    model = _cnn()
    steps = [{k: v.detach().clone() for k, v in model.state_dict().items()}]  # the start, then after each step
    s = TrainSettings(epochs=1, batch_size=8, lr=3e-3, patience=9, augment="none", ema=0.5)
    res = fit(model, (x, y), (x, y), s, torch.device("cpu"),
              on_progress=lambda *a: steps.append({k: v.detach().clone() for k, v in model.state_dict().items()}))
    assert len(steps) == 1 + 4  # 32 images in batches of 8
    avg, decay = dict(steps[0]), 1 - 1 / (0.5 * 4)
    for t, st in enumerate(steps[1:], start=1):  # the documented rule: decay ramped up over the first steps
        d = min(decay, (1 + t) / (10 + t))
        avg = {k: (v * d + st[k] * (1 - d)) if v.is_floating_point() else st[k] for k, v in avg.items()}
    kept = res["best_state"]
    assert all(torch.allclose(kept[k], avg[k], atol=1e-6) for k in avg)
    assert not torch.allclose(kept["fc.weight"], steps[-1]["fc.weight"])  # not the last step's weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())  # restored into the model
    from core.engine import Normalizer, run_epoch
    from core.models import spec_of

    spec = spec_of(model)
    va = run_epoch(model, Normalizer(spec.mean, spec.std), x, torch.as_tensor(y), s, torch.device("cpu"),
                   torch.Generator())
    assert va["acc"] == res["best_val_acc"]  # the validation figure is the average's own


def test_mixup_pairs_every_image_with_another_in_step_across_ranks():
    from core.engine import mixup_pairs

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    lam, partner = mixup_pairs(0.4, 10, g1)
    assert 0.5 <= lam <= 1.0
    assert sorted(partner.tolist()) == list(range(10)) and (partner != torch.arange(10)).all()  # a derangement
    seen, j = set(), 0
    for _ in range(10):  # one cycle through all ten: no image is mixed only with its own partner's partner
        seen.add(j)
        j = int(partner[j])
    assert len(seen) == 10
    lam_r, part_r = mixup_pairs(0.4, 10, g2, rows=torch.tensor([2, 5, 7]))  # a rank holding 3 of the 10
    assert lam_r == lam and sorted(part_r.tolist()) == [0, 1, 2] and (part_r != torch.arange(3)).all()
    assert torch.equal(g1.get_state(), g2.get_state())  # every rank's generator stays in step


def test_mixup_trains_on_mixed_images_and_labels():
    """--mixup: the training loss is lam * CE(first label) + (1 - lam) * CE(partner's label) on the mixed image."""
    from core.engine import Normalizer, mixup_pairs, run_epoch
    from core.models import spec_of

    x, y = _toy()
    model = _cnn().train()  # train-mode BatchNorm normalises by the batch: the same function below and in run_epoch
    norm = Normalizer(spec_of(model).mean, spec_of(model).std)
    yt = torch.as_tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(32, generator=g)  # what run_epoch draws first: the shuffle, then the pairs
    lam, partner = mixup_pairs(0.4, 32, g)
    xb = norm(x[perm].float())
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        logits = model(lam * xb + (1 - lam) * xb[partner])
        want = lam * ce(logits, yt[perm], reduction="sum") + (1 - lam) * ce(logits, yt[perm][partner], reduction="sum")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they were
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    def epoch(mixup):
        s = TrainSettings(epochs=1, batch_size=32, augment="none", mixup=mixup)
        return run_epoch(model, norm, x, yt, s, torch.device("cpu"), torch.Generator().manual_seed(0),
                         optimizer=opt, scheduler=sched)["loss_sum"]

    assert epoch(0.4) == pytest.approx(float(want), rel=1e-5)
    assert epoch(0.0) != pytest.approx(float(want), rel=1e-3)  # without mixup: the plain images and labels


def test_backbone_lr_scales_the_pretrained_layers_only(monkeypatch):
    """--backbone-lr: fit's one-cycle schedule peaks at lr for the head and at lr x fraction for every other layer."""
    import core.engine as engine

    made = []
    make = engine._make_optimizer
    monkeypatch.setattr(engine, "_make_optimizer", lambda *a: made.append(make(*a)) or made[-1])
    x, y = _toy()
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, (x, y), (x, y), TrainSettings(epochs=2, batch_size=8, lr=1e-2, augment="none", backbone_lr=0.1),
        torch.device("cpu"))
    body, head = made[0].param_groups
    assert [body["max_lr"], head["max_lr"]] == [pytest.approx(1e-3), pytest.approx(1e-2)]
    assert {id(p) for p in head["params"]} == {id(p) for p in model.fc.parameters()}
    assert len(body["params"]) + len(head["params"]) == len(list(model.parameters()))
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(not k.startswith("fc.") for k in moved)  # the backbone still learns, only slower


def test_frozen_backbone_trains_only_the_head():
    x, y = _toy()
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, (x, y), (x, y), TrainSettings(epochs=2, batch_size=8, freeze_backbone=True, augment="none"),
        torch.device("cpu"))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fc.") for k in changed)  # BatchNorm statistics included: unchanged


def test_sgd_is_used_and_learns():
    from core.engine import _make_optimizer

    model = _cnn()
    assert isinstance(_make_optimizer(model, TrainSettings(optimizer="sgd"), "fc"), torch.optim.SGD)
    assert isinstance(_make_optimizer(model, TrainSettings(), "fc"), torch.optim.AdamW)
    x, y = _toy(64)
    res = fit(model, (x, y), (x, y), TrainSettings(epochs=6, batch_size=8, optimizer="sgd", lr=0.05, patience=9,
                                                   augment="none"), torch.device("cpu"))
    h = pd.DataFrame(res["history"])
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] and res["best_val_acc"] > 0.5


def test_rotation_turns_each_image_by_its_own_angle_and_leaves_every_other_draw_alone():
    """augment=dihedral+jitter+rotate: the jitter's zoom, shift and colour as before, then a turn by any angle.

    A centred disc looks the same at any angle: with and without rotation it keeps its size and its distance from
    the centre (the turn also turns the shift's direction); an upright bar is tilted, by a different angle each."""
    yy, xx = torch.meshgrid(torch.arange(48) - 23.5, torch.arange(48) - 23.5, indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 12 ** 2).float() * 150 + 50
    bar = ((xx.abs() < 3) & (yy.abs() < 20)).float() * 150 + 50  # upright: a turn tilts it
    x = torch.stack([disc, bar])[:, None].repeat(1, 3, 1, 1)
    n = 16
    xs = x.repeat_interleave(n // 2, 0)
    plain = augment_batch(xs, 32, torch.Generator().manual_seed(3), jitter=True, colour=False)
    turned = augment_batch(xs, 32, torch.Generator().manual_seed(3), jitter=True, colour=False, rotate=True)
    assert turned.shape == plain.shape == (n, 3, 32, 32)
    # the disc: the same zoom and the same shift's length, whatever the angle (the rotation draws came last)
    def mass_and_radius(im):
        w = im[0] - 50
        c = torch.arange(32.0) - 15.5
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        return float(w.sum()), float(torch.hypot((w * gx).sum() / w.sum(), (w * gy).sum() / w.sum()))
    for a, b in zip(turned[: n // 2], plain[: n // 2]):
        (ma, ra), (mb, rb) = mass_and_radius(a), mass_and_radius(b)
        assert ma == pytest.approx(mb, rel=0.03) and ra == pytest.approx(rb, abs=0.3)
    # the bar's tilt differs image to image: its second moments are no longer axis-aligned
    def tilt(im):
        w = im[0] - im[0].min()
        c = torch.arange(32.0) - 15.5
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        return float((w * gx * gy).sum() / w.sum())
    assert max(abs(tilt(im)) for im in plain[n // 2:]) < 1.0
    tilts = [tilt(im) for im in turned[n // 2:]]
    assert max(abs(t) for t in tilts) > 5.0 and len({round(t) for t in tilts}) > 3


def test_rotation_is_a_known_augmentation_and_an_unknown_one_is_one_line():
    from core.config import StudyConfig
    StudyConfig(augment="dihedral+jitter+rotate").validate()  # accepted
    with pytest.raises(ValueError, match=r"^--augment: unknown augmentation 'rotate'; choose from .*dihedral\+jitter\+rotate"):
        StudyConfig(augment="rotate").validate()


def test_random_erasing_fills_a_box_with_the_mean_colour_on_about_half_the_images():
    """augment=dihedral+jitter+erase: the same images as the jitter, but for one box per erased image."""
    from core.engine import ERASE_AREA
    g = torch.Generator().manual_seed(2)
    x = 40 + torch.rand(64, 3, 40, 40, generator=g) * 170
    plain = augment_batch(x, 32, torch.Generator().manual_seed(4), jitter=True)
    erased = augment_batch(x, 32, torch.Generator().manual_seed(4), jitter=True, erase=True)
    changed = (erased != plain).any(dim=1)  # (B, H, W): where the box is
    n_erased = 0
    for i in range(64):
        where = changed[i].nonzero()
        if not len(where):
            continue
        n_erased += 1
        (t, l), (b, r) = where.min(0).values.tolist(), where.max(0).values.tolist()
        box = erased[i, :, t:b + 1, l:r + 1]
        # one rectangle, one colour: the image's own mean, per channel
        assert ERASE_AREA[0] * 0.5 <= (b - t + 1) * (r - l + 1) / 32 ** 2 <= ERASE_AREA[1] * 1.5
        fill = box.flatten(1)
        assert torch.allclose(fill, fill[:, :1].expand_as(fill))
        torch.testing.assert_close(fill[:, 0], plain[i].mean(dim=(1, 2)))
        assert changed[i, t:b + 1, l:r + 1].float().mean() > 0.9  # solid (a box pixel may equal the mean by chance)
    assert 20 <= n_erased <= 44  # p = 0.5 of 64

"""The replication scorecard: the paper's reported metric beside this run's, per variant and image size.

The paper reports *validation* accuracy on a random 80/20 split of TRAIN (Tables 3-4: 0.92 original,
0.89 RealESRGAN_x4plus). A random split of these images is leaky: near-copies of training cells land in
validation. So each row shows three numbers: the paper's validation accuracy (where the paper has the
variant), this run's validation accuracy at the restored epoch (and which split it came from), and this
run's test accuracy on images of source cells the model never saw, with its 95% CI.
"""

from __future__ import annotations

from enum import StrEnum

import pandas as pd

#: The paper's reported validation accuracy (Tables 3 and 4; ResNet-50, 224 px, random split, 1,989 images).
PAPER_VAL_ACCURACY: dict[str, float] = {"original": 0.92, "realesrgan-x4plus": 0.89}
PAPER_CITATION = ("paper, Tables 3-4: ResNet-50, 224 px, validation = random 20% of TRAIN (1,989 images), "
                  "RealESRGAN_x4plus for the enhanced model")
# "estimated": groups are an estimate of the source cells (core.groups), so a few validation images can still have
# a near-copy in training; the run's near-copy check beside the scorecard counts them
SPLIT_WORDS = {"grouped": "grouped (no estimated source cell on both sides)",
               "random": "random (leaky: near-copies of training cells in validation)"}
COLUMNS = ["variant", "image_size", "paper_val_accuracy", "val_accuracy", "val_split", "val_leaky", "n_val",
           "test_source", "test_accuracy", "test_ci_low", "test_ci_high", "test_from", "seeds", "test_seeds", "refit"]
# A refit run (StudyConfig.refit) tests a model trained afresh on training + validation images.
REFIT_WORDS = ("The test model was refit on training + validation images for the best epoch count that validation "
               "chose, so the source cells validation held out taught it too; the validation accuracy is the first "
               "fit's.")


class AccuracySource(StrEnum):
    """Where a scorecard row's test accuracy comes from."""

    STATS = "stats"  # the stats table: the estimate with its bootstrap CI
    PREDICTIONS = "predictions"  # a run stopped before its statistics: the predictions' accuracy, no CI


NO_CI_WORDS = "no CI: the run stopped before its statistics"
NO_VALIDATION_WORDS = ("No validation figures in this run: it stopped before any model finished, or it was made "
                       "before they were stored.")
_NUMBERS = ("paper_val_accuracy", "val_accuracy", "test_accuracy", "test_ci_low", "test_ci_high")


def scorecard(validation: pd.DataFrame, stats: pd.DataFrame, test_source: str | None,
              predictions: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (variant, image size): see :data:`COLUMNS`. Seed means where a run has several seeds;
    the test CI is then the interval of the seed-averaged accuracy (``core.stats``). A model with test
    predictions but no statistics (a run stopped before them) shows the seed-mean accuracy of its predictions
    and no CI."""
    if validation is None or validation.empty:
        return pd.DataFrame(columns=COLUMNS)
    from core.stats import model_summary

    tests = model_summary(stats).set_index(["variant", "image_size"])
    rows = []
    for (variant, size), v in validation.groupby(["variant", "image_size"], sort=False):
        acc = _test_accuracy(tests, variant, int(size))
        if acc["test_accuracy"] is None:
            acc["test_accuracy"], acc["test_seeds"] = _predicted_accuracy(predictions, variant, int(size))
            acc["test_from"] = None if acc["test_accuracy"] is None else AccuracySource.PREDICTIONS
        split = str(v["split"].iloc[0])
        rows.append({"variant": variant, "image_size": int(size),
                     "paper_val_accuracy": PAPER_VAL_ACCURACY.get(variant),
                     "val_accuracy": float(v["val_accuracy"].mean()), "val_split": split,
                     "val_leaky": bool(v["leaky"].any()) or split == "random", "n_val": int(v["n_val"].iloc[0]),
                     "test_source": test_source, **acc, "seeds": int(v["seed"].nunique()),
                     "refit": bool("refit_epochs" in v and v["refit_epochs"].notna().any())})
    # numbers stay numbers where a run has none (no paper figure; no stats yet: stopped before its test)
    return pd.DataFrame(rows, columns=COLUMNS).astype({**{c: float for c in _NUMBERS}, "test_seeds": "Int64"})


def _test_accuracy(tests: pd.DataFrame, variant: str, size: int) -> dict:
    """The test accuracy and CI of one model set, from ``core.stats.model_summary`` indexed by (variant, size)."""
    if (variant, size) not in tests.index:
        return {"test_accuracy": None, "test_ci_low": None, "test_ci_high": None, "test_from": None, "test_seeds": None}
    r = tests.loc[(variant, size)]
    return {"test_accuracy": float(r["estimate"]), "test_ci_low": _num(r["ci_low"]), "test_ci_high": _num(r["ci_high"]),
            "test_from": AccuracySource.STATS, "test_seeds": int(r["n_seeds"])}


def fallback_predictions(run, stats: pd.DataFrame | None) -> pd.DataFrame | None:
    """A run's predictions where its statistics are missing (a run stopped before them), else ``None``: only
    then does :func:`scorecard` need them. A damaged predictions table counts as absent."""
    if stats is not None and not stats.empty:
        return None
    from core.store import DamagedTable, Table

    try:
        return run.table(Table.PREDICTIONS)
    except DamagedTable:
        return None


def _predicted_accuracy(predictions: pd.DataFrame | None, variant: str, size: int) -> tuple[float | None, int | None]:
    """The seed mean of one model set's test accuracy, straight from its predictions (no interval), and how
    many seeds it averages: a run stopped between seeds has predictions for fewer seeds than validation."""
    if predictions is None or predictions.empty:
        return None, None
    p = predictions[(predictions["variant"] == variant) & (predictions["image_size"] == size)]
    if not len(p):
        return None, None
    per_seed = p.groupby("seed")["correct"].mean()
    return float(per_seed.mean()), len(per_seed)


def test_seeds_words(test_seeds, seeds) -> str:
    """' (test: mean of 1 of 3 seeds)' where the test accuracy averages fewer seeds than validation, else ''."""
    if test_seeds is None or pd.isna(test_seeds) or int(test_seeds) >= int(seeds):
        return ""
    return f" (test: mean of {int(test_seeds)} of {int(seeds)} seeds)"


def _num(x):
    return None if x is None or pd.isna(x) else float(x)


def scorecard_text(card: pd.DataFrame) -> str:
    """The scorecard as plain text for ``wbc report``."""
    if card.empty:
        return f"Replication scorecard: {NO_VALIDATION_WORDS}"
    lines = [f"Replication scorecard (paper's figures: {PAPER_CITATION})"]
    for r in card.itertuples():
        paper = "-" if _num(r.paper_val_accuracy) is None else f"{r.paper_val_accuracy:.2f}"
        test = "-" if _num(r.test_accuracy) is None else f"{r.test_accuracy:.3f}"
        if _num(r.test_ci_low) is not None:
            test += f" [95% CI {r.test_ci_low:.3f}-{r.test_ci_high:.3f}]"
        elif r.test_from == AccuracySource.PREDICTIONS:
            test += f" ({NO_CI_WORDS})"
        test += test_seeds_words(r.test_seeds, r.seeds)
        seeds = f", mean of {r.seeds} seeds" if r.seeds > 1 else ""
        lines.append(f"- {r.variant} ({r.image_size} px{seeds}): paper validation {paper} | this run validation "
                     f"{r.val_accuracy:.3f} on {r.n_val} images, {SPLIT_WORDS.get(r.val_split, r.val_split)} | "
                     f"test on unseen source cells ({r.test_source}) {test}")
    if card["refit"].any():
        lines.append(f"  {REFIT_WORDS}")
    if card["val_leaky"].any():
        lines.append("  The validation split is random, so it is leaky: its accuracy measures recall of near-copies "
                     "of training cells, as the paper's does. Read the test column.")
    return "\n".join(lines)

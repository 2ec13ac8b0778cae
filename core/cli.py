"""``wbc``: the command line (``python -m core`` too).

    wbc study  [--preset quick|paper|study] [--data DIR] [--test-dir DIR] [--variants a,b] ...
    wbc study  --resume RUN [--runs-dir DIR]
    wbc runs   [--runs-dir DIR]
    wbc report RUN [--runs-dir DIR]
    wbc data fetch [--dest DIR]
    wbc enhance --model NAME IN_DIR OUT_DIR
    wbc audit DATA

Errors: one line on stderr and a non-zero exit (2: a bad argument or value, 1: anything else, 130: cancelled),
never a traceback; ``wbc --debug ...`` (anywhere on the line) prints the traceback too. All of it is in
:func:`main`, around every command.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import pandas as pd

from core.audit_cli import add_audit_parser
from core.config import CLASSES, ENHANCE_PRECISIONS, PRESETS, StudyConfig, config_with
from core.data import run_copies_words
from core.enhance.cli import add_enhance_parser
from core.paths import path_arg
from core.terminal import CONTROL_CHARS, ControlFree, one_line


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line naming the bad value, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(cast=str):
    def parse(s: str):
        items = [x.strip() for x in s.split(",") if x.strip()]
        try:
            return tuple(cast(x) for x in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {s!r}") from None

    return parse


def _count_or_all(s: str) -> int | None:
    """``--per-class 500``, or ``all`` (None: every image, over a preset's count)."""
    if s.strip().lower() == "all":
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {s!r}: give a count or 'all'") from None


MAX_SEEDS = 1000  # models per variant and size: far beyond any study here, and checked before anything is built
MAX_SEED = 2**32 - 1  # numpy's and torch's limit


def _one_seed(s: str) -> int:
    try:
        seed = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {s[:40]!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{s[:40]!r}: a seed must be from 0 to {MAX_SEED}")
    return seed


def _seeds(s: str) -> tuple[int, ...]:
    """``--seeds 3`` means seeds 0,1,2; ``--seeds 0,5,7`` lists them (each checked as ``--seed``)."""
    if "," in s:
        seeds = tuple(_one_seed(x) for x in s.split(","))
    else:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {s[:40]!r}") from None
        seeds = range(n) if 1 <= n <= MAX_SEEDS else ()  # bounded before the range is built
    if not 1 <= len(seeds) <= MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{s[:40]!r}: give a count from 1 to {MAX_SEEDS} or a list of at most "
                                         f"{MAX_SEEDS} seeds")
    return tuple(seeds)


def _resume_id(s: str) -> str:
    if not s.strip():  # an unset $RUN must not start a new study
        raise argparse.ArgumentTypeError("give the id of the run to resume (it is empty)")
    return s


def add_study_parser(sub) -> None:
    # A setting flag not typed is absent from the parsed args (SUPPRESS), so the preset keeps its value, and one
    # typed as None (`--per-class all`, `--enhance-precision auto`) overrides it: config_from_args.
    p = sub.add_parser("study", help="run a study: train and evaluate each variant, store results",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="quick (CPU, minutes), paper, or study (rigorous)")
    p.add_argument("--data", type=path_arg, dest="data_dir",
                   help="data root (else $WBC_DATA, else known locations)")
    p.add_argument("--test-dir", type=path_arg,
                   help="a TEST folder in the Kaggle layout (else TEST/TEST_SIMPLE of the data)")
    p.add_argument("--variants", type=_csv(), help="comma-separated enhancers, e.g. original,realesrgan-x4plus")
    p.add_argument("--classifier", help="resnet50 | resnet18 | efficientnet_lite0 | simple_cnn")
    p.add_argument("--pretrained", help="imagenet | none | PATH to a state dict")
    p.add_argument("--epochs", type=int)
    p.add_argument("--per-class", type=_count_or_all,
                   help="training images per class, or 'all' (default: the preset's)")
    p.add_argument("--test-per-class", type=_count_or_all, help="test images per class, or 'all' (default: all)")
    p.add_argument("--image-size", dest="image_sizes", type=_csv(int), help="input size(s), e.g. 224 or 224,448")
    p.add_argument("--seed", type=_one_seed, help="a single seed")
    p.add_argument("--seeds", type=_seeds, help="N (seeds 0..N-1) or a list 0,1,2")
    p.add_argument("--split", help="grouped (default: no source cell on both sides) | random (paper, leaky)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float,
                   help="the optimizer's weight decay (default: the preset's; 1e-4, cpu preset 0.05)")
    p.add_argument("--optimizer", help="adamw | sgd")
    p.add_argument("--patience", type=int)
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head")
    p.add_argument("--input-policy", help="what the classifier sees: cell (crop around the stained cell; default) | "
                                          "center (centred square) | full (the whole frame squashed, the paper's)")
    p.add_argument("--crop", type=int, help="region side in original pixels (default: 144 for cell, 200 for center)")
    p.add_argument("--augment", help="dihedral+jitter (default) | dihedral+jitter+hed | dihedral+jitter+rotate | dihedral+jitter+erase | dihedral+zoom | dihedral | dihedral-batch | none")
    p.add_argument("--label-smoothing", type=float, help="default 0.1")
    p.add_argument("--select-by", help="best checkpoint by validation macro_f1 (default) or val_loss")
    p.add_argument("--ema", type=float, metavar="EPOCHS",
                   help="validate and keep a moving average of the weights over about EPOCHS epochs (0: off)")
    p.add_argument("--backbone-lr", type=float, metavar="FRACTION",
                   help="the pretrained layers learn at FRACTION of --lr, the new head at --lr (default 1)")
    p.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="mix pairs of training images and their labels, weight ~ Beta(ALPHA, ALPHA) (0: off)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction,
                   help="after validation picks the best epoch, refit the test model on training + validation "
                        "images for that many epochs (the cpu preset does; --no-refit: test the validated model)")
    p.add_argument("--tta", type=int, help="test-time augmentation: dihedral views averaged (1, 2, 4 or 8; default 8)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-repeatable GPU kernels (slower); default: cudnn.benchmark picks the fastest")
    p.add_argument("--enhance-batch-size", type=int, help="images per Real-ESRGAN forward (default: 1 on CPU; on CUDA what fills 60%% of the free memory)")
    p.add_argument("--enhance-precision", choices=list(ENHANCE_PRECISIONS),
                   help="Real-ESRGAN precision: auto (fp16 on CUDA, fp32 on CPU; default) | fp32 | half "
                        "(fp16 on CUDA, bf16 on CPU: 52-54 dB vs fp32; ~3x faster with AMX, slower without) | "
                        "fast (fp16 on CUDA; bf16 on CPU only if a probe measures it faster, else fp32)")
    p.add_argument("--enhance-compile", action="store_true",
                   help="torch.compile the Real-ESRGAN model (fused kernels: for long GPU jobs; tens of seconds to "
                        "compile first; outputs differ by rounding and are cached apart)")
    p.add_argument("--runs-dir", type=path_arg, default=None, help="run store (default: runs/ or $WBC_RUNS_DIR)")
    p.add_argument("--cache-dir", type=path_arg,
                   help="cache for enhanced images and weights (default: ~/.cache/wbc)")
    p.add_argument("--run-id", default=None, help="name the run (default: timestamp-preset-random)")
    p.add_argument("--resume", metavar="RUN", default=None, type=_resume_id,
                   help="continue an interrupted, failed or cancelled run with its stored config: complete models "
                        "are kept, the rest trained")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bars")
    p.set_defaults(func=cmd_study)


def given_settings(args) -> dict:
    """The StudyConfig settings typed on the command line, and only those (a flag not typed is absent from
    ``args``), None included: ``--per-class all`` is ``per_class=None``, ``--enhance-precision auto`` is
    ``enhance_half=None``."""
    given = {k: v for k, v in vars(args).items() if k not in _ALWAYS_PARSED | _MAPPED}
    seeds = vars(args).get("seeds") or ((args.seed,) if "seed" in vars(args) else None)
    if seeds is not None:
        given["seeds"] = seeds
    if "enhance_precision" in vars(args):
        given["enhance_half"] = ENHANCE_PRECISIONS[args.enhance_precision]
    if args.runs_dir is not None:
        given["runs_dir"] = args.runs_dir
    return given


def config_from_args(args) -> StudyConfig:
    """The study config `wbc study` runs: the preset, then every setting flag typed."""
    return config_with(args.preset, given_settings(args))


# Study args parsed whether typed or not (they have defaults); the other flags are present only when typed
_ALWAYS_PARSED = {"command", "func", "debug", "preset", "resume", "run_id", "runs_dir", "quiet"}
_MAPPED = {"seed", "seeds", "enhance_precision"}  # typed flags that given_settings turns into other settings


def _typed_flags(args) -> list[str]:
    """The study flags typed on the line (``--runs-dir`` and ``--quiet`` aside), as argparse dests."""
    return sorted([k for k in vars(args) if k not in _ALWAYS_PARSED]
                  + [k for k in ("preset", "run_id") if getattr(args, k) is not None])


def cmd_study(args) -> int:
    from core import distributed

    main_rank = _torchrun_rank() == 0  # under torchrun, rank 0 alone speaks
    bar = None if args.quiet or not main_rank else _StageBars()
    try:
        r = _resume(args, bar) if args.resume else _start(args, bar, main_rank)
    finally:
        if bar:
            bar.close()
        distributed.shutdown()
    if not main_rank:
        return 0
    info = r.info
    acc = ", ".join(f"{v} {a:.3f}" for v, a in (info.summary.get("accuracy") or {}).items())
    print(f"accuracy on {info.test_source}: {acc}", file=sys.stderr)
    print(f"report: wbc report {r.run_id}", file=sys.stderr)
    print(r.run_id)
    return 0


def _start(args, bar, main_rank: bool = True):
    from core.pipeline import run
    from core.registries import validate_config

    cfg = config_from_args(args)
    validate_config(cfg)
    for note in cfg.notes if main_rank else []:
        print(f"note: {note}", file=sys.stderr)
    return run(cfg, on_progress=bar, run_id=args.run_id)


def _resume(args, bar):
    """``--resume RUN``: the stored config, so no other study flag."""
    from core.pipeline import resume
    from core.store import RunStore

    typed = _typed_flags(args)
    if typed:
        raise ValueError(f"--resume runs the stored config; drop --{typed[0].replace('_', '-')}")
    return resume(args.resume, RunStore(args.runs_dir), on_progress=bar)


class _StageBars:
    """One tqdm bar per stage, fed by the pipeline's progress dicts."""

    def __init__(self):
        self.bar, self.stage = None, None

    def __call__(self, info: dict) -> None:
        from tqdm import tqdm

        if info["stage"] != self.stage:
            self.close()
            self.stage = info["stage"]
            self.bar = tqdm(desc=f"[{info['stage_index']}/{info['stages']}] {self.stage}", total=None,
                            file=sys.stderr, dynamic_ncols=True, leave=True)
        if info["total"]:
            self.bar.total = info["total"]
            self.bar.n = info["done"]
            self.bar.set_postfix_str(info.get("message") or "", refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_runs(args) -> int:
    from core.store import RunStore

    store = RunStore(args.runs_dir)
    if store.root.exists() and not store.root.is_dir():
        raise ValueError(f"--runs-dir: {store.root} is a file, not a folder of runs")
    df = store.list_runs()
    if df.empty:
        print(f"no runs in {store.root}" + ("" if store.root.is_dir() else " (no such folder yet)"))
        return 0
    df["accuracy"] = df["accuracy"].map(_accuracy_words)
    cols = ["run_id", "status", "preset", "classifier", "test_set", "accuracy", "seconds"]
    # each cell one line of at most 60 characters: a hand-edited status or path cannot widen or break the table
    shown = df[cols].astype(object).fillna("").map(lambda v: v if isinstance(v, (int, float)) else one_line(v, 60))
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(shown.to_string(index=False))
    for _, r in df[df["warning"].notna()].iterrows():
        print(f"warning: {r['run_id']}: {r['warning']}", file=sys.stderr)
    return 0


def _accuracy_words(acc) -> str:
    """'original=0.912 bicubic-x4=0.905'; a value that is not a number (a hand-edited run.json) is shown as is."""
    if not isinstance(acc, dict):
        return ""
    return " ".join(f"{k}={v:.3f}" if isinstance(v, (int, float)) else f"{k}={str(v)[:12]}" for k, v in acc.items())


def _get_run(runs_dir, rid: str):
    from core.store import RunStore

    store = RunStore(runs_dir)
    if rid == "latest":
        ids = store.run_ids()
        if not ids:
            raise KeyError(f"no runs in {store.root}")
        rid = ids[0]
    return store.get(rid)


def cmd_explain(args) -> int:
    import time

    from core.explain import explain_run

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {args.limit}")
    r = _get_run(args.runs_dir, args.run)
    t0 = time.perf_counter()
    _check_explain_mode(args)
    if r.table("predictions", columns=["image_id"]).empty:  # failed or cancelled before its first model
        raise ValueError(f"run {r.run_id} ({r.status()}) has no predictions: nothing to explain")
    if getattr(args, "sr_change", False):
        return _sr_change(r, t0)
    if getattr(args, "map", False):
        return _map(r, t0)
    rows = explain_run(r, variant=args.variant, only_errors=args.only_errors, limit=args.limit)
    n = rows["image_id"].nunique() if len(rows) else 0
    print(f"{len(rows)} Grad-CAM maps of {n} image(s) in {r.path / 'explain'} "
          f"({time.perf_counter() - t0:.1f} s); index: the run's explain table")
    if len(rows):
        share = rows[rows["role"] == "pred"].groupby("correct")["heat_in_cell"].mean()
        words = {True: "right", False: "wrong"}
        print("heat on the stained cell, predicted class: " +
              ", ".join(f"{words[bool(k)]} {v:.2f}" for k, v in share.items() if v == v))
    return 0


def _report_files(r, args) -> int:
    from core.fsio import atomic_write_bytes
    from core.report import report_blocks, to_html, to_markdown

    blocks = report_blocks(r)
    if args.html:
        out = _html_target(Path(args.html).expanduser(), r)
        atomic_write_bytes(out, to_html(blocks).encode())
        print(f"wrote {out}", file=sys.stderr)
    if args.format == "md":
        print(to_markdown(blocks), end="")
    return 0


def _html_target(out: Path, r) -> Path:
    """Where ``--html`` may write: a file that is new or an earlier report (``.html``). Anything else (a run's
    run.json, a table, a folder) is refused before the report is made, so no run and no other file is lost."""
    from core.store import check_output_file

    return check_output_file(out, "--html", (".html", ".htm"), "an .html", r.run_id + ".html")


def _sr_change(r, t0: float) -> int:
    import time

    from core.srchange import sr_change
    from core.store import Table

    table = sr_change(r)
    r.write_table(Table.SR_CHANGE, table)
    summary = table.groupby("variant")["hf_gain"].median()
    print(f"sr_change: {len(table)} images in {time.perf_counter() - t0:.1f} s; median log2 high-frequency gain over "
          f"bicubic: " + (", ".join(f"{v} {g:+.2f}" for v, g in summary.items()) or "no enhanced variant"))
    return 0


def _check_explain_mode(args) -> None:
    """--sr-change and --map are modes of their own: the Grad-CAM options do not apply to them."""
    modes = [m for m in ("sr_change", "map") if getattr(args, m, False)]
    if len(modes) > 1:
        raise ValueError("--sr-change and --map: choose one")
    for flag in ("variant", "limit", "only_errors"):
        if modes and getattr(args, flag, None) not in (None, False):
            raise ValueError(f"--{flag.replace('_', '-')} applies to Grad-CAM maps, not to --{modes[0].replace('_', '-')}")


def _map(r, t0: float) -> int:
    import time

    from core.embedmap import embedding_map

    df = embedding_map(r)
    print(f"map of {df['image_id'].nunique()} test images x {df['variant'].nunique()} variant(s) in "
          f"{time.perf_counter() - t0:.1f} s "
          f"(cached in the run; the dashboard's Map page shows it)")
    return 0


def cmd_report(args) -> int:
    from core.groups import leakage_words
    from core.metrics import format_report

    r = _get_run(args.runs_dir, args.run)
    if getattr(args, "html", None) or getattr(args, "format", "text") == "md":
        return _report_files(r, args)
    info = r.info
    meta, cfg, data = info.raw, info.config, info.data
    print(f"run {r.run_id}: {r.status()} | preset {info.preset} | {cfg.get('classifier')} "
          f"({cfg.get('pretrained')}) | split {cfg.get('split')} | test {info.test_source} | "
          f"{info.duration_s if info.duration_s is not None else '?'} s on {info.device}")
    leak = leakage_words(data.get("leakage"))
    if leak:
        print(f"validation leakage ({cfg.get('split')} split): {leak}")
    for note in meta.get("notes") or []:  # one line each: a note cannot print a line of its own
        print(f"note: {one_line(note, 600, more='…')}")
    for level, text in run_copies_words(data):  # byte-identical test files (core.data.exact_copies)
        print(f"{level}: {text}")
    for v, prov in ((meta.get("weights") or {}).get("enhancers") or {}).items():
        if prov.get("sha256") or prov.get("method"):  # how each variant's images were made
            how = prov.get("method") or f"weights {prov.get('source', '?')} sha256 {prov['sha256'][:16]}"
            extra = f", {prov['precision']} on {prov.get('device', '?')}" if prov.get("precision") else ""
            print(f"variant {v}: {how}{extra}")
    if info.error:
        print(f"error: {info.error_line}")
    from core.store import odd_labels

    odd = odd_labels(r.table("predictions", columns=["true_label", "pred_label"]))
    if odd:
        print(f"warning: run {r.run_id}'s predictions name classes that are not {', '.join(CLASSES)} (e.g. "
              f"{', '.join(odd)}): per-class figures and confusion matrices leave them out", file=sys.stderr)
    gone = _missing_tables(r)
    if gone:
        print(f"warning: run {r.run_id} is finished but {', '.join(gone)} "
              f"{'is' if len(gone) == 1 else 'are'} missing or not a file: what they hold is left out of this "
              "report", file=sys.stderr)
    print(f"input: {_input_words(cfg)}")
    stats = r.table("stats")
    from core.scorecard import fallback_predictions, scorecard, scorecard_text

    print(scorecard_text(scorecard(r.table("validation"), stats, info.test_source, fallback_predictions(r, stats))))
    metrics, confusion = r.table("metrics"), r.table("confusion")
    if not metrics.empty:
        print()
        print(format_report(metrics, confusion))
    if not stats.empty:
        from core.stats import summary_text

        print(summary_text(stats))
    if meta.get("skipped"):
        first = meta["skipped"][0]  # {path, split, error} (core.data.scan_split; the store keeps dicts only)
        print(f"\n{len(meta['skipped'])} files skipped (unreadable or not images), e.g. "
              f"{one_line(first.get('path', '?'), 200)} ({one_line(first.get('error', '?'), 120)})")
    return 0


def _missing_tables(r) -> list[str]:
    """The tables every finished run stores (predictions, metrics, confusion) that are not files in its folder."""
    from core.store import Status, Table, schema

    if r.status() != Status.FINISHED:
        return []
    names = [f"{schema(t).name}.parquet" for t in (Table.PREDICTIONS, Table.METRICS, Table.CONFUSION)]
    return [n for n in names if not (r.path / n).is_file()]


def _input_words(cfg: dict) -> str:
    """What the classifier saw and how it was trained, in one line (older runs: the full frame). A run.json
    without a readable config says so rather than showing the defaults as if the run had used them."""
    if not cfg:
        return "unknown (run.json holds no readable config)"
    c = StudyConfig.from_dict(cfg)
    from core.regions import crop_for

    crop = crop_for(c.input_policy, c.crop)
    region = "the whole frame" if c.input_policy == "full" else f"{c.input_policy} region of {crop} px"
    return (f"{region} at {','.join(map(str, c.image_sizes))} px; augment {c.augment}, label smoothing "
            f"{c.label_smoothing}, best epoch by validation {c.select_by}"
            + (f" of a weight average over {c.ema:g} epochs" if c.ema else "")
            + (f", mixup alpha {c.mixup:g}" if c.mixup else "")
            + (f", pretrained layers at {c.backbone_lr:g} x the head's learning rate" if c.backbone_lr != 1 else "")
            + (", test model refit on training + validation images" if c.refit else "")
            + f", test-time views {c.tta}")


def cmd_data_fetch(args) -> int:
    try:
        import kagglehub
    except ImportError:
        print("wbc data fetch: error: needs kagglehub: pip install 'wbc-sr-study[fetch]' (or pip install "
              "kagglehub), then retry; or download https://www.kaggle.com/datasets/paultimothymooney/blood-cells "
              "by hand and pass --data DIR", file=sys.stderr)
        return 1
    try:
        path = Path(kagglehub.dataset_download("paultimothymooney/blood-cells"))
    except Exception as e:
        print(f"wbc data fetch: error: download failed ({type(e).__name__}: {e}). Kaggle needs network "
              f"access and may need credentials (~/.kaggle/kaggle.json).", file=sys.stderr)
        return 1
    if args.dest:
        import shutil

        dest = Path(args.dest)
        shutil.copytree(path, dest, dirs_exist_ok=True)
        path = dest
    print(f"downloaded to {path}\nuse it with: export WBC_DATA={path}   (or wbc study --data {path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="wbc", description="Real-ESRGAN x white-blood-cell classification study")
    p.add_argument("--debug", action="store_true", help="on an error, also print the traceback (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_study_parser(sub)
    pr = sub.add_parser("runs", help="list runs")
    pr.add_argument("--runs-dir", type=path_arg)
    pr.set_defaults(func=cmd_runs)
    prep = sub.add_parser("report", help="per-class report, confusion matrices and statistics of a run")
    prep.add_argument("run", help="run id, or 'latest'")
    prep.add_argument("--runs-dir", type=path_arg)
    prep.add_argument("--html", type=path_arg, metavar="FILE",
                      help="also write a self-contained HTML report (opens offline)")
    prep.add_argument("--format", choices=("text", "md"), default="text", help="print text (default) or Markdown")
    prep.set_defaults(func=cmd_report)
    pe = sub.add_parser("explain", help="Grad-CAM of a run's test images, for the true and the predicted class")
    pe.add_argument("run", help="run id, or 'latest'")
    pe.add_argument("--runs-dir", type=path_arg)
    pe.add_argument("--variant", help="one variant (default: all)")
    pe.add_argument("--only-errors", action="store_true", help="misclassified images only")
    pe.add_argument("--limit", type=int, help="at most N images per call (default: all chosen)")
    pe.add_argument("--sr-change", action="store_true",
                    help="instead: measure what super-resolution changed in every enhanced test image (sr_change)")
    pe.add_argument("--map", action="store_true",
                    help="instead: lay out the test set's embedding map (t-SNE per variant) and cache it in the run")
    pe.set_defaults(func=cmd_explain)
    pd_ = sub.add_parser("data", help="data helpers")
    dsub = pd_.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    pf = dsub.add_parser("fetch", help="download the Kaggle dataset (needs network and kagglehub)")
    pf.add_argument("--dest", help="copy the files here")
    pf.set_defaults(func=cmd_data_fetch)
    add_enhance_parser(sub)
    add_audit_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error ends here: one line on stderr, an exit code, no traceback (unless --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    stdout, stderr = sys.stdout, sys.stderr
    if args.command in READS_THE_STORE:  # what they print comes from run folders: no terminal control codes
        sys.stdout, sys.stderr = ControlFree(stdout), ControlFree(stderr)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # wbc report ... | head: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a process killed by the signal
    except (KeyboardInterrupt, Exception) as e:
        if debug:
            traceback.print_exc()
        if _cancelled(e):
            print(f"wbc {args.command}: cancelled", file=sys.stderr)
            return 130
        rank = _torchrun_rank()  # torchrun: say which rank
        print(f"wbc {args.command}: error{f' (rank {rank})' if rank else ''}: "
              f"{_error_words(e).translate(CONTROL_CHARS)}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, (ValueError, KeyError, FileExistsError)) else 1
    finally:
        sys.stdout, sys.stderr = stdout, stderr


# Commands whose output quotes run folders (run.json, tables, logs), which may have been written by anyone; they
# print no progress bars (a bar's carriage return would show as "?"), so both their streams go through ControlFree
READS_THE_STORE = {"runs", "report", "explain"}


def _torchrun_rank() -> int:
    """This process's rank when torchrun started it (it sets WORLD_SIZE and RANK), else 0. From the environment,
    without importing torch (core.distributed.launched reads the same two variables)."""
    if "WORLD_SIZE" not in os.environ:
        return 0
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _cancelled(e: BaseException) -> bool:
    engine = sys.modules.get("core.engine")  # not imported: no study ran, nothing was cancelled
    return isinstance(e, KeyboardInterrupt) or (engine is not None and isinstance(e, engine.Cancelled))


def _error_words(e: BaseException) -> str:
    """What the user reads. Errors raised on purpose (ValueError, KeyError, OSError, core's own classes) as
    written, on their first line (OSError in full: the data help spans lines); anything else named, on one line."""
    first = (str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines() or [""])[0]
    if isinstance(e, OSError):
        return str(e)
    if isinstance(e, (ValueError, KeyError)) or type(e).__module__.startswith("core."):
        return first
    return f"{type(e).__name__}: {first} (wbc --debug ... shows the traceback)"


if __name__ == "__main__":
    raise SystemExit(main())

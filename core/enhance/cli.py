"""``wbc enhance``: enhance every image of a folder (recursively) into another folder, mirroring paths.

Resumable (valid outputs are skipped; files are written atomically), with a progress bar, a duration estimate
from a short calibration, and a per-image error list (``OUT_DIR/enhance_errors.csv``) instead of a crash.
OUT_DIR and IN_DIR never overlap (OUT_DIR is not IN_DIR, inside it or above it: the outputs and the error list
stay out of the inputs), and OUT_DIR must be writable before the first image is enhanced.
Standalone: ``python -m core.enhance.cli --model NAME IN_DIR OUT_DIR``.

Under ``torchrun --nproc-per-node N -m core enhance ...`` every rank lists the same inputs and enhances its
share (every N-th file); rank 0 reports progress for its share, gathers the errors and writes the error list.
The outputs are the same files as one process writes (tests/test_scaling.py).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from core.paths import path_arg
from core.progress import fmt_duration

ERRORS_CSV = "enhance_errors.csv"
FORMAT_SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEVICES = ("auto", "cpu", "cuda")


class _Usage(Exception):
    pass


def _one_line_error(prog: str):
    def error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    return error


def add_enhance_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("enhance", help="enhance a folder of images (e.g. Real-ESRGAN x4)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.error = _one_line_error("wbc enhance")  # one-line errors, exit code 2
    p.set_defaults(func=cmd_enhance)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="enhancer name, e.g. realesrgan-x4plus, realesr-animevideov3")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: 1 on CPU, where it is fastest; on CUDA what fills 60%% of the free memory)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--format", default="png", help="png (default, lossless) | jpeg | webp (lossless)")
    p.add_argument("--half", action="store_true", default=None,
                   help="reduced precision: fp16 on CUDA (already the default there), bf16 on CPU (not bit-exact; ~3x "
                        "faster on CPUs with AMX, slower on CPUs without)")
    p.add_argument("--weights", help="a local .pth state dict to use instead of the official/converted weights")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the Real-ESRGAN model (fused kernels, for long GPU jobs; compiles for tens "
                        "of seconds first; outputs differ by rounding and are cached apart)")
    p.add_argument("--no-estimate", action="store_true", help="skip the calibration and duration estimate")
    p.add_argument("in_dir", type=path_arg, metavar="IN_DIR")
    p.add_argument("out_dir", type=path_arg, metavar="OUT_DIR")


def _calibrate(todo: list, enhancer, fmt: str, tries: int = 10) -> tuple[int, list[dict], float | None, list]:
    """Enhance images one at a time until two succeed (the first warms up, the second is timed).

    Bad files met on the way are listed, not timed. Returns (images made, errors, s/image or None, the rest).
    """
    from core.enhance.cache import enhance_files

    made, errors, times, k = 0, [], [], 0
    while k < len(todo) and k < tries and made < 2:
        t0 = time.perf_counter()
        written, errs = enhance_files(todo[k : k + 1], enhancer, 1, fmt)
        if written:
            made, times = made + 1, times + [time.perf_counter() - t0]
        errors += errs
        k += 1
    per = min(times) if len(times) == 2 else None
    return made, errors, per, todo[k:]


def _validate(args) -> None:
    from core.enhance import get_enhancer_spec, list_enhancers
    from core.enhance.cache import FORMATS

    if args.model not in list_enhancers():
        raise _Usage(f"--model: unknown model {args.model!r}; choose from {', '.join(list_enhancers())}")
    if get_enhancer_spec(args.model).identity:
        raise _Usage(f"--model: {args.model!r} is the identity; nothing to enhance")
    if args.batch_size is not None and args.batch_size < 1:
        raise _Usage(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.device not in DEVICES:
        raise _Usage(f"--device: unknown device {args.device!r}; choose from {', '.join(DEVICES)}")
    from core.devices import resolve_device

    try:
        resolve_device(args.device)  # --device cuda without a GPU: said before OUT_DIR is made
    except ValueError as e:
        raise _Usage(str(e)) from None
    if args.format not in FORMATS:
        raise _Usage(f"--format: unknown format {args.format!r}; choose from {', '.join(FORMATS)}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise _Usage(f"--weights: {args.weights!r} is not a file")
    if not Path(args.in_dir).is_dir():
        raise _Usage(f"IN_DIR: {args.in_dir!r} is not a folder")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise _Usage(f"OUT_DIR: {args.out_dir!r} exists and is not a folder")
    _check_folders(Path(args.in_dir), Path(args.out_dir))


def _check_folders(in_dir: Path, out_dir: Path) -> None:
    """OUT_DIR apart from IN_DIR (resolved: links followed) and writable, before any work."""
    from core.store import check_writable

    src, dest = in_dir.resolve(), out_dir.resolve()
    if dest == src or dest in src.parents:
        raise _Usage(f"OUT_DIR: {str(out_dir)!r} is IN_DIR or holds it; choose a folder outside IN_DIR")
    if src in dest.parents:
        raise _Usage(f"OUT_DIR: {str(out_dir)!r} is inside IN_DIR; choose a folder outside IN_DIR (the outputs and "
                     f"{ERRORS_CSV} would become inputs)")
    try:
        check_writable(out_dir, "OUT_DIR")
    except ValueError as e:
        raise _Usage(str(e)) from None


def list_inputs(in_dir: Path, out_dir: Path) -> list[Path]:
    """Every non-hidden file under ``in_dir`` (sorted), except those inside ``out_dir``."""
    out_dir = out_dir.resolve()
    files = []
    for path in sorted(in_dir.rglob("*")):
        rel = path.relative_to(in_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) \
                and out_dir not in path.resolve().parents:
            files.append(path)
    return files


def cmd_enhance(args) -> int:
    out_was_there = Path(args.out_dir).exists()
    try:
        _validate(args)
    except _Usage as e:
        print(f"wbc enhance: error: {e}", file=sys.stderr)
        return 2
    from core import distributed
    from core.devices import resolve_device

    w = distributed.init(resolve_device(args.device))
    code = 1
    try:
        code = _enhance(args, w)
        return code
    finally:
        distributed.shutdown()
        if code and not out_was_there and w.main:  # a failed start leaves no empty OUT_DIR behind
            _remove_if_empty(Path(args.out_dir))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only an empty folder goes
    except OSError:
        pass


def _enhance(args, w) -> int:
    """The listing, the work (this rank's share of it) and the report (rank 0)."""
    from tqdm import tqdm

    from core import distributed
    from core.enhance import create_enhancer
    from core.enhance.cache import enhance_files, is_valid_image
    from core.enhance.weights import WeightsError

    in_dir, out_dir = Path(args.in_dir), Path(args.out_dir)
    suffix = FORMAT_SUFFIX[args.format]
    errors: list[dict] = []
    todo: list[tuple[Path, Path]] = []
    seen: dict[Path, Path] = {}
    done_before = 0
    for src in list_inputs(in_dir, out_dir):
        dest = out_dir / src.relative_to(in_dir).with_suffix(suffix)
        if dest in seen:
            errors.append({"path": str(src), "error": f"output {dest} also produced by {seen[dest]}"})
            continue
        seen[dest] = src
        if dest.is_file() and is_valid_image(dest):
            done_before += 1
        else:
            todo.append((src, dest))
    say = print if w.main else (lambda *a, **k: None)
    if not seen and not errors:
        say(f"wbc enhance: error: IN_DIR: no input files under {in_dir}", file=sys.stderr)
        return 2
    say(f"{len(seen)} input files: {done_before} already done, {len(todo)} to enhance with {args.model}"
        + (f" on {w.size} ranks" if w.active else ""), file=sys.stderr)
    if w.active:
        errors = errors if w.main else []  # the listing's errors are the same on every rank: rank 0 keeps them
        share = len(todo)
        todo = list(w.shard(todo))
    made = 0
    if todo:
        try:
            enhancer = create_enhancer(args.model, device=args.device, batch_size=args.batch_size,
                                       weights=args.weights, half=getattr(args, "half", None),
                                       compile=getattr(args, "compile", False))
        except (WeightsError, ValueError) as e:
            from core.store import first_line

            print(f"wbc enhance: error: {first_line(e) or type(e).__name__}", file=sys.stderr)
            return 1
        prov = enhancer.provenance()
        say(f"weights: {prov.get('source', '-')} {prov.get('path', '')} sha256={enhancer.weights_id()[:16]}"
            + ("; compiled (torch.compile)" if prov.get("compiled") else ""), file=sys.stderr)

        rest = todo
        if not args.no_estimate and len(todo) > 2:
            made, errs, per, rest = _calibrate(todo, enhancer, args.format)
            errors += errs
            if per is not None:
                say(f"estimated total: {fmt_duration(per * len(todo))} for {len(todo)} images"
                    + (f" on each of {w.size} ranks ({share} in all)" if w.active else "")
                    + f" ({per:.2f} s/image on {getattr(enhancer, 'device', 'cpu')}, calibrated on 2 images)",
                    file=sys.stderr)
        bar = tqdm(total=len(todo), initial=len(todo) - len(rest), unit="img", desc=f"enhance {args.model}",
                   file=sys.stderr, dynamic_ncols=True, disable=not w.main)
        written, errs = enhance_files(rest, enhancer, args.batch_size, args.format, on_batch=bar.update)
        bar.close()
        made += len(written)
        errors += errs
    if w.active:  # rank 0 reports for all
        made = sum(distributed.all_gather_object(made))
        errors = [e for part in distributed.all_gather_object(errors) for e in part]
        if not w.main:  # rank 0's exit code says it for all
            return 0

    _write_errors(out_dir / ERRORS_CSV, errors)
    print(f"enhanced {made}, skipped {done_before} (already done), errors {len(errors)}", file=sys.stderr)
    if errors:
        print(f"errors (also in {out_dir / ERRORS_CSV}):", file=sys.stderr)
        for e in errors:
            print(f"  {e['path']}: {e['error']}", file=sys.stderr)
    return 1 if errors else 0


def _write_errors(path: Path, errors: list[dict]) -> None:
    import io

    from core.fsio import atomic_write_bytes

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["path", "error"])
    w.writeheader()
    w.writerows(errors)
    atomic_write_bytes(path, buf.getvalue().encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wbc enhance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.error = _one_line_error("wbc enhance")
    return cmd_enhance(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

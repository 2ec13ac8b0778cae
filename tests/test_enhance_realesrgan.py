"""Real-ESRGAN enhancers: ncnn converter, weight sources, batched fast path vs RealESRGANer, wbc enhance CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.enhance import create_enhancer, load_rgb
from core.enhance.ncnn import ncnn_to_state_dict, write_ncnn
from core.enhance.realesrgan import MODELS, build_model, psnr, reference_enhance_rgb
from core.enhance.weights import NCNN_SOURCE, WeightsError, ncnn_model_dir, sha256_file



def _data_root() -> Path:
    from core.data import DataNotFoundError, find_data_root

    try:
        return find_data_root()  # $WBC_DATA, then the known places (../shared/data/blood-cells, ...)
    except DataNotFoundError:
        return Path("/nonexistent")


DATA = _data_root()
REAL = sorted((DATA / "TEST_SIMPLE").glob("*/*.jpeg"))[:2]
needs_data = pytest.mark.skipif(len(REAL) < 2, reason="real blood-cell images not found")


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory):
    """One cache for the session (each model is converted once); offline so no test waits on the network."""
    old = {k: os.environ.get(k) for k in ("WBC_CACHE_DIR", "WBC_OFFLINE")}
    os.environ["WBC_CACHE_DIR"] = str(tmp_path_factory.mktemp("wbc_cache"))
    os.environ["WBC_OFFLINE"] = "1"
    yield Path(os.environ["WBC_CACHE_DIR"])
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def x4plus():
    return create_enhancer("realesrgan-x4plus", device="cpu", batch_size=2)


@pytest.fixture(scope="session")
def animev3():
    return create_enhancer("realesr-animevideov3", device="cpu", batch_size=2)


def _tiny_models():
    from core.enhance._compat import ensure_basicsr_importable

    ensure_basicsr_importable()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return [lambda: SRVGGNetCompact(num_feat=8, num_conv=3, upscale=4, act_type="prelu"),
            lambda: RRDBNet(3, 3, scale=4, num_feat=8, num_block=2, num_grow_ch=4)]


@pytest.mark.parametrize("make", _tiny_models(), ids=["srvgg", "rrdb"])
def test_converter_roundtrip_on_tiny_random_models(make, tmp_path):
    torch.manual_seed(0)
    src = make()
    for name, p in src.named_parameters():  # random, non-trivial PReLU slopes too
        p.data = torch.randn_like(p) * 0.1
    write_ncnn(src, tmp_path / "m.param", tmp_path / "m.bin")
    dst = make()
    sd = ncnn_to_state_dict(tmp_path / "m.param", tmp_path / "m.bin", dst.state_dict())
    assert list(sd) == list(src.state_dict())
    dst.load_state_dict(sd, strict=True)
    for key, want in src.state_dict().items():
        is_conv_weight = key.endswith(".weight") and want.ndim == 4
        want = want.half().float() if is_conv_weight else want  # ncnn keeps conv weights in fp16
        assert torch.equal(sd[key], want), key
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(src(x), dst(x), atol=2e-3)


def test_converter_rejects_truncated_bin(tmp_path):
    make = _tiny_models()[0]
    write_ncnn(make(), tmp_path / "m.param", tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        ncnn_to_state_dict(tmp_path / "m.param", tmp_path / "m.bin", make().state_dict())


def test_shipped_x4plus_converts_and_loads_strict(x4plus, weights_cache):
    prov = x4plus.provenance()
    assert prov["source"] == NCNN_SOURCE and prov["enhancer"] == "realesrgan-x4plus"
    assert Path(prov["path"]).parent == weights_cache / "weights"
    assert x4plus.weights_id() == prov["sha256"] == sha256_file(prov["path"])
    assert sum(p.numel() for p in x4plus.model.parameters()) == 16697987  # RRDBNet 23 blocks
    # a second enhancer reuses the cached conversion
    again = create_enhancer("realesrgan-x4plus", device="cpu")
    assert again.weights_id() == x4plus.weights_id() and again.provenance()["source"] == NCNN_SOURCE


def test_other_shipped_ncnn_files_convert():
    mdir = ncnn_model_dir()
    for spec in MODELS.values():
        if spec.ncnn and spec.name != "realesrgan-x4plus":  # x4plus: see the test above
            model = build_model(spec)
            sd = ncnn_to_state_dict(mdir / f"{spec.ncnn}.param", mdir / f"{spec.ncnn}.bin", model.state_dict())
            model.load_state_dict(sd, strict=True)


def _center_crop(im, size=64):
    h, w = im.shape[:2]
    return np.ascontiguousarray(im[(h - size) // 2 : (h + size) // 2, (w - size) // 2 : (w + size) // 2])


@needs_data
def test_x4plus_batched_matches_reference_on_real_crops(x4plus):
    crops = [_center_crop(load_rgb(p), 32) for p in REAL]  # x4plus: ~30 s per full image on 2 CPU cores
    ours = x4plus.enhance_batch(crops)
    ref = x4plus.reference()
    for crop, out in zip(crops, ours):
        want = reference_enhance_rgb(ref, crop)
        assert out.shape == want.shape == (128, 128, 3) and out.dtype == np.uint8
        assert psnr(out, want) >= 45.0


@needs_data
def test_animevideov3_batched_matches_reference_on_full_images(animev3):
    images = [load_rgb(p) for p in REAL]
    ours = animev3.enhance_batch(images + [_center_crop(images[0], 48)])  # mixed sizes in one call
    assert ours[2].shape == (192, 192, 3)
    ref = animev3.reference()
    for im, out in zip(images, ours):
        want = reference_enhance_rgb(ref, im)
        assert out.shape == (im.shape[0] * 4, im.shape[1] * 4, 3)
        assert psnr(out, want) >= 45.0


def test_missing_and_corrupt_weights_raise_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_enhancer("realesr-animevideov3", device="cpu", weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="corrupt"):
        create_enhancer("realesr-animevideov3", device="cpu", weights=str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save({"params": _tiny_models()[0]().state_dict()}, wrong)
    with pytest.raises(WeightsError, match="does not fit"):
        create_enhancer("realesr-animevideov3", device="cpu", weights=str(wrong))


def test_corrupt_cached_weights_are_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("WBC_CACHE_DIR", str(tmp_path))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "realesr-animevideov3.ncnn.pth").write_bytes(b"\0" * 100)
    with pytest.raises(WeightsError, match="corrupt"):
        create_enhancer("realesr-animevideov3", device="cpu")


def test_general_x4v3_offline_is_unavailable():
    with pytest.raises(WeightsError, match="realesr-general-x4v3.*offline.*--weights"):
        create_enhancer("realesr-general-x4v3", device="cpu")


def test_explicit_weights_file_is_used(animev3, tmp_path):
    own = tmp_path / "mine.pth"
    own.write_bytes(Path(animev3.provenance()["path"]).read_bytes())
    enh = create_enhancer("realesr-animevideov3", device="cpu", weights=str(own))
    assert enh.provenance()["source"] == "file" and enh.provenance()["path"] == str(own.resolve())


def test_import_is_cheap():
    code = "import sys, core.enhance; print('basicsr' in sys.modules or 'realesrgan.archs' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@needs_data
def test_cli_enhances_lists_bad_files_and_resumes(tmp_path, animev3, capsys):
    from core.enhance.cli import ERRORS_CSV, main

    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for p in REAL:
        (src / "sub" / p.name).write_bytes(p.read_bytes())
    (src / "truncated.jpeg").write_bytes(REAL[0].read_bytes()[:2000])
    (src / "notes.txt").write_text("not an image")
    args = ["--model", "realesr-animevideov3", "--device", "cpu", "--batch-size", "2"]

    assert main(args + [str(src), str(out)]) == 1  # 1: some images failed
    made = sorted(out.rglob("*.png"))
    assert [p.relative_to(out).as_posix() for p in made] == sorted(f"sub/{p.stem}.png" for p in REAL)
    assert load_rgb(made[0]).shape == (960, 1280, 3)
    rows = (out / ERRORS_CSV).read_text().splitlines()
    assert len(rows) == 3 and {r.split(",")[0] for r in rows[1:]} == {str(src / "truncated.jpeg"), str(src / "notes.txt")}
    err = capsys.readouterr().err
    assert "enhanced 2" in err and "truncated.jpeg" in err and "notes.txt" in err
    # the estimate is timed on images that were enhanced, not on the bad file met first (notes.txt sorts first)
    per = float(re.search(r"estimated total: .* \(([\d.]+) s/image on cpu", err).group(1))
    assert per > 0.05  # a 320x240 -> 1280x960 forward on a CPU; a failed decode takes milliseconds

    # partial run: one output is kept, the other removed -> only the missing one is redone
    keep, redo = made
    mtime = keep.stat().st_mtime_ns
    redo.unlink()
    assert main(args + [str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert "enhanced 1, skipped 1" in err
    assert keep.stat().st_mtime_ns == mtime and redo.is_file()


def test_cli_refuses_an_image_above_the_pixel_budget_before_decoding_it(tmp_path, capsys):
    """A few-MB JPEG of 108 MP took 17.8 GB to enhance x4: enhance applies the study's pixel budget (from the
    header), lists the file as an error and still does the others."""
    from PIL import Image

    from core.data import MAX_PIXELS
    from core.enhance.cli import ERRORS_CSV, main

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.new("RGB", (2100, 2100)).save(src / "big.jpeg")  # 4.4 MP, just above the 4.2 MP budget
    Image.new("RGB", (32, 24)).save(src / "small.jpeg")
    assert 2100 * 2100 > MAX_PIXELS
    assert main(["--model", "bicubic-x4", "--no-estimate", str(src), str(out)]) == 1
    assert [p.name for p in out.rglob("*.png")] == ["small.png"]
    rows = (out / ERRORS_CSV).read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(src / "big.jpeg")) and "pixel budget" in rows[1]
    assert "ImageTooLarge" in capsys.readouterr().err


def test_cli_invalid_args_exit_2(tmp_path, capsys):
    from core.enhance.cli import main

    for bad, word in ((["--model", "nope"], "nope"), (["--model", "realesr-animevideov3", "--device", "tpu"], "tpu"),
                      (["--model", "realesr-animevideov3", "--format", "bmp"], "bmp"),
                      (["--model", "realesr-animevideov3", "--batch-size", "0"], "0")):
        assert main(bad + [str(tmp_path), str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err
    with pytest.raises(SystemExit) as e:
        main(["--model", "realesr-animevideov3", "--batch-size", "x", str(tmp_path), str(tmp_path / "o")])
    assert e.value.code == 2


@needs_data
def test_bf16_on_cpu_is_opt_in_and_close(animev3):
    assert animev3.half is False and animev3.provenance()["precision"] == "float32"
    fast = create_enhancer("realesr-animevideov3", device="cpu", half=True)
    assert fast.provenance()["precision"] == "bfloat16"
    crop = _center_crop(load_rgb(REAL[0]), 64)
    assert psnr(fast.enhance_batch([crop])[0], animev3.enhance_batch([crop])[0]) >= 40.0


@needs_data
def test_out_of_memory_halves_the_batch_then_tiles(tmp_path):
    enh = create_enhancer("realesr-animevideov3", device="cpu", batch_size=2)
    crops = [_center_crop(load_rgb(p), 64) for p in REAL]
    want = enh.enhance_batch(crops)
    real_model, shapes = enh.model, []

    def small_memory(x):  # pretends a batch > 1 or an input > 60 px does not fit
        shapes.append(tuple(x.shape))
        if x.shape[0] > 1 or max(x.shape[-2:]) > 60:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_model(x)

    enh.model = small_memory
    got = enh.enhance_batch(crops)
    assert shapes[0][0] == 2 and shapes[1][0] == 1 and enh.tile == 32
    for g, w in zip(got, want):
        assert g.shape == w.shape and psnr(g, w) >= 35.0  # tiles differ from one forward only near seams


@needs_data
def test_cpu_allocation_failure_also_falls_back_to_tiles():
    enh = create_enhancer("realesr-animevideov3", device="cpu", batch_size=1)
    crop = _center_crop(load_rgb(REAL[0]), 64)
    want = enh.enhance_batch([crop])[0]
    real_model = enh.model

    def small_ram(x):  # what the CPU allocator raises for an allocation it cannot make
        if max(x.shape[-2:]) > 60:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
        return real_model(x)

    enh.model = small_ram
    got = enh.enhance_batch([crop])[0]
    assert enh.tile == 32 and got.shape == want.shape and psnr(got, want) >= 35.0
    enh.model = lambda x: (_ for _ in ()).throw(RuntimeError("shape mismatch"))  # other errors are not retried
    with pytest.raises(RuntimeError, match="shape mismatch"):
        enh.enhance_batch([crop])


def test_batch_size_defaults_by_device_and_is_recorded(animev3):
    auto = create_enhancer("realesr-animevideov3", device="cpu")
    assert auto.batch_size == 1 and auto.provenance()["batch_size"] == 1  # fastest on CPU (cache-bound)
    assert animev3.batch_size == 2 and animev3.provenance()["batch_size"] == 2  # an explicit value wins
    with pytest.raises(ValueError, match="--batch-size"):
        create_enhancer("realesr-animevideov3", device="cpu", batch_size=0)


def test_precision_is_part_of_the_cache_key(animev3, tmp_path):
    from core.enhance.cache import cache_path

    fast = create_enhancer("realesr-animevideov3", device="cpu", half=True)
    assert fast.weights_id() == animev3.weights_id()  # same weights ...
    a, b = cache_path(tmp_path, animev3, "ab" * 20), cache_path(tmp_path, fast, "ab" * 20)
    assert a != b and "-bfloat16" in b.parent.parent.name  # ... but bf16 pixels never stand in for fp32 ones
    assert a.parent.parent.name == animev3.weights_id()[:16]  # fp32 keeps the key of earlier caches


def test_png_encoding_is_lossless_rgb(tmp_path):
    from core.enhance.cache import save_image_atomic

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)  # red stays red: no RGB/BGR swap
    save_image_atomic(arr, tmp_path / "x.png")
    back = load_rgb(tmp_path / "x.png")
    assert back.dtype == np.uint8 and np.array_equal(back, arr) and tuple(back[0, 0]) == (255, 0, 0)
    assert not list(tmp_path.glob(".*.tmp"))


def test_study_flags_reach_the_enhancer(monkeypatch):
    """`wbc study --enhance-precision half --enhance-batch-size 3` builds the enhancer that way (preflight)."""
    from core.cli import build_parser, config_from_args
    from core.pipeline import preflight

    def enhancer(*flags):
        args = build_parser().parse_args(["study", "--variants", "original,realesr-animevideov3", "--classifier",
                                          "simple_cnn", "--pretrained", "none", "--device", "cpu", *flags])
        cfg = config_from_args(args)
        cfg.validate()
        return cfg, preflight(cfg)["realesr-animevideov3"]

    cfg, enh = enhancer("--enhance-precision", "half", "--enhance-batch-size", "3")
    assert cfg.enhance_half is True and enh.batch_size == 3 and enh.provenance()["precision"] == "bfloat16"
    cfg, enh = enhancer("--enhance-precision", "fp32")
    assert cfg.enhance_half is False and enh.batch_size == 1 and enh.provenance()["precision"] == "float32"
    cfg, enh = enhancer()
    assert cfg.enhance_half is None and enh.provenance()["precision"] == "float32"  # auto on CPU
    assert cfg.enhance_compile is False and enh.provenance()["compiled"] is False
    compiled = []  # torch.compile itself is tested below; here only that the flag reaches it
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    cfg, enh = enhancer("--enhance-compile")
    assert cfg.enhance_compile is True and compiled == [enh.model] and enh.provenance()["compiled"] is True
    assert enh.output_id().endswith("-compiled")


@pytest.mark.parametrize("bf16_seconds, native, chose", [(0.01, True, "bfloat16"), (0.03, True, "float32"),
                                                           (0.01, False, "float32")],
                         ids=["bf16-faster", "bf16-slower", "bf16-emulated"])
def test_fast_precision_keeps_bf16_on_cpu_only_where_a_probe_measures_it_faster(monkeypatch, bf16_seconds, native, chose):
    """--enhance-precision fast: the enhancer times a probe region in fp32 and in bf16 and keeps bf16 only when it
    is FAST_MIN_SPEEDUP times faster on a CPU with native bf16; the times, the choice and the cache key agree."""
    import core.enhance.realesrgan as rr
    from core.enhance import create_enhancer

    calls = []

    def fake_run(self, batch):  # fp32 takes 20 ms per probe, bf16 what the case says
        calls.append((self.half, batch.shape))
        clock[0] += bf16_seconds if self.half else 0.02
        return [batch[0]]

    clock = [0.0]
    monkeypatch.setattr(rr.RealESRGANEnhancer, "_run", fake_run)
    monkeypatch.setattr(rr.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(rr, "_native_bf16", lambda: native)
    enh = create_enhancer("realesr-animevideov3", device="cpu", half="fast")
    probe = enh.provenance()["precision_probe"]
    assert enh.precision == chose and enh.provenance()["precision"] == chose and probe["chose"] == chose
    assert probe["seconds"] == ({"float32": 0.02, "bfloat16": bf16_seconds} if native else {"float32": 0.02})
    assert probe["requested"] == "fast" and all(s[1:3] == rr.PRECISION_PROBE_SHAPE for _, s in calls)
    assert {h for h, _ in calls} == ({False, True} if native else {False})  # emulated bf16 is not even timed
    assert enh.output_id().endswith("-bfloat16") == (chose == "bfloat16")
    with pytest.raises(ValueError, match="half: expected"):
        create_enhancer("realesr-animevideov3", device="cpu", half="fastest")


@pytest.mark.parametrize("avx512_bf16, amx, warns", [(False, False, "emulated"), (True, False, "without AMX"),
                                                       (True, True, None)], ids=["emulated", "no-amx", "amx"])
def test_explicit_bf16_on_cpu_warns_where_it_is_likely_slower(monkeypatch, avx512_bf16, amx, warns):
    """An explicit --enhance-precision half on CPU is honoured, with a one-line warning where bf16 is emulated, or
    native without AMX (measured slower than fp32 there); with AMX, no warning."""
    import warnings

    import core.enhance.realesrgan as rr
    from core.enhance import create_enhancer

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        enh = create_enhancer("realesr-animevideov3", device="cpu", half=True)
    said = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning) and "bf16" in str(w.message)]
    assert enh.precision == "bfloat16" and rr._native_bf16() == (avx512_bf16 or amx)
    assert (said == []) if warns is None else (len(said) == 1 and warns in said[0] and "\n" not in said[0])


def test_the_cpu_presets_ask_for_the_measured_precision(animev3):
    """quick and cpu run `fast` (recorded in the config, as the Launch page reads it back); on this machine the
    real probe's choice follows its own measured speed-up, and the provenance says which precision made the pixels."""
    from core.config import PRESETS, make_config, precision_name
    from core.pipeline import preflight

    for name in ("quick", "cpu"):
        assert precision_name(PRESETS[name]["enhance_half"]) == "fast"
    cfg = make_config("quick", variants=("original", "realesr-animevideov3"), device="cpu")
    prov = preflight(cfg)["realesr-animevideov3"].provenance()
    probe = prov["precision_probe"]
    assert prov["precision"] == probe["chose"] and probe["chose"] in ("float32", "bfloat16")
    sec = probe["seconds"]
    if probe["chose"] == "bfloat16":  # chosen only when measured faster (the times are rounded to 0.1 ms)
        assert sec["bfloat16"] * 1.19 <= sec["float32"]
    else:
        assert "bfloat16" not in sec or sec["bfloat16"] * 1.21 >= sec["float32"]
    # a resumed run keeps the precision its images were made in, whatever this process measures
    pinned = preflight(cfg, pinned={"realesr-animevideov3": "bfloat16"})["realesr-animevideov3"]
    assert pinned.precision == "bfloat16" and pinned.output_id().endswith("-bfloat16")
    unpinned = preflight(cfg, pinned={"realesr-animevideov3": "<b>fp8</b>"})["realesr-animevideov3"]  # run.json: untrusted
    assert unpinned.precision == prov["precision"]
    with pytest.raises(ValueError, match="--enhance-precision: unknown value 'Fast'"):
        make_config("quick", enhance_half="Fast").validate()


def test_a_run_records_its_enhance_precision_and_a_resumed_run_keeps_it(tmp_path, animev3):
    """The study records the precision before any image is made; a resumed run (its run.json says bfloat16) makes
    the rest of its images in bfloat16 whatever this machine's probe now measures."""
    from core.config import make_config
    from core.pipeline import run_enhancers
    from core.store import RunStore

    cfg = make_config("quick", variants=("original", "realesr-animevideov3"), device="cpu")
    run = RunStore(tmp_path).create(cfg.to_dict(), "r")
    measured = run_enhancers(run, cfg)["realesr-animevideov3"].precision
    assert run.read_meta()["enhance_precision"] == {"realesr-animevideov3": measured}
    run.update_meta(enhance_precision={"realesr-animevideov3": "bfloat16"})  # as if it had started on an AMX CPU
    assert run_enhancers(run, cfg)["realesr-animevideov3"].output_id().endswith("-bfloat16")
    assert run.read_meta()["enhance_precision"] == {"realesr-animevideov3": "bfloat16"}
    run.update_meta(enhance_precision="<script>")  # untrusted: not a mapping, so the probe decides again
    assert run_enhancers(run, cfg)["realesr-animevideov3"].precision == measured


def test_enhance_precision_auto_overrides_a_preset(tmp_path):
    """`--preset quick --enhance-precision auto` runs auto (a typed None overrides the preset), and says so."""
    from core.cli import build_parser, config_from_args

    def cfg(*flags):
        return config_from_args(build_parser().parse_args(["study", "--preset", "quick", *flags]))

    assert cfg().enhance_half == "fast" and cfg("--enhance-precision", "fp32").enhance_half is False
    auto = cfg("--enhance-precision", "auto")
    assert auto.enhance_half is None and "enhance_half='auto' (preset: 'fast')" in auto.notes[-1]


@needs_data
def test_compiled_model_writes_the_same_pixels_and_is_cached_apart(animev3, tmp_path, capsys):
    """`wbc enhance --compile` runs the model through torch.compile: the eager pixels up to rounding, the fact
    recorded, and its outputs cached apart from the eager ones."""
    from PIL import Image
    from torch._dynamo.utils import counters

    from core.enhance.cache import cache_path
    from core.enhance.cli import main

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    crop = _center_crop(load_rgb(REAL[0]), 32)  # the compile probe's shape: one compile only
    Image.fromarray(crop).save(src / "a.png")
    graphs = counters["stats"]["unique_graphs"]
    args = ["--model", "realesr-animevideov3", "--device", "cpu", "--compile", "--no-estimate"]
    assert main(args + [str(src), str(out)]) == 0
    assert counters["stats"]["unique_graphs"] > graphs  # torch.compile compiled the model
    assert "compiled (torch.compile" in capsys.readouterr().err
    assert psnr(load_rgb(out / "a.png"), animev3.enhance_batch([crop])[0]) >= 45.0
    compiled = create_enhancer("realesr-animevideov3", device="cpu", compile=True)
    calls, fn = [], compiled._compiled
    compiled._compiled = lambda x: calls.append(tuple(x.shape)) or fn(x)
    assert psnr(compiled.enhance_batch([crop])[0], animev3.enhance_batch([crop])[0]) >= 45.0
    assert calls == [(1, 3, 42, 42)]  # the image went through the compiled model (32 px + the 10 px pre-pad)
    assert compiled.provenance()["compiled"] is True and animev3.provenance()["compiled"] is False
    assert cache_path(tmp_path, compiled, "ab" * 20) != cache_path(tmp_path, animev3, "ab" * 20)


def test_a_compiler_that_cannot_work_fails_at_once_in_one_line(monkeypatch):
    """torch.compile compiles on first use: the enhancer compiles a small probe at once, so that a machine
    without a working compiler fails before any image, in one line, not image by image."""
    def broken(model, **kw):
        def run(x):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n  (long compiler output)")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ValueError) as e:
        create_enhancer("realesr-animevideov3", device="cpu", compile=True)
    assert str(e.value).startswith("--compile: torch.compile failed on cpu (RuntimeError: InductorError")
    assert "\n" not in str(e.value) and str(e.value).endswith("run without --compile")

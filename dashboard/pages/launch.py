"""Launch: a form that starts a study in the background (a subprocess, one at a time), with live stage,
progress, ETA and log tail, a cancel button, and the new run when it is done."""

from __future__ import annotations

import os
import time
from pathlib import Path

import panel as pn

from dashboard.jobs import MANAGER, running_elsewhere
from dashboard.pages.common import fmt_eta, progress_summary
from dashboard.safe import esc
from dashboard.security import PathNotAllowed, data_roots, resolve_under, safe_data_folder

AUTO_TEST = "(automatic: TEST / TEST_SIMPLE of the data)"


def candidate_data_folders(max_depth: int = 3) -> list[str]:
    """Folders under the allowed data roots that hold TRAIN/ (the Kaggle layout), shallowest first."""
    from core.data import find_split_dirs

    out = []
    for root in data_roots():
        frontier = [root]
        for _ in range(max_depth):
            nxt = []
            for d in frontier:
                try:
                    if "TRAIN" in find_split_dirs(d, max_depth=1) and str(d) not in out:
                        out.append(str(d))
                        continue
                    nxt += sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))[:50]
                except OSError:
                    continue
            frontier = nxt
    return out


def test_folders(data_folder: str) -> list[str]:
    from core.data import find_split_dirs

    try:
        dirs = find_split_dirs(Path(data_folder))
    except OSError:
        return []
    return [str(p) for k, p in dirs.items() if k != "TRAIN"]


def allowed_test_folders(folder: str) -> tuple[list[str], str | None]:
    """The test folders of a data folder, which is checked against the data roots before it is scanned (a typed
    '/' lists nothing): (its test folders under a data root, None), or ([], why the folder is refused)."""
    try:
        data = safe_data_folder(folder)
    except PathNotAllowed as e:
        return [], str(e)
    out = []
    for t in test_folders(str(data)):
        try:
            resolve_under(t, data_roots(), "test folder")
            out.append(t)
        except PathNotAllowed:
            continue
    return out, None


def seed_args(seeds) -> list[str]:
    """``--seed N`` for one seed, ``--seeds a,b,c`` for several (the form's text "0,1,2" or an int)."""
    try:
        vals = [int(x) for x in str(seeds).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"seeds: {seeds!r} is not a comma-separated list of whole numbers") from None
    if not vals or min(vals) < 0 or len(set(vals)) != len(vals):
        raise ValueError(f"seeds: give distinct whole numbers >= 0, e.g. 0 or 0,1,2 (got {seeds!r})")
    return ["--seed", str(vals[0])] if len(vals) == 1 else ["--seeds", ",".join(map(str, vals))]


def build_args(values: dict) -> list[str]:
    """CLI arguments from the form (paths already validated)."""
    a = []
    if values.get("preset") and values["preset"] != "custom":
        a += ["--preset", values["preset"]]
    a += ["--data", values["data"]]
    if values.get("test_dir"):
        a += ["--test-dir", values["test_dir"]]
    a += ["--variants", ",".join(values["variants"]), "--classifier", values["classifier"],
          "--pretrained", values["pretrained"], "--epochs", str(values["epochs"]),
          "--image-size", str(values["image_size"]), *seed_args(values.get("seeds", values.get("seed", 0))),
          "--device", values["device"],
          "--split", values.get("split") or "grouped"]
    if values.get("input_policy"):
        a += ["--input-policy", values["input_policy"]]
    if values.get("precision") and values["precision"] != "auto":
        a += ["--enhance-precision", values["precision"]]
    if values.get("per_class"):
        a += ["--per-class", str(values["per_class"])]
    if values.get("test_per_class"):
        a += ["--test-per-class", str(values["test_per_class"])]
    return a


def view(state) -> pn.viewable.Viewable:
    import core  # the registries (imports torch: done lazily, and warmed by app_hooks at server start)

    presets = ["custom", *core.PRESETS]
    folders = candidate_data_folders()
    w = dict(
        preset=pn.widgets.Select(name="Preset", options=presets, value="quick", width=150, css_classes=["wbc-l-preset"]),
        data=pn.widgets.Select(name="Data folder (under the allowed roots)", options=folders,
                               value=folders[0] if folders else None, width=500, css_classes=["wbc-l-data"]),
        data_path=pn.widgets.TextInput(name="…or type a data folder path", placeholder="/path/under/a/data/root",
                                       width=420, css_classes=["wbc-l-data-path"]),
        test=pn.widgets.Select(name="Test folder", options=[AUTO_TEST], value=AUTO_TEST, width=420,
                               css_classes=["wbc-l-test"]),
        variants=pn.widgets.MultiChoice(name="Variants", options=core.list_enhancers(), width=420,
                                        css_classes=["wbc-l-variants"]),
        classifier=pn.widgets.Select(name="Classifier", options=core.list_classifiers(), width=200,
                                     css_classes=["wbc-l-classifier"]),
        pretrained=pn.widgets.Select(name="Pretrained", options=["imagenet", "none"], width=120,
                                     css_classes=["wbc-l-pretrained"]),
        epochs=pn.widgets.IntInput(name="Epochs", value=3, start=1, end=200, width=90, css_classes=["wbc-l-epochs"]),
        per_class=pn.widgets.IntInput(name="Train imgs/class (0=all)", value=40, start=0, width=170,
                                      css_classes=["wbc-l-per-class"]),
        test_per_class=pn.widgets.IntInput(name="Test imgs/class (0=all)", value=0, start=0, width=170,
                                           css_classes=["wbc-l-test-per-class"]),
        image_size=pn.widgets.IntInput(name="Image size", value=224, start=32, end=1024, width=100,
                                       css_classes=["wbc-l-size"]),
        seeds=pn.widgets.TextInput(name="Seeds", value="0", width=90, css_classes=["wbc-l-seed"],
                                   description="one seed (0) or several, comma-separated (0,1,2)"),
        split=pn.widgets.Select(name="Validation split", options=list(core.SPLITS), value="grouped", width=130,
                                css_classes=["wbc-l-split"]),
        input_policy=pn.widgets.Select(name="Classifier input", options=list(core.POLICIES), value="cell", width=120,
                                       css_classes=["wbc-l-input-policy"],
                                       description="cell: a square around the stained white cell (default). "
                                                   "center: a centred square. full: the whole frame squashed "
                                                   "(the paper's)."),
        device=pn.widgets.Select(name="Device", options=["auto", "cpu", "cuda"], value="auto", width=100,
                                 css_classes=["wbc-l-device"]),
        precision=pn.widgets.Select(name="Real-ESRGAN precision", options=["auto", "fp32", "half"], value="auto",
                                    width=150, css_classes=["wbc-l-precision"],
                                    description="auto: fp16 on CUDA, fp32 on CPU. half: also bf16 on CPU "
                                                "(~2x faster on AVX512-BF16 CPUs, 52-54 dB PSNR vs fp32)."),
    )
    start = pn.widgets.Button(name="Start study", button_type="primary", width=140, css_classes=["wbc-l-start"])
    cancel = pn.widgets.Button(name="Cancel", button_type="danger", width=100, disabled=True,
                               css_classes=["wbc-l-cancel"])
    message = pn.pane.Alert("", alert_type="info", visible=False, css_classes=["wbc-l-message"],
                            sizing_mode="stretch_width")
    stage = pn.pane.Markdown("No study started from this dashboard.", css_classes=["wbc-l-stage"], sizing_mode="stretch_width")
    bar = pn.indicators.Progress(value=0, max=100, width=420, visible=False, css_classes=["wbc-l-progress"])
    log = pn.pane.HTML("", css_classes=["wbc-l-log"], sizing_mode="stretch_width",
                       styles={"font-family": "monospace", "font-size": "12px", "background": "#f7f7f7"})
    open_run = pn.widgets.Button(name="Open the new run", button_type="success", visible=False,
                                 css_classes=["wbc-l-open"])
    path_note = pn.pane.Alert("", alert_type="warning", visible=False, css_classes=["wbc-l-path-note"],
                              sizing_mode="stretch_width")
    roots_md = pn.pane.Markdown(
        ("Allowed data roots (from `WBC_DATA_ROOTS`):\n\n" if os.environ.get("WBC_DATA_ROOTS") else
         "Allowed data roots (the data root found; set `WBC_DATA_ROOTS` to change):\n\n") + (
            ", ".join(f"<code>{esc(r)}</code>" for r in data_roots()) or "**none** — set `WBC_DATA_ROOTS` to launch studies"),
        sizing_mode="stretch_width")

    def apply_preset(*_):
        p = core.PRESETS.get(w["preset"].value)
        if not p:
            return
        w["variants"].value = [v for v in p.get("variants", ()) if v in w["variants"].options]
        if p.get("classifier") in w["classifier"].options:
            w["classifier"].value = p["classifier"]
        w["pretrained"].value = p.get("pretrained", "imagenet") if p.get("pretrained") in ("imagenet", "none") else "imagenet"
        w["epochs"].value = int(p.get("epochs", 3))
        w["per_class"].value = int(p.get("per_class") or 0)
        w["image_size"].value = int((p.get("image_sizes") or (224,))[0])
        w["seeds"].value = ",".join(str(x) for x in (p.get("seeds") or (0,)))
        w["test_per_class"].value = int(p.get("test_per_class") or 0)
        w["split"].value = p.get("split", "grouped")
        w["input_policy"].value = p.get("input_policy", "cell")
        w["precision"].value = {True: "half", False: "fp32"}.get(p.get("enhance_half"), "auto")

    def update_tests(*_):
        typed = w["data_path"].value.strip()
        folder = typed or w["data"].value
        found, why = allowed_test_folders(folder) if folder else ([], None)
        path_note.object = f"Data folder not usable: {esc(why)}" if typed and why else ""
        path_note.visible = bool(typed and why)
        opts = [AUTO_TEST] + found
        w["test"].options = opts
        if w["test"].value not in opts:
            w["test"].value = AUTO_TEST

    def say(text, kind="info"):
        message.object = text
        message.alert_type = kind
        message.visible = bool(text)

    def on_start(_):
        try:
            typed = w["data_path"].value.strip()
            data = safe_data_folder(typed or w["data"].value)
            from core.data import find_split_dirs

            if "TRAIN" not in find_split_dirs(data):
                raise PathNotAllowed(f"data folder {data} has no TRAIN/ class folders")
            test = None
            if w["test"].value and w["test"].value != AUTO_TEST:
                test = str(resolve_under(w["test"].value, data_roots(), "test folder"))
            if not w["variants"].value:
                raise ValueError("choose at least one variant")
            seed_args(w["seeds"].value)
        except (PathNotAllowed, ValueError) as e:
            say(f"Not started: {esc(e)}", "danger")
            return
        values = {k: x.value for k, x in w.items()}
        values.update(data=str(data), test_dir=test)
        job, msg = MANAGER.launch(build_args(values), state.runs_dir, preset=values["preset"])
        if job is None:
            say(esc(msg), "warning")
            return
        say(f"{esc(msg)}: <code>{esc(' '.join(job.argv[1:]))}</code>", "info")
        poll()

    def on_cancel(_):
        say(esc(MANAGER.cancel()), "warning")
        poll()

    seen = {"job": None, "done": False, "appeared": False}

    elsewhere = pn.pane.Alert("", alert_type="warning", visible=False, css_classes=["wbc-l-elsewhere"],
                              sizing_mode="stretch_width")
    ticks = {"n": 0}

    def poll():
        job = MANAGER.current
        ticks["n"] += 1
        if ticks["n"] % 5 == 1:  # every 5 s: studies in this store that this dashboard did not start
            others = running_elsewhere(state.runs_dir, exclude=job.run_id if job else None)
            elsewhere.object = "".join(
                f"A study started elsewhere is running in this store: <code>{esc(rid)}</code> — "
                f"{progress_summary(pr)}. A study started here would share the machine with it.<br>"
                for rid, pr in others)
            elsewhere.visible = bool(others)
        if job is None:
            cancel.disabled = True
            return
        if seen["job"] is not job:
            seen.update(job=job, done=False, appeared=False)
            open_run.visible = False
        s = job.state()
        running = job.running
        cancel.disabled = not running or job.cancel_requested
        start.disabled = running
        prog = job.run.read_progress()
        pct = prog.get("percent")
        if pct is None and prog.get("total"):
            pct = 100.0 * (prog.get("done") or 0) / max(1, prog["total"])
        bar.visible = True
        bar.value = int(pct) if isinstance(pct, (int, float)) and running else (100 if s == "finished" else 0)
        elapsed = (job.ended or time.time()) - job.started
        step = f" {prog['stage_index']}/{prog['stages']}" if prog.get("stage_index") and prog.get("stages") else ""
        pct_txt = f" · {pct:.0f}%" if isinstance(pct, (int, float)) else ""
        stage.object = (f"**{esc(job.run_id)}** — **{esc(s)}** · stage{esc(step)}: "
                        f"{esc(prog.get('stage') or 'starting')} ({esc(prog.get('done', 0))}/"
                        f"{esc(prog.get('total', '?'))}){pct_txt} · {esc(prog.get('message', ''))} · "
                        f"ETA {fmt_eta(prog.get('eta_s')) if running else '—'} · elapsed {fmt_eta(elapsed)}")
        log.object = "<pre style='margin:0;white-space:pre-wrap'>" + esc("\n".join(job.log_tail(15))) + "</pre>"
        if not seen["appeared"] and (job.run.path / "run.json").exists():
            seen["appeared"] = True
            state.refresh += 1
        if not running and not seen["done"]:
            seen["done"] = True
            state.refresh += 1
            start.disabled = False
            kind = {"finished": "success", "cancelled": "warning"}.get(s, "danger")
            extra = ""
            if s == "failed":
                try:
                    err = job.run.read_meta().get("error") or {}
                    extra = f": {esc(err.get('message', ''))}"
                except Exception:
                    extra = f" (exit code {job.returncode})"
            say(f"Study {esc(job.run_id)} {esc(s)}{extra}.", kind)
            open_run.name = f"Open {job.run_id}"
            open_run.visible = (job.run.path / "run.json").exists()

    def on_open(_):
        job = MANAGER.current
        if job is not None:
            state.param.update(run_id=job.run_id, page="Overview")

    w["preset"].param.watch(apply_preset, "value")
    w["data"].param.watch(update_tests, "value")
    w["data_path"].param.watch(update_tests, "value")
    start.on_click(on_start)
    cancel.on_click(on_cancel)
    open_run.on_click(on_open)
    apply_preset()
    update_tests()
    poll()
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        cb = pn.state.add_periodic_callback(poll, period=1000)

        def stop(_ctx):
            try:
                cb.stop()
            except Exception:
                pass

        pn.state.on_session_destroyed(stop)

    form = pn.Column(
        pn.pane.Markdown("### Start a study"), roots_md,
        pn.Row(w["preset"], w["classifier"], w["pretrained"]),
        w["data"], w["data_path"], path_note, w["test"], w["variants"],
        pn.Row(w["epochs"], w["per_class"], w["test_per_class"]),
        pn.Row(w["image_size"], w["input_policy"], w["seeds"], w["split"], w["device"]),
        pn.Row(w["precision"]),
        pn.Row(start, cancel), width=540, sizing_mode="fixed")
    status = pn.Column(pn.pane.Markdown("### Progress"), elsewhere, stage, bar, message, open_run,
                       pn.pane.Markdown("**Log (tail)**"), log, sizing_mode="stretch_width")
    return pn.Row(form, pn.Spacer(width=20), status, sizing_mode="stretch_width", css_classes=["wbc-page-launch"])

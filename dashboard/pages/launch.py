"""Launch: a form that starts a study in the background (a subprocess, one at a time), with live stage,
progress, ETA and log tail, a cancel button, and the new run when it is done."""

from __future__ import annotations

import os
import time
from pathlib import Path

import panel as pn
import param

from core.config import (DEVICES, ENHANCE_PRECISIONS, IMAGE_SIZE_RANGE, MIN_PER_CLASS, POLICIES, PRESETS, PRETRAINED,
                         SPLITS, precision_name)
from core.enhance.registry import list_enhancers
from core.models import list_classifiers
from core.store import Status
from dashboard.jobs import MANAGER, running_elsewhere
from dashboard.pages.base import Page
from dashboard.pages.common import fmt_eta, progress_summary
from dashboard.safe import esc
from dashboard.security import PathNotAllowed, data_roots, resolve_under, safe_data_folder

AUTO_TEST = "(automatic: TEST / TEST_SIMPLE of the data)"
# The form's width (its widest row: image size, input, seeds, split, device) and the progress column's least width:
# side by side from a window of about 1,350 px, the progress under the form below that.
FORM_PX, PROGRESS_MIN_PX = 600, 400


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


def typed_test_folder(path: str) -> tuple[str | None, str | None]:
    """A typed test folder (a Kaggle TEST kept apart from the data, say): (its resolved path, None) when it lies
    under a data root and holds class folders as ``--test-dir`` reads them (also nested), else (None, why)."""
    from core.data import test_split_dir

    try:
        p = resolve_under(path, data_roots(), "test folder")
    except PathNotAllowed as e:
        return None, str(e)
    try:
        found = test_split_dir(p) if p.is_dir() else None  # the rule `wbc study --test-dir` applies
    except OSError:
        found = None
    if found is None:
        return None, f"test folder {path} has no class folders (EOSINOPHIL/ ...)"
    return str(p), None


def seed_args(seeds) -> list[str]:
    """``--seed N`` for one seed, ``--seeds a,b,c`` for several (the form's text "0,1,2" or an int)."""
    try:
        vals = [int(x) for x in str(seeds).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"Seeds: {seeds!r} is not a comma-separated list of whole numbers") from None
    if not vals or min(vals) < 0 or len(set(vals)) != len(vals):
        raise ValueError(f"Seeds: give distinct whole numbers >= 0, e.g. 0 or 0,1,2 (got {seeds!r})")
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
    preset = PRESETS.get(values.get("preset") or "custom", {})
    if values.get("precision") and values["precision"] != precision_name(preset.get("enhance_half")):
        a += ["--enhance-precision", values["precision"]]  # what the preset (or the CLI's default) does not already
    for field in PER_CLASS_FIELDS:  # 0 in the form is every image, over a preset's count too (cpu: 1,500)
        if values.get(field) is not None:
            a += ["--" + field.replace("_", "-"), str(values[field]) if values[field] else "all"]
    return a


# The form's whole-number fields: (label, lowest, highest). The widgets keep whatever is typed (an empty box, 0,
# 10^9) so that Start can say what is wrong, instead of the widget quietly putting the old value back.
# The image size and the per-class minimum are core.config's (its validation says the same in --flag words).
NUMBERS = {"epochs": ("Epochs", 1, 500), "per_class": ("Train imgs/class", 0, None),
           "test_per_class": ("Test imgs/class", 0, None), "image_size": ("Image size", *IMAGE_SIZE_RANGE)}
PER_CLASS_FIELDS = ("per_class", "test_per_class")  # 0 = all images


def number_problems(values: dict) -> list[str]:
    """One line per form number that is empty or out of range (0 = all for the per-class ones), in form order."""
    out = []
    for name, (label, lo, hi) in NUMBERS.items():
        v = values.get(name)
        if v is None:
            out.append(f"{label}: enter a whole number")
        elif v < lo or (hi is not None and v > hi):
            out.append(f"{label}: must be between {lo} and {hi}, got {v}" if hi is not None
                       else f"{label}: must be {lo} or more, got {v}")
        elif name in PER_CLASS_FIELDS and 0 < v < MIN_PER_CLASS:
            out.append(f"{label}: must be 0 (all) or at least {MIN_PER_CLASS}, got {v}")
    return out


def check_numbers(values: dict) -> None:
    """ValueError naming the first form number that is empty or out of range (:func:`number_problems`)."""
    problems = number_problems(values)
    if problems:
        raise ValueError(problems[0])


# The form's fields (LaunchPage parameters), in the order build_args reads them.
FORM_FIELDS = ("preset", "variants", "classifier", "pretrained", "epochs", "per_class", "test_per_class", "image_size",
               "seeds", "split", "input_policy", "device", "precision")


# the precision select's labels -> the CLI's values: "half" named by the dtypes that Overview shows (float16 on
# CUDA, bfloat16 on CPU); the others as they are
PRECISION_LABELS = {{"half": "fp16 / bf16"}.get(p, p): p for p in ENHANCE_PRECISIONS}


class LaunchPage(Page):
    """A form whose option lists come from core (presets, registries, config choices), the running job's
    progress polled once a second, and the one-study-at-a-time job manager."""

    title = "Launch"
    css = "wbc-page-launch"
    preset = param.Selector(default="quick", objects=["custom", *PRESETS])
    data = param.Selector(default=None, objects=[], allow_None=True, doc="A data folder under the allowed roots.")
    data_path = param.String(default="", doc="A typed data folder (checked against the roots before a scan).")
    test = param.Selector(default=AUTO_TEST, objects=[AUTO_TEST])
    test_path = param.String(default="", doc="A typed test folder (checked against the roots; it replaces 'test').")
    variants = param.ListSelector(default=[], objects=list_enhancers())
    classifier = param.Selector(default="efficientnet_lite0", objects=list_classifiers())
    pretrained = param.Selector(default="imagenet", objects=list(PRETRAINED))
    epochs = param.Integer(default=3, allow_None=True)  # checked on Start (NUMBERS), not by the widget
    per_class = param.Integer(default=40, allow_None=True)
    test_per_class = param.Integer(default=0, allow_None=True)
    image_size = param.Integer(default=224, allow_None=True)
    seeds = param.String(default="0")
    split = param.Selector(default="grouped", objects=list(SPLITS))
    input_policy = param.Selector(default="cell", objects=list(POLICIES))
    device = param.Selector(default="auto", objects=list(DEVICES))
    precision = param.Selector(default="auto", objects=list(ENHANCE_PRECISIONS))

    def __init__(self, state, **params):
        super().__init__(state, **params)
        self.form_problem, self.test_note = "", ""  # what Start waits for (besides path_note): said above it
        folders = candidate_data_folders()
        self.param.data.objects = folders
        self.data = folders[0] if folders else None
        self._job, self._job_done, self._run_appeared, self._ticks = None, False, False, 0
        self.apply_preset()
        self.update_tests()
        self.check_form()

    # ---------------------------------------------------------------------------------------- the form
    @param.depends("preset", watch=True)
    def apply_preset(self) -> None:
        """The form takes the preset's settings (custom keeps what is there)."""
        p = PRESETS.get(self.preset)
        if not p:
            return
        self.param.update(
            variants=[v for v in p.get("variants", ()) if v in self.param.variants.objects],
            classifier=p["classifier"] if p.get("classifier") in self.param.classifier.objects else self.classifier,
            pretrained=p.get("pretrained") if p.get("pretrained") in PRETRAINED else "imagenet",
            epochs=int(p.get("epochs", 3)), per_class=int(p.get("per_class") or 0),
            image_size=int((p.get("image_sizes") or (224,))[0]),
            seeds=",".join(str(x) for x in (p.get("seeds") or (0,))),
            test_per_class=int(p.get("test_per_class") or 0), split=p.get("split", "grouped"),
            input_policy=p.get("input_policy", "cell"),
            precision=precision_name(p.get("enhance_half")))

    @param.depends("data", "data_path", watch=True)
    def update_tests(self) -> None:
        """The test folders of the chosen data folder; a typed folder outside the roots is refused unscanned."""
        typed = self.data_path.strip()
        folder = typed or self.data
        found, why = allowed_test_folders(folder) if folder else ([], None)
        self.path_note = f"Data folder not usable: {esc(why)}" if typed and why else ""
        self.show_path_notes()
        self.param.test.objects = [AUTO_TEST] + found
        if self.test not in self.param.test.objects:
            self.test = AUTO_TEST
        self.refresh_start()  # Start waits for a usable folder too

    @param.depends("test_path", watch=True)
    def check_test_path(self) -> None:
        """A typed test folder is checked as it is entered (outside the roots or without class folders: said)."""
        typed = self.test_path.strip()
        why = typed_test_folder(typed)[1] if typed else None
        self.test_note = f"Test folder not usable: {esc(why)}" if why else ""
        self.show_path_notes()
        self.refresh_start()

    def show_path_notes(self) -> None:
        if hasattr(self, "note"):
            text = "<br>".join(t for t in (self.path_note, self.test_note) if t)
            self.note.object, self.note.visible = text, bool(text)

    @param.depends(*NUMBERS, "seeds", watch=True)
    def check_form(self) -> None:
        """Say at once what Start would refuse in the numbers and the seeds (every problem, one line each), and
        hold Start until they are fixed."""
        problems = number_problems({k: getattr(self, k) for k in NUMBERS})
        try:
            seed_args(self.seeds)
        except ValueError as e:
            problems.append(str(e))
        self.form_problem = "\n".join(problems)
        if hasattr(self, "form_check"):
            self.form_check.object = "<br>".join(esc(p) for p in problems)
            self.form_check.visible = bool(problems)
        self.refresh_start()

    def held(self) -> bool:
        """Start waits: a number or the seeds are wrong, or a typed data or test folder is not usable (said above it)."""
        return bool(self.form_problem or self.path_note or self.test_note)

    def refresh_start(self) -> None:
        """Start is off while a study runs or the form holds it (the one place that decides)."""
        if hasattr(self, "start_b"):
            job = MANAGER.current
            self.start_b.disabled = self.held() or bool(job and job.running)

    def checked_values(self) -> dict:
        """The form as build_args wants it, every path checked; ValueError / PathNotAllowed says what is wrong."""
        from core.data import find_split_dirs

        check_numbers({k: getattr(self, k) for k in NUMBERS})
        data = safe_data_folder(self.data_path.strip() or self.data)
        if "TRAIN" not in find_split_dirs(data):
            raise PathNotAllowed(f"data folder {data} has no TRAIN/ class folders")
        test = None
        if self.test_path.strip():
            test, why = typed_test_folder(self.test_path.strip())
            if why:
                raise PathNotAllowed(why)
        elif self.test and self.test != AUTO_TEST:
            test = str(resolve_under(self.test, data_roots(), "test folder"))
        if not self.variants:
            raise ValueError("choose at least one variant")
        seed_args(self.seeds)
        return {**{k: getattr(self, k) for k in FORM_FIELDS}, "data": str(data), "test_dir": test}

    def start(self, _=None) -> None:
        try:
            values = self.checked_values()
        except (PathNotAllowed, ValueError) as e:
            self.say(f"Not started: {esc(e)}", "danger")
            return
        job, msg = MANAGER.launch(build_args(values), self.state.runs_dir, preset=values["preset"])
        if job is None:
            self.say(esc(msg), "warning")
            return
        self.say(f"{esc(msg)}: <code>{esc(' '.join(job.argv[1:]))}</code>", "info")
        self.poll()

    def cancel(self, _=None) -> None:
        self.say(esc(MANAGER.cancel()), "warning")
        self.poll()

    def open_run(self, _=None) -> None:
        if MANAGER.current is not None:
            self.state.param.update(run_id=MANAGER.current.run_id, page="Overview")

    def say(self, text: str, kind: str = "info") -> None:
        self.message.object, self.message.alert_type, self.message.visible = text, kind, bool(text)

    # ------------------------------------------------------------------------------------------ layout
    def layout(self) -> list:
        # side by side where both fit, the progress under the form in a narrow window (it ran off the screen at 1100 px)
        return [pn.FlexBox(self.form(), self.progress_column(), flex_wrap="wrap", gap="20px", align_items="flex-start",
                           sizing_mode="stretch_width")]

    def form(self) -> pn.Column:
        w = self.widgets()
        self.start_b = pn.widgets.Button(name="Start study", button_type="primary", width=140,
                                         css_classes=["wbc-l-start"])
        self.cancel_b = pn.widgets.Button(name="Cancel", button_type="danger", width=100, disabled=True,
                                          css_classes=["wbc-l-cancel"])
        self.note = pn.pane.Alert("", alert_type="warning", visible=False, css_classes=["wbc-l-path-note"],
                                  sizing_mode="stretch_width")
        self.show_path_notes()
        self.form_check = pn.pane.Alert("<br>".join(esc(p) for p in self.form_problem.splitlines()),
                                        alert_type="warning", visible=bool(self.form_problem),
                                   css_classes=["wbc-l-check"], sizing_mode="stretch_width")
        self.refresh_start()
        self.start_b.on_click(self.start)
        self.cancel_b.on_click(self.cancel)
        return pn.Column(
            pn.pane.Markdown("### Start a study"), roots_markdown(), pn.Row(w["preset"], w["classifier"], w["pretrained"]),
            w["data"], w["data_path"], w["test"], w["test_path"], self.note, w["variants"],
            pn.Row(w["epochs"], w["per_class"], w["test_per_class"]),
            pn.Row(w["image_size"], w["input_policy"], w["seeds"], w["split"], w["device"]),
            pn.Row(w["precision"]), self.form_check, pn.Row(self.start_b, self.cancel_b),
            width=FORM_PX, sizing_mode="fixed")

    def widgets(self) -> dict:
        """One widget per form parameter: (widget class, label, width, description)."""
        W = pn.widgets
        spec = {
            "preset": (W.Select, "Preset", 150, None), "classifier": (W.Select, "Classifier", 200, None),
            "pretrained": (W.Select, "Pretrained", 120, None),
            "data": (W.Select, "Data folder (under the allowed roots)", 500, None),
            "data_path": (W.TextInput, "…or type a data folder path", 420, None),
            "test": (W.Select, "Test folder", 420, None),
            "test_path": (W.TextInput, "…or type a test folder path", 420, "A TEST folder in the Kaggle layout "
                          "(class folders, also nested) under an allowed root; it replaces the choice above."),
            "variants": (W.MultiChoice, "Variants", 420, None),
            "epochs": (W.IntInput, "Epochs", 90, None), "per_class": (W.IntInput, "Train imgs/class (0=all)", 170, None),
            "test_per_class": (W.IntInput, "Test imgs/class (0=all)", 170, None),
            "image_size": (W.IntInput, "Image size", 90, None),
            "seeds": (W.TextInput, "Seeds", 90, "one seed (0) or several, comma-separated (0,1,2)"),
            "split": (W.Select, "Validation split", 120, None),
            "input_policy": (W.Select, "Classifier input", 120, "cell: a square around the stained white cell "
                             "(default). center: a centred square. full: the whole frame squashed (the paper's)."),
            "device": (W.Select, "Device", 100, None),
            "precision": (W.Select, "Real-ESRGAN precision", 150, "auto: fp16 on CUDA, fp32 on CPU. fp16 / bf16 "
                          "(the CLI's half): half precision everywhere, fp16 on CUDA and bf16 on CPU (52-54 dB PSNR "
                          "vs fp32; ~3x faster on CPUs with AMX, slower on others). fast (the quick and cpu "
                          "presets'): fp16 on CUDA; on CPU bf16 only where a probe measures it faster, else fp32. "
                          "Overview names the one used."),
        }
        css = {"image_size": "size", "seeds": "seed"}
        out = {}
        for name, (cls, label, width, desc) in spec.items():
            kw = {"description": desc} if desc else {}
            if name in ("data_path", "test_path"):
                kw["placeholder"] = "/path/under/a/data/root"
            out[name] = cls.from_param(self.param[name], name=label, width=width,
                                       css_classes=[f"wbc-l-{css.get(name, name).replace('_', '-')}"], **kw)
        out["precision"].options = PRECISION_LABELS
        return out

    def progress_column(self) -> pn.Column:
        self.message = pn.pane.Alert("", alert_type="info", visible=False, css_classes=["wbc-l-message"],
                                     sizing_mode="stretch_width")
        self.stage = pn.pane.Markdown("No study started from this dashboard.", css_classes=["wbc-l-stage"],
                                      sizing_mode="stretch_width")
        self.bar = pn.indicators.Progress(value=0, max=100, sizing_mode="stretch_width", max_width=420, visible=False,
                                          css_classes=["wbc-l-progress"])
        self.log = pn.pane.HTML("", css_classes=["wbc-l-log"], sizing_mode="stretch_width",
                                styles={"font-family": "monospace", "font-size": "12px", "background": "#f7f7f7"})
        self.open_b = pn.widgets.Button(name="Open the new run", button_type="success", visible=False,
                                        css_classes=["wbc-l-open"])
        self.open_b.on_click(self.open_run)
        self.elsewhere = pn.pane.Alert("", alert_type="warning", visible=False, css_classes=["wbc-l-elsewhere"],
                                       sizing_mode="stretch_width")
        self.poll()
        self.start_polling()
        return pn.Column(pn.pane.Markdown("### Progress"), self.elsewhere, self.stage, self.bar, self.message,
                         self.open_b, pn.pane.Markdown("**Log (tail)**"), self.log, sizing_mode="stretch_width",
                         styles={"flex": f"1 1 {PROGRESS_MIN_PX}px", "min-width": f"{PROGRESS_MIN_PX}px"}, css_classes=["wbc-l-progress-column"])

    # ------------------------------------------------------------------------------------ the job's progress
    def start_polling(self) -> None:
        """Poll once a second while the browser session lives (not outside a served session: tests)."""
        if pn.state.curdoc is None or pn.state.curdoc.session_context is None:
            return
        from panel.io.callbacks import PeriodicCallback

        # background: a once-a-second poll is not work the user waits for, so the header's busy spinner stays still
        cb = PeriodicCallback(callback=self.poll, period=1000, background=True)
        cb.start()

        def stop(_ctx):
            try:
                cb.stop()
            except Exception:
                pass

        pn.state.on_session_destroyed(stop)

    def poll(self) -> None:
        job = MANAGER.current
        self._ticks += 1
        if self._ticks % 5 == 1:  # every 5 s: studies in this store that this dashboard did not start
            self.show_elsewhere(job.run_id if job else None)
        if job is None:
            self.cancel_b.disabled = True
            return
        if self._job is not job:
            self._job, self._job_done, self._run_appeared = job, False, False
            self.open_b.visible = False
        self.show_job(job)
        if not self._run_appeared and job.run.exists():
            self._run_appeared = True
            self.state.refresh += 1
        if not job.running and not self._job_done:
            self.job_ended(job)

    def show_elsewhere(self, exclude: str | None) -> None:
        others = running_elsewhere(self.state.runs_dir, exclude=exclude)
        self.elsewhere.object = "".join(
            f"A study started elsewhere is running in this store: <code>{esc(rid)}</code> — "
            f"{progress_summary(pr)}. A study started here would share the machine with it.<br>" for rid, pr in others)
        self.elsewhere.visible = bool(others)

    def show_job(self, job) -> None:
        s, running = job.state(), job.running
        self.cancel_b.disabled = not running or job.cancel_requested
        self.refresh_start()
        prog = job.run.progress
        pct = prog.fraction_percent()
        self.bar.visible = True
        self.bar.value = int(pct) if pct is not None and running else (100 if s == Status.FINISHED else 0)
        elapsed = (job.ended or time.time()) - job.started
        step = f" {prog.stage_index}/{prog.stages}" if prog.stage_index and prog.stages else ""
        pct_txt = f" · {pct:.0f}%" if pct is not None else ""
        done = prog.done if prog.done is not None else 0
        total = prog.total if prog.total is not None else "?"
        self.stage.object = (f"**{esc(job.run_id)}** — **{esc(s)}** · stage{esc(step)}: "
                             f"{esc(prog.stage or 'starting')} ({esc(_count(done))}/{esc(_count(total))}){pct_txt} · "
                             f"{esc(prog.message or '')} · this stage: ETA {fmt_eta(prog.eta_s) if running else '—'} · "
                             f"elapsed {fmt_eta(elapsed)}")
        self.log.object = "<pre style='margin:0;white-space:pre-wrap'>" + esc("\n".join(job.log_tail(15))) + "</pre>"

    def job_ended(self, job) -> None:
        self._job_done = True
        self.state.refresh += 1
        self.refresh_start()
        s = job.state()
        kind = {Status.FINISHED: "success", Status.CANCELLED: "warning"}.get(s, "danger")
        extra = ""
        if s == Status.FAILED:
            try:
                extra = f": {esc(job.run.info.error_message or '')}"
            except Exception:
                extra = f" (exit code {job.returncode})"
        self.say(f"Study {esc(job.run_id)} {esc(s)}{extra}.", kind)
        self.open_b.name = f"Open {job.run_id}"
        self.open_b.visible = job.run.exists()


def _count(x) -> str:
    """A progress count as written (3, not 3.0)."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def roots_markdown() -> pn.pane.Markdown:
    roots = ", ".join(f"<code>{esc(r)}</code>" for r in data_roots())
    head = ("Allowed data roots (from `WBC_DATA_ROOTS`):\n\n" if os.environ.get("WBC_DATA_ROOTS") else
            "Allowed data roots (the data root found; set `WBC_DATA_ROOTS` to change):\n\n")
    return pn.pane.Markdown(head + (roots or "**none** — set `WBC_DATA_ROOTS` to launch studies"),
                            sizing_mode="stretch_width")

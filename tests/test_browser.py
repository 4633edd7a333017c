"""The user's screens in a real browser: the smoke study's ``report.html`` and ``harness ui`` (MLflow UI).

Headless Chromium (the system's ``chromium`` package, driven by Playwright's Python package; Playwright's
own browsers are never downloaded). Screenshots are saved under each test's temporary directory
(``pytest --basetemp DIR`` keeps them where you can look at them).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from services import CHROMIUM_ARGS, chromium_path, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "studies" / "smoke.yaml"
WINDOW = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium on this machine (CI: apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=120_000)
        try:
            yield browser
        finally:
            browser.close()


def _page(browser):
    page = browser.new_page(viewport=WINDOW)
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return page, errors


def test_report_renders_every_figure_and_table_within_a_1280px_window(browser, smoke_run, tmp_path):
    assert smoke_run.report_dir is not None, smoke_run.log.read_text()[-2000:]
    html = smoke_run.report_dir / "report.html"
    page, errors = _page(browser)
    page.goto(html.as_uri(), wait_until="load")
    images = page.eval_on_selector_all(
        "img",
        """els => els.map(e => ({alt: e.alt, complete: e.complete, natural: e.naturalWidth,
                                 width: e.getBoundingClientRect().width,
                                 height: e.getBoundingClientRect().height}))""",
    )
    assert images, "the report has figures"
    for image in images:
        assert image["complete"] and image["natural"] > 0, f"figure does not decode: {image['alt']}"
        assert image["width"] > 100 and image["height"] > 100, f"figure not visible: {image}"
    for i in range(len(images)):
        assert page.locator("img").nth(i).is_visible()
    tables = page.eval_on_selector_all(
        "table",
        """els => els.map(e => ({rows: e.querySelectorAll('tbody tr').length,
                                 right: e.getBoundingClientRect().right,
                                 caption: e.caption ? e.caption.textContent : ''}))""",
    )
    assert tables and all(t["rows"] > 0 for t in tables), tables
    _assert_tables_stay_in_the_text_column(page)
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert errors == []


def _assert_tables_stay_in_the_text_column(page) -> None:
    """Every table's visible box (clipped by a scrolling wrapper, if any) ends inside the text column,
    and the page never scrolls sideways in a 1280-px window."""
    column = page.evaluate(
        "(() => { const b = document.body; return b.getBoundingClientRect().right"
        " - parseFloat(getComputedStyle(b).paddingRight); })()"
    )
    boxes = page.eval_on_selector_all(
        "table",
        """els => els.map(e => {
             const scroller = e.parentElement && getComputedStyle(e.parentElement).overflowX === 'auto'
               ? e.parentElement.getBoundingClientRect().right : Infinity;
             return {right: Math.min(e.getBoundingClientRect().right, scroller),
                     caption: e.caption ? e.caption.textContent.slice(0, 60) : ''};
           })""",
    )
    for box in boxes:
        assert box["right"] <= column + 1, (
            f"table runs past the text column ({box['right']:.0f} > {column:.0f}): {box}"
        )
    width = page.evaluate("window.innerWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width, "the page scrolls sideways"


def test_a_results_table_of_six_benchmarks_fits_a_1280px_window(browser, tmp_path):
    """The full ablation's table (six benchmarks, mean ± sd cells) is far wider than the smoke study's."""
    import pandas as pd

    from harness.report.render import Table, to_html

    metrics = [
        f"{b}.{m}"
        for b, m in [
            ("scienceqa", "acc"),
            ("gpqa", "acc"),
            ("mbpp", "pass_at_1"),
            ("humaneval", "pass_at_1"),
            ("cos_e", "acc"),
            ("toolalpaca", "acc"),
        ]
    ] + ["mean.acc", "ppl_fit", "ppl_ret", "ret_jsd", "ppl_ret_reverse", "Δ mean.acc vs sdft"]
    rows = [
        {"variant": f"unisd[agreement+contrastive+ema+{i}]", "family": "unisd", "n": 3}
        | {m: "0.512 ± 0.031" for m in metrics}
        for i in range(4)
    ]
    html = tmp_path / "wide.html"
    html.write_text(to_html("wide", [Table(pd.DataFrame(rows), "a wide results table")]), encoding="utf-8")
    page, errors = _page(browser)
    page.goto(html.as_uri(), wait_until="load")
    page.screenshot(path=str(tmp_path / "wide.png"), full_page=True)
    _assert_tables_stay_in_the_text_column(page)
    assert errors == []


def _wait_health(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        assert process.poll() is None, "harness ui exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.time() < deadline, f"harness ui never answered /health in {timeout}s"
        time.sleep(0.5)


def _harness_ui(smoke_run, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "ui", str(SMOKE), "--output-dir", str(smoke_run.output_dir)]
        + ["--port", str(port)],
        cwd=smoke_run.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # as a terminal would: `harness ui` leads its own group, the UI another
    )


def _kill_ui(process: subprocess.Popen) -> None:
    """Finalizer: whatever happened, no process of the UI is left (its server runs in its own group)."""
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for proc in [*children, psutil.Process(process.pid)] if process.poll() is None else children:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)


def _stopped_by(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to ``harness ui`` only and check that it exits and leaves no process of its UI."""
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "the MLflow UI runs as a child of harness ui"
    process.send_signal(signum)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"harness ui did not exit on {signal.Signals(signum).name}")
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()
    assert not alive, (
        f"{signal.Signals(signum).name} left the UI's processes running: {[c.pid for c in alive]}"
    )


def test_harness_ui_opens_the_runs_table_of_the_study_and_sigterm_stops_it(browser, smoke_run, tmp_path):
    from harness.spec import load_spec
    from harness.tracking import get_runs

    spec = load_spec(SMOKE).with_overrides(output_dir=smoke_run.output_dir)
    runs = get_runs(spec)
    trials = [r for r in runs if r.data.tags.get("unisd.role") == "trial"]
    parent = next(r for r in runs if r.data.tags.get("unisd.role") == "study")
    port = free_port()
    ui = _harness_ui(smoke_run, port)
    try:
        printed = ui.stdout.readline()
        url = printed.split(": ", 1)[1].split()[0]  # "MLflow UI for study smoke: URL  (Ctrl-C stops it)"
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{parent.info.experiment_id}"), printed
        _wait_health(f"http://127.0.0.1:{port}", ui)
        page, errors = _page(browser)
        page.set_default_timeout(180_000)  # the UI's first render takes a minute on a busy 2-core machine
        page.goto(url, wait_until="load")  # the address `harness ui` prints, as a user would open it
        page.wait_for_selector(f"text={parent.info.run_name}")
        page.screenshot(path=str(tmp_path / "mlflow_experiment.png"))
        assert f"/experiments/{parent.info.experiment_id}/runs" in page.url, (
            f"the study opened on {page.url}, not on its runs table"
        )
        # the trials are the study run's children: expand it and find every trial by name
        page.locator('[role="row"]', has_text=parent.info.run_name).first.locator("button").first.click()
        for run in trials:
            page.wait_for_selector(f"text={run.info.run_name}")
        page.screenshot(path=str(tmp_path / "mlflow_runs.png"))
        child = trials[0]
        page.goto(  # the trial's own page, in the model-training view (as the runs table's link keeps it)
            f"http://127.0.0.1:{port}/#/experiments/{parent.info.experiment_id}/runs/{child.info.run_id}"
            "?workflowType=machine_learning"
        )
        page.wait_for_selector("text=mean.acc")
        page.screenshot(path=str(tmp_path / "mlflow_trial_run.png"), full_page=True)
        # the UI probes optional endpoints (404) that a local store does not serve; nothing else may fail
        assert not [e for e in errors if "404" not in e], errors
        _stopped_by(ui, signal.SIGTERM)
    finally:
        if ui.poll() is None:
            _kill_ui(ui)


@pytest.mark.parametrize("signum", [signal.SIGHUP])
def test_harness_ui_stops_its_whole_process_group_on_sighup(smoke_run, signum):
    port = free_port()
    ui = _harness_ui(smoke_run, port)
    try:
        _wait_health(f"http://127.0.0.1:{port}", ui)
        _stopped_by(ui, signum)
    finally:
        if ui.poll() is None:
            _kill_ui(ui)

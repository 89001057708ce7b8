"""``benchmarks.interactivity``: ``cpu_seconds`` tells the CPU time of the app server from everything else this
process started (oracle: two child processes that each spin for a known CPU time, ``time.process_time``, say so,
then wait on their input); ``WATCH_DOM``, the in-page clock of ``--browser``, starts at the press and leaves a
canvas's fallback content out (oracle: Chromium's own events and mutations made on purpose)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.interactivity import cpu_seconds

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\nprint('spun', flush=True)\ninput()"


def test_cpu_seconds_splits_the_server_from_the_other_children():
    server, other = (subprocess.Popen([sys.executable, "-c", SPIN.format(s=s)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) for s in (0.6, 0.3))
    try:
        assert server.stdout.readline() == other.stdout.readline() == "spun\n"
        server_s, other_s = cpu_seconds(server.pid)
        assert 0.55 <= server_s < 1.2  # the spin (less up to a clock tick of accounting) plus the interpreter's start
        assert 0.25 <= other_s < 0.9
    finally:
        for p in (server, other):
            p.communicate("\n", timeout=30)


def test_cpu_seconds_leaves_the_other_servers_out_of_the_browser():
    """With two app servers side by side (``--compare``), the other one's CPU counts for neither."""
    server, other_server, browser = (subprocess.Popen([sys.executable, "-c", SPIN.format(s=s)], stdin=subprocess.PIPE,
                                                      stdout=subprocess.PIPE, text=True) for s in (0.5, 1.5, 0.5))
    try:
        assert server.stdout.readline() == other_server.stdout.readline() == browser.stdout.readline() == "spun\n"
        server_s, browser_s = cpu_seconds(server.pid, (other_server.pid,))
        assert 0.45 <= server_s < 1.2  # the spin (less a clock tick) plus the interpreter's start
        assert 0.45 <= browser_s < 1.2  # without the other server's 1.5 s
        assert cpu_seconds(server.pid)[1] >= browser_s + 1.4  # counted as the browser's when not named
    finally:
        for p in (server, other_server, browser):
            p.communicate("\n", timeout=30)


@pytest.mark.browser
def test_the_page_clock_starts_at_the_press_and_ignores_a_canvas_fallback():
    """``WATCH_DOM`` in headless Chromium on a static page. Oracle: the browser's own event time stamp and DOM
    mutations made at known moments: a press is stamped, a change inside a ``<canvas>`` (fallback content, never
    drawn) leaves the last-change stamp alone, a change of the canvas's own size and of a visible element move it."""
    from playwright.sync_api import sync_playwright

    from benchmarks.interactivity import WATCH_DOM
    from benchmarks.memory import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_content('<button id="b">press</button><canvas id="c"></canvas><p id="p">text</p>')
            page.add_script_tag(content=WATCH_DOM)  # as the benchmark's init script runs it, on this document

            def last_after(js: str) -> tuple[float, float]:
                before = page.evaluate("() => window.__qcoreLastChange")
                page.evaluate(js)
                page.wait_for_timeout(50)  # mutation records are delivered after the task
                return before, page.evaluate("() => window.__qcoreLastChange")

            start = page.evaluate("() => performance.now()")
            page.click("#b")
            pressed = page.evaluate("() => window.__qcorePressed")
            assert pressed is not None and start <= pressed <= page.evaluate("() => performance.now()")
            before, after = last_after("() => document.getElementById('c').appendChild(document.createElement('table'))")
            assert after == before  # inside the canvas: not counted
            before, after = last_after("() => document.querySelector('#c table').setAttribute('role', 'grid')")
            assert after == before
            before, after = last_after("() => { document.getElementById('c').width = 640; }")
            assert after > before  # the canvas itself changed size: counted
            before, after = last_after("() => { document.getElementById('p').textContent = 'changed'; }")
            assert after > before
        finally:
            browser.close()


def test_every_browser_change_names_a_widget_its_page_draws():
    """``BROWSER_CHANGES`` stays in step with the pages: each entry's page file exists and draws a widget of that
    kind with exactly that label (oracle: the page's source), so a renamed widget fails here, not in a benchmark run."""
    import re
    from pathlib import Path

    from benchmarks.interactivity import BROWSER_CHANGES

    pages = Path(__file__).resolve().parents[1] / "pages"
    for path, title, kind, label, models, _ in BROWSER_CHANGES:
        source = (pages / f"{path or 'model'}.py").read_text()
        assert re.search(rf"\.{kind}\(\s*\"{re.escape(label)}\"", source), (title, kind, label)
        assert models in {"every", "lm", "first", "small"}


def test_browser_changes_run_on_the_models_they_are_for(digits_cnn):
    """``runs_on``: a language model's pages on tiny-lm only, QAT where the app trains without asking, the rest on
    every model (oracle: the zoo's task kinds and parameter counts against the app's threshold)."""
    from benchmarks.interactivity import runs_on
    from ui.state import SMALL_MODEL_WEIGHTS

    assert sum(i.params for i in digits_cnn.layers.values()) <= SMALL_MODEL_WEIGHTS
    assert runs_on("lm", "tiny-lm", "digits-cnn") and not runs_on("lm", "digits-cnn", "digits-cnn")
    assert runs_on("small", "digits-cnn", "digits-cnn") and not runs_on("small", "minilm-l6", "digits-cnn")
    assert runs_on("first", "digits-cnn", "digits-cnn") and not runs_on("first", "minilm-l6", "digits-cnn")
    assert runs_on("every", "minilm-l6", "digits-cnn")

"""End to end in a real browser: ``streamlit run app.py`` driven by Debian's Chromium through Playwright.

Visits every page the sidebar navigation lists (found in the page, so pages added later are covered),
waits for its Plotly charts and checks that each drew data and that no error box or exception appears.
Playwright never downloads a browser here: it launches ``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ERROR_BOXES = '[data-testid="stException"], [data-testid="stAlertContentError"]'
PAGE_TIMEOUT_MS = 30_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The URL of a fresh ``streamlit run app.py`` (the project's venv python), stopped afterwards.
    The server's output goes to a log file (a pipe nobody reads could fill up and stall it)."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("streamlit did not start:\n" + log_path.read_text(errors="replace"))
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _chart_points(page) -> list[int]:
    """For each Plotly chart on the page, once Plotly has drawn them all: how many data points its
    traces hold (x or y values; typed arrays included)."""
    page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
        .every(c => c.querySelector('.js-plotly-plot') && c.querySelector('.js-plotly-plot')._fullData)""",
                           timeout=PAGE_TIMEOUT_MS)
    return page.eval_on_selector_all(".js-plotly-plot", """plots => plots.map(p =>
        p._fullData.reduce((n, t) => n + Math.max((t.x || []).length || 0, (t.y || []).length || 0), 0))""")


def _wait_until_idle(page) -> None:
    """Until the page's script has drawn its title and finished running (checked twice, 0.4 s apart,
    so a run that has not started yet is not taken for one that has finished)."""
    page.locator("h1").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    for _ in range(2):
        page.wait_for_timeout(400)
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=PAGE_TIMEOUT_MS)


def test_every_page_renders_its_charts_without_errors(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, timeout=PAGE_TIMEOUT_MS)
            _wait_until_idle(page)  # the navigation app.py declares replaces the first (pages/ folder) listing
            links = [(a.inner_text().strip().splitlines()[-1].strip(), a.get_attribute("href"))  # after the icon
                     for a in page.locator('[data-testid="stSidebarNav"] a').all()]
            titles = [t for t, _ in links]
            assert {"Model", "Formats", "Weights", "Activations"} <= set(titles), titles
            assert "state" not in titles and "formulas" not in titles, titles  # helper modules are not pages
            charts_per_page, seconds = {}, {}
            for title, href in links:
                start = time.monotonic()
                page.goto(href if href.startswith("http") else app_url + "/" + href.lstrip("/"), timeout=PAGE_TIMEOUT_MS)
                _wait_until_idle(page)
                errors = page.locator(ERROR_BOXES)
                assert errors.count() == 0, f"{title}: {errors.first.inner_text()}"
                points = _chart_points(page)
                assert all(n > 0 for n in points), f"{title}: a chart drew no data {points}"
                charts_per_page[title] = len(points)
                seconds[title] = round(time.monotonic() - start, 1)
                # the model choice is in the sidebar of every page
                assert page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').count() >= 1, title
            print("seconds to render each page:", seconds)
            for title, at_least in {"Model": 1, "Formats": 4, "Weights": 4, "Activations": 3}.items():
                assert charts_per_page[title] >= at_least, charts_per_page
        finally:
            browser.close()


def test_a_bad_upload_shows_an_error_box_and_keeps_the_loaded_model(app_url, tmp_path, digits_mlp):
    from playwright.sync_api import expect, sync_playwright
    from safetensors.torch import save_file

    state = {k: v * 0.5 for k, v in digits_mlp.model.state_dict().items()}
    save_file(state, tmp_path / "half.safetensors")
    state["fc2.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    params = f"{sum(v.numel() for v in state.values()):,}"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, timeout=PAGE_TIMEOUT_MS)
            _wait_until_idle(page)
            sidebar = page.locator('[data-testid="stSidebar"]')
            sidebar.get_by_text("Upload", exact=True).click()
            model_file = sidebar.locator('input[type="file"]').first
            load = sidebar.get_by_role("button", name="Load uploaded model")

            model_file.set_input_files(str(tmp_path / "half.safetensors"))
            expect(load).to_be_enabled(timeout=PAGE_TIMEOUT_MS)
            load.click()
            expect(page.locator("h1").first).to_have_text("Model: half.safetensors", timeout=PAGE_TIMEOUT_MS)
            expect(page.locator('[data-testid="stMetric"]', has_text="Parameters")).to_contain_text(params)

            model_file.set_input_files(str(tmp_path / "nan.safetensors"))
            _wait_until_idle(page)  # the new file is committed before the click
            load.click()
            error = page.locator('[data-testid="stAlertContentError"]')
            expect(error).to_contain_text("nan.safetensors contains NaN or Inf weights; check the training run that "
                                       "produced it", timeout=PAGE_TIMEOUT_MS)
            expect(page.locator("h1").first).to_have_text("Model: half.safetensors")  # the loaded model stays
            expect(page.locator('[data-testid="stMetric"]', has_text="Parameters")).to_contain_text(params)
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()


def test_a_link_to_the_home_page_by_its_file_name_goes_home(app_url):
    """/model (the home page's file name) opens the Model page at "/" with the link's query, not "page not found"."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{app_url}/model?model=digits-cnn", timeout=PAGE_TIMEOUT_MS)
            _wait_until_idle(page)
            expect(page.locator("h1").first).to_have_text("Model: digits-cnn")
            assert page.get_by_text("Page not found").count() == 0 and page.locator(ERROR_BOXES).count() == 0
            assert page.url.split("?")[0].rstrip("/") == app_url, page.url
        finally:
            browser.close()

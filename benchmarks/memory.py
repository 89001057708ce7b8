"""Memory: resident memory of the real app server with 1 session and with many sessions on one zoo model.

    python -m benchmarks.memory [--quick] [--models digits-mlp,minilm-l6] [--sessions 10]

Starts ``streamlit run app.py`` (headless, a free port, no file watcher), then opens one browser
session and afterwards the others all at once, with Playwright driving Debian's Chromium
(``/usr/bin/chromium``; Playwright never downloads a browser here), each on ``/?model=<name>`` in
its own browser context, and waits until every page has rendered (a Plotly chart or the sidebar
caption, and no script still running). The server's resident set size (``VmRSS`` in
``/proc/<pid>/status``, MiB = 2**20 bytes) is read when idle (no session yet), with 1 session open
and with all sessions open; ``VmHWM`` is the peak. Sessions share the model through
``st.cache_resource``, so each extra session should add little.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app.py"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
RENDERED = ".js-plotly-plot, [data-testid='stSidebar'] [data-testid='stCaptionContainer']"
RUNNING = "[data-testid='stStatusWidgetRunningIcon']"  # Streamlit's "Running…" icon, shown while a script runs
START_TIMEOUT_S = 60
RENDER_TIMEOUT_S = 120
SETTLE_S = 1.0  # let the server finish the session's work (and the allocator settle) before reading RSS


def memory_mib(pid: int) -> dict:
    """{"rss": current resident set, "hwm": peak resident set} of process ``pid`` in MiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[key].split()[0]) / 1024 for name, key in (("rss", "VmRSS"), ("hwm", "VmHWM"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(log_path: Path, app: Path = APP):
    """``(pid, base_url)`` of a fresh headless server of ``app`` (default: this checkout's ``app.py``); stopped (by
    its own pid) on exit."""
    port = free_port()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
             "--server.port", str(port), "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=app.parent, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app server did not start; its log ends:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield server.pid, url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def open_sessions(browser, url: str, count: int) -> list:
    """Open ``count`` sessions at once (one browser context each) and wait until every page has rendered
    and its script has finished; the contexts stay open (closing one would end its session)."""
    contexts = [browser.new_context(viewport={"width": 1280, "height": 900}) for _ in range(count)]
    pages = [context.new_page() for context in contexts]
    for page in pages:
        page.goto(url, wait_until="commit", timeout=RENDER_TIMEOUT_S * 1000)
    for page in pages:
        page.wait_for_selector(RENDERED, timeout=RENDER_TIMEOUT_S * 1000)
        page.wait_for_selector(RUNNING, state="detached", timeout=RENDER_TIMEOUT_S * 1000)
        if page.locator("[data-testid='stException']").count():
            raise RuntimeError(f"the app raised: {page.locator('[data-testid=stException]').first.inner_text()[:300]}")
    return contexts


def measure_model(name: str, sessions: int, log_path: Path) -> dict:
    """Server RSS (MiB) idle, with 1 session and with ``sessions`` sessions on zoo model ``name``."""
    from playwright.sync_api import sync_playwright

    with app_server(log_path) as (pid, base_url), sync_playwright() as pw:
        url = f"{base_url}/?model={name}"
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            time.sleep(SETTLE_S)
            idle = memory_mib(pid)
            start = time.perf_counter()
            open_sessions(browser, url, 1)
            first_s = time.perf_counter() - start
            time.sleep(SETTLE_S)
            one = memory_mib(pid)
            start = time.perf_counter()
            open_sessions(browser, url, sessions - 1)
            more_s = time.perf_counter() - start
            time.sleep(SETTLE_S)
            many = memory_mib(pid)
        finally:
            browser.close()
    return {"model": name, "sessions": sessions, "idle": idle["rss"], "one": one["rss"], "many": many["rss"],
            "peak": many["hwm"], "per_session": (many["rss"] - one["rss"]) / (sessions - 1),
            "first_render_s": first_s, "others_render_s": more_s}


def main(argv=None) -> str:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits-mlp, 1 and 3 sessions (used by the test suite)")
    ap.add_argument("--models", default="digits-mlp,minilm-l6")
    ap.add_argument("--sessions", type=int, default=10)
    args = ap.parse_args(argv)
    models, sessions = (["digits-mlp"], 3) if args.quick else (args.models.split(","), args.sessions)
    if sessions < 2:
        ap.error("--sessions must be at least 2 (the extra memory per session needs two readings)")

    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure_model(name, sessions, Path(tmp) / f"{name}.log") for name in models]
    table = pd.DataFrame([{
        "model": r["model"], "RSS idle (MiB)": r["idle"], "RSS, 1 session (MiB)": r["one"],
        f"RSS, {r['sessions']} sessions (MiB)": r["many"], "peak RSS (MiB)": r["peak"],
        "extra per session (MiB)": r["per_session"], "first session rendered in (s)": r["first_render_s"],
        f"other {r['sessions'] - 1} rendered in (s)": r["others_render_s"],
    } for r in rows])
    text = (f"Resident memory of the app server process (`streamlit run app.py`): one session, then {sessions - 1} "
            f"more at once, in headless Chromium on the Model page; extra per session = (RSS with {sessions} − RSS "
            f"with 1) / {sessions - 1}.\n\n{table.to_markdown(index=False, floatfmt='.1f')}\n")
    print(text)
    return text


if __name__ == "__main__":
    main()

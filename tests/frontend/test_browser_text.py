"""``ui.text.plain`` in a real browser (Debian's Chromium through Playwright, a ``streamlit run`` of a tiny script):
hostile text renders as exactly its characters -- no link, image, icon or emoji, and nothing invisible in the
text a reader selects and copies -- in the Markdown kinds the app uses (body, alert, button label, metric label).
The control, the same text with backslash escapes only, does link: the test can tell the two apart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, PAGE_TIMEOUT_MS, _free_port
from test_text import HOSTILE

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = '''
import re, sys
sys.path.insert(0, {root!r})
import streamlit as st
from ui.text import _SPECIAL, plain
for i, text in enumerate({texts!r}):
    st.markdown(plain(text))
    st.error(plain(text))
    st.button(plain(text), key=f"b{{i}}")
    st.metric(plain(text), "1")
    st.markdown(_SPECIAL.sub(r"\\\\\\1", text))  # the control: escapes only
'''
KINDS = ["[data-testid=stMarkdown]", "[data-testid=stAlert]", "[data-testid=stButton] button",
         "[data-testid=stMetricLabel]"]


def test_plain_text_renders_as_its_characters_and_copies_without_extras(tmp_path):
    from playwright.sync_api import sync_playwright

    script = tmp_path / "texts.py"
    script.write_text(SCRIPT.format(root=str(ROOT), texts=HOSTILE))
    port = _free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
                                   "--server.port", str(port), "--server.address", "127.0.0.1",
                                   "--server.fileWatcherType", "none"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 4000})
            page.goto(url, timeout=PAGE_TIMEOUT_MS)
            page.wait_for_function(f"document.querySelectorAll('[data-testid=stMetric]').length === {len(HOSTILE)}",
                                   timeout=PAGE_TIMEOUT_MS)
            page.wait_for_timeout(1000)  # remark-emoji and KaTeX load lazily: let them
            shown = {kind: page.eval_on_selector_all(kind, """els => els.map(e => [e.innerText.trim(),
                e.querySelectorAll('a').length, e.querySelectorAll('img, [role=img], .katex').length])""")
                     for kind in KINDS}
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    markdown, control = shown[KINDS[0]][0::2], shown[KINDS[0]][1::2]
    for kind, rows in [(KINDS[0], markdown)] + [(k, shown[k]) for k in KINDS[1:]]:
        assert [r[0] for r in rows] == HOSTILE, kind  # innerText: what a selection copies
        assert all(r[1:] == [0, 0] for r in rows), (kind, rows)
    assert sum(r[1] for r in control) >= 4 and sum(r[2] for r in control) >= 1, control  # www, mailto, http, :streamlit:

"""The workshop in a real browser at projector size: every lesson, both steps, on a fresh ``streamlit run app.py``
(the server fixture of ``test_browser``), with no error box, no empty chart and no overlapping axis labels."""

from __future__ import annotations

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, ERROR_BOXES, PAGE_TIMEOUT_MS, _chart_points
from test_browser import app_url  # noqa: F401 -- the module-scoped fresh server
from ui.lessons import lessons

pytestmark = pytest.mark.browser
PROJECTOR = {"width": 1280, "height": 720}
LESSON_TIMEOUT_MS = 180_000  # a lesson's first visit on a fresh server computes its facts (a sweep, evaluations)


def _wait_until_idle(page, timeout_ms: int = LESSON_TIMEOUT_MS) -> None:
    """``test_browser._wait_until_idle`` with room for a lesson's first computation on a loaded machine."""
    page.locator("h1").first.wait_for(timeout=timeout_ms)
    for _ in range(2):
        page.wait_for_timeout(400)
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)

# Every text Plotly draws for an axis or a title: tick labels, axis titles, the figure's title.
_LABEL_BOXES = """plots => plots.map(p => [...p.querySelectorAll(
        '.xtick text, .ytick text, .g-xtitle text, .g-ytitle text, .g-x2title text, .g-y2title text, .gtitle')]
    .filter(t => t.textContent.trim() && t.getBoundingClientRect().width > 0)
    .map(t => { const r = t.getBoundingClientRect();
                return {text: t.textContent, x0: r.left, y0: r.top, x1: r.right, y1: r.bottom}; }))"""


def overlaps(boxes: list[dict], tolerance: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of labels whose bounding boxes intersect by more than ``tolerance`` pixels both ways."""
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if (min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]) > tolerance
                    and min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]) > tolerance):
                out.append((a["text"], b["text"]))
    return out


def test_overlaps_finds_crossing_boxes_only():
    a = {"text": "a", "x0": 0, "y0": 0, "x1": 10, "y1": 10}
    assert overlaps([a, {"text": "b", "x0": 5, "y0": 5, "x1": 15, "y1": 15}]) == [("a", "b")]
    assert overlaps([a, {"text": "c", "x0": 10, "y0": 0, "x1": 20, "y1": 10}]) == []  # touching is fine


def test_every_lesson_at_1280x720(app_url):  # noqa: F811
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=PROJECTOR)
            page.goto(app_url, timeout=PAGE_TIMEOUT_MS)
            _wait_until_idle(page)
            first = page.locator('[data-testid="stSidebarNav"] a').first.inner_text().strip().splitlines()[-1]
            assert first.strip() == "Lessons"
            assert page.get_by_text("Deploy", exact=True).count() == 0  # toolbarMode = "minimal"
            for n in lessons():
                for step in ("idea", "exercise"):
                    page.goto(f"{app_url}/lessons?lesson={n}&step={step}", timeout=PAGE_TIMEOUT_MS)
                    _wait_until_idle(page)
                    where = f"lesson {n}, {step}"
                    assert page.locator("h2").first.inner_text().startswith(f"{n}. "), where
                    errors = page.locator(ERROR_BOXES)
                    assert errors.count() == 0, f"{where}: {errors.first.inner_text()}"
                    if step == "idea":
                        points = _chart_points(page)
                        assert points and all(p > 0 for p in points), f"{where}: a chart drew no data {points}"
                        for boxes in page.eval_on_selector_all(".js-plotly-plot", _LABEL_BOXES):
                            assert not overlaps(boxes), f"{where}: overlapping labels {overlaps(boxes)}"
        finally:
            browser.close()

"""The app against hostile visitors: Markdown/HTML in link parameters, file names and ONNX names is shown as
text; an upload that would exhaust memory or time is refused by ``qcore.io.sandbox`` with one line while the
server keeps answering; an internal error shows an id, never a traceback.

Every payload is built here in ``tmp_path``; none is committed.
"""

from __future__ import annotations

import json
import re
import resource
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from markdown_it import MarkdownIt
from onnx import TensorProto, helper, numpy_helper
from streamlit.testing.v1 import AppTest

from qcore.recipe.links import encode_layers
from ui import keys, state
from qcore.errors import QcoreError
from qcore.io.sandbox import vet_upload
from qcore.io.workload import load_workload
from test_browser import CHROMIUM, CHROMIUM_ARGS, PAGE_TIMEOUT_MS, _wait_until_idle, app_url  # noqa: F401
from ui.text import plain

APP = str(Path(__file__).resolve().parents[2] / "app.py")
EVIL = "[click](http://evil/a) ![img](http://evil/x.png) <b>bold</b> :red[r] :material/home: www.evil.com"
EVIL_FILE = "[c](https:evil.com) <b>b <img src=x onerror=alert(1)> www.evil.com.onnx"  # no "/" in a file name
# what must never reach a Markdown call unescaped (each is a live link, image, tag or directive when rendered)
RAW = ["](http", "![", "<b>", ":red[", ":material/", "www.evil", "](https"]
PAGES = ["model", "formats", "weights", "activations", "sensitivity", "mixed_precision", "tradeoffs", "qat", "export"]


def visible(markdown: str) -> str:
    """What a reader sees of escaped Markdown: the empty ``:small[]`` node breaks dropped (they render as an empty
    span), backslash escapes resolved (tests/frontend/test_browser_text.py checks this against the browser)."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown.replace(":small[]", ""))


def rendered_texts(at: AppTest) -> list[str]:
    """Every string of the run that Streamlit renders as Markdown: element bodies (markdown, caption, title,
    alerts, toasts), labels, help tooltips and progress texts, in the sidebar and the main area."""
    texts = []

    def walk(node):
        proto = getattr(node, "proto", None)
        if proto is not None and getattr(node, "type", "") not in ("code", "dataframe", "plotly_chart", "arrow_data_frame"):
            for field in ("body", "label", "help", "text"):
                value = getattr(proto, field, None)
                if isinstance(value, str) and value:
                    texts.append(value)
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return texts


def assert_plain(texts: list[str]) -> None:
    """No hostile fragment is there unescaped, and a CommonMark renderer (an oracle independent of
    ``ui.text``) finds no link, image or tag in any of them."""
    md = MarkdownIt("commonmark").enable("strikethrough")
    for t in texts:
        assert not [r for r in RAW if r in t], t
        html = md.render(t)
        assert "<a " not in html and "<img" not in html and "<b>" not in html, (t, html)


def hostile_onnx(path: Path) -> Path:
    """A two-Gemm MLP whose initializer, node and output names carry ``EVIL``, with a second graph output
    (the loader writes a note naming the output it scores)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"w1 {EVIL}")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), f"w2 {EVIL}")
    nodes = [helper.make_node("Gemm", ["x", w1.name], [f"h {EVIL}"], name=f"fc1 {EVIL}", transB=1),
             helper.make_node("Relu", [f"h {EVIL}"], [f"r {EVIL}"], name=f"relu {EVIL}"),
             helper.make_node("Gemm", [f"r {EVIL}", w2.name], [f"out {EVIL}"], name=f"fc2 {EVIL}", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info(f"out {EVIL}", TensorProto.FLOAT, ["batch", 3]),
                               helper.make_tensor_value_info(f"r {EVIL}", TensorProto.FLOAT, ["batch", 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def folding_bomb(path: Path) -> Path:
    """202 bytes of ONNX whose ConstantOfShape folds to a 40000 x 40000 float32 tensor (6.0 GiB)."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array([40000, 40000], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def legit(tmp_path_factory, digits_mlp):
    """digits-mlp as an uploaded safetensors state dict (the quickest real upload to load)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("legit") / "mlp.safetensors"
    save_file(digits_mlp.model.state_dict(), path)
    return path


# ---- (a) link parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("query", [
    {"preset": EVIL},
    {"layers": encode_layers({f"fc1 {EVIL}": None})},  # an unknown layer: the error quotes its name
    {"layers": encode_layers({"fc1": {"weights": {"format": EVIL}}})},  # the error quotes the format
])
def test_a_hostile_link_is_reported_as_text(query):
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query)
    at.run()
    assert not at.exception
    (box,) = [e.value for e in at.sidebar.error]
    assert visible(box).startswith("The link's recipe was not loaded: ") and "[click](http://evil/a)" in visible(box)
    assert "\\[" in box and "\\(http\\:" in box  # the attacker's text is there, escaped
    assert_plain(rendered_texts(at))


# ---- (b) names from an uploaded ONNX, on every page ----------------------------------------------
def test_hostile_onnx_names_are_shown_as_text_on_every_page(tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path / "cache"))
    path = hostile_onnx(tmp_path / EVIL_FILE)
    workload = load_workload(str(path))
    assert any("](http://evil" in n for n in workload.notes)  # the loader does quote the names

    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state[keys.SOURCE] = keys.UPLOAD_SOURCE
    at.session_state[keys.UPLOAD] = {"key": "upload:hostile", "workload": workload, "label": path.name}
    at.run()
    seen = []
    for page in PAGES:
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, (page, [e.value for e in at.exception])
        texts = rendered_texts(at)
        assert_plain(texts)
        seen += texts
        for chart in at.get("plotly_chart"):  # figure titles built by the pages: HTML escaped
            title = json.loads(chart.proto.spec)["layout"].get("title", {}).get("text", "")
            assert "<b>" not in title, (page, title)
    assert f"Model: {plain(EVIL_FILE)}" in seen  # the title names the file, escaped
    assert any(plain(f"'out {EVIL}'") in t for t in seen)  # the note naming the output, escaped


# ---- (c) the sandbox -------------------------------------------------------------------------------
def _one_line_refusal(call, bound_s: float) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(QcoreError) as e:
        call()
    seconds = time.monotonic() - start
    message = str(e.value)
    assert "\n" not in message and seconds < bound_s, (message, seconds)
    return message, seconds


def test_a_folding_bomb_is_refused_in_one_line_without_touching_this_process(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    message, _ = _one_line_refusal(lambda: vet_upload(folding_bomb(tmp_path / "bomb.onnx")), bound_s=60)
    assert message.startswith(("ONNX operator 'ConstantOfShape'", "bomb.onnx was refused")), message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # this process grew < 100 MiB


def test_the_memory_wall_refuses_what_the_loaders_let_through(legit):
    vet_upload(legit)  # loads under the default limits
    message, _ = _one_line_refusal(lambda: vet_upload(legit, memory_bytes=400 * 2**20), bound_s=60)
    assert message == ("mlp.safetensors was refused: loading it needed more than 400 MiB of memory "
                       "(limit QCORE_UPLOAD_MEMORY_MB)")


def test_the_time_wall_kills_a_slow_load_at_the_timeout(legit):
    message, seconds = _one_line_refusal(lambda: vet_upload(legit, timeout_s=0.5), bound_s=3)
    assert message == "mlp.safetensors was refused: loading it took longer than 0.5 s (limit QCORE_UPLOAD_TIMEOUT_S)"


def test_the_loaders_own_message_comes_back_unchanged(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(QcoreError) as in_process:
        load_workload(str(path))
    with pytest.raises(QcoreError) as vetted:
        vet_upload(path)
    assert str(vetted.value) == str(in_process.value)


# ---- (d) a real server keeps answering while an upload is refused ---------------------------------
@pytest.mark.browser
def test_the_server_answers_while_a_bomb_upload_is_vetted(app_url, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    bomb = folding_bomb(tmp_path / "bomb.onnx")
    hostile = hostile_onnx(tmp_path / EVIL_FILE)
    health, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            start = time.monotonic()
            try:
                with urllib.request.urlopen(f"{app_url}/_stcore/health", timeout=3) as r:
                    health.append((r.status, time.monotonic() - start))
            except OSError as e:
                health.append((repr(e), time.monotonic() - start))
            time.sleep(0.2)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        poller = threading.Thread(target=poll)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, timeout=PAGE_TIMEOUT_MS)
            _wait_until_idle(page)
            sidebar = page.locator('[data-testid="stSidebar"]')
            sidebar.get_by_text("Upload", exact=True).click()
            model_file = sidebar.locator('input[type="file"]').first
            load = sidebar.get_by_role("button", name="Load uploaded model")
            model_file.set_input_files(str(bomb))
            expect(load).to_be_enabled(timeout=PAGE_TIMEOUT_MS)
            poller.start()
            load.click()
            other = browser.new_page()  # a second visitor while the bomb is vetted
            other.goto(app_url, timeout=PAGE_TIMEOUT_MS)
            expect(other.locator("h1").first).to_have_text("Model: digits-mlp", timeout=PAGE_TIMEOUT_MS)
            error = page.locator('[data-testid="stAlertContentError"] p')
            expect(error).to_contain_text(re.compile("bomb.onnx was refused|ConstantOfShape"), timeout=60_000)
            stop.set()
            poller.join()
            assert len(error.all_inner_texts()) == 1 and "\n" not in error.inner_text().strip(), error.all_inner_texts()
            assert health and all(status == 200 and s < 3 for status, s in health), health
            print(f"{len(health)} health checks during the vet, slowest {max(s for _, s in health):.2f} s")

            model_file.set_input_files(str(hostile))  # the real renderer: no link, image, tag or icon from names
            _wait_until_idle(page)
            load.click()
            expect(page.locator("h1").first).to_contain_text("evil.com.onnx", timeout=PAGE_TIMEOUT_MS)
            _wait_until_idle(page)
            foreign = page.eval_on_selector_all("a[href], img[src]", """els => els.map(e => e.href || e.src)
                .filter(u => new URL(u, location.href).host !== location.host && !u.startsWith('data:'))""")
            assert foreign == [], foreign  # no link or image leaves the app (heading anchors stay on the page)
            assert page.locator("[data-testid=stMain] b, [data-testid=stSidebar] b").count() == 0
            shown = page.locator('[data-testid="stAlertContentInfo"]').all_inner_texts()
            assert any(f"'out {EVIL}'" in t for t in shown), shown  # exactly the name: nothing invisible added
        finally:
            stop.set()
            if poller.is_alive():
                poller.join()
            browser.close()


# ---- (e) an internal error ------------------------------------------------------------------------
def test_an_internal_error_shows_an_id_and_logs_the_traceback(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("bug at /srv/secret/path.py")

    monkeypatch.setattr(state, "preset_sizes", broken)
    at = AppTest.from_file(APP, default_timeout=120)
    with caplog.at_level("ERROR", logger="quantization_explorer"):
        at.run()
    assert not at.exception
    (box,) = [e.value for e in at.error]
    match = re.fullmatch(r"Something went wrong \(error id ([0-9a-f]{8})\); the server log has the details\.", box)
    assert match, box
    assert not any("secret" in t for t in rendered_texts(at))
    (record,) = [r for r in caplog.records if r.name == "quantization_explorer"]
    assert match.group(1) in record.getMessage() and "bug at /srv/secret/path.py" in caplog.text
    assert record.exc_info and record.exc_info[0] is RuntimeError

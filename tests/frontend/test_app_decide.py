"""AppTest of the decide pages (Sensitivity, Mixed precision, Trade-offs, Export) and the shareable URL:
numbers shown against numbers computed independently with qcore."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from qcore.recipe.links import build_recipe, compact, decode_layers, encode_layers
from ui import state
from test_browser import CHROMIUM, CHROMIUM_ARGS, ERROR_BOXES, PAGE_TIMEOUT_MS, _wait_until_idle, app_url  # noqa: F401
from test_hostile_app import visible
from qcore.analysis import sensitivity
from qcore.errors import QcoreError
from qcore.recipe import PRESETS, Recipe, preset
from qcore.numerics.spec import TensorSpec
from qcore.model.size import weight_bytes

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")


@pytest.fixture(autouse=True, scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QCORE_CACHE_DIR", str(tmp_path_factory.mktemp("qcore-cache")))
        yield


@pytest.fixture
def downloads(monkeypatch):
    """The text a download button serves (AppTest stores it as a media file named in ``proto.url``)."""
    stored = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        stored[file_id] = path_or_data
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return lambda button: bytes(stored[Path(button.proto.url).stem]).decode()


def open_page(page: str, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query)
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def size_shown(at: AppTest) -> int:
    return int(metric(at, "Size (bytes)").replace(",", ""))


def edit(at: AppTest, rows: dict) -> None:
    editor = at.data_editor[0]
    at.session_state[editor.key] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.exception, at.exception


def test_editing_one_layer_changes_the_size_by_exactly_its_bytes(digits_mlp):
    at = open_page("mixed_precision")
    before = size_shown(at)
    assert before == digits_mlp.size(preset("int8-static", digits_mlp.layer_shapes))["size_bytes"]
    layer = list(digits_mlp.layers).index("fc2")
    edit(at, {layer: {"weights": "int4"}})
    shape = digits_mlp.layer_shapes["fc2"]
    int8 = weight_bytes(shape, TensorSpec(format="int8", granularity="per_channel"))["total"]
    int4 = weight_bytes(shape, TensorSpec(format="int4", granularity="per_channel"))["total"]
    assert before - size_shown(at) == int8 - int4 == 4096
    table = at.data_editor[0].value
    assert table.loc[table["layer"] == "fc2", "size (bytes)"].item() == int4
    assert decode_layers(at.query_params["layers"]) == {"fc2": {"weights": {"format": "int4"}}}
    edit(at, {layer: {"weights": "fp32"}})  # fp32 weights and float inputs: the layer leaves the recipe
    edit(at, {layer: {"weights": "fp32", "inputs": "float"}})
    assert decode_layers(at.query_params["layers"]) == {"fc2": None}
    assert metric(at, "Weights kept in FP32") == f"{100 * 64 * 128 / (128 * 64 + 64 * 128 + 10 * 64):.1f}%"


def test_an_edit_the_recipe_cannot_hold_is_shown_as_adjusted(digits_mlp):
    at = open_page("mixed_precision")
    edit(at, {0: {"weights": "fp16", "symmetric": False}})  # float formats are symmetric by construction
    row = at.data_editor[0].value.iloc[0]
    assert (row["weights"], bool(row["symmetric"])) == ("fp16", True)
    assert row["size (bytes)"] == 128 * 64 * 2
    assert decode_layers(at.query_params["layers"]) == {"fc1": {"weights": {"format": "fp16"}}}


def test_downloaded_recipe_reloads_to_the_same_table(digits_cnn, downloads):
    at = open_page("mixed_precision", model="digits-cnn", preset="nf4")
    edit(at, {0: {"weights": "fp16"}, 3: {"weights": "int3", "inputs": "int8 dynamic"}})
    table = at.data_editor[0].value
    data = downloads(at.download_button[0])
    recipe = Recipe.from_json(data)
    assert recipe.plan("features.0").weights.format == "fp16"
    assert recipe.plan("classifier.1").activations.dynamic is True

    fresh = open_page("mixed_precision", model="digits-cnn")
    assert fresh.data_editor[0].value["weights"].tolist() != table["weights"].tolist()
    fresh.file_uploader[0].upload("mine.json", data.encode(), "application/json")
    fresh.run()
    assert not fresh.error
    assert fresh.data_editor[0].value.equals(table)
    assert size_shown(fresh) == digits_cnn.size(recipe)["size_bytes"] == size_shown(at)


def test_invalid_uploaded_recipe_shows_an_error_and_keeps_the_table():
    at = open_page("mixed_precision", preset="int4-weight-only")
    table = at.data_editor[0].value
    at.file_uploader[0].upload("bad.json", json.dumps({"weights": {"format": "int9"}}).encode(), "application/json")
    at.run()
    assert len(at.error) == 1 and "int9" in visible(at.error[0].value) and "bad.json" in visible(at.error[0].value)
    assert at.data_editor[0].value.equals(table)


def test_link_restores_model_preset_and_overrides(digits_cnn):
    overrides = {"features.0": None, "classifier.3": {"weights": {"format": "int8", "granularity": "per_channel"}}}
    at = open_page("mixed_precision", model="digits-cnn", preset="int4-weight-only",
                   layers=encode_layers(overrides))
    table = at.data_editor[0].value.set_index("layer")
    assert table["weights"].to_dict() == {"features.0": "fp32", "features.3": "int4", "features.7": "int4",
                                          "classifier.1": "int4", "classifier.3": "int8"}
    expected = preset("int4-weight-only", digits_cnn.layer_shapes).with_layer("features.0", None)
    expected = expected.with_layer("classifier.3", overrides["classifier.3"])
    assert size_shown(at) == digits_cnn.size(expected)["size_bytes"]
    assert at.query_params["preset"] == "int4-weight-only"
    assert decode_layers(at.query_params["layers"]) == overrides


def test_broken_link_says_so_and_falls_back_to_the_default():
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(preset="int4-weight-only", layers="%%%not-base64")
    at.run()
    assert len(at.sidebar.error) == 1 and "layers= parameter" in at.sidebar.error[0].value
    assert "layers" not in at.query_params and "preset" not in at.query_params  # the default recipe needs none
    at.switch_page("pages/mixed_precision.py").run()
    assert set(at.data_editor[0].value["weights"]) == {"int8"}


def test_evaluate_shows_the_simulated_metric(digits_mlp):
    at = open_page("mixed_precision", preset="int4-weight-only")
    next(b for b in at.button if b.label.startswith("Evaluate")).click()
    at.run()
    result = digits_mlp.evaluate(preset("int4-weight-only", digits_mlp.layer_shapes)).to_dict()
    acc = result["quantized"]["metrics"]["accuracy"]
    assert metric(at, "accuracy (simulated)") == f"{acc:.4f}"
    assert acc != result["fp32"]["metrics"]["accuracy"]


def test_sensitivity_shows_the_sweep_and_acts_on_a_layer(digits_mlp):
    at = open_page("sensitivity")
    result = sensitivity.sweep(digits_mlp, state.DEFAULT_CANDIDATES, "both", "only").to_dict()
    worst = max((r for r in result["rows"] if r["rank"] == 1), key=lambda r: r["metric_drop"])
    assert metric(at, "Most sensitive layer") == worst["layer"]
    assert metric(at, "Its accuracy drop") == f"{worst['metric_drop']:+.4f}"
    heatmap = next(d for c in at.get("plotly_chart") for d in json.loads(c.proto.spec)["data"] if d["type"] == "heatmap")
    drops = {(r["layer"], r["candidate"]): r["metric_drop"] for r in result["rows"]}
    assert heatmap["customdata"][0][0] == pytest.approx(drops[(heatmap["y"][0], heatmap["x"][0])])

    picker = at.selectbox(key="sens_act_layer:zoo:digits-mlp")  # every layer, most sensitive first, with its numbers
    chosen = next(s for s in at.selectbox if s.label == "Rank the layers under").value
    ranked = sorted((r for r in result["rows"] if r["candidate"] == chosen), key=lambda r: r["rank"])
    assert picker.options == [f"{i}. {r['layer']} ({r['kind']}): drop {r['metric_drop']:+.4f}, output SQNR {r['sqnr_db']:.1f} dB"
                              for i, r in enumerate(ranked, 1)]
    picker.select("fc3").run()
    at.button(key="sens_f:fc3").click().run()
    assert decode_layers(at.query_params["layers"]) == {"fc3": None}
    at.selectbox(key="sens_act_layer:zoo:digits-mlp").select("fc2").run()
    at.button(key="sens_a:fc2").click().run()
    assert at.title[0].value.startswith("Activations")
    assert at.selectbox(key="act_layer:zoo:digits-mlp").value == "fc2"


def test_tradeoffs_table_holds_measured_metrics_and_the_pareto_front(digits_mlp):
    at = open_page("tradeoffs")
    table = at.dataframe[0].value.set_index("recipe")
    for label, name in (("FP32", "fp32"), ("INT8 static", "int8-static"), ("NF4", "nf4"), ("FP8", "fp8")):
        result = digits_mlp.evaluate(preset(name, digits_mlp.layer_shapes)).to_dict()
        assert table.loc[label, "accuracy"] == result["quantized"]["metrics"]["accuracy"]
        assert table.loc[label, "size (bytes)"] == result["quantized"]["size_bytes"]
    assert set(table.index) == {"FP32", "FP16", "BF16", "INT8 dynamic", "INT8 static", "INT4 weight-only", "NF4", "FP8"}
    assert table["latency source"].str.startswith("estimate").all()
    fp32 = table.loc["FP32", "accuracy"]
    for label, row in table.iterrows():  # the change against FP32, to the 4 decimals shown, never a negative zero
        assert row["change"] == pytest.approx(round(row["accuracy"] - fp32, 4), abs=1e-12)
        assert row["change"] != 0 or str(row["change"]) == "0.0", (label, row["change"])
    points = [{"label": k, "size_bytes": r["size (bytes)"], "metric": r["accuracy"]} for k, r in table.iterrows()]
    front = {p["label"] for p in points if not any(  # brute force: nothing at most as large and as good, and better in one
        q["size_bytes"] <= p["size_bytes"] and q["metric"] >= p["metric"]
        and (q["size_bytes"] < p["size_bytes"] or q["metric"] > p["metric"]) for q in points)}
    assert set(table.index[table["Pareto"]]) == front
    best = table[table["accuracy"] == table["accuracy"].max()]
    assert table["size (bytes)"].idxmin() in front and best["size (bytes)"].idxmin() in front


def test_a_large_models_tradeoffs_stay_shown_after_a_widget_change_once_evaluated(digits_mlp, monkeypatch):
    """The "Evaluate all" button holds for one run only: the page remembers which recipes it was asked to evaluate,
    so changing the latency target below does not hide the results again (a new recipe asks again)."""
    monkeypatch.setattr(state, "SMALL_MODEL_WEIGHTS", 0)  # digits-mlp counts as large: evaluation waits for a click
    at = open_page("tradeoffs")
    assert not at.dataframe and any(b.label.startswith("Evaluate all") for b in at.button)
    next(b for b in at.button if b.label.startswith("Evaluate all")).click().run()
    shown = len(at.dataframe)
    assert shown >= 1
    profile = at.selectbox(key="trade_profile")
    profile.set_value(next(o for o in profile.options if o != profile.value)).run()
    assert not at.exception and len(at.dataframe) == shown, "the results vanished after a widget change"
    at.switch_page("pages/mixed_precision.py").run()
    edit(at, {0: {"weights": "int4"}})  # "yours" becomes a recipe not evaluated yet
    at.switch_page("pages/tradeoffs.py").run()
    assert not at.dataframe and any(b.label.startswith("Evaluate all") for b in at.button)


def test_export_builds_its_report_again_only_when_what_it_shows_changes(digits_mlp, downloads, monkeypatch):
    """A widget change on Export (the runtime radio) serves the same report without building it again; another
    recipe builds a new one, which holds that recipe's metric (oracle: ``Workload.evaluate``)."""
    from qcore import report

    built = []
    real = report.html_report
    monkeypatch.setattr(report, "html_report", lambda *a, **k: built.append(1) or real(*a, **k))
    at = open_page("export", preset="int4-weight-only")
    first = downloads(next(b for b in at.download_button if b.label == "Download the HTML report"))
    radio = at.radio(key="export_runtime")
    radio.set_value(next(o for o in radio.options if o != radio.value)).run()
    assert not at.exception and len(built) == 1
    assert downloads(next(b for b in at.download_button if b.label == "Download the HTML report")) == first
    at.switch_page("pages/mixed_precision.py").run()
    at.selectbox(key=next(s.key for s in at.selectbox if s.label == "Start from a preset")).set_value("int8-static").run()
    at.switch_page("pages/export.py").run()
    assert len(built) == 2
    html = downloads(next(b for b in at.download_button if b.label == "Download the HTML report"))
    acc = digits_mlp.evaluate(preset("int8-static", digits_mlp.layer_shapes)).quantized.metrics["accuracy"]
    assert f"{acc:.6g}" in html


def test_export_downloads_recipe_report_and_sensitivity_csv(digits_mlp, downloads):
    at = open_page("export", preset="int4-weight-only")
    buttons = {b.label: b for b in at.download_button}
    recipe = preset("int4-weight-only", digits_mlp.layer_shapes)
    assert Recipe.from_json(downloads(buttons["Download recipe JSON"])).to_dict()["layers"] == recipe.to_dict()["layers"]
    html = downloads(buttons["Download the HTML report"])
    acc = digits_mlp.evaluate(recipe).quantized.metrics["accuracy"]
    assert "digits-mlp" in html and f"{acc:.6g}" in html and html.count("Plotly.newPlot") >= 3
    csv = downloads(buttons["Download sensitivity table (CSV)"]).splitlines()
    assert len(csv) == 1 + len(digits_mlp.layers) * len(state.DEFAULT_CANDIDATES)


@settings(max_examples=25)
@given(st.sampled_from(list(PRESETS)), st.dictionaries(
    st.sampled_from(["features.0", "features.3", "features.7", "classifier.1", "classifier.3"]),
    st.one_of(st.none(), st.fixed_dictionaries({"weights": st.sampled_from(
        [None, {"format": "int4"}, {"format": "fp16"}, {"format": "int8", "granularity": "per_tensor"}])}))))
def test_compact_and_url_encoding_reproduce_every_layer(digits_cnn, name, layers):
    try:
        recipe = build_recipe(digits_cnn, name, layers)
    except QcoreError:  # e.g. a group size that does not divide features.0's fan-in of 9
        assume(False)
    short_name, short = compact(digits_cnn, recipe)
    again = build_recipe(digits_cnn, short_name, decode_layers(encode_layers(short)))
    assert all(again.plan(n) == recipe.plan(n) for n in digits_cnn.layers)


def test_search_fills_the_table_with_a_measured_recipe_within_the_budget_on_use_this_recipe(digits_mlp):
    at = open_page("mixed_precision")
    at.slider(key="mp_budget").set_value(0.2).run()
    next(b for b in at.button if b.label == "Search").click()
    at.run()
    assert not at.exception and len(at.success) == 1
    next(b for b in at.button if b.label == "Use this recipe").click()
    at.run()
    name, overrides = at.query_params.get("preset", state.DEFAULT_PRESET), at.query_params.get("layers")
    recipe = build_recipe(digits_mlp, name, decode_layers(overrides) if overrides else {})
    measured = digits_mlp.evaluate(recipe).to_dict()
    assert measured["quantized"]["size_bytes"] <= 0.2 * measured["fp32"]["size_bytes"]
    assert size_shown(at) == measured["quantized"]["size_bytes"]
    assert (f"simulated accuracy {measured['quantized']['metrics']['accuracy']:.4f} at "
            f"{measured['quantized']['size_bytes']:,} bytes") in at.success[0].value


@pytest.mark.browser
def test_a_shared_link_opens_the_same_recipe_in_the_browser_and_downloads_it(app_url, digits_mlp, tmp_path):
    """Real browser, fresh server, the link is its first request: model, recipe and page come back; the
    recipe downloads."""
    from playwright.sync_api import expect, sync_playwright

    overrides = {"fc1": None, "fc3": {"weights": {"format": "int8", "granularity": "per_channel"}}}
    expected = build_recipe(digits_mlp, "int4-weight-only", overrides)
    link = f"mixed_precision?model=digits-mlp&preset=int4-weight-only&layers={encode_layers(overrides)}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.goto(f"{app_url}/{link}", timeout=PAGE_TIMEOUT_MS)
            _wait_until_idle(page)
            expect(page.locator("h1").first).to_have_text("Mixed precision: a format for every layer")
            expect(page.locator('[data-testid="stMetric"]', has_text="Size (bytes)")).to_contain_text(
                f"{digits_mlp.size(expected)['size_bytes']:,}")
            # app.py framed the page: its sidebar names the link's recipe, its navigation lists the pages
            expect(page.locator('[data-testid="stSidebar"]')).to_contain_text("Recipe: int4-weight-only with 2 layer override(s)")
            frame = (ROOT / "ui" / "frame.py").read_text()  # every page but Generation (language models only)
            listed = len(re.findall(r'st\.Page\((?:HOME|"pages/[a-z_]+\.py")', frame)) - ("pages/generate.py" in frame)
            assert listed >= 9 and page.locator('[data-testid="stSidebarNav"] a').count() == listed
            assert page.locator(ERROR_BOXES).count() == 0 and page.get_by_text("Page not found").count() == 0
            with page.expect_download(timeout=PAGE_TIMEOUT_MS) as download:
                page.get_by_role("button", name="Download recipe JSON").click()
            saved = tmp_path / "recipe.json"
            download.value.save_as(saved)
            got = Recipe.from_json(saved.read_text())
            assert all(got.plan(n) == expected.plan(n) for n in digits_mlp.layers)
        finally:
            browser.close()


def test_export_onnx_of_int4_weight_only_then_int8_static_shows_the_file_not_the_theory(digits_mlp):
    """Regression: fc1 int4 weight-only before fc2 int8-static crashed Export with TensorQuantOverrides' traceback;
    the download showed the theoretical size. Now the file exports and the page gives its real bytes and the
    metric of the file run in ONNX Runtime, each labelled, equal to the engine's own export report."""
    from qcore.export import export

    layers = {"fc1": {"weights": {"format": "int4", "granularity": "per_channel"}, "activations": None},
              "fc2": {"weights": {"format": "int8", "granularity": "per_channel"},
                      "activations": {"format": "int8", "dynamic": False}}}
    at = open_page("export", preset="fp32", layers=encode_layers(layers))
    next(b for b in at.button if b.label == "Prepare onnx").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    recipe = build_recipe(digits_mlp, "fp32", layers)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        rep = export(digits_mlp, recipe, "onnx", f"{tmp}/r.onnx").to_dict()
    button = next(b for b in at.download_button if b.label.startswith("Download onnx"))
    assert button.label == f"Download onnx ({rep['file_size_bytes']:,} bytes)"
    caption = next(c.value for c in at.caption if "file on disk" in c.value)
    measured = rep["metrics"]["onnxruntime"]["accuracy"]
    from ui.text import plain

    assert plain(f"{rep['file_size_bytes']:,} bytes") in caption and plain(f"{measured:.4f} measured") in caption

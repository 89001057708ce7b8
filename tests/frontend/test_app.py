"""The Streamlit app driven by ``streamlit.testing.v1.AppTest``: choose models, switch pages, change
widgets, and compare what is shown (metrics, tables, figure data) with qcore computed independently.

The app's zoo loader is pointed at the session fixtures (``tests/conftest.py``), so minilm-l6 loads
once for the whole suite and every test can check that the app never changed the cached models.
AppTest (1.67) draws the sidebar only on a session's first run, so a model is chosen there (through
the real widget) before switching pages; uploads, which need the sidebar twice, are driven in the
real browser (tests/frontend/test_browser.py).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from qcore.analysis import explain, summary
from qcore.figures import viz
from qcore import zoo
from qcore.numerics.formats import FORMATS
from qcore.numerics.metrics import sqnr_db
from qcore.numerics.quantize import fake_quantize
from qcore.numerics.spec import TensorSpec
from qcore.model.size import float_bytes
from test_hostile_app import visible
from ui.text import plain

APP = str(Path(__file__).resolve().parents[2] / "app.py")  # AppTest resolves relative paths against this file
TIMEOUT = 120


@pytest.fixture(scope="module")
def zoo_models(digits_mlp, digits_cnn):
    """The app's zoo loader returns the session fixtures (minilm-l6 once a test has added it);
    yields ``(models, snapshots)``: ``{name: workload}`` and ``{name: its state dicts before any page ran}``."""
    models = {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn}
    snapshots = {name: snapshot(w) for name, w in models.items()}
    real_load = zoo.load

    def load(name):
        return models[name] if name in models else real_load(name)

    mp = pytest.MonkeyPatch()
    mp.setattr(zoo, "load", load)
    st.cache_resource.clear()
    st.cache_data.clear()
    yield models, snapshots
    mp.undo()
    st.cache_resource.clear()


def snapshot(w) -> dict:
    return {k: v.clone() for m in (w.model, w.folded[0]) for k, v in m.state_dict().items()}


def assert_unchanged(w, before: dict) -> None:
    """The cached workload's weights are bit for bit what they were: no page modified them."""
    after = snapshot(w)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a page modified a cached model"


def open_app(model: str | None = None) -> AppTest:
    """A fresh session on the Model page, ``model`` chosen in the sidebar's select box."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    if model is not None:
        at.sidebar.selectbox(key="model").set_value(model).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _typed_arrays(obj):
    """Plotly's JSON stores numeric arrays as ``{"dtype", "bdata" (base64), "shape"?}``: back to numpy."""
    if isinstance(obj, dict):
        if set(obj) <= {"dtype", "bdata", "shape"} and "bdata" in obj:
            a = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
            return a.reshape([int(n) for n in str(obj["shape"]).split(",")]) if "shape" in obj else a
        return {k: _typed_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_typed_arrays(v) for v in obj]
    return obj


def figures(at: AppTest) -> list[go.Figure]:
    """The page's Plotly figures, rebuilt from the JSON the app sent."""
    return [go.Figure(_typed_arrays(json.loads(chart.proto.spec))) for chart in at.get("plotly_chart")]


def trace(fig, name: str):
    (t,) = [t for t in fig.data if t.name == name]
    return t


def line_positions(fig, name: str, axis: str = "x") -> list[float]:
    return sorted(getattr(s, f"{axis}0") for s in fig.layout.shapes if s.name == name)


# ---- Model page --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_model_page_shows_the_models_sizes_layers_and_data(zoo_models, name):
    at = open_app(name)
    w = zoo_models[0][name]
    assert at.title[0].value == f"Model: {plain(name)}"  # names are escaped for Markdown
    shown = metrics(at)
    assert shown["FP32 size"] == viz.human_bytes(float_bytes(w.model))
    assert shown["Parameters"] == f"{sum(p.numel() for p in w.model.parameters()):,}"
    assert shown["Quantizable layers"] == str(len(w.layers))
    assert shown["Calibration samples"] == f"{len(w.calibration):,}"
    assert shown["Evaluation samples"] == f"{len(w.evaluation):,}"
    headline = w.task.headline
    assert shown[f"FP32 {headline}"] == f"{w.fp32_metrics[headline]:.4f}"

    layers = at.dataframe[0].value
    expected = summary.layer_table(w)
    assert list(layers["layer"]) == [r["name"] for r in expected] == list(w.layers)
    assert list(layers["parameters"]) == [r["params"] for r in expected]
    assert layers["share of model"].tolist() == pytest.approx([r["share"] for r in expected])
    assert list(layers["weight shape"]) == [" × ".join(map(str, w.layers[n].weight_shape)) for n in w.layers]

    sizes = summary.preset_sizes(w)
    table = at.dataframe[1].value
    assert list(table["preset"]) == [r["preset"] for r in sizes]
    assert list(table["size (bytes)"]) == [r["size_bytes"] for r in sizes]
    (fig,) = figures(at)
    assert list(fig.data[0].customdata) == [r["size_bytes"] for r in sizes]
    assert list(fig.data[0].y) == [r["preset"] for r in sizes]
    smallest = min(sizes, key=lambda r: r["size_bytes"])
    assert shown[f"Smallest preset ({smallest['preset']})"] == viz.human_bytes(smallest["size_bytes"])
    assert_unchanged(w, zoo_models[1][name])


# ---- Formats page ------------------------------------------------------------------------------
def test_formats_page_grid_bits_and_clipping(zoo_models):
    at = visit(open_app("digits-mlp"), "formats")
    x = explain.sample_distribution("normal")
    spec = TensorSpec(format="int4", symmetric=True, range="minmax")
    scale = float(x.abs().max()) / 7
    shown = metrics(at)
    assert shown["Levels"] == "16" and shown["Step size"] == f"{scale:.4g}"
    assert shown["SQNR"] == f"{sqnr_db(fake_quantize(x, spec), x):.1f} dB"
    dist, layout, curve, tradeoff = figures(at)
    assert sum(trace(dist, "values").y[::2]) == x.numel()
    assert line_positions(dist, "minmax") == pytest.approx([-float(x.abs().max()), float(x.abs().max())])
    assert list(trace(dist, "representable values").x[1::3]) == pytest.approx((FORMATS["int4"].values() * scale).tolist())
    assert [t.name for t in layout.data if t.y[0] == "int4"] == ["sign", "magnitude (two's complement)"]
    minmax_curve = [t for t in curve.data if t.name == "minmax" and t.xaxis == "x"][0]
    assert list(minmax_curve.x) == [2, 3, 4, 5, 6, 7, 8]
    assert list(minmax_curve.y) == pytest.approx([sqnr_db(fake_quantize(x, TensorSpec(format=f"int{b}")), x)
                                                  for b in range(2, 9)])
    total = trace(tradeoff, "total error")
    amax = float(x.abs().max())
    assert total.x[-1] == pytest.approx(amax) and total.x[29] == pytest.approx(amax / 2)
    for i in (29, -1):  # the error of clipping at [-t, t]
        t = total.x[i]
        assert total.y[i] == pytest.approx(float(((fake_quantize(x, spec, -t, t) - x).double() ** 2).mean()))

    at.select_slider(key="formats_bits").set_value(8)
    at.selectbox(key="formats_range").set_value("mse")
    rerun(at)
    spec8 = TensorSpec(format="int8", symmetric=True, range="mse")
    shown = metrics(at)
    assert shown["Levels"] == "256"
    assert shown["SQNR"] == f"{sqnr_db(fake_quantize(x, spec8), x):.1f} dB"
    lo, hi = explain.method_ranges(x, spec8)["mse"]
    assert line_positions(figures(at)[0], "mse") == pytest.approx([lo, hi])

    at.selectbox(key="formats_family").set_value("fp8_e4m3")
    rerun(at)
    assert metrics(at)["Levels"] == f"{FORMATS['fp8_e4m3'].describe()['levels']:,}"
    layout = figures(at)[1]
    assert [(t.name, t.x[0]) for t in layout.data if t.y[0] == "fp8_e4m3"] == [("sign", 1), ("exponent", 4), ("mantissa", 3)]

    at.selectbox(key="formats_family").set_value("fp16")
    rerun(at)  # FP16 is a plain cast by default: no scale, no clipping range
    assert metrics(at)["Clip range"] == "none (plain cast)"
    assert not [s for s in figures(at)[0].layout.shapes]
    assert any("plain cast" in visible(i.value) for i in at.info)
    assert metrics(at)["SQNR"] == f"{sqnr_db(fake_quantize(x, TensorSpec(format='fp16')), x):.1f} dB"


def test_formats_page_on_a_layers_weights(zoo_models):
    at = visit(open_app("digits-mlp"), "formats")
    at.selectbox(key="formats_source").set_value("a layer of the loaded model")
    rerun(at)
    at.selectbox(key="formats_layer:zoo:digits-mlp").set_value("fc2")
    at.selectbox(key="formats_range").set_value("percentile")
    rerun(at)
    w = zoo_models[0]["digits-mlp"]
    x = dict(w.folded[0].named_modules())["fc2"].weight.detach().reshape(-1)
    spec = TensorSpec(format="int4", symmetric=True, range="percentile", percentile=99.99)
    assert metrics(at)["SQNR"] == f"{sqnr_db(fake_quantize(x, spec), x):.1f} dB"
    dist = figures(at)[0]
    assert sum(trace(dist, "values").y[::2]) == x.numel() == 64 * 128
    assert line_positions(dist, "percentile") == pytest.approx(list(explain.method_ranges(x, spec)["percentile"]))
    assert_unchanged(w, zoo_models[1]["digits-mlp"])


# ---- Weights page ------------------------------------------------------------------------------
def test_weights_page_layer_report_and_every_layer(zoo_models):
    w = zoo_models[0]["digits-cnn"]
    before = zoo_models[1]["digits-cnn"]
    at = visit(open_app("digits-cnn"), "weights")
    modules = dict(w.folded[0].named_modules())
    layer = list(w.layers)[0]
    weight = modules[layer].weight.detach()
    per_channel = TensorSpec(format="int4", granularity="per_channel", range="minmax")
    shown = metrics(at)
    assert shown["Values"] == f"{weight.numel():,}"
    assert shown["SQNR"] == f"{sqnr_db(fake_quantize(weight, per_channel), weight):.1f} dB"
    per_tensor = TensorSpec(format="int4", range="minmax")
    assert shown["SQNR per-tensor"] == f"{sqnr_db(fake_quantize(weight, per_tensor), weight):.1f} dB"
    dist, error, channels, every = figures(at)
    assert sum(trace(dist, "values").y[::2]) == weight.numel()
    assert set(s.name for s in dist.layout.shapes) == {"minmax", "percentile", "mse", "entropy"}
    assert sum(error.data[0].y[::2]) == weight.numel()
    rows = weight.reshape(weight.shape[0], -1)
    assert sorted(trace(channels, "channel min").y[::2]) == pytest.approx(sorted(rows.amin(1).tolist()))
    assert sorted(trace(channels, "channel range").y[::2]) == pytest.approx(sorted(rows.amax(1).tolist()))
    expected = explain.layer_sqnr({n: modules[n].weight.detach() for n in w.layers}, per_channel)
    assert list(every.data[0].x) == list(w.layers)
    assert list(every.data[0].y) == pytest.approx([r["sqnr_db"] for r in expected])
    worst = min(expected, key=lambda r: r["sqnr_db"])["name"]
    assert any(f"Worst layer: **{plain(worst)}**" in m.value for m in at.markdown)

    last = list(w.layers)[-1]
    at.selectbox(key="weights_layer:zoo:digits-cnn").set_value(last)
    at.selectbox(key="weights_format").set_value("int8")
    at.toggle(key="weights_symmetric").set_value(False)
    at.selectbox(key="weights_granularity").set_value("per_tensor")
    rerun(at)
    weight = modules[last].weight.detach()
    spec = TensorSpec(format="int8", symmetric=False, granularity="per_tensor", range="minmax")
    assert metrics(at)["SQNR"] == f"{sqnr_db(fake_quantize(weight, spec), weight):.1f} dB"
    assert line_positions(figures(at)[0], "minmax") == pytest.approx([float(weight.min()), float(weight.max())])

    at.selectbox(key="weights_layer:zoo:digits-cnn").set_value(layer)  # features.0: fan-in 9 does not split in 32s
    at.selectbox(key="weights_granularity").set_value("per_group")
    rerun(at)  # the group size slider appears
    at.select_slider(key="weights_group").set_value(32)
    rerun(at)
    assert any("does not divide the fan-in 9: groups of 9" in visible(i.value) for i in at.info), [visible(i.value) for i in at.info]
    assert_unchanged(w, before)


# ---- Activations page --------------------------------------------------------------------------
def test_activations_page_ranges_outliers_and_batches(zoo_models):
    w = zoo_models[0]["digits-cnn"]
    before = zoo_models[1]["digits-cnn"]
    at = visit(open_app("digits-cnn"), "activations")
    stats = w.calibration_stats()
    layer = [n for n, s in stats.items() if s.numel > 0][1]
    assert at.selectbox(key="act_layer:zoo:digits-cnn").value == layer  # not the raw pixels of the first layer
    at.selectbox(key="act_layer:zoo:digits-cnn").set_value(layer)
    rerun(at)
    s = stats[layer]
    shown = metrics(at)
    assert shown["Values seen"] == f"{s.numel:,}"
    assert shown["Smallest input"] == f"{s.min:.4g}" and shown["Largest input"] == f"{s.max:.4g}"
    spec = TensorSpec.from_dict({"format": "int8", "symmetric": False, "percentile": 99.99}, "spec", True)
    expected = explain.activation_ranges(s, spec)
    table = at.dataframe[0].value
    assert list(table["method"]) == list(explain.ACTIVATION_METHODS)
    assert table["lo"].tolist() == pytest.approx([r["lo"] for r in expected])
    assert table["hi"].tolist() == pytest.approx([r["hi"] for r in expected])
    assert table["clipped"].tolist() == pytest.approx([r["clipped_fraction"] for r in expected])
    dist, outliers, static_dynamic = figures(at)
    assert sum(trace(dist, "values").y[::2]) == s.numel
    assert line_positions(dist, "entropy") == pytest.approx(sorted([r["lo"], r["hi"]] for r in expected
                                                                   if r["range"] == "entropy")[0])
    assert list(outliers.data[0].y) == pytest.approx(sorted(s.channel_absmax.tolist(), reverse=True))
    assert metrics(at)["Largest channel / median channel"] == f"{explain.outlier_channels(s)['ratio']:.1f}×"
    assert len(static_dynamic.data[0].x) == math.ceil(len(w.calibration) / 16)

    at.select_slider(key="act_batch").set_value(64)
    rerun(at)
    per_batch = explain.batch_ranges(w, 64)[layer]
    bars = figures(at)[2].data[0]
    assert len(bars.x) == math.ceil(len(w.calibration) / 64)
    assert list(bars.base) == pytest.approx([lo for lo, _ in per_batch])
    assert line_positions(figures(at)[2], "static: minmax", "y") == pytest.approx([s.min, s.max])
    assert_unchanged(w, before)


# ---- minilm-l6 (loaded once for the whole suite) -----------------------------------------------
@pytest.mark.slow
def test_every_page_on_minilm(zoo_models, minilm):
    w = zoo_models[0]["minilm-l6"] = minilm
    before = snapshot(w)
    at = open_app("minilm-l6")
    assert metrics(at)["Parameters"] == f"{sum(p.numel() for p in w.model.parameters()):,}"
    assert metrics(at)["Quantizable layers"] == str(len(w.layers))
    visit(at, "weights")
    big = list(w.layers)[0]  # the word embedding: analysed on a sample of whole rows
    assert w.layers[big].params > explain.MAX_ANALYSED_WEIGHTS
    assert any("fixed random sample" in visible(i.value) for i in at.info)
    assert at.toggle(key="weights_all:zoo:minilm-l6").value is False  # too big to quantize every layer unasked
    assert len(figures(at)) == 3
    visit(at, "activations")
    s = w.calibration_stats()[at.selectbox(key="act_layer:zoo:minilm-l6").value]
    assert metrics(at)["Values seen"] == f"{s.numel:,}"
    visit(at, "formats")
    assert metrics(at)["Levels"] == "16"
    assert_unchanged(w, before)


def test_the_model_page_says_what_every_preset_does_in_whole_sentences():
    """Each preset of the size table has its description, uncut (oracle: ``PRESET_DESCRIPTIONS``)."""
    from qcore.recipe import PRESET_DESCRIPTIONS

    at = open_app("digits-mlp")
    shown = next(e for e in at.expander if e.label == "What each preset does").markdown[0].value
    for name in at.dataframe[1].value["preset"]:
        if name in PRESET_DESCRIPTIONS:
            assert plain(PRESET_DESCRIPTIONS[name]) in shown, name

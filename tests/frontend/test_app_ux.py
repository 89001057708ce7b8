"""AppTest of small UX promises a newcomer's walk through the app checked: metric deltas coloured by better /
worse, honest names for simulated numbers, no tautological headline, group sizes only where they apply, buttons
of one row with one width. Numbers are recomputed with numpy / the engine, never read back from the page."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from streamlit.elements.widgets.button import ButtonMixin
from streamlit.proto.Metric_pb2 import Metric as MetricProto
from streamlit.testing.v1 import AppTest

from qcore.analysis import sensitivity
from qcore.recipe import PRESETS, preset
from qcore.recipe.table import apply_rows, table_rows
from ui import keys, recipe_table, state
from test_app_decide import APP, edit, metric, open_page
from test_app_honest import table_recipe
from test_hostile_app import visible

MINUS = "\u2212"


@pytest.fixture(autouse=True, scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QCORE_CACHE_DIR", str(tmp_path_factory.mktemp("qcore-cache")))
        yield


def shown_metric(at: AppTest, label: str):
    return next(m for m in at.metric if m.label == label)


def sqnr_db(w: np.ndarray, q: np.ndarray) -> float:
    return float(10 * np.log10((w.astype(np.float64) ** 2).sum() / ((w - q).astype(np.float64) ** 2).sum()))


def int4_minmax(w: np.ndarray, axis) -> np.ndarray:
    """Symmetric int4 min-max fake quantization, by hand: scale = max|w| / 7 over ``axis``, round half to even."""
    scale = (np.abs(w).max(axis=axis, keepdims=True) / 7).astype(np.float32)
    return (np.clip(np.round(w / scale), -8, 7) * scale).astype(np.float32)


# ---- item 1: arrows and colours mean better / worse -----------------------------------------------------------
def test_weights_per_channel_gain_is_a_green_rise_in_db(digits_mlp):
    at = open_page("weights")  # fc1, int4 symmetric min-max: the page's defaults
    w = digits_mlp.model.fc1.weight.detach().numpy()
    per_tensor, per_channel = sqnr_db(w, int4_minmax(w, None)), sqnr_db(w, int4_minmax(w, 1))
    assert per_channel > per_tensor
    m = shown_metric(at, "SQNR per-channel")
    assert m.value == f"{per_channel:.1f} dB" and metric(at, "SQNR per-tensor") == f"{per_tensor:.1f} dB"
    assert m.delta == f"+{per_channel - per_tensor:.1f} dB vs per-tensor"
    assert (m.proto.color, m.proto.direction) == (MetricProto.GREEN, MetricProto.UP)


def test_mixed_precision_a_smaller_size_is_green_and_the_evaluated_number_says_simulated(digits_mlp):
    at = open_page("mixed_precision", preset="int4-weight-only")
    sizes = digits_mlp.size(preset("int4-weight-only", digits_mlp.layer_shapes))
    size, fp32 = sizes["size_bytes"], sizes["fp32_bytes"]
    m = shown_metric(at, "Size (bytes)")
    assert m.value == f"{size:,}"
    assert m.delta == f"{MINUS}{100 * (1 - size / fp32):.1f}% vs FP32"
    assert (m.proto.color, m.proto.direction) == (MetricProto.GREEN, MetricProto.DOWN)

    (evaluate,) = [b for b in at.button if b.label.startswith("Evaluate")]
    assert evaluate.label == "Evaluate this recipe (simulated)"
    evaluate.click()
    at.run()
    result = digits_mlp.evaluate(preset("int4-weight-only", digits_mlp.layer_shapes)).to_dict()
    q, f = result["quantized"]["metrics"]["accuracy"], result["fp32"]["metrics"]["accuracy"]
    m = shown_metric(at, "accuracy (simulated)")
    assert m.value == f"{q:.4f}" and q != f
    worse = q < f
    assert m.delta == f"{'−' if worse else '+'}{abs(q - f):.4f} vs FP32 {f:.4f}"
    assert (m.proto.color, m.proto.direction) == ((MetricProto.RED, MetricProto.DOWN) if worse else
                                                  (MetricProto.GREEN, MetricProto.UP))
    labels = [x.label for x in at.metric] + [b.label for b in at.button]
    assert not [label for label in labels if "measured" in label], labels  # only a file's number is measured


# ---- item 3: a group size only where the granularity is per_group ---------------------------------------------
def test_mixed_precision_shows_a_group_size_only_on_per_group_rows(digits_mlp):
    at = open_page("mixed_precision")  # int8-static: per-channel everywhere
    table = at.data_editor[0].value
    assert (table["group size"] == "").all() and set(table["granularity"]) == {"per_channel"}
    fc2 = list(digits_mlp.layers).index("fc2")
    edit(at, {fc2: {"granularity": "per_group"}})
    table = at.data_editor[0].value.set_index("layer")
    assert table.loc["fc2", "group size"] == "128"  # the spec's group size: fc2 reads 128 inputs, one group
    assert (table.drop(index="fc2")["group size"] == "").all()
    before, after = preset("int8-static", digits_mlp.layer_shapes), table_recipe(at, digits_mlp)
    assert after.plan("fc2").weights == replace(before.plan("fc2").weights, granularity="per_group")  # only that
    assert all(after.plan(n) == before.plan(n) for n in ("fc1", "fc3"))
    edit(at, {fc2: {"group size": "32"}})  # typed on the per_group row: taken
    assert table_recipe(at, digits_mlp).plan("fc2").weights.group_size == 32
    assert at.data_editor[0].value.set_index("layer").loc["fc2", "group size"] == "32"
    at.session_state[at.data_editor[0].key] = {"edited_rows": {fc2: {"group size": "3x"}}, "added_rows": [],
                                               "deleted_rows": []}
    at.run()  # not a number (the browser's validation stops this; a crafted edit gets one error line)
    assert not at.exception and "not a whole number" in visible(at.error[0].value)
    assert table_recipe(at, digits_mlp).plan("fc2").weights.group_size == 32


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "fp32"])
def test_the_shown_table_writes_back_the_same_recipe(digits_cnn, name):
    """Blanking the group size changes the view only: the table, shown and read back unedited, is the recipe."""
    recipe = preset(name, digits_cnn.layer_shapes)
    rows = table_rows(digits_cnn, recipe)
    table = recipe_table.shown(rows)
    assert list(table["group size"] != "") == [r["granularity"] == "per_group" for r in rows]
    assert apply_rows(digits_cnn, recipe, recipe_table.filled(table, rows)).resolve(digits_cnn.layer_shapes) == \
        recipe.resolve(digits_cnn.layer_shapes)


# ---- item 2: no "FP32 against FP32" headline ---------------------------------------------------------------------
def test_sensitivity_shows_fp32_accuracy_and_the_median_layer_drop(digits_mlp):
    at = open_page("sensitivity")
    chosen = at.selectbox(key="sens_rank_candidate:both:only").value
    rows = [r for r in sensitivity.sweep(digits_mlp, state.DEFAULT_CANDIDATES, "both", "only").to_dict()["rows"]
            if r["candidate"] == chosen]
    assert metric(at, "FP32 accuracy") == f"{digits_mlp.fp32_metrics['accuracy']:.4f}"  # labels: informative
    median = float(np.median([r["metric_drop"] for r in rows]))
    assert metric(at, "Median layer's accuracy drop") == f"{median:+.4f}".replace("-", MINUS)


def test_sensitivity_has_no_fp32_headline_when_the_metric_scores_against_fp32(tmp_path):
    from qcore.io.workload import load_workload
    from test_output_kinds import Vad

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(Vad(x).eval(), (x[:2],), dynamic_shapes=({0: batch},)), tmp_path / "vad.pt2")
    np.savez(tmp_path / "vad.npz", x=x.numpy())
    workload = load_workload(str(tmp_path / "vad.pt2"), str(tmp_path / "vad.npz"))  # no labels: decision agreement
    assert workload.task.headline == "decision_agreement"
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state[keys.SOURCE] = keys.UPLOAD_SOURCE
    at.session_state[keys.UPLOAD] = {"key": "upload:vad", "workload": workload, "label": "vad.pt2"}
    at.run()
    at.switch_page("pages/sensitivity.py").run()
    assert not at.exception, [e.value for e in at.exception]
    labels = [m.label for m in at.metric]
    assert not [label for label in labels if label.startswith("FP32")], labels  # 1.0000 against itself, by definition
    assert labels[0] == "Most sensitive layer" and labels[-1].startswith("Median layer's")
    drop = shown_metric(at, labels[1])
    assert "1.0000 by definition" in visible(drop.help)


# ---- item 7: one row of buttons, one width ------------------------------------------------------------------------
def test_act_on_a_layer_buttons_stretch_to_their_columns(monkeypatch, digits_mlp):
    widths = {}
    original = ButtonMixin.button

    def recording(self, label, *args, **kwargs):
        widths[label] = kwargs.get("width", "content")
        return original(self, label, *args, **kwargs)

    monkeypatch.setattr(ButtonMixin, "button", recording)
    open_page("sensitivity")
    assert {widths[b] for b in ("Weights", "Inputs", "Keep layer in float")} == {"stretch"}, widths


# ---- item 1 on the other pages ------------------------------------------------------------------------------------
def test_export_a_smaller_file_is_green_and_a_lower_accuracy_red(digits_mlp):
    at = open_page("export", preset="int4-weight-only")
    size = shown_metric(at, "Theoretical size (bytes)")
    assert (size.proto.color, size.proto.direction) == (MetricProto.GREEN, MetricProto.DOWN)
    result = digits_mlp.evaluate(preset("int4-weight-only", digits_mlp.layer_shapes)).to_dict()
    q, f = result["quantized"]["metrics"]["accuracy"], result["fp32"]["metrics"]["accuracy"]
    assert q < f  # int4 costs digits-mlp a few test images
    m = shown_metric(at, "accuracy (simulated)")
    assert m.delta == f"{MINUS}{f - q:.4f} vs FP32"
    assert (m.proto.color, m.proto.direction) == (MetricProto.RED, MetricProto.DOWN)


def test_model_page_smallest_preset_is_a_green_fall():
    at = open_page("model")
    m = next(m for m in at.metric if m.label.startswith("Smallest preset"))
    assert m.delta.startswith(MINUS) and (m.proto.color, m.proto.direction) == (MetricProto.GREEN, MetricProto.DOWN)


# ---- items 1 and 8 on Trade-offs ----------------------------------------------------------------------------------
def test_tradeoffs_class_drop_is_red_and_the_latency_caption_names_the_cpu_flags(digits_mlp):
    at = open_page("tradeoffs")
    chosen = at.selectbox(key="trade_class:zoo:digits-mlp").value
    assert chosen == "INT4 weight-only"
    result = digits_mlp.evaluate(preset("int4-weight-only", digits_mlp.layer_shapes)).to_dict()
    ref, got = result["fp32"]["metrics"]["per_class_accuracy"], result["quantized"]["metrics"]["per_class_accuracy"]
    change = min(b - a for a, b in zip(ref, got) if a is not None)
    assert change < 0
    m = next(m for m in at.metric if m.label.startswith("Largest drop: class"))
    assert m.delta == f"{MINUS}{-change:.4f} vs FP32"
    assert (m.proto.color, m.proto.direction) == (MetricProto.RED, MetricProto.DOWN)

    with open("/proc/cpuinfo") as f:  # the flags as the kernel lists them
        lines = f.read().splitlines()
    name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = set(next(line for line in lines if line.startswith("flags")).split(":", 1)[1].split())
    caption = next(visible(c.value) for c in at.caption if "Measured latencies" in c.value)
    assert name in caption
    for flag in {"avx2", "avx512f", "avx512_vnni", "amx_int8", "fma"} & flags:
        assert flag in caption, (flag, caption)
    assert not [flag for flag in {"avx512_vnni", "amx_int8"} - flags if flag in caption]  # none it lacks

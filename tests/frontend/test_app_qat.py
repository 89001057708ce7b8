"""The QAT page under AppTest: a short run from the page shows the engine's numbers, and the same inputs are
never trained twice in one session."""

import pytest
from streamlit.proto.Metric_pb2 import Metric as MetricProto
from test_app import metrics, open_app, visit, zoo_models  # noqa: F401 -- zoo_models is a fixture

import qcore.training
from ui import keys
from qcore.recipe.links import build_recipe
from qcore.training import QATConfig, finetune
from ui.text import plain


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_qat_page_shows_the_engines_numbers_and_trains_once(zoo_models, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr(qcore.training, "finetune", lambda *a, **k: calls.append(1) or finetune(*a, **k))
    at = open_app("digits-mlp")
    int2 = {"weights": {"format": "int2", "granularity": "per_channel", "symmetric": True}}  # PTQ loses ~26 points here
    at.session_state[keys.RECIPES] = {"zoo:digits-mlp": {"preset": "int8-weight-only", "layers": {n: int2 for n in ("fc1", "fc2", "fc3")}}}
    visit(at, "qat")
    at.number_input(key="qat_epochs").set_value(2)
    at.run()
    at.button(key="qat_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception]

    w = zoo_models[0]["digits-mlp"]
    recipe = build_recipe(w, "int8-weight-only", {n: int2 for n in ("fc1", "fc2", "fc3")})
    assert at.selectbox(key="qat_recipe:zoo:digits-mlp").value.startswith("yours")  # the current recipe by default
    r = finetune(w, recipe, QATConfig(epochs=2, lr=1e-3))
    assert r.best_epoch > 0 and r.qat_metrics["accuracy"] != r.ptq_metrics["accuracy"]  # QAT changed the model
    shown = metrics(at)
    assert shown["FP32 accuracy"] == f"{w.fp32_metrics['accuracy']:.4f}"
    assert shown["PTQ accuracy"] == f"{r.ptq_metrics['accuracy']:.4f}"
    assert shown["QAT accuracy"] == f"{r.qat_metrics['accuracy']:.4f}"
    fp32, ptq, qat = w.fp32_metrics["accuracy"], r.ptq_metrics["accuracy"], r.qat_metrics["accuracy"]
    for label, change in (("PTQ accuracy", ptq - fp32), ("QAT accuracy", qat - ptq)):  # accuracy: up is better
        m = next(m for m in at.metric if m.label == label)
        assert (m.proto.color, m.proto.direction) == ((MetricProto.GREEN, MetricProto.UP) if change > 0 else
                                                      (MetricProto.RED, MetricProto.DOWN)), (label, change)
    assert plain("Loss: cross-entropy") in at.success[0].value and plain("digits training split") in at.success[0].value

    at.run()  # same inputs again: the kept result, no second run, no Run button
    assert calls == [1] and not [b for b in at.button if b.key == "qat_run"]
    assert metrics(at)["QAT accuracy"] == f"{r.qat_metrics['accuracy']:.4f}"
    assert any("Already trained" in c.value for c in at.caption)

    visit(at, "tradeoffs")  # the QAT point sits beside its PTQ twin: same size, the QAT metric
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    qat = table[table["recipe"].str.startswith("QAT (2 epochs, lr 0.001)")]
    assert len(qat) == 1 and qat["accuracy"].iloc[0] == pytest.approx(r.qat_metrics["accuracy"], abs=1e-12)
    assert qat["size (bytes)"].iloc[0] == w.evaluate(recipe).quantized.size_bytes


def test_qat_page_all_float_recipe_fails_at_submission(zoo_models):  # noqa: F811
    at = open_app("digits-mlp")
    at.session_state[keys.RECIPES] = {"zoo:digits-mlp": {"preset": "fp32", "layers": {}}}
    visit(at, "qat")
    assert not at.metric and not at.error  # nothing runs before the click
    at.button(key="qat_run").click().run()  # the current recipe keeps every layer in float: one error box
    assert len(at.error) == 1 and plain("keeps every layer in float") in at.error[0].value and not at.metric
    assert not at.session_state[keys.JOBS].get("qat") if keys.JOBS in at.session_state else True  # no job was made


def test_the_qat_model_exports_to_onnx_from_the_page(zoo_models):  # noqa: F811
    """The fine-tuned model goes out as ONNX from the QAT page; the caption's measured metric is the file's."""
    at = open_app("digits-mlp")
    int2 = {"weights": {"format": "int2", "granularity": "per_channel", "symmetric": True}}
    at.session_state[keys.RECIPES] = {"zoo:digits-mlp": {"preset": "int8-weight-only", "layers": {n: int2 for n in ("fc1", "fc2", "fc3")}}}
    visit(at, "qat")
    at.number_input(key="qat_epochs").set_value(1)
    at.run()
    at.button(key="qat_run").click().run()
    at.button(key="qat_onnx").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    w = zoo_models[0]["digits-mlp"]
    r = finetune(w, build_recipe(w, "int8-weight-only", {n: int2 for n in ("fc1", "fc2", "fc3")}), QATConfig(epochs=1, lr=1e-3))
    caption = next(c.value for c in at.caption if plain("measured by running this file in ONNX Runtime") in c.value)
    assert plain(f"accuracy: {r.qat_metrics['accuracy']:.4f} measured") in caption  # the file computes what QAT reported

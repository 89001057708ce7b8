"""The zoo: shipped weights, fixed splits, the README's FP32 numbers, minilm's metrics."""

import pytest

from qcore import QcoreError, preset, zoo
from qcore.zoo import digits


def test_digits_splits_are_fixed_and_disjoint():
    s = digits.splits()
    assert [len(s[k]) for k in ("train", "calibration", "test")] == [1237, 200, 360]
    assert s["test"].inputs[0].shape == (360, 1, 8, 8) and float(s["test"].inputs[0].max()) == 1.0
    # same permutation every time (seeded): first test labels are stable
    assert s["test"].labels[:10].tolist() == digits.splits()["test"].labels[:10].tolist()


@pytest.mark.parametrize("name, accuracy", [("digits-mlp", 0.9750), ("digits-cnn", 0.9917)])
def test_readme_fp32_accuracy(name, accuracy):
    w = zoo.load(name)
    assert w.fp32_metrics["accuracy"] == pytest.approx(accuracy, abs=5e-5)
    assert len(w.fp32_metrics["per_class_accuracy"]) == 10


def test_unknown_zoo_name():
    with pytest.raises(QcoreError, match="unknown zoo model 'resnet'; available: digits-mlp, digits-cnn, minilm-l6, tiny-lm"):
        zoo.load("resnet")


def test_evaluate_result_shape_and_sizes(digits_cnn):
    r = digits_cnn.evaluate(preset("int8-static", digits_cnn.layer_shapes)).to_dict()
    assert set(r) >= {"model", "recipe", "metric", "fp32", "quantized"}
    assert r["metric"] == "accuracy" and r["fp32"]["size_bytes"] == 114240
    # int8 per-channel: weights to a quarter plus a float32 scale per output channel
    assert r["quantized"]["size_bytes"] < 0.3 * r["fp32"]["size_bytes"]
    assert r["quantized"]["metrics"]["accuracy"] >= 0.98
    assert r["folded"] == [["features.0", "features.1"], ["features.3", "features.4"], ["features.7", "features.8"]]


@pytest.mark.slow
def test_minilm_metrics(minilm):
    assert len(minilm.layers) == 39  # 36 Linear (6 blocks x 6) + 3 Embedding
    assert minilm.evaluation.inputs[0].shape[0] == 300 and len(minilm.calibration) == 64
    fp32 = minilm.fp32_metrics
    assert fp32["cosine_to_fp32"] == pytest.approx(1.0) and fp32["retrieval_agreement"] == 1.0
    # real ground truth: the FP32 model finds most paraphrases and separates them from unrelated pairs
    assert fp32["paraphrase_top1"] > 0.85 and fp32["separation"] > 0.4
    r = minilm.evaluate(preset("int8-weight-only", minilm.layer_shapes)).quantized.metrics
    assert 0.995 < r["cosine_to_fp32"] < 1.0 and r["retrieval_agreement"] > 0.95
    r4 = minilm.evaluate(preset("int4-weight-only", minilm.layer_shapes)).quantized.metrics
    assert r4["cosine_to_fp32"] < r["cosine_to_fp32"] and r4["sqnr_db"] < r["sqnr_db"]

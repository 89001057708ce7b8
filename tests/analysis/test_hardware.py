"""Hardware profiles and the roofline estimate: spec-sheet figures cited, estimates labelled,
bytes and operations computed from shapes."""

import json

import pytest

from qcore import QcoreError, preset
from qcore.analysis.roofline import compute_precision, roofline
from qcore.hardware import PROFILES, get_profile, probe


def test_profiles_cite_their_source_and_have_fp32():
    assert {"h100-sxm", "rtx-4090", "apple-m3", "raspberry-pi-5"} <= set(PROFILES)
    for p in PROFILES.values():
        assert p.memory_bandwidth_gb_s > 0 and p.peak_tops["fp32"] > 0 and len(p.source) > 20 and not p.measured
    assert PROFILES["h100-sxm"].memory_bandwidth_gb_s == 3350.0 and "int4" not in PROFILES["h100-sxm"].peak_tops
    with pytest.raises(QcoreError, match="unknown hardware profile"):
        get_profile("tpu-v9")


def test_probe_measures_this_machine():
    p = probe()
    assert p.measured and p.memory_bandwidth_gb_s > 0.1 and p.peak_tops["fp32"] > 0 and p.peak_tops["int8"] > 0


def test_roofline_counts_bytes_and_ops_from_shapes(digits_mlp):
    fp32 = roofline(digits_mlp, preset("fp32"), "h100-sxm", batch_size=1)
    int8 = roofline(digits_mlp, preset("int8-static", digits_mlp.layer_shapes), "h100-sxm", batch_size=1)
    macs = 64 * 128 + 128 * 64 + 64 * 10
    assert fp32.total.ops == int8.total.ops == 2 * macs
    weights = 4 * macs
    activations_fp32 = 4 * (64 + 128) + 4 * (128 + 64) + 4 * (64 + 10)  # inputs + outputs, float32
    assert fp32.total.bytes == weights + activations_fp32
    int8_weights = macs + 4 * (128 + 64 + 10)  # int8 codes + per-channel float32 scales
    assert int8.total.bytes == int8_weights + (64 + 128 + 64) + 4 * (128 + 64 + 10)  # int8 inputs, fp32 outputs
    assert int8.total.bytes < fp32.total.bytes and int8.total.latency_ms < fp32.total.latency_ms
    for r in (fp32, int8):
        assert r.label == r.total.label == "estimate" and all(row.label == "estimate" for row in r.layers)
    assert {row.compute_precision for row in int8.layers} == {"int8"}
    assert all(row.bound == "memory" for row in int8.layers)  # tiny layers on a big GPU
    d = json.loads(json.dumps(int8.to_dict()))  # the JSON form: the fields by name, "label" first
    assert list(d) == ["label", "profile", "profile_source", "measured_profile", "batch_size", "layers", "total",
                       "fp32_total", "notes"]
    assert d["total"] == {"bytes": int8.total.bytes, "ops": 2 * macs, "latency_ms": int8.total.latency_ms, "label": "estimate"}
    assert [list(r) for r in d["layers"]] == [["layer", "compute_precision", "runs_at", "bytes", "ops", "memory_ms",
                                               "compute_ms", "latency_ms", "bound", "label"]] * 3
    assert [r["layer"] for r in d["layers"]] == ["fc1", "fc2", "fc3"] and d["profile"] == "NVIDIA H100 SXM5 80GB"


def test_roofline_falls_back_where_a_precision_has_no_units(digits_mlp):
    recipe = preset("int8-static", digits_mlp.layer_shapes).to_dict()
    recipe["weights"] = {"format": "int4", "granularity": "per_channel"}
    recipe["activations"] = {"format": "int4", "symmetric": False}
    from qcore import Recipe

    r = roofline(digits_mlp, Recipe.from_dict(recipe), "h100-sxm")
    assert {(row.compute_precision, row.runs_at) for row in r.layers} == {("int4", "int8")}
    assert any("no int4 units" in n for n in r.notes)


def test_compute_precision_of_weight_only_is_the_activation_precision(digits_mlp):
    plan = preset("int4-weight-only", digits_mlp.layer_shapes).plan("fc1")
    assert compute_precision("Linear", plan) == "fp32"
    assert compute_precision("Linear", preset("fp8").plan("fc1")) == "fp8"
    assert compute_precision("Linear", preset("int8-dynamic").plan("fc1")) == "int8"


def test_roofline_never_puts_hooks_on_the_shared_model(monkeypatch):
    """Regression: ``_layer_work`` hooked the workload's shared folded model; a copy taken meanwhile by another
    session kept the hooks. The estimate now records on a private copy."""
    import torch

    from qcore import zoo

    w = zoo.load("digits-cnn")
    hooked = []
    original = torch.nn.Module.register_forward_hook
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",
                        lambda self, *a, **k: hooked.append(self) or original(self, *a, **k))
    roofline(w, preset("int8-static", w.layer_shapes))
    shared = {id(m) for m in w.folded[0].modules()}
    assert hooked and not any(id(m) in shared for m in hooked)

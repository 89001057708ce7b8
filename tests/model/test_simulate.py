"""Simulation of whole models: weights, dynamic/static activations, folding, isolation."""

import pytest
import torch
from torch import nn

from qcore import QcoreError, Recipe, fake_quantize, preset
from qcore.model.simulate import find_layers, fold_batchnorm, simulate
from qcore.zoo.digits import DigitsCNN

W8 = {"format": "int8", "granularity": "per_channel"}


def _inputs_of(model, layer, x):
    seen = []
    handle = dict(model.named_modules())[layer].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    return seen[0], out


def test_find_layers_names_kinds_and_shapes(digits_cnn):
    layers = find_layers(digits_cnn.model)
    assert list(layers) == ["features.0", "features.3", "features.7", "classifier.1", "classifier.3"]
    assert layers["features.3"].kind == "Conv2d" and layers["features.3"].weight_shape == (32, 16, 3, 3)
    assert layers["features.3"].params == 32 * 16 * 9 + 32
    assert layers["classifier.3"].kind == "Linear" and layers["classifier.3"].weight_shape == (10, 64)


def test_fold_batchnorm_preserves_outputs_and_reports_pairs():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(16, 1, 8, 8)
    ref = model(x)
    folded = fold_batchnorm(model)
    assert folded == [("features.0", "features.1"), ("features.3", "features.4"), ("features.7", "features.8")]
    assert isinstance(model.features[1], nn.Identity)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_simulate_leaves_original_untouched(digits_mlp):
    before = {k: v.clone() for k, v in digits_mlp.model.state_dict().items()}
    sim = digits_mlp.simulate(preset("int4-weight-only", digits_mlp.layer_shapes))
    for k, v in digits_mlp.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(sim.model.fc1.weight, digits_mlp.model.fc1.weight)
    assert not digits_mlp.model.fc1._forward_pre_hooks


def test_weight_only_weights_equal_fake_quantize(digits_mlp):
    recipe = Recipe.from_dict({"weights": W8, "activations": None, "layers": {"fc3": None}})
    sim = digits_mlp.simulate(recipe)
    torch.testing.assert_close(sim.model.fc1.weight, fake_quantize(digits_mlp.model.fc1.weight, W8), rtol=0, atol=0)
    assert torch.equal(sim.model.fc3.weight, digits_mlp.model.fc3.weight)  # kept in fp32
    assert sim.weight_quantized == ["fc1", "fc2"] and sim.activation_quantized == []
    assert len(torch.unique(sim.model.fc1.weight[0])) <= 256


def test_fp32_recipe_reproduces_outputs_exactly(digits_mlp):
    sim = digits_mlp.simulate(preset("fp32"))
    x = digits_mlp.evaluation.inputs[0][:32]
    assert torch.equal(sim.model(x), digits_mlp.model(x))


def test_dynamic_activations_put_inputs_on_a_per_batch_grid(digits_mlp):
    recipe = Recipe.from_dict({"weights": None, "activations": {"format": "int4", "symmetric": False, "dynamic": True}})
    sim = digits_mlp.simulate(recipe)
    x = digits_mlp.evaluation.inputs[0][:64]
    seen, _ = _inputs_of(sim.model, "fc2", x)  # registered after the quantizer: sees what fc2 computes with
    with torch.no_grad():
        fp32_in = torch.relu(sim.model.fc1(fake_quantize(x.flatten(1), {"format": "int4", "symmetric": False})))
    assert len(torch.unique(seen)) <= 16 < len(torch.unique(fp32_in))
    # the grid spans this batch's own range: its largest value is reproduced exactly-ish
    assert float(seen.max()) == pytest.approx(float(fp32_in.max()), rel=1e-5)
    torch.testing.assert_close(seen, fake_quantize(fp32_in, {"format": "int4", "symmetric": False}))
    assert sim.activation_quantized == ["fc1", "fc2", "fc3"]


def test_static_activations_use_calibrated_range(digits_mlp):
    recipe = preset("int8-static", digits_mlp.layer_shapes)
    stats = digits_mlp.calibration_stats()
    sim = digits_mlp.simulate(recipe)
    x = digits_mlp.evaluation.inputs[0][:64] * 5  # inputs far beyond the calibrated range get clipped
    captured = []
    m = sim.model.fc1
    m.register_forward_hook(lambda mod, a, out: captured.append(a[0]))
    with torch.no_grad():
        sim.model(x)
    hi = stats["fc1"].max
    assert float(captured[0].max()) <= hi + 1e-6
    assert float(captured[0].max()) == pytest.approx(hi, rel=0.01)
    assert len(torch.unique(captured[0])) <= 256


def test_static_recipe_without_calibration_is_rejected(digits_mlp):
    with pytest.raises(QcoreError, match="calibration data is needed"):
        simulate(digits_mlp.model, preset("int8-static"))


def test_embedding_weights_quantized_and_indices_untouched():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 4)

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

    torch.manual_seed(0)
    model = Tiny().eval()
    layers = find_layers(model)
    assert layers["emb"].kind == "Embedding"
    sim = simulate(model, preset("int8-dynamic"))
    assert sim.activation_quantized == ["head"]
    assert len(torch.unique(sim.model.emb.weight[3])) <= 256
    out = sim.model(torch.randint(0, 50, (4, 7)))
    assert out.shape == (4, 4) and torch.isfinite(out).all()


def test_non_finite_weight_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(QcoreError, match=r"weight of layer '0' contains 1 NaN"):
        simulate(model, preset("int8-weight-only"))


def test_recipe_naming_missing_layer_is_rejected(digits_mlp):
    recipe = Recipe.from_dict({"weights": W8, "layers": {"fc9": None}})
    with pytest.raises(QcoreError, match="'fc9', which is not a quantizable layer"):
        digits_mlp.evaluate(recipe)


def test_too_big_range_search_names_the_layer(digits_mlp, monkeypatch):
    """A recipe whose range search on a layer is over the limit fails with one line naming that layer."""
    from qcore.numerics import ranges

    monkeypatch.setattr(ranges, "MAX_ENTROPY_BLOCKS", 100)  # fc1 (128 x 64) in groups of 32: 256 blocks
    recipe = Recipe.from_dict({"weights": {"format": "int8", "granularity": "per_group", "group_size": 32,
                                           "range": "entropy"}, "layers": {"fc2": None, "fc3": None}})
    with pytest.raises(QcoreError) as e:
        digits_mlp.simulate(recipe)
    assert str(e.value).startswith("layer 'fc1': range 'entropy' with granularity per_group of 32 makes 256 blocks")
    assert "\n" not in str(e.value)


def test_simulation_hooks_live_on_its_copy_only(digits_cnn):
    """Simulating, calibrating and evaluating leave the shared folded model and the original
    without a single hook (a hook there would be copied into every other session's models)."""
    def hooks(m):
        return sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules())

    sim = digits_cnn.simulate(preset("int8-static", digits_cnn.layer_shapes))
    assert hooks(sim.model) == len(sim.activation_quantized) > 0
    assert hooks(digits_cnn.folded[0]) == 0 and hooks(digits_cnn.model) == 0

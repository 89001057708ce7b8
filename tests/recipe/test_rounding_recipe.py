"""The recipe's rounding keys: one-line errors, nothing written for nearest, merges and links that keep them."""

import json
from types import SimpleNamespace

import pytest

from qcore.errors import QcoreError
from qcore.model.simulate import LayerInfo
from qcore.recipe import Recipe, preset
from qcore.recipe.links import build_recipe, compact
from qcore.numerics.spec import AdaRoundOptions, GPTQOptions, TensorSpec

W4 = {"format": "int4", "granularity": "per_group", "group_size": 32}


@pytest.mark.parametrize("weights,message", [
    ({**W4, "rounding": "optimal"}, "weights.rounding='optimal' is not a rounding; allowed: nearest, gptq, adaround"),
    ({"format": "nf4", "rounding": "gptq"}, "applies to integer formats"),
    ({"format": "fp8_e4m3", "rounding": "adaround"}, "applies to integer formats"),
    ({**W4, "gptq": {"damp": 0.1}}, "weights.gptq is given with rounding nearest"),
    ({**W4, "rounding": "adaround", "gptq": {}}, "weights.gptq is given with rounding adaround"),
    ({**W4, "rounding": "gptq", "gptq": {"damp": 0}}, "weights.gptq.damp=0 must be a number in (0, 1]"),
    ({**W4, "rounding": "gptq", "gptq": {"damp": -1}}, "weights.gptq.damp=-1"),
    ({**W4, "rounding": "gptq", "gptq": {"blocks": 4}}, "unknown key weights.gptq.'blocks'; allowed keys: damp, "),
    ({**W4, "rounding": "gptq", "gptq": {"act_order": 1}}, "weights.gptq.act_order=1 must be true or false"),
    ({**W4, "rounding": "gptq", "gptq": {"block_size": 0}}, "weights.gptq.block_size=0 must be an integer"),
    ({**W4, "rounding": "adaround", "adaround": {"iters": 2.5}}, "weights.adaround.iters=2.5 must be an integer"),
    ({**W4, "rounding": "adaround", "adaround": {"reg": "high"}}, "weights.adaround.reg='high' must be a number"),
    ({"format": "int4", "granularity": "per_channel", "axis": 1, "rounding": "gptq"}, "needs per_channel along axis 0"),
])
def test_bad_rounding_keys_are_one_line_errors(weights, message):
    with pytest.raises(QcoreError) as e:
        Recipe.from_dict({"weights": weights})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rounding_on_activations_is_refused():
    with pytest.raises(QcoreError, match="activations.rounding='gptq' applies to weights only"):
        Recipe.from_dict({"activations": {"format": "int8", "rounding": "gptq"}})


def test_nearest_is_not_written_and_options_are_filled_in():
    assert "rounding" not in TensorSpec.from_dict({**W4, "rounding": "nearest"}).to_dict()
    spec = TensorSpec.from_dict({**W4, "rounding": "gptq", "gptq": {"damp": 0.1}})
    assert spec.gptq == GPTQOptions(damp=0.1, act_order=True, block_size=128)
    assert spec.to_dict()["gptq"] == {"damp": 0.1, "act_order": True, "block_size": 128}
    assert TensorSpec.from_dict({**W4, "rounding": "adaround"}).adaround == AdaRoundOptions()
    r = preset("int4-gptq")
    assert Recipe.from_json(r.to_json()) == r and hash(r) == hash(Recipe.from_json(r.to_json()))


def test_layer_overrides_drop_the_inherited_rounding_where_it_cannot_apply():
    r = Recipe.from_dict({"weights": {**W4, "rounding": "gptq", "gptq": {"damp": 0.05}}, "layers": {
        "a": {"weights": {"rounding": "nearest"}}, "b": {"weights": {"format": "nf4"}},
        "c": {"weights": {"rounding": "adaround"}}, "d": {"weights": {"format": "int8"}}}})
    assert r.plan("a").weights.rounding == "nearest" and r.plan("a").weights.gptq is None
    assert r.plan("b").weights.rounding == "nearest"  # nf4 cannot take it: dropped, as symmetric is
    assert r.plan("c").weights.adaround == AdaRoundOptions() and r.plan("c").weights.gptq is None
    assert r.plan("d").weights.gptq == GPTQOptions(damp=0.05)  # another int format keeps it


TOY = SimpleNamespace(name="toy", layers={n: LayerInfo(n, "Linear", (8, 64), 0) for n in ("fc1", "fc2", "fc3")},
                      layer_shapes={n: (8, 64) for n in ("fc1", "fc2", "fc3")})


@pytest.mark.parametrize("layers", [
    {"fc1": {"weights": {"format": "int8", "granularity": "per_channel", "rounding": "nearest"}}},
    {"fc2": {"weights": {"rounding": "adaround", "adaround": {"iters": 50}}}, "fc3": None},
    {"fc1": {"weights": {"gptq": {"act_order": False}}}},
])
def test_links_round_trip_the_rounding_keys(layers):
    recipe = Recipe.from_dict({**preset("int4-gptq").to_dict(), "layers": layers})
    name, overrides = compact(TOY, recipe)
    again = build_recipe(TOY, name, json.loads(json.dumps(overrides)))
    assert again.resolve(TOY.layer_shapes) == recipe.resolve(TOY.layer_shapes)
    nearest = Recipe.from_dict({**preset("int8-weight-only").to_dict(), "layers": {"fc1": {"weights": W4 | {"rounding": "gptq"}}}})
    name, overrides = compact(TOY, nearest)
    assert build_recipe(TOY, name, overrides).resolve(TOY.layer_shapes) == nearest.resolve(TOY.layer_shapes)


@pytest.mark.parametrize("gptq,message", [
    ({"clip": -1}, "weights.gptq.clip=-1 must be an integer in [0, 100]"),
    ({"clip": 2.5}, "weights.gptq.clip=2.5 must be an integer"),
    ({"clip": True}, "weights.gptq.clip=True must be an integer"),
    ({"sequential": "yes"}, "weights.gptq.sequential='yes' must be true or false"),
])
def test_clip_and_sequential_are_validated_in_one_line(gptq, message):
    with pytest.raises(QcoreError) as e:
        Recipe.from_dict({"weights": {**W4, "rounding": "gptq", "gptq": gptq}})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_clip_and_sequential_at_their_defaults_leave_the_json_as_before():
    """A GPTQ recipe written before ``clip``/``sequential`` existed reads back to the same JSON and hash."""
    old = {"name": "old", "weights": {**W4, "rounding": "gptq", "gptq": {"damp": 0.01, "act_order": True,
                                                                        "block_size": 128}}, "activations": None}
    r = Recipe.from_dict(old)
    assert r.weights.to_dict()["gptq"] == {"damp": 0.01, "act_order": True, "block_size": 128}
    explicit = Recipe.from_dict({**old, "weights": {**old["weights"], "gptq": {"clip": 0, "sequential": False}}})
    assert explicit == r and explicit.to_json() == r.to_json()
    on = TensorSpec.from_dict({**W4, "rounding": "gptq", "gptq": {"clip": 20, "sequential": True}})
    assert on.gptq == GPTQOptions(clip=20, sequential=True)
    assert on.to_dict()["gptq"] == {"damp": 0.01, "act_order": True, "block_size": 128, "clip": 20, "sequential": True}

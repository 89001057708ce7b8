"""Recipes: JSON round trip, key-by-key layer overrides, presets, and validation message by message."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcore import PRESETS, QcoreError, Recipe, TensorSpec, load_recipe, preset
from qcore.recipe import LayerPlan

LAYERS = {"features.0": (16, 1, 3, 3), "features.3": (32, 16, 3, 3), "classifier.1": (64, 288),
          "classifier.3": (10, 64)}
ISSUE_EXAMPLE = {
    "name": "w8a8-percentile",
    "weights": {"format": "int8", "granularity": "per_channel", "symmetric": True, "range": "minmax"},
    "activations": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "range": "percentile",
                    "percentile": 99.99, "dynamic": False},
    "layers": {"features.0": {"weights": {"format": "int4", "granularity": "per_group", "group_size": 3}},
               "classifier.3": None},
}

int_specs = st.fixed_dictionaries(
    {"format": st.sampled_from(["int2", "int3", "int4", "int8", "int16"])},
    optional={"granularity": st.sampled_from(["per_tensor", "per_channel", "per_group"]),
              "group_size": st.sampled_from([8, 16, 32]), "symmetric": st.booleans(),
              "range": st.sampled_from(["minmax", "percentile", "mse", "entropy"]),
              "percentile": st.sampled_from([99.0, 99.9, 99.99, 100.0]), "axis": st.integers(0, 1)}
).map(lambda d: d if d.get("granularity") == "per_group" else {k: v for k, v in d.items() if k != "group_size"})
float_specs = st.one_of(st.just({"format": "fp32"}), st.fixed_dictionaries(
    {"format": st.sampled_from(["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])},
    optional={"scaled": st.booleans(), "granularity": st.sampled_from(["per_tensor", "per_channel"])}))
nf4_specs = st.fixed_dictionaries({"format": st.just("nf4")}, optional={"group_size": st.sampled_from([32, 64])})
weight_specs = st.one_of(int_specs, float_specs, nf4_specs)
act_specs = st.fixed_dictionaries(
    {"format": st.sampled_from(["int8", "int4", "fp8_e4m3", "fp16"])},
    optional={"dynamic": st.booleans(), "range": st.sampled_from(["minmax", "moving_average", "entropy"])}
).map(lambda d: {**d, "symmetric": True} if not d["format"].startswith("int") else d)
overrides = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "weights": st.one_of(st.none(), weight_specs), "activations": st.one_of(st.none(), act_specs)}))
recipes = st.fixed_dictionaries({
    "name": st.text(min_size=1, max_size=12), "weights": st.one_of(st.none(), weight_specs),
    "activations": st.one_of(st.none(), act_specs),
    "layers": st.dictionaries(st.sampled_from(list(LAYERS)), overrides, max_size=3)})


@given(d=recipes)
def test_json_round_trip_is_exact(d):
    r = Recipe.from_dict(d)
    again = Recipe.from_json(r.to_json())
    assert again == r
    assert again.to_dict() == r.to_dict()
    assert json.loads(r.to_json()) == r.to_dict()
    for layer in LAYERS:
        assert again.plan(layer) == r.plan(layer)


def test_issue_example_resolves_as_documented():
    r = Recipe.from_dict(ISSUE_EXAMPLE)
    r.check_against(LAYERS)
    assert r.plan("features.3") == LayerPlan(
        TensorSpec(format="int8", granularity="per_channel"),
        TensorSpec(format="int8", symmetric=False, range="percentile", percentile=99.99))
    # the override changes format, granularity and group size, and keeps the rest of the defaults
    assert r.plan("features.0").weights == TensorSpec(format="int4", granularity="per_group", group_size=3)
    assert r.plan("features.0").activations == r.activations
    assert r.plan("classifier.3") == LayerPlan(None, None) and r.plan("classifier.3").is_float
    assert r.to_dict()["layers"]["classifier.3"] is None


def test_plan_merges_key_by_key_and_null_parts():
    r = Recipe.from_dict({
        "weights": {"format": "int8", "granularity": "per_channel", "symmetric": False, "range": "mse"},
        "activations": {"format": "int8", "symmetric": False},
        "layers": {
            "a": {"weights": {"range": "percentile", "percentile": 99.9}},  # same format: keeps symmetric=False
            "b": {"weights": {"format": "fp8_e4m3", "scaled": True}},  # float: drops the inherited symmetric
            "c": {"weights": None},  # weights stay float, activations still quantized
            "d": {"activations": None},  # weight-only for this layer
            "e": {"weights": {"format": "int4"}},  # int -> int keeps the affine choice
        }})
    assert r.plan("a").weights == TensorSpec(format="int8", granularity="per_channel", symmetric=False,
                                             range="percentile", percentile=99.9)
    assert r.plan("b").weights == TensorSpec(format="fp8_e4m3", granularity="per_channel", range="mse", scaled=True)
    assert r.plan("c") == LayerPlan(None, r.activations)
    assert r.plan("d") == LayerPlan(r.weights, None)
    assert r.plan("e").weights == TensorSpec(format="int4", granularity="per_channel", symmetric=False, range="mse")
    assert r.plan("not-overridden") == LayerPlan(r.weights, r.activations)
    # from a scaled float default to an integer format, the inherited "scaled" is dropped
    f = Recipe.from_dict({"weights": {"format": "fp8_e4m3", "scaled": True}, "layers": {"x": {"weights": {"format": "int4"}}}})
    assert f.plan("x").weights == TensorSpec(format="int4")
    # an override on a weight-only recipe may add activations for one layer
    w = Recipe.from_dict({"weights": {"format": "int8"}, "layers": {"x": {"activations": {"format": "int8"}}}})
    assert w.plan("x").activations == TensorSpec(format="int8") and w.plan("y").activations is None


def test_with_layer_returns_a_new_recipe():
    r = preset("int8-static")
    r2 = r.with_layer("fc1", None).with_layer("fc2", {"weights": {"format": "int4"}})
    assert r.to_dict()["layers"] == {} and r2.plan("fc1").is_float
    assert r2.plan("fc2").weights == TensorSpec(format="int4", granularity="per_channel")
    assert Recipe.from_json(r2.to_json()) == r2


def test_presets_match_the_issue():
    assert list(PRESETS) == ["fp32", "fp16", "bf16", "int8-weight-only", "int8-dynamic", "int8-static",
                             "int4-weight-only", "nf4", "fp8", "int4-gptq", "int3-adaround", "int4-awq", "w8a8-smoothquant",
                             "int4-int8compute", "w8a8-smoothquant-mul", "int4-gptq-embeddings"]
    w8 = TensorSpec(format="int8", granularity="per_channel")
    assert preset("fp16").plan("x") == LayerPlan(TensorSpec(format="fp16"), TensorSpec(format="fp16"))
    assert preset("bf16").weights == TensorSpec(format="bf16")
    assert preset("int8-weight-only").plan("x") == LayerPlan(w8, None)
    assert preset("int8-dynamic").plan("x") == LayerPlan(w8, TensorSpec(format="int8", symmetric=False, dynamic=True))
    assert preset("int8-static").plan("x") == LayerPlan(w8, TensorSpec(format="int8", symmetric=False))
    assert preset("int4-weight-only").plan("x") == LayerPlan(
        TensorSpec(format="int4", granularity="per_group", group_size=32, symmetric=False), None)
    assert preset("nf4").plan("x") == LayerPlan(TensorSpec(format="nf4", granularity="per_group", group_size=64), None)
    assert preset("fp8").plan("x") == LayerPlan(
        TensorSpec(format="fp8_e4m3", granularity="per_channel", scaled=True),
        TensorSpec(format="fp8_e4m3", scaled=True, dynamic=True))
    assert preset("fp32").plan("x").is_float
    for name in PRESETS:
        r = preset(name)
        assert r.name == name and Recipe.from_json(r.to_json()) == r


def _largest_divisor(n: int, at_most: int) -> int:
    best = 1
    for d in range(1, at_most + 1):  # plain loop: the oracle for group_size_for
        if n % d == 0:
            best = d
    return best


def test_regression_per_group_presets_resolve_the_group_size_per_layer():
    """Regression: per_group failed (or fell back to per-channel) on any layer whose fan-in the group size
    does not divide; now each layer takes the largest divisor of its fan-in not above the preset's size."""
    shapes = {**LAYERS, "wide": (8, 96)}  # fan-ins: 9, 144, 288, 64, 96
    r = preset("int4-weight-only", shapes)  # group 32
    expected = {n: _largest_divisor(math.prod(s[1:]), 32) for n, s in shapes.items()}
    assert expected == {"features.0": 9, "features.3": 24, "classifier.1": 32, "classifier.3": 32, "wide": 32}
    assert r.to_dict()["layers"] == {"features.0": {"weights": {"group_size": 9}}, "features.3": {"weights": {"group_size": 24}}}
    for name, g in expected.items():
        assert r.plan(name).weights == TensorSpec(format="int4", granularity="per_group", group_size=g, symmetric=False)
    r.check_against(shapes)
    n = preset("nf4", shapes)  # group 64
    assert {k: v["weights"]["group_size"] for k, v in n.to_dict()["layers"].items()} == {
        name: _largest_divisor(math.prod(s[1:]), 64) for name, s in shapes.items() if math.prod(s[1:]) % 64}
    assert n.plan("wide").weights.group_size == 48  # fan-in 96, preset 64
    assert Recipe.from_json(n.to_json()) == n  # the written recipe reads back as the same recipe
    assert preset("int8-static", shapes).to_dict()["layers"] == {}  # no group size: nothing to resolve


def test_per_channel_override_on_a_per_group_default_drops_the_inherited_group_size():
    r = Recipe.from_dict({"weights": {"format": "int4", "granularity": "per_group", "group_size": 32},
                          "layers": {"fc1": {"weights": {"granularity": "per_channel"}}}})
    assert r.plan("fc1").weights == TensorSpec(format="int4", granularity="per_channel")
    assert "group_size" not in r.plan("fc1").weights.to_dict() and r.weights.to_dict()["group_size"] == 32
    # a spec built in code (the app's table rows) drops a group_size it cannot use instead of refusing it
    assert TensorSpec.from_dict({"format": "int8", "granularity": "per_channel", "group_size": 4096}) == \
        TensorSpec(format="int8", granularity="per_channel")


def test_load_recipe_from_preset_json_text_and_file(tmp_path):
    assert load_recipe("int8-static") == preset("int8-static")
    text = json.dumps(ISSUE_EXAMPLE)
    assert load_recipe(text, LAYERS) == Recipe.from_dict(ISSUE_EXAMPLE)
    path = tmp_path / "r.json"
    path.write_text(text)
    assert load_recipe(str(path), LAYERS) == Recipe.from_dict(ISSUE_EXAMPLE)


def _error(fn, *args) -> str:
    with pytest.raises(QcoreError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("d,message", [
    ({"weights": {"format": "int9"}},
     "unknown format weights.format='int9'; allowed: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int2, int3, int4, "
     "int5, int6, int7, int8, int16, nf4"),
    ({"weights": {"format": "int1"}},
     "unknown format weights.format='int1' (1-bit integers are not supported: the smallest integer format is "
     "int2); allowed: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int2, int3, int4, int5, int6, int7, int8, int16, nf4"),
    ({"weights": {"format": "int8", "bits": 8}},
     "unknown key weights.'bits'; allowed keys: format, granularity, axis, group_size, symmetric, range, "
     "percentile, dynamic, scaled, rounding, gptq, adaround, compute"),
    ({"weight": {"format": "int8"}}, "unknown recipe key 'weight'; allowed keys: name, weights, activations, layers, transforms, kv_cache"),
    ({"weights": {"granularity": "per_row"}},
     "weights.granularity='per_row' is not a granularity; allowed: per_tensor, per_channel, per_group"),
    ({"weights": {"range": "moving_average"}},
     "weights.range='moving_average' is not a range method; allowed here: minmax, percentile, mse, entropy"),
    ({"activations": {"range": "kl"}},
     "activations.range='kl' is not a range method; allowed here: minmax, percentile, mse, entropy, moving_average"),
    ({"weights": {"granularity": "per_group", "group_size": 0}},
     "weights.group_size=0 must be a positive integer such as 32, 64 or 128 (at most 1048576)"),
    # regression: huge integers are refused by range, and shown without converting them to 5,000 digits
    ({"weights": {"granularity": "per_group", "group_size": 2**21}},
     "weights.group_size=2097152 must be a positive integer such as 32, 64 or 128 (at most 1048576)"),
    ({"weights": {"granularity": "per_group", "group_size": 10**5000}},
     "weights.group_size=<an integer of about 5,000 digits> must be a positive integer such as 32, 64 or 128 (at most 1048576)"),
    ({"weights": {"axis": 10**20}},
     "weights.axis=100000000000000000000 must be a dimension index in [-8, 8), e.g. 0 (output channel) or 1"),
    ({"weights": {"axis": -9}}, "weights.axis=-9 must be a dimension index in [-8, 8), e.g. 0 (output channel) or 1"),
    ({"weights": {"granularity": "per_group", "group_size": "abc"}}, "weights.group_size='abc' must be an integer"),
    ({"weights": {"percentile": True}}, "weights.percentile=True must be a number in (50, 100], e.g. 99.9 or 99.99"),
    ({"weights": {"granularity": ["per_tensor"]}},
     "weights.granularity=['per_tensor'] is not a granularity; allowed: per_tensor, per_channel, per_group"),
    ({"weights": {"range": {"minmax": 1}}},
     "weights.range={'minmax': 1} is not a range method; allowed here: minmax, percentile, mse, entropy"),
    # regression: the name was turned into a string whatever it was
    ({"name": {"a": [1, 2, 3]}}, "recipe.name={'a': [1, 2, 3]} must be a string of at most 1000 characters"),
    ({"name": "n" * 1001}, "recipe.name='" + "n" * 37 + "..." + "n" * 38 + "' must be a string of at most 1000 characters"),
    ({"layers": {("fc1",): None}}, "recipe.layers key ('fc1',) must be a layer name of at most 1000 characters"),
    # regression: values in messages are shortened, so a 100,000-character format is not echoed whole
    ({"weights": {"format": "x" * 100_000}},
     "unknown format weights.format='" + "x" * 37 + "..." + "x" * 38 + "'; "
     "allowed: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int2, int3, int4, int5, int6, int7, int8, int16, nf4"),
    ({"weights": {"granularity": "per_group", "group_size": 32.0}}, "weights.group_size=32.0 must be an integer"),
    ({"weights": {"axis": True}}, "weights.axis=True must be an integer"),
    ({"weights": {"symmetric": "yes"}}, "weights.symmetric='yes' must be true or false"),
    ({"weights": {"percentile": 50}}, "weights.percentile=50 must be a number in (50, 100], e.g. 99.9 or 99.99"),
    ({"weights": {"percentile": 100.5}}, "weights.percentile=100.5 must be a number in (50, 100], e.g. 99.9 or 99.99"),
    ({"weights": {"format": "fp16", "symmetric": False}},
     "weights.symmetric=False is only possible for integer formats; fp16 is symmetric by construction"),
    ({"weights": {"format": "int8", "scaled": True}},
     "weights.scaled=True applies to float formats (fp8/fp16/bf16) only; integer and nf4 formats are always scaled"),
    ({"weights": {"dynamic": True}},
     "weights.dynamic=True applies to activations only (weights are always quantized ahead of time)"),
    ({"activations": {"granularity": "per_channel"}},
     "activations.granularity='per_channel' is not supported for activations; use per_tensor"),
    ({"activations": {"format": "nf4", "granularity": "per_tensor"}},
     "activations.format='nf4' is a weight-only format; use an int or float format for activations"),
    ({"weights": "int8"}, "weights must be an object like {\"format\": \"int8\"} or null, got 'int8'"),
    ([1, 2], "a recipe must be a JSON object with keys name, weights, activations, layers"),
    ({"layers": ["fc1"]}, "recipe.layers must be an object mapping layer names to overrides or null"),
    ({"layers": {"fc1": "int4"}}, "layers['fc1'] must be an object like {\"weights\": {\"format\": \"int4\"}} or null"),
    ({"layers": {"fc1": {"weight": {"format": "int4"}}}},
     "unknown key layers['fc1'].'weight'; allowed keys: weights, activations"),
    ({"layers": {"fc1": {"weights": {"format": "int4", "granularity": "per_block"}}}},
     "layers['fc1'].weights.granularity='per_block' is not a granularity; allowed: per_tensor, per_channel, per_group"),
    ({"layers": {"fc1": {"weights": "int4"}}},
     "layers['fc1'].weights must be an object like {\"format\": \"int8\"} or null, got 'int4'"),
    # regression (a huge group size typed on a per_channel row was stored as a no-op override): a group_size
    # next to any granularity but per_group is refused, in the defaults and in a layer's own override
    ({"weights": {"format": "int8", "granularity": "per_channel", "group_size": 4096}},
     "weights.group_size=4096 is given with granularity per_channel, where it does nothing; remove group_size or "
     "set granularity per_group"),
    ({"weights": {"group_size": 64}},  # the default granularity is per_tensor
     "weights.group_size=64 is given with granularity per_tensor, where it does nothing; remove group_size or set "
     "granularity per_group"),
    ({"activations": {"format": "int8", "group_size": 64}},
     "activations.group_size=64 is given with granularity per_tensor, where it does nothing; remove group_size or "
     "set granularity per_group"),
    ({"weights": {"format": "int4", "granularity": "per_group"},
      "layers": {"fc1": {"weights": {"granularity": "per_channel", "group_size": 32}}}},
     "layers['fc1'].weights.group_size=32 is given with granularity per_channel, where it does nothing; remove "
     "group_size or set granularity per_group"),
    ({"weights": {"format": ["int8"]}},
     "unknown format weights.format=['int8']; allowed: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int2, int3, int4, "
     "int5, int6, int7, int8, int16, nf4"),
    ({"weights": {"format": "int8"}, "layers": {"fc1": {"weights": {"format": {"int": 4}}}}},
     "unknown format layers['fc1'].weights.format={'int': 4}; allowed: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, "
     "int2, int3, int4, int5, int6, int7, int8, int16, nf4"),
])
def test_invalid_recipes_are_rejected_message_by_message(d, message):
    assert _error(Recipe.from_dict, d) == message


def test_model_dependent_validation_names_the_layer():
    r = Recipe.from_dict({"weights": {"format": "int8"}, "layers": {"classifier.9": None}})
    assert _error(r.check_against, LAYERS) == (
        "recipe.layers names 'classifier.9', which is not a quantizable layer of this model; layers are: "
        "features.0, features.3, classifier.1, classifier.3")
    # a group size no layer's fan-in divides is not an error: it resolves per layer (fan-in 9 -> 9, 288 -> 6)
    g = Recipe.from_dict({"layers": {"classifier.1": {"weights": {"format": "int4", "granularity": "per_group",
                                                                  "group_size": 7}}}})
    g.check_against(LAYERS)
    assert g.plan("classifier.1").weights.for_shape(LAYERS["classifier.1"]).group_size == 6
    a = Recipe.from_dict({"weights": {"format": "int8", "granularity": "per_channel", "axis": 4}})
    assert _error(a.check_against, LAYERS) == (
        "weights.axis=4 is out of range for layer 'features.0' with weight shape (16, 1, 3, 3)")
    many = {f"l{i}": (4, 4) for i in range(10)}
    assert _error(r.check_against, many).endswith("layers are: l0, l1, l2, l3, l4, l5, l6, l7, ...")


def test_load_recipe_errors(tmp_path):
    assert _error(load_recipe, "int3-magic") == (
        "'int3-magic' is neither a preset (fp32, fp16, bf16, int8-weight-only, int8-dynamic, int8-static, "
        "int4-weight-only, nf4, fp8, int4-gptq, int3-adaround, int4-awq, w8a8-smoothquant, int4-int8compute, w8a8-smoothquant-mul, "
        "int4-gptq-embeddings) nor a recipe file that exists")
    assert _error(preset, "int3") == (
        "unknown preset 'int3'; available presets: fp32, fp16, bf16, int8-weight-only, int8-dynamic, int8-static, "
        "int4-weight-only, nf4, fp8, int4-gptq, int3-adaround, int4-awq, w8a8-smoothquant, int4-int8compute, "
        "w8a8-smoothquant-mul, int4-gptq-embeddings")
    assert _error(load_recipe, '{"weights": {"format": "int8",}}') == (
        "the recipe is not valid JSON (Expecting property name enclosed in double quotes at line 1); "
        "fix the file and retry")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"nope": None}}))
    assert "'nope', which is not a quantizable layer" in _error(load_recipe, str(bad), LAYERS)


@pytest.mark.parametrize("text,message", [
    ('{"weights": {"format": "int8", "group_size": ' + "9" * 5000 + "}}",
     "the recipe holds an integer with 5,000 digits; recipe numbers are small (at most 12 digits), e.g. group_size 128"),
    ('{"weights": {"percentile": 1e999}}',
     "the recipe holds the number 1e999, which is not finite; use a number such as 99.99"),
    ('{"weights": {"percentile": NaN}}',
     "the recipe holds NaN, which is not a JSON number; use a finite number such as 99.99"),
    ('{"weights": {"percentile": -Infinity}}',
     "the recipe holds -Infinity, which is not a JSON number; use a finite number such as 99.99"),
    ("[" * 100_000 + "]" * 100_000, "the recipe is nested more than 8 levels deep; a recipe is recipe -> layers -> "
     "layer -> weights -> values"),
    ('{"layers": {"a": {"weights": {"format": [[[[[[["int8"]]]]]]]}}}}', "the recipe is nested more than 8 levels deep; "
     "a recipe is recipe -> layers -> layer -> weights -> values"),
    ('{"name": "' + "a" * 2**20 + '"}', "the recipe is larger than 1 MiB; a recipe is a small JSON file"),
    (b'{"name": "\xff"}', "the recipe is not UTF-8 text (byte 10); save it as UTF-8 JSON"),
])
def test_recipe_json_is_bounded(text, message):
    """Regression: deep nesting and 5,000-digit integers raised RecursionError/ValueError (tracebacks)."""
    assert _error(Recipe.from_json, text) == message


def test_recipe_json_within_bounds_still_parses():
    from qcore.recipe.parse import parse_json as _parse_json

    assert _parse_json("[" * 8 + "]" * 8) == [[[[[[[[]]]]]]]]  # 8 levels deep is the limit, not 7
    assert _parse_json('{"a": [999999999999, -999999999999, 1e308]}') == {"a": [10**12 - 1, 1 - 10**12, 1e308]}
    assert Recipe.from_json(b'\xef\xbb\xbf{"name": "\xc3\xa9"}').name == "\u00e9"  # UTF-8 with a BOM


def test_load_recipe_refuses_non_files_and_reads_a_bounded_prefix(tmp_path):
    assert _error(load_recipe, str(tmp_path)).endswith("is not a regular file; give a JSON file")
    assert _error(load_recipe, "/dev/zero") == "recipe file '/dev/zero' is not a regular file; give a JSON file"
    assert "could not be read (File name too long)" in _error(load_recipe, "[" * 100_000)
    big = tmp_path / "big.json"
    big.write_text('{"name": "' + "a" * 3 * 2**20 + '"}')
    assert _error(load_recipe, str(big)) == "the recipe is larger than 1 MiB; a recipe is a small JSON file"

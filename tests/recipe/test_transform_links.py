"""``transforms=`` in a link (``links.encode_transforms`` / ``decode_transforms``): any list of transform entries
round-trips and rebuilds the same recipe; a cut or changed parameter is one line; a link without it is the preset."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_recipe_links import TOY

from qcore.errors import QcoreError
from qcore.recipe import preset
from qcore.recipe.links import build_recipe, decode_transforms, encode_transforms

LAYERS = list(TOY.layer_shapes)
ENTRY = st.one_of(
    st.builds(lambda a, ls: {"smoothquant": {"alpha": a, "layers": ls}},
              st.floats(0, 1), st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True)),
    st.builds(lambda ls: {"cle": {"layers": ls}}, st.lists(st.sampled_from(LAYERS), min_size=1, max_size=2, unique=True)),
    st.just({"bias_correction": {}}), st.builds(lambda g: {"awq": {"grid": g}}, st.integers(2, 100)))


@settings(max_examples=25, deadline=None)
@given(st.lists(ENTRY, max_size=4))
def test_transforms_round_trip_through_the_link(entries):
    text = encode_transforms(entries)
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")  # url-safe, no '='
    assert json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))) == entries  # independent decode
    assert decode_transforms(text) == entries
    assert build_recipe(TOY, "int8-static", {}, decode_transforms(text)) == build_recipe(TOY, "int8-static", {}, entries)


def test_a_link_without_transforms_is_the_presets():
    assert build_recipe(TOY, "int8-static", {}).transforms == preset("int8-static", TOY.layer_shapes).transforms


@pytest.mark.parametrize("text", [encode_transforms([{"cle": {"layers": ["features.3"]}}])[:-4] + "!!",  # cut, changed
                                  encode_transforms({"cle": {}}),  # an object, not a list
                                  "x" * 300_000])
def test_a_corrupted_transforms_parameter_is_one_line(text):
    with pytest.raises(QcoreError) as e:
        decode_transforms(text)
    assert "transforms=" in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_transform_in_a_link_is_one_line():
    with pytest.raises(QcoreError) as e:
        build_recipe(TOY, "int8-static", {}, decode_transforms(encode_transforms([{"rotate": {}}])))
    assert "\n" not in str(e.value)

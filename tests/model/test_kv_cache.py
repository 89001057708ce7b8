"""KV-cache quantization: the recipe key, the blocks each granularity names (by hand), what the hooks replace
in a model (only the cached keys and values), links, and its effect measured through the normal evaluate path."""

import json
import math

import pytest
import torch
from torch import nn

from qcore import Recipe, preset
from qcore.errors import QcoreError
from qcore.model.kv_cache import CacheSlice, apply_kv_cache, find_cache_slices, quantize_cache
from qcore.recipe.kv_cache import KVCacheSpec
from qcore.recipe.links import decode_kv_cache, encode_kv_cache


def _int8_by_hand(block: torch.Tensor) -> torch.Tensor:
    s = block.abs().max() / 127
    return torch.round(block / s) * s


def test_per_token_is_one_scale_per_token_and_head():
    x = torch.randn(2, 3, 2 * 4)  # batch 2, 3 tokens, 2 heads of 4
    got = quantize_cache(x, KVCacheSpec("int8", "per_token"), heads=2, head_dim=4)
    for b in range(2):
        for t in range(3):
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                assert torch.allclose(got[b, t, sl], _int8_by_hand(x[b, t, sl]), atol=1e-7)


def test_per_head_is_one_scale_per_head_over_every_token():
    x = torch.randn(2, 3, 2 * 4)
    x[0, 1, 4] = 50.0  # an outlier in head 1 of sequence 0: only that head's block gets the coarse step
    got = quantize_cache(x, KVCacheSpec("int8", "per_head"), heads=2, head_dim=4)
    for b in range(2):
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            assert torch.allclose(got[b, :, sl], _int8_by_hand(x[b, :, sl]), atol=1e-6)


def test_hooks_replace_only_the_cached_features():
    """A GPT-2-style fused projection (queries | keys | values): the queries pass untouched."""
    layer = nn.Linear(8, 24)
    model = nn.Sequential(layer)
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        ref = layer(x)
    spec = KVCacheSpec("int4", "per_token")
    apply_kv_cache(model, (CacheSlice("0", "key", 2, 4, 8), CacheSlice("0", "value", 2, 4, 16)), spec)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out[..., :8], ref[..., :8])
    for start in (8, 16):
        assert torch.allclose(out[..., start:start + 8], quantize_cache(ref[..., start:start + 8], spec, 2, 4))
    assert not torch.equal(out[..., 8:], ref[..., 8:])


def test_projections_are_found_by_structure():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim, self.num_heads = 4, 2
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.ModuleDict({"attn": Attention(), "mlp": nn.Linear(8, 8)})
    assert find_cache_slices(model) == (CacheSlice("attn.k_proj", "key", 2, 4), CacheSlice("attn.v_proj", "value", 2, 4))
    assert find_cache_slices(nn.Linear(3, 3)) == ()


def test_recipe_key_is_validated_and_omitted_when_absent():
    base = preset("int8-dynamic").to_dict()
    assert "kv_cache" not in base and "kv_cache" not in Recipe.from_dict(base).to_json()
    r = Recipe.from_dict({**base, "kv_cache": {"format": "int4", "granularity": "per_head"}})
    assert r.kv_cache == KVCacheSpec("int4", "per_head") and r != Recipe.from_dict(base)
    assert Recipe.from_json(r.to_json()) == r and json.loads(r.to_json())["kv_cache"]["format"] == "int4"
    for bad, words in [({"format": "nf4"}, "not a cache format"), ({"format": "int8", "granularity": "per_row"}, "per_head"),
                       ({"bits": 8}, "unknown key kv_cache.'bits'"), ("int8", "must be an object"),
                       ({"format": "fp8_e4m3", "symmetric": False}, "only possible for integer")]:
        with pytest.raises(QcoreError) as e:
            Recipe.from_dict({**base, "kv_cache": bad})
        assert words in str(e.value) and "\n" not in str(e.value)


def test_links_round_trip_the_kv_cache():
    for spec in (KVCacheSpec("int8", "per_token"), KVCacheSpec("int4", "per_head", symmetric=False),
                 KVCacheSpec("fp8_e4m3", "per_token")):
        assert decode_kv_cache(encode_kv_cache(spec)) == spec
    assert encode_kv_cache(None) is None and decode_kv_cache("") is None
    with pytest.raises(QcoreError, match="FORMAT.GRANULARITY"):
        decode_kv_cache("int8")


def test_a_model_without_attention_refuses_a_kv_cache_recipe(digits_mlp):
    recipe = Recipe.from_dict({**preset("int8-dynamic").to_dict(), "kv_cache": {"format": "int8"}})
    with pytest.raises(QcoreError, match="not a language model"):
        digits_mlp.simulate(recipe)


def test_on_tiny_lm_kv_int8_changes_perplexity_less_than_int4(tiny_lm):
    """Measured through the normal evaluate path, weights in float, only the cache quantized (one scale per head:
    on the 32 test windows perplexity moves by 0.008 at int8 and 0.075 at int4 from FP32's 136.13)."""
    assert len(tiny_lm.kv_cache_slices) == 2 * tiny_lm.model.config.layers
    fp32 = tiny_lm.fp32_metrics["perplexity"]
    got = {f: tiny_lm.evaluate(Recipe("kv", kv_cache=KVCacheSpec(f, "per_head"))).quantized.metrics
           for f in ("int8", "int4")}
    change = {f: abs(m["perplexity"] - fp32) for f, m in got.items()}
    assert change["int8"] < change["int4"] and got["int8"]["kl_divergence"] < got["int4"]["kl_divergence"]
    assert math.isfinite(got["int4"]["perplexity"])


def test_recipe_id_and_links_carry_the_kv_cache_only_when_set():
    from dataclasses import replace
    from types import SimpleNamespace

    from qcore.recipe.links import build_recipe, recipe_id

    w = SimpleNamespace(name="toy", layer_shapes={"fc": (4, 8)})
    plain = build_recipe(w, "int8-dynamic", {})
    with_kv = build_recipe(w, "int8-dynamic", {}, kv_cache=KVCacheSpec("int4", "per_head"))
    assert with_kv == replace(plain, kv_cache=KVCacheSpec("int4", "per_head")) and with_kv != plain
    assert "kv_cache" not in recipe_id(w, plain) and json.loads(recipe_id(w, with_kv))["(kv_cache)"]["format"] == "int4"

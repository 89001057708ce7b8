"""KV-cache quantization, simulated: fake-quantize what the attention cache would hold.

A decoder caches, per layer, the key and value vectors of every token it has seen: (tokens, kv_heads,
head_dim) each. They are the outputs of the attention's key and value projections, so the simulation puts a
forward hook on each projection (``CacheSlice``: which layer, which output features, how many heads) that
replaces those features by their quantized-dequantized values under the recipe's ``kv_cache`` spec
(``qcore.recipe.kv_cache``), with the blocks its granularity names:

- per_token: one scale per (sequence, token, head), a block of head_dim values;
- per_head : one scale per (sequence, head), a block of tokens x head_dim values (the whole window).

What exactly is quantized, by architecture:

- GPT-2 (``c_attn``, one fused projection): features [hidden, 2 hidden) are the keys, [2 hidden, 3 hidden) the
  values -- exactly what GPT-2's cache stores (it applies no rotation);
- Llama / Qwen2 / tiny-lm (``k_proj``, ``v_proj``): the projection outputs. Llama and Qwen2 rotate keys (RoPE)
  *after* ``k_proj`` and cache the rotated keys; this simulation quantizes the keys before the rotation.
  RoPE rotates pairs of features within a head, so it keeps each head vector's length but not its largest
  element: a per-token absmax scale of the rotated key can differ from the unrotated one (values are exact).

Every position of the evaluated window reads quantized keys and values, as decoding with a quantized cache
does for all earlier tokens (the newest token's own key is quantized too; runtimes that keep it in float are
slightly better). Hooks go on the simulation's private copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcore.numerics.quantize import quantize
from qcore.recipe.kv_cache import KVCacheSpec


@dataclass(frozen=True)
class CacheSlice:
    """Output features [start, start + heads * head_dim) of layer ``layer`` are the ``role`` ("key" | "value")
    vectors the cache stores, ``heads`` (KV heads) of ``head_dim`` each, in head-major order."""

    layer: str
    role: str
    heads: int
    head_dim: int
    start: int = 0


def quantize_cache(x: torch.Tensor, spec: KVCacheSpec, heads: int, head_dim: int) -> torch.Tensor:
    """``x`` (B, T, heads * head_dim) float -> the same shape, fake-quantized in blocks per ``spec.granularity``."""
    b, t, _ = x.shape
    v = x.float().reshape(b, t, heads, head_dim)
    if spec.granularity == "per_token":
        rows = quantize(v.reshape(-1, head_dim), spec.block_spec).dequantize().reshape(b, t, heads, head_dim)
    else:  # per_head: (B, H, T * D)
        rows = quantize(v.permute(0, 2, 1, 3).reshape(b * heads, t * head_dim), spec.block_spec).dequantize()
        rows = rows.reshape(b, heads, t, head_dim).permute(0, 2, 1, 3)
    return rows.reshape(b, t, heads * head_dim).to(x.dtype)


class CacheQuantizer:
    """Forward hook replacing a projection's cached features by their quantized values."""

    def __init__(self, slices: list[CacheSlice], spec: KVCacheSpec):
        self.slices, self.spec = slices, spec

    def __call__(self, module, args, out):
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            return None
        out = out.clone()
        for s in self.slices:
            end = s.start + s.heads * s.head_dim
            out[..., s.start:end] = quantize_cache(out[..., s.start:end], self.spec, s.heads, s.head_dim)
        return out


def apply_kv_cache(model: nn.Module, slices: tuple[CacheSlice, ...], spec: KVCacheSpec) -> list[str]:
    """Hook every projection in ``slices`` of ``model`` (in place: give it a private copy); returns the layers."""
    by_layer: dict[str, list[CacheSlice]] = {}
    for s in slices:
        by_layer.setdefault(s.layer, []).append(s)
    modules = dict(model.named_modules())
    for layer, parts in by_layer.items():
        modules[layer].register_forward_hook(CacheQuantizer(parts, spec))
    return list(by_layer)


def _kv_heads(attention: nn.Module) -> int | None:
    """KV heads of an attention module: its own ``num_key_value_heads``, its config's, or ``num_heads``."""
    for source in (attention, getattr(attention, "config", None)):
        n = getattr(source, "num_key_value_heads", None)
        if isinstance(n, int) and n > 0:
            return n
    n = getattr(attention, "num_heads", None)
    return n if isinstance(n, int) and n > 0 else None


def find_cache_slices(model: nn.Module) -> tuple[CacheSlice, ...]:
    """The key and value projections of every attention of ``model`` (its prepared copy: GPT-2's ``c_attn``
    already a Linear), found by structure: a module with ``k_proj`` and ``v_proj`` Linear children and an
    integer ``head_dim`` (tiny-lm, Llama, Qwen2), or with a ``c_attn`` Linear of 3 x heads x head_dim outputs
    (GPT-2). A projection whose output size is not kv_heads x head_dim is skipped. Empty: not a decoder."""
    found = []
    for name, m in model.named_modules():
        prefix, head_dim, heads = f"{name}." if name else "", getattr(m, "head_dim", None), _kv_heads(m)
        if not (isinstance(head_dim, int) and head_dim > 0 and heads):
            continue
        children = dict(m.named_children())
        if isinstance(children.get("k_proj"), nn.Linear) and isinstance(children.get("v_proj"), nn.Linear):
            if all(children[p].out_features == heads * head_dim for p in ("k_proj", "v_proj")):
                found += [CacheSlice(prefix + "k_proj", "key", heads, head_dim),
                          CacheSlice(prefix + "v_proj", "value", heads, head_dim)]
        elif isinstance(children.get("c_attn"), nn.Linear) and children["c_attn"].out_features == 3 * heads * head_dim:
            hidden = heads * head_dim  # GPT-2: [queries | keys | values] along the output features
            found += [CacheSlice(prefix + "c_attn", "key", heads, head_dim, hidden),
                      CacheSlice(prefix + "c_attn", "value", heads, head_dim, 2 * hidden)]
    return tuple(found)

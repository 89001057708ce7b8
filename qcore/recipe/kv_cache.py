"""``KVCacheSpec``: how a language model's attention cache is quantized (the recipe's ``"kv_cache"`` key).

    "kv_cache": {"format": "int8", "granularity": "per_token", "symmetric": true}

The cache holds, for every layer, the keys and values of every token seen so far: a (tokens, kv_heads,
head_dim) tensor each. ``granularity`` says which of its values share one scale:

- ``per_token`` : one scale per token per head -- a block of ``head_dim`` values (as llama.cpp's q8_0 /
                  vLLM's per-token-head int8 caches keep one per head vector); written as each token arrives.
- ``per_head``  : one scale per head per sequence -- a block of tokens x ``head_dim`` values (as a
                  per-channel-group static cache would); the simulation takes each head's range over the whole
                  evaluated window, which a runtime writing token by token would have to know ahead (optimistic).

``format`` is any format that may quantize activations (int2..int16, fp8_e4m3/e5m2, fp16, bf16); float
formats below 16 bits are scaled into their range. ``symmetric`` (integer formats): zero-point 0.
Absent (the default) the cache stays float and the recipe's JSON has no ``kv_cache`` key at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from qcore.errors import QcoreError, shown as _show
from qcore.numerics.formats import FORMATS
from qcore.numerics.spec import TensorSpec

KV_GRANULARITIES = ("per_token", "per_head")


@dataclass(frozen=True)
class KVCacheSpec:
    format: str = "int8"
    granularity: str = "per_token"
    symmetric: bool = True

    def to_dict(self) -> dict:
        return {"format": self.format, "granularity": self.granularity, "symmetric": self.symmetric}

    @property
    def block_spec(self) -> TensorSpec:
        """The spec quantizing the cache viewed as rows, one row per block (``per_channel`` along axis 0)."""
        fmt = FORMATS[self.format]
        return TensorSpec(self.format, "per_channel", 0, symmetric=self.symmetric,
                          scaled=fmt.can_be_scaled and fmt.bits <= 8)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "kv_cache") -> "KVCacheSpec":
        if not isinstance(d, Mapping):
            raise QcoreError(f"{where} must be an object like {{\"format\": \"int8\", \"granularity\": \"per_token\"}} "
                             f"or absent, got {_show(d)}")
        allowed = ("format", "granularity", "symmetric")
        for key in d:
            if key not in allowed:
                raise QcoreError(f"unknown key {where}.{_show(key)}; allowed keys: {', '.join(allowed)}")
        spec = cls(**d)
        usable = [n for n, f in FORMATS.items() if f.for_activations and f.quantizes]
        if not isinstance(spec.format, str) or spec.format not in usable:
            raise QcoreError(f"{where}.format={_show(spec.format)} is not a cache format; allowed: {', '.join(usable)}")
        if not isinstance(spec.granularity, str) or spec.granularity not in KV_GRANULARITIES:
            raise QcoreError(f"{where}.granularity={_show(spec.granularity)} is not a cache granularity; allowed: "
                             f"{', '.join(KV_GRANULARITIES)}")
        if not isinstance(spec.symmetric, bool):
            raise QcoreError(f"{where}.symmetric={_show(spec.symmetric)} must be true or false")
        if not spec.symmetric and not FORMATS[spec.format].can_be_affine:
            raise QcoreError(f"{where}.symmetric=false is only possible for integer formats; {spec.format} is symmetric")
        return spec

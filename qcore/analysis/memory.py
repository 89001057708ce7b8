"""The memory calculator: how many bytes a language model's weights and its KV cache take, by hand.

A pure estimate from shapes and formats (no model is run, nothing is measured). Units: bytes, and
decimal gigabytes (GB = 10^9 bytes), the unit the usual rules of thumb use ("a 1B-parameter model takes
4 GB in FP32, 2 GB in FP16, 1 GB in INT8, 0.5 GB in INT4"; "Llama-2-70B: about 140 GB in FP16, 35 GB
in INT4").

- **Weights**: every parameter at the format's bits (``Format.bits``), rounded up to whole bytes, plus,
  when ``group_size`` is given, one float32 scale per group of ``group_size`` parameters (4 bytes, as
  ``qcore.model.size`` stores scales) and a zero-point per group at the format's bits if it is affine.
  ``group_size=None`` counts the codes only, as the rules of thumb above do. Embeddings and norms count
  at the same format (the rules of thumb do too); real checkpoints often keep them in 16 bits.
- **KV cache**: 2 (keys and values) x layers x kv_heads x head_dim x context x batch values, each at
  the KV format's bits; with ``kv_granularity`` "per_token" plus one float32 scale per token per head
  per K/V, "per_head" one per head per K/V per sequence. Grouped-query attention (kv_heads < heads) is
  why the 70B cache is 8x smaller than the head count suggests.
- Not included: activations, the runtime's own buffers, the tokenizer, fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qcore.errors import QcoreError
from qcore.numerics.formats import FORMATS

SCALE_BYTES = 4  # float32 scales, as qcore.model.size stores them
GB = 10**9
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "fp8_e4m3", "int8", "int4", "nf4", "int3", "int2")
KV_GRANULARITIES = ("per_head", "per_token")


@dataclass(frozen=True)
class LMShape:
    """The shapes that set a decoder's memory: Llama-style (RMSNorm, gated MLP of 3 matrices, no biases).

    ``params`` overrides the count computed from the shapes (a nominal "1B" model). ``source`` says where
    the shapes come from."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    params: int | None = None
    source: str = ""

    @property
    def param_count(self) -> int:
        """Parameters: embeddings (+ an untied head) + per layer q/k/v/o, gate/up/down and two norms, + the
        final norm."""
        if self.params is not None:
            return self.params
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        per_layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * per_layer + self.hidden


# Public configurations (the config.json each model ships on the Hugging Face Hub).
REFERENCE_MODELS = {
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json: 22 layers, hidden 2048, 32 heads,
    # 4 KV heads, intermediate 5632, vocabulary 32000 -- 1.10 B parameters.
    "1B": LMShape("TinyLlama-1.1B", 22, 2048, 32, 4, 64, 5632, 32000,
                  source="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json"),
    # meta-llama/Llama-2-7b-hf config.json: 32 layers, hidden 4096, 32 heads (no GQA), intermediate 11008 -- 6.74 B.
    "7B": LMShape("Llama-2-7B", 32, 4096, 32, 32, 128, 11008, 32000, source="meta-llama/Llama-2-7b-hf config.json"),
    # meta-llama/Llama-2-70b-hf config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads, intermediate 28672 -- 68.98 B.
    "70B": LMShape("Llama-2-70B", 80, 8192, 64, 8, 128, 28672, 32000, source="meta-llama/Llama-2-70b-hf config.json"),
}


def _fmt(name: str, what: str):
    if name not in FORMATS:
        raise QcoreError(f"unknown {what} format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def weight_memory(params: int, fmt: str, group_size: int | None = None, symmetric: bool = True) -> dict:
    """Bytes of ``params`` weights at ``fmt``: ``{"codes", "scales", "zero_points", "total"}`` (see the module
    docstring; scales only with ``group_size`` and only for formats that store one)."""
    f = _fmt(fmt, "weight")
    if params < 0 or (group_size is not None and group_size < 1):
        raise QcoreError(f"params {params} and group size {group_size} must be positive; give e.g. --params 7e9")
    codes = math.ceil(params * f.bits / 8)
    stored = f.params(symmetric, f.can_be_scaled and f.bits <= 8) if group_size else ()
    groups = math.ceil(params / group_size) if group_size else 0
    scales = groups * SCALE_BYTES if "scale" in stored else 0
    zero_points = math.ceil(groups * f.bits / 8) if "zero_point" in stored else 0
    return {"codes": codes, "scales": scales, "zero_points": zero_points, "total": codes + scales + zero_points}


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int, batch: int = 1, fmt: str = "fp16",
                   granularity: str | None = None) -> int:
    """Bytes of the KV cache: 2 x layers x kv_heads x head_dim x context x batch values at ``fmt``'s bits,
    plus float32 scales per ``granularity`` (None: codes only; "per_token": one per token, head and K/V;
    "per_head": one per head and K/V per sequence)."""
    f = _fmt(fmt, "KV-cache")
    if min(layers, kv_heads, head_dim, context, batch) < 1:
        raise QcoreError("layers, KV heads, head size, context and batch must all be at least 1")
    if granularity is not None and granularity not in KV_GRANULARITIES:
        raise QcoreError(f"unknown KV-cache granularity {granularity!r}; choose one of {', '.join(KV_GRANULARITIES)}")
    values = 2 * layers * kv_heads * head_dim * context * batch
    scales = 0
    if granularity is not None and "scale" in f.params(True, f.can_be_scaled and f.bits <= 8):
        per_sequence = context if granularity == "per_token" else 1
        scales = 2 * layers * kv_heads * per_sequence * batch * SCALE_BYTES
    return math.ceil(values * f.bits / 8) + scales


def memory_table(shape: LMShape, formats=WEIGHT_FORMATS, group_size: int | None = None, context: int = 4096,
                 batch: int = 1, kv_format: str = "fp16", kv_granularity: str | None = None) -> list[dict]:
    """One row per weight format: ``{"model", "format", "params", "weight_bytes", "weight_gb", "kv_cache_bytes",
    "kv_cache_gb", "total_gb", "includes"}``; the KV cache is the same in every row (``kv_format`` at
    ``context`` tokens x ``batch``)."""
    kv = kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, context, batch, kv_format, kv_granularity)
    includes = (f"weights: every parameter at the format, {'codes only' if group_size is None else f'plus a float32 scale per {group_size} weights'}; "
                f"KV cache: {kv_format}, {context} tokens x batch {batch}; not activations or runtime buffers")
    rows = []
    for fmt in formats:
        w = weight_memory(shape.param_count, fmt, group_size if _fmt(fmt, "weight").bits < 16 else None)
        rows.append({"model": shape.name, "format": fmt, "params": shape.param_count, "weight_bytes": w["total"],
                     "weight_gb": w["total"] / GB, "kv_cache_bytes": kv, "kv_cache_gb": kv / GB,
                     "total_gb": (w["total"] + kv) / GB, "includes": includes})
    return rows


def workload_shape(workload) -> LMShape:
    """The shape of a loaded language model (zoo tiny-lm, a Hugging Face folder): its parameter count and, from its
    key projections (``Workload.kv_cache_slices``), layers, KV heads and head size. QcoreError if it has none."""
    keys = [s for s in workload.kv_cache_slices if s.role == "key"]
    if not keys:
        raise QcoreError(f"{workload.name} is not a language model with attention layers; give a reference model "
                         f"({', '.join(REFERENCE_MODELS)}), a language model, or --params")
    params = sum(t.numel() for t in workload.model.parameters())
    return LMShape(workload.name, len(keys), 0, keys[0].heads, keys[0].heads, keys[0].head_dim, 0, 0, params=params,
                   source="the loaded model's parameters and key projections")

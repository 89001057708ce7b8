"""Causal language models: the task that scores them and the data they are scored on.

Convention: a language model (LM) is an ``nn.Module`` whose ``forward(input_ids)`` maps token ids
``(B, T)`` int64 to next-token logits ``(B, T, V)``: position t predicts token t + 1. A model may
declare ``context_length`` (int), the longest T it accepts (learned position embeddings end there).
Its workload's ``tokenizer`` (a ``TextCodec``) turns text into ids and back, for generation.

Data: ``token_windows`` cuts one long token stream into windows ``(N, T)``; the labels ``(N, T)`` are
the inputs shifted by one (the token each position should predict), -100 where a position is not
scored (as in Hugging Face: overlapping context that an earlier window already scored).

Metrics (``lm_metrics``), over the scored positions only, all in nats where they are logs:

- ``perplexity``      (headline, lower is better) exp(mean cross-entropy of the labels): the model is as
                      unsure as a uniform choice among this many tokens;
- ``delta_perplexity``  perplexity minus FP32's on the same windows (0 for FP32);
- ``kl_divergence``   mean over positions of KL(FP32 || quantized) of the next-token distributions, as
                      llama.cpp's ``--kl-divergence`` reports it: it sees changes before any token flips;
- ``top1_agreement``  fraction of positions whose most likely next token equals FP32's;
- ``top1_flips``      1 - top1_agreement: the share of positions where a greedy decoder would diverge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from qcore.errors import QcoreError
from qcore.model.workload import Data
from qcore.model.task import Task

IGNORE_INDEX = -100  # label of a position that is not scored (Hugging Face's convention)
_CHUNK = 512  # positions per float64 log-softmax (bounds memory at 512 x V x 8 bytes per temporary)


@dataclass(frozen=True)
class TextCodec:
    """A language model's tokenizer as generation needs it: ``encode(text) -> ids``, ``decode(ids) -> text``
    (decoding one id gives that token's piece of text), ``stop_id`` the end-of-text id (None: none)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    stop_id: int | None = None


def token_windows(ids: torch.Tensor, window: int, stride: int | None = None) -> Data:
    """Windows of ``window`` tokens from the 1-D stream ``ids`` (L,), starting every ``stride`` tokens
    (default ``window``: no overlap), as ``Data(inputs=(x,), labels=y)`` with x, y ``(N, window)`` int64
    and y[i, t] = ids[start_i + t + 1]. With stride < window, a window's first ``window - stride`` labels
    are ``IGNORE_INDEX`` (the previous window scored those tokens; here they are context), except in the
    first window, so every token after the first is scored exactly once. A tail shorter than a
    stride is dropped, so N = (L - 1 - window) // stride + 1."""
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise QcoreError(f"window {window} and stride {stride} must satisfy 1 <= stride <= window; choose others")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if len(ids) < window + 1:
        raise QcoreError(f"the text has {len(ids)} tokens, fewer than one window of {window} plus the next "
                         "token; use a longer text or a shorter window")
    starts = range(0, len(ids) - window, stride)
    x = torch.stack([ids[s:s + window] for s in starts])
    y = torch.stack([ids[s + 1:s + window + 1] for s in starts])
    y[1:, :window - stride] = IGNORE_INDEX
    return Data((x,), y)


def _scored(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor):
    """The scored positions as rows: (logits (P, V), reference (P, V), labels (P,))."""
    if labels.shape != logits.shape[:-1]:
        raise QcoreError(f"next-token labels have shape {tuple(labels.shape)}, not the logits' positions "
                         f"{tuple(logits.shape[:-1])}; give one label per position (-100 to skip it)")
    keep = labels.reshape(-1) != IGNORE_INDEX
    v = logits.shape[-1]
    out, ref = logits.reshape(-1, v)[keep], reference.reshape(-1, v)[keep]
    for what, t in (("outputs", out), ("reference outputs", ref)):
        if not torch.isfinite(t).all():
            raise QcoreError(f"the model's {what} contain {int((~torch.isfinite(t)).sum())} NaN or infinite "
                             "logits (an overflow inside the model); metrics need finite outputs")
    return out, ref, labels.reshape(-1)[keep]


def kl_per_position(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) in nats for each row of ``(..., V)`` logits, float64,
    shape ``(...)``; >= 0 (rounding below zero is clamped)."""
    v = logits.shape[-1]
    flat_q, flat_p = logits.reshape(-1, v), reference.reshape(-1, v)
    parts = []
    for i in range(0, len(flat_q), _CHUNK):
        log_p = torch.log_softmax(flat_p[i:i + _CHUNK].double(), dim=-1)
        log_q = torch.log_softmax(flat_q[i:i + _CHUNK].double(), dim=-1)
        parts.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0))
    return torch.cat(parts).reshape(logits.shape[:-1]) if parts else torch.zeros(logits.shape[:-1], dtype=torch.float64)


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for i in range(0, len(logits), _CHUNK):
        log_q = torch.log_softmax(logits[i:i + _CHUNK].double(), dim=-1)
        total += float(-log_q.gather(1, labels[i:i + _CHUNK, None]).sum())
    return total / len(logits)


def _perplexity(mean_cross_entropy: float) -> float:
    """exp(mean cross-entropy); ``inf`` past float64's range (a model that is certain and wrong)."""
    return math.exp(mean_cross_entropy) if mean_cross_entropy < 709.0 else math.inf


def lm_metrics(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """The metrics above from logits ``(N, T, V)``, FP32 reference logits ``(N, T, V)`` and next-token
    labels ``(N, T)`` (``IGNORE_INDEX`` = not scored). Perplexity needs labels: without them this raises."""
    if labels is None:
        raise QcoreError("perplexity needs next-token labels (the evaluation data's ids shifted by one); "
                         "give the evaluation data as token windows with labels")
    out, ref, y = _scored(logits, reference, labels)
    if not len(y):
        raise QcoreError("every label is -100, so no position is scored; give at least one next-token label")
    ppl, ppl_ref = _perplexity(_mean_cross_entropy(out, y)), _perplexity(_mean_cross_entropy(ref, y))
    agreement = float((out.argmax(-1) == ref.argmax(-1)).double().mean())
    return {"perplexity": ppl, "delta_perplexity": ppl - ppl_ref,
            "kl_divergence": float(kl_per_position(out, ref).mean()),
            "top1_agreement": agreement, "top1_flips": 1.0 - agreement}


def causal_lm_task(vocab_size: int, why: str = "") -> Task:
    """The ``"causal-lm"`` task for a vocabulary of ``vocab_size`` tokens: ``lm_metrics``, headline
    ``perplexity`` (lower is better)."""
    def metrics(out, ref, labels):
        if out.shape[-1] != vocab_size:
            raise QcoreError(f"the model gives {out.shape[-1]} logits per position, not the vocabulary's "
                             f"{vocab_size}; check the tokenizer matches the model")
        return lm_metrics(out, ref, labels)

    return Task("causal-lm", "perplexity", metrics, higher_is_better=False, why=why)

"""Metrics comparing a quantized model's outputs with the FP32 model's (and with labels).

All take ``outputs`` and ``reference`` of the same shape ``(N, ...)``, one row per sample.
SQNR = 10 log10(sum ref^2 / sum (out - ref)^2) in dB; identical outputs give ``SQNR_EXACT_DB``
(a finite stand-in for +inf so results stay valid JSON). NaN or infinite values in either tensor raise
``QcoreError`` rather than giving a NaN metric.
"""

from __future__ import annotations

import math

import torch

from qcore.errors import QcoreError

SQNR_EXACT_DB = 200.0


def _check_finite(outputs: torch.Tensor, reference: torch.Tensor) -> None:
    for what, t in (("outputs", outputs), ("reference outputs", reference)):
        if not torch.isfinite(t).all():
            n = int((~torch.isfinite(t)).sum())
            raise QcoreError(f"the model's {what} contain {n} NaN or infinite values (an overflow inside the "
                             "model); metrics need finite outputs: check the model and its inputs")


def sqnr_db_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from summed squares: 10 log10(signal / noise), with signal = sum ref^2 and
    noise = sum (out - ref)^2 (accumulated in float64 by the caller). No noise gives ``SQNR_EXACT_DB``;
    noise without signal gives ``-SQNR_EXACT_DB``; anything else is clamped to +-``SQNR_EXACT_DB``.
    NaN or infinite sums raise ``QcoreError`` (they would otherwise compare as neither limit)."""
    if not (math.isfinite(signal) and math.isfinite(noise)):
        raise QcoreError(f"cannot compute an SQNR from signal {signal} and noise {noise} (an overflow inside the "
                         "model); metrics need finite outputs: check the model and its inputs")
    if noise == 0.0:
        return SQNR_EXACT_DB
    if signal == 0.0:
        return -SQNR_EXACT_DB
    return max(min(10.0 * math.log10(signal / noise), SQNR_EXACT_DB), -SQNR_EXACT_DB)


def sqnr_db(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; ~6 dB per bit for uniform grids)."""
    _check_finite(outputs, reference)
    ref = reference.double()
    return sqnr_db_from_sums(float((ref**2).sum()), float(((outputs.double() - ref) ** 2).sum()))


def mean_cosine(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the cosine similarity of flattened rows (1 = same direction)."""
    _check_finite(outputs, reference)
    a = outputs.reshape(len(outputs), -1).double()
    b = reference.reshape(len(reference), -1).double()
    both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
    return float(torch.where(both_zero, 1.0, cos).mean())


def kl_divergence(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) in nats."""
    _check_finite(logits, reference_logits)
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean().clamp(min=0.0))


def classification_metrics(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None,
                           num_classes: int | None = None) -> dict:
    """accuracy and per_class_accuracy (if labels), agreement (top-1 same as FP32), sqnr_db, cosine, kl_div."""
    pred, ref_pred = logits.argmax(-1), reference.argmax(-1)
    out = {
        "agreement": float((pred == ref_pred).double().mean()),
        "sqnr_db": sqnr_db(logits, reference),
        "cosine": mean_cosine(logits, reference),
        "kl_div": kl_divergence(logits, reference),
    }
    if labels is not None:
        out["accuracy"] = float((pred == labels).double().mean())
        n = num_classes or int(logits.shape[-1])
        per_class = []
        for c in range(n):
            mask = labels == c
            per_class.append(float((pred[mask] == c).double().mean()) if mask.any() else None)
        out["per_class_accuracy"] = per_class
    return out


def mse(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared difference over every element (in the output's units squared)."""
    _check_finite(outputs, reference)
    return float(((outputs.double() - reference.double()) ** 2).mean())


def probability_metrics(probs: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None,
                        activation: str, threshold: float = 0.5) -> dict:
    """Outputs that are probabilities, scored by the decisions they lead to.

    ``activation="sigmoid"``: every element is an independent yes/no probability; the decision is
    ``p > threshold`` (0.5), so a [B, 1] voice-activity output gives one decision per sample and a
    [B, 1, H, W] text map one per pixel. ``"softmax"``: each row over the last axis is a distribution;
    the decision is its argmax. ``decision_agreement`` is the fraction of decisions equal to FP32's,
    ``decision_flips`` their count; ``mse`` and ``sqnr_db`` measure how far the probabilities moved
    (a flip needs a probability near the threshold, so both matter). ``accuracy`` with labels: one
    decision per sample (sigmoid with one output, or softmax) against 0/1 or class-index labels.
    """
    _check_finite(probs, reference)
    if activation == "sigmoid":
        decisions, ref_decisions = probs > threshold, reference > threshold
    else:
        decisions, ref_decisions = probs.argmax(-1), reference.argmax(-1)
    same = decisions == ref_decisions
    out = {"decision_agreement": float(same.double().mean()), "decision_flips": int((~same).sum()),
           "mse": mse(probs, reference), "sqnr_db": sqnr_db(probs, reference)}
    if labels is not None:
        per_sample = decisions.reshape(len(decisions), -1)
        out["accuracy"] = float((per_sample[:, 0].long() == labels.long()).double().mean())
    return out


def regression_metrics(outputs: torch.Tensor, reference: torch.Tensor) -> dict:
    """``sqnr_db`` (headline: scale-free, so one threshold reads the same for any output units),
    ``mse`` (output units squared) and ``max_abs_error`` (the worst element, output units)."""
    _check_finite(outputs, reference)
    return {"sqnr_db": sqnr_db(outputs, reference), "mse": mse(outputs, reference),
            "max_abs_error": float((outputs.double() - reference.double()).abs().max()) if outputs.numel() else 0.0}


def sequence_metrics(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Logits over a vocabulary at every position, (N, T, V) (any rank >= 3: the last axis is the class axis).

    ``token_agreement`` (headline): the fraction of positions whose argmax token equals FP32's -- what a
    greedy decoder (CTC, a tagger) would output differently; ``sqnr_db`` of the logits; ``kl_div``: the mean
    KL(FP32 || quantized) per position in nats, which sees changes that do not yet flip a token."""
    _check_finite(logits, reference)
    same = logits.argmax(-1) == reference.argmax(-1)
    v = logits.shape[-1]
    return {"token_agreement": float(same.double().mean()), "sqnr_db": sqnr_db(logits, reference),
            "kl_div": kl_divergence(logits.reshape(-1, v), reference.reshape(-1, v))}

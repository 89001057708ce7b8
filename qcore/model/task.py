"""What a model's outputs mean and how they are scored: ``Task`` (kind, headline metric, direction), the
output kinds the engine knows (``OUTPUT_KINDS``) and the tasks for each (``classification_task``, ``output_task``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from qcore.errors import QcoreError

from qcore.numerics.metrics import (classification_metrics, mean_cosine, probability_metrics, regression_metrics,
                                     sequence_metrics, sqnr_db)


@dataclass(frozen=True)
class Task:
    """What the model's outputs mean and how they are scored.

    ``kind`` is one of ``OUTPUT_KINDS``; metrics(outputs, reference, labels) -> dict of floats; ``headline``
    names the one shown first; ``why`` says where the kind came from ("inferred from the final Sigmoid",
    "set by you").
    """

    kind: str
    headline: str
    metrics: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], dict]
    higher_is_better: bool = True
    class_names: tuple[str, ...] | None = None
    why: str = ""


# What each kind of output is, and its headline metric (labels: with a label per sample).
OUTPUT_KINDS = {
    "classification": "class logits (N, C): accuracy with labels, else top-1 agreement with FP32",
    "probabilities": "probabilities from a final Sigmoid or Softmax: accuracy with labels, else the fraction of "
                     "decisions (p > 0.5, or the argmax) that agree with FP32",
    "embedding": "embeddings or features: mean cosine similarity with the FP32 output",
    "regression": "regression values: SQNR in dB against the FP32 output (MSE beside it)",
    "detection": "detection maps (boxes, scores): SQNR in dB of the whole map against FP32",
    "sequence": "logits at every position (N, T, V): the fraction of positions whose top token agrees with FP32",
    "causal-lm": "next-token logits of a language model (N, T, V), labels the next token ids (N, T): perplexity "
                 "(lower is better), KL divergence and top-1 agreement with FP32",
}


def classification_task(num_classes: int, has_labels: bool, class_names=None, why: str = "") -> Task:
    headline = "accuracy" if has_labels else "agreement"
    return Task("classification", headline,
                lambda out, ref, labels: classification_metrics(out, ref, labels, num_classes),
                class_names=tuple(class_names) if class_names else None, why=why)


def output_task(kind: str, sample_shape: tuple[int, ...], has_labels: bool, why: str,
                activation: str | None = None) -> Task:
    """The ``Task`` scoring outputs of ``kind`` with per-sample shape ``sample_shape``.

    ``activation`` ("sigmoid" | "softmax") says how probabilities were made; it decides what a decision is
    (see ``probability_metrics``). Detection maps are scored by SQNR over the whole raw map: turning one
    into boxes (score threshold, NMS) is specific to each detector, and SQNR weighs errors by the map's
    energy, so the strong cells boxes come from count most -- cosine, by contrast, stays near 1 long after
    boxes move. Sequence logits are scored per position, as a greedy decoder reads them.
    """
    if kind not in OUTPUT_KINDS:
        raise QcoreError(f"unknown output kind {kind!r}; choose one of {', '.join(OUTPUT_KINDS)}")
    if kind == "classification":
        if len(sample_shape) != 1 or sample_shape[0] < 2:
            raise QcoreError(f"the model's output per sample is {sample_shape}, not class logits (C,) with C >= 2; "
                             "choose another output kind")
        return classification_task(sample_shape[0], has_labels, why=why)
    if kind == "probabilities":
        act = activation or "sigmoid"
        labelled = has_labels and (act == "softmax" or math.prod(sample_shape) == 1)
        return Task(kind, "accuracy" if labelled else "decision_agreement",
                    lambda out, ref, labels: probability_metrics(out, ref, labels if labelled else None, act), why=why)
    if kind == "causal-lm":
        from qcore.model.lm import causal_lm_task  # lm builds on this module's Task and Data

        if len(sample_shape) != 2:
            raise QcoreError(f"the model's output per sample is {sample_shape}, not next-token logits (T, V); "
                             "choose another output kind")
        return causal_lm_task(sample_shape[-1], why=why)
    if kind == "sequence":
        if len(sample_shape) < 2:
            raise QcoreError(f"the model's output per sample is {sample_shape}, not logits at every position (T, V); "
                             "choose another output kind")
        return Task(kind, "token_agreement", lambda out, ref, labels: sequence_metrics(out, ref), why=why)
    if kind == "embedding":
        return Task(kind, "cosine_to_fp32",
                    lambda out, ref, labels: {"cosine_to_fp32": mean_cosine(out, ref), "sqnr_db": sqnr_db(out, ref)},
                    why=why)
    if kind == "detection":
        return Task(kind, "sqnr_db", lambda out, ref, labels: {**regression_metrics(out, ref),
                                                               "cosine": mean_cosine(out, ref)}, why=why)
    return Task(kind, "sqnr_db", lambda out, ref, labels: regression_metrics(out, ref), why=why)

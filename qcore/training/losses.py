"""The losses QAT minimises: cross-entropy on labels, or distillation towards the FP32 model's outputs.

- ``cross_entropy``: ``F.cross_entropy(logits, labels)`` (mean over the batch), for classification
  workloads that have labels (the digits models, labelled uploads).
- ``distillation``: where there are no labels, the fine-tuned quantized model learns to reproduce the
  FP32 model's outputs on the training inputs:
    * embeddings (minilm-l6): ``1 - cos(out, fp32_out)``, mean over sentences;
    * classification logits: ``KL(softmax(fp32_out) || softmax(out))``, mean over samples (temperature 1);
    * anything else: mean squared error.

``choose_loss`` picks one (``"auto"``: cross-entropy when labels exist, else distillation) and says why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qcore.errors import QcoreError

LOSSES = ("auto", "cross_entropy", "distillation")
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (out, fp32_out, labels) -> scalar


def choose_loss(requested: str, task_kind: str, has_labels: bool) -> str:
    """``"cross_entropy"`` or ``"distillation"`` for a workload of ``task_kind`` with or without labels."""
    if requested not in LOSSES:
        raise QcoreError(f"unknown loss {requested!r}; choose one of {', '.join(LOSSES)}")
    if requested == "auto":
        return "cross_entropy" if has_labels and task_kind == "classification" else "distillation"
    if requested == "cross_entropy" and not (has_labels and task_kind == "classification"):
        raise QcoreError("cross-entropy needs a classification model with labelled data; use --loss distillation "
                         "(or auto), which learns from the FP32 model's outputs instead")
    return requested


def loss_function(name: str, task_kind: str) -> Loss:
    if name == "cross_entropy":
        return lambda out, fp32_out, labels: F.cross_entropy(out.float(), labels)
    if task_kind == "embedding":
        return lambda out, fp32_out, labels: (1 - F.cosine_similarity(out.float(), fp32_out, dim=-1)).mean()
    if task_kind == "classification":
        return lambda out, fp32_out, labels: F.kl_div(F.log_softmax(out.float(), -1), F.log_softmax(fp32_out, -1),
                                                      reduction="batchmean", log_target=True)
    return lambda out, fp32_out, labels: F.mse_loss(out.float(), fp32_out)

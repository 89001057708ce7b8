"""A QAT run as plain JSON, so it can run as a background job (``qcore.jobs``) on another process or machine.

``config_from(inputs)`` reads and checks a ``QATConfig`` from a job's JSON inputs (one-line errors).
``to_json(result, base)`` is ``QATResult.to_dict()`` plus ``"weights"``: the fine-tuned weights exactly as
``training.save`` writes them (the safetensors bytes, float32, with the base model's content hash and the
recipe in its metadata), base64-encoded. ``from_json(base, data)`` rebuilds the ``QATResult`` -- its workload
through ``load_finetuned``, so the checks that refuse weights fine-tuned from another model apply, and the
rebuilt workload's ``evaluate`` reproduces the QAT metric exactly.

Size: base64 is 4/3 of the safetensors file, i.e. about 5.3 bytes per parameter (digits-cnn: ~0.3 MB;
minilm-l6: ~120 MB, which a Redis result store must have room for).
"""

from __future__ import annotations

import base64
import math
import tempfile
from dataclasses import fields
from pathlib import Path

from qcore.errors import QcoreError
from qcore.model.workload import Workload
from qcore.recipe import Recipe
from qcore.training.qat import EpochRow, QATConfig, QATResult
from qcore.training.result import WEIGHTS_FILE, load_finetuned, save

LOSSES = ("auto", "cross_entropy", "distillation")


def config_from(inputs: dict) -> QATConfig:
    """The ``QATConfig`` that ``inputs`` (``epochs``, ``lr``, optional ``batch_size``, ``loss``, ``seed``,
    ``patience``, ``learn_scales``) asks for; defaults for keys left out."""
    default = QATConfig()
    values = {f.name: inputs.get(f.name, getattr(default, f.name)) for f in fields(QATConfig)}
    for name in ("epochs", "batch_size", "patience"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
            raise QcoreError(f"QAT {name} must be a whole number from 1 to 1000; got {v!r}")
    lr = values["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 1:
        raise QcoreError(f"QAT learning rate must be a number in (0, 1]; got {lr!r}")
    if values["loss"] not in LOSSES:
        raise QcoreError(f"unknown QAT loss {values['loss']!r}; use one of {', '.join(LOSSES)}")
    if not isinstance(values["seed"], int) or not isinstance(values["learn_scales"], bool):
        raise QcoreError("QAT seed must be a whole number and learn_scales true or false")
    return QATConfig(**{**values, "lr": float(lr)})


def to_json(result: QATResult, base: Workload) -> dict:
    """``result`` as JSON-able data (see the module docstring); ``base`` is the workload it was fine-tuned from."""
    with tempfile.TemporaryDirectory() as tmp:
        files = save(result.workload, base, result.recipe, tmp)
        weights = base64.b64encode(Path(files["weights"]).read_bytes()).decode("ascii")
    return {**result.to_dict(), "weights": weights}


def from_json(base: Workload, data: dict) -> QATResult:
    """The ``QATResult`` that ``to_json(result, base)`` wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        path.write_bytes(base64.b64decode(data["weights"]))
        workload = load_finetuned(base, path)
    return QATResult(workload, Recipe.from_dict(data["recipe"]), data["loss"], QATConfig(**data["config"]),
                     [EpochRow(**row) for row in data["history"]], data["best_epoch"], data["stopped"],
                     data["message"], data["fp32"], data["ptq"], data["qat"], data["train_samples"],
                     data["seconds"], list(data["notes"]))

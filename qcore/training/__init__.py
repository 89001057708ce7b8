"""Quantization-aware training: ``finetune(workload, recipe, QATConfig(...)) -> QATResult`` (see ``qat``)."""

from qcore.training.qat import EpochRow, QATConfig, QATResult, finetune, training_data
from qcore.training.result import finetuned_workload, load_finetuned, save

__all__ = ["EpochRow", "QATConfig", "QATResult", "finetune", "finetuned_workload", "load_finetuned", "save", "training_data"]

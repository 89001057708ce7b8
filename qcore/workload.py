"""A workload: a model with its calibration data, evaluation data and metric.

Zoo entries and uploads both become a ``Workload``; everything downstream (evaluate, sensitivity,
search, the app) takes one. It caches what every recipe shares -- the BatchNorm-folded FP32 copy,
its quantizable layers, calibration statistics and the FP32 reference outputs -- and never
modifies ``model``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
from torch import nn

from . import calibrate as calibrate_mod
from .metrics import classification_metrics
from .recipe import Recipe
from .simulate import LayerInfo, Simulation, find_layers, fold_batchnorm, modules_by_name, simulate
from .size import model_size


@dataclass
class Data:
    """Model inputs (a tuple of tensors with a shared first dimension N) and optional labels (N,)."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
        return [tuple(t[i:i + batch_size] for t in self.inputs) for i in range(0, len(self), batch_size)]

    def subset(self, index) -> "Data":
        return Data(tuple(t[index] for t in self.inputs), None if self.labels is None else self.labels[index])


@dataclass(frozen=True)
class Task:
    """What the model's outputs mean and how they are scored.

    metrics(outputs, reference, labels) -> dict of floats; ``headline`` names the one shown first.
    """

    kind: str  # "classification" | "embedding"
    headline: str
    metrics: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], dict]
    higher_is_better: bool = True
    class_names: tuple[str, ...] | None = None


def classification_task(num_classes: int, has_labels: bool, class_names=None) -> Task:
    headline = "accuracy" if has_labels else "agreement"
    return Task("classification", headline,
                lambda out, ref, labels: classification_metrics(out, ref, labels, num_classes),
                class_names=tuple(class_names) if class_names else None)


@dataclass(eq=False)
class Workload:
    name: str
    model: nn.Module
    calibration: Data
    evaluation: Data
    task: Task
    description: str = ""
    source: str = "zoo"
    notes: list[str] = field(default_factory=list)
    batch_size: int = 128
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- what every recipe shares (computed once) ----------------------------------------
    @cached_property
    def folded(self) -> tuple[nn.Module, list[tuple[str, str]]]:
        import copy

        m = copy.deepcopy(self.model).eval()
        return m, fold_batchnorm(m)

    @cached_property
    def layers(self) -> dict[str, LayerInfo]:
        return find_layers(self.folded[0])

    @property
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: i.weight_shape for n, i in self.layers.items()}

    def calibration_stats(self, progress=None) -> dict[str, calibrate_mod.ActivationStats]:
        with self._lock:
            if "_calib" not in self.__dict__:
                m = self.folded[0]
                self.__dict__["_calib"] = calibrate_mod.calibrate(
                    m, modules_by_name(m, self.layers), self.calibration.batches(self.batch_size), progress)
        return self.__dict__["_calib"]

    @cached_property
    def reference_outputs(self) -> torch.Tensor:
        return self.run(self.model, self.evaluation)

    @cached_property
    def fp32_metrics(self) -> dict:
        ref = self.reference_outputs
        return self.task.metrics(ref, ref, self.evaluation.labels)

    # ---- per recipe ------------------------------------------------------------------------
    def run(self, model: nn.Module, data: Data) -> torch.Tensor:
        """Outputs of ``model`` over ``data``, concatenated along the batch dimension."""
        model.eval()
        with torch.no_grad():
            return torch.cat([model(*b).float() for b in data.batches(self.batch_size)])

    def simulate(self, recipe: Recipe, quantized_weights=None) -> Simulation:
        from .simulate import needs_calibration

        recipe.check_against(self.layer_shapes)
        calib = self.calibration_stats() if needs_calibration(recipe, self.layers) else None
        sim = simulate(self.folded[0], recipe, calib, fold=False, quantized_weights=quantized_weights)
        sim.folded = self.folded[1]
        return sim

    def size(self, recipe: Recipe) -> dict:
        return model_size(self.model, self.layers, recipe)

    def evaluate(self, recipe: Recipe) -> dict:
        """Metrics and sizes of FP32 and of the simulated model under ``recipe``::

            {"model", "recipe", "metric", "fp32": {"size_bytes", "metrics"},
             "quantized": {"size_bytes", "metrics"}, "folded": [...], "notes": [...]}
        """
        sim = self.simulate(recipe)
        outputs = self.run(sim.model, self.evaluation)
        size = self.size(recipe)
        return {
            "model": self.name,
            "recipe": recipe.to_dict(),
            "metric": self.task.headline,
            "fp32": {"size_bytes": size["fp32_bytes"], "metrics": self.fp32_metrics},
            "quantized": {"size_bytes": size["size_bytes"],
                          "metrics": self.task.metrics(outputs, self.reference_outputs, self.evaluation.labels)},
            "folded": [list(p) for p in sim.folded],
            "notes": list(self.notes),
        }

"""Remedies for a layer that hurts: change how one layer is quantized, measure before and after.

``REMEDIES`` is the table the Sensitivity page lists: name -> ``Remedy`` (a label, why it helps, and how it
changes a layer's plan). Weight rounding remedies keep the layer's format, granularity and range and change
only which grid point each weight goes to (``TensorSpec.rounding``): GPTQ and AdaRound. A remedy that changes
the float model (SmoothQuant, AWQ, CLE) is one more entry whose ``apply`` returns the changed recipe.

``try_remedy(workload, recipe, layer, name)`` measures both recipes, all numbers from the simulation:

- ``layer_sqnr_db``: the layer's output error on the calibration data with FP32 inputs,
  ``10 log10(tr(W H W^T) / tr(dW H dW^T))`` with ``H = sum x x^T`` over its calibration input rows (the same
  as the SQNR of ``X W^T`` against ``X W'^T``, without keeping X);
- ``metric``: the model's headline metric on the whole evaluation set (``Workload.evaluate``);
- ``weight_error_steps``: each weight's error ``w' - w`` in units of its block's step (scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from qcore.errors import QcoreError
from qcore.model.workload import Workload
from qcore.numerics.granularity import to_blocks
from qcore.numerics.metrics import SQNR_EXACT_DB
from qcore.numerics.spec import ROUNDING_OPTIONS
from qcore.recipe import LayerOverride, LayerPlan, Recipe


def _with_rounding(rounding: str) -> Callable[[Recipe, str], Recipe]:
    def apply(recipe: Recipe, layer: str) -> Recipe:
        plan = recipe.plan(layer)
        w = plan.weights
        if w is None or not w.fmt.can_be_affine:
            raise QcoreError(f"layer {layer!r} has {'float' if w is None else w.format} weights: rounding {rounding} "
                             "applies to integer weights (int2..int8); quantize its weights to an int format first")
        target = LayerPlan(replace(w, rounding=rounding, **{k: (c() if k == rounding else None)
                                                             for k, c in ROUNDING_OPTIONS.items()}), plan.activations)
        entry = LayerOverride.to_reach(recipe.defaults, plan, target)
        return recipe if entry is None else recipe.with_layer(layer, entry)
    return apply


@dataclass(frozen=True)
class Remedy:
    label: str
    why: str
    apply: Callable[[Recipe, str], Recipe]  # (recipe, layer) -> the recipe with the remedy on that layer


REMEDIES = {
    "gptq": Remedy("GPTQ rounding", "rounds one input column at a time and pushes each error onto the columns not yet "
                   "rounded, weighted by how the calibration inputs correlate (Frantar et al. 2022)", _with_rounding("gptq")),
    "adaround": Remedy("AdaRound rounding", "learns for each weight whether to round up or down so the layer's output "
                       "on the calibration inputs stays closest to FP32 (Nagel et al. 2020)", _with_rounding("adaround")),
}


def layer_sqnr_db(hessian: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """SQNR in dB of the layer output X W^T vs X W'^T over rows with ``hessian = X^T X`` (weights as (out, in))."""
    W = weight.detach().double().reshape(weight.shape[0], -1)
    dW = quantized.detach().double().reshape(W.shape) - W
    signal = float(torch.einsum("oi,ij,oj->", W, hessian, W))
    noise = float(torch.einsum("oi,ij,oj->", dW, hessian, dW))
    if noise <= 0:
        return SQNR_EXACT_DB
    return 10 * math.log10(max(signal, 1e-300) / noise)


def try_remedy(workload: Workload, recipe: Recipe, layer: str, name: str,
               progress: Callable[[float, str], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict:
    """``{"remedy", "recipe": the recipe with it, "before": {...}, "after": {...}}``; before/after hold
    ``layer_sqnr_db``, ``metric`` and ``weight_error_steps`` (a flat list) as the module docstring says."""
    remedied = REMEDIES[name].apply(recipe, layer)
    weight = dict(workload.folded[0].named_modules())[layer].weight.detach()
    hessian = workload.rounder.layer_inputs([layer])[layer].hessian
    out = {"remedy": name, "layer": layer, "metric_name": workload.task.headline, "recipe": remedied}
    for i, (side, r) in enumerate((("before", recipe), ("after", remedied))):
        if progress:
            progress(i / 2, f"evaluating {side}")
        workload.rounded_weights(r, None if progress is None else
                                 lambda f, msg: progress(i / 2 + f / 4, msg), should_stop)
        q = workload.simulate(r).weights[layer]
        steps = to_blocks(q.dequantize() - weight, q.spec.granularity, q.spec.axis, q.spec.group_size) / \
            q.scale.reshape(-1, 1)
        out[side] = {"layer_sqnr_db": layer_sqnr_db(hessian, weight, q.dequantize()),
                     "metric": workload.evaluate(r, should_stop=should_stop).quantized.metrics[workload.task.headline],
                     "weight_error_steps": steps.reshape(-1).tolist()}
    if progress:
        progress(1.0, "done")
    return out

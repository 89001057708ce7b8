"""Remedies for a layer that hurts: change how one layer is quantized, measure before and after.

``REMEDIES`` is the one table the Sensitivity page lists: name -> ``Remedy`` (a label, why it helps, its kind and
``apply(workload, recipe, layer) -> recipe``, which raises a one-line ``QcoreError`` when it does not fit the layer).
Two kinds:

- ``"rounding"`` (GPTQ, AdaRound): keep the layer's format, granularity and range and change only which grid point
  each weight goes to (``TensorSpec.rounding``, in the layer's override);
- ``"transform"`` (SmoothQuant, AWQ, CLE, bias correction): a model-level transform in the recipe's ``transforms``,
  restricted to the layer's group (``qcore.analysis.transform_remedies`` says how each is added).

``try_remedy(workload, recipe, layer, name)`` measures both recipes, all numbers from the simulation:

- ``layer_sqnr_db``, with ``sqnr_measure`` saying which: for rounding on a recipe without transforms, the layer's
  output error on the calibration data with FP32 inputs, ``10 log10(tr(W H W^T) / tr(dW H dW^T))`` with ``H = sum x x^T`` over its calibration
  input rows (the SQNR of ``X W^T`` against ``X W'^T``, without keeping X). A transform rescales the layer's weights
  *and* its inputs, so that would compare unlike things: for a transform, or rounding on a recipe that has
  transforms, both sides are the SQNR of the layer's output in the whole simulated model against FP32's
  (``transform_remedies.layer_output_sqnr``);
- ``metric``: the model's headline metric on the whole evaluation set (``Workload.evaluate``);
- ``weight_error_steps``: each weight's error ``w' - w`` in units of its block's step (scale), ``w`` the float
  weight that side rounds (transformed, when the recipe has transforms); rounding only (None for a transform,
  whose float weights are different numbers before and after).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from qcore.analysis.transform_remedies import (awq_for, bias_correction_for, cle_for, layer_output_sqnr,
                                              smoothquant_for, smoothquant_mul_for)
from qcore.errors import QcoreError
from qcore.model.simulate import modules_by_name
from qcore.model.workload import Workload
from qcore.numerics.granularity import to_blocks
from qcore.numerics.metrics import SQNR_EXACT_DB
from qcore.numerics.spec import ROUNDING_OPTIONS
from qcore.recipe import LayerOverride, LayerPlan, Recipe


def _with_rounding(rounding: str) -> Callable[[Workload, Recipe, str], Recipe]:
    def apply(_w: Workload, recipe: Recipe, layer: str) -> Recipe:
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
    kind: str  # "rounding" (the layer's override) or "transform" (the recipe's transforms)
    apply: Callable[[Workload, Recipe, str], Recipe]  # (workload, recipe, layer) -> the recipe with the remedy on it


REMEDIES = {
    "gptq": Remedy("GPTQ rounding", "rounds one input column at a time and pushes each error onto the columns not yet "
                   "rounded, weighted by how the calibration inputs correlate (Frantar et al. 2022)", "rounding",
                   _with_rounding("gptq")),
    "adaround": Remedy("AdaRound rounding", "learns for each weight whether to round up or down so the layer's output "
                       "on the calibration inputs stays closest to FP32 (Nagel et al. 2020)", "rounding",
                       _with_rounding("adaround")),
    "smoothquant": Remedy("SmoothQuant (the layer's block)", "divides each input channel by s = max|x|^0.5 / "
                          "max|W|^0.5 and multiplies the weight's column by s, folded into the norm or layer that "
                          "produced the input: input outliers move into the weights (Xiao et al. 2022)", "transform",
                          smoothquant_for),
    "smoothquant_mul": Remedy("SmoothQuant with a Mul (no fold reaches the layer)", "for a Linear after a GELU or a "
                              "LayerNorm that also feeds a residual add, where no fold can hold the scale: divides each "
                              "input channel by s with an explicit Mul op before the layer (one op more in the exported "
                              "graph) and multiplies the weight's column by s, alpha searched on the layer's output "
                              "error (as w8a8-smoothquant-mul)", "transform", smoothquant_mul_for),
    "awq": Remedy("AWQ (the layer's block)", "scales up the input channels whose activations are large, so their "
                  "weights get finer steps, searching the exponent that minimises the block's output error on the "
                  "calibration data (Lin et al. 2023)", "transform", awq_for),
    "cle": Remedy("Cross-layer equalization", "for a Linear/Conv reading another through a ReLU, equalizes the "
                  "producer's output channel ranges with this layer's input channel ranges, so a per-tensor grid is "
                  "not set by one wide channel (Nagel et al. 2019)", "transform", cle_for),
    "bias_correction": Remedy("Bias correction", "adds to the layer's bias the mean output error its quantized "
                              "weights cause on the calibration data (Nagel et al. 2019)", "transform",
                              bias_correction_for),
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
    """``{"remedy", "layer", "metric_name", "sqnr_measure", "recipe": the recipe with it, "before": {...},
    "after": {...}}``; before/after hold ``layer_sqnr_db``, ``metric`` and ``weight_error_steps`` (a flat list, or
    None for a transform) as the module docstring says. A remedy that does not fit the layer: one-line QcoreError."""
    remedy = REMEDIES[name]
    remedied = remedy.apply(workload, recipe, layer)
    rounding = remedy.kind == "rounding"
    by_weights = rounding and not recipe.transforms  # the FP32 model's own weights and inputs on both sides
    hessian = workload.rounder.layer_inputs([layer])[layer].hessian if by_weights else None
    out = {"remedy": name, "layer": layer, "metric_name": workload.task.headline, "recipe": remedied,
           "sqnr_measure": "calibration data, FP32 inputs" if by_weights else
           "the whole simulated model vs FP32, first calibration batch"}
    for i, (side, r) in enumerate((("before", recipe), ("after", remedied))):
        if progress:
            progress(i / 2, f"evaluating {side}")
        workload.rounded_weights(r, None if progress is None else
                                 lambda f, msg: progress(i / 2 + f / 4, msg), should_stop)
        metric = workload.evaluate(r, should_stop=should_stop).quantized.metrics[workload.task.headline]
        if not rounding:
            out[side] = {"layer_sqnr_db": layer_output_sqnr(workload, r, layer), "metric": metric,
                         "weight_error_steps": None}
            continue
        done = workload.transformed(r)  # the float weights this side rounds (its transforms applied)
        weight = modules_by_name(workload.folded[0] if done is None else done.model, [layer])[layer].weight.detach()
        q = workload.simulate(r).weights[layer]
        steps = to_blocks(q.dequantize() - weight, q.spec.granularity, q.spec.axis, q.spec.group_size) / \
            q.scale.reshape(-1, 1)
        out[side] = {"layer_sqnr_db": layer_sqnr_db(hessian, weight, q.dequantize()) if by_weights else
                     layer_output_sqnr(workload, r, layer), "metric": metric,
                     "weight_error_steps": steps.reshape(-1).tolist()}
    if progress:
        progress(1.0, "done")
    return out

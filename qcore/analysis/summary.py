"""Model summaries: the per-layer table and the size of the model under every preset.

Both return plain lists of dicts (one row each), ready for a table, a chart or JSON.
"""

from __future__ import annotations

import torch

from qcore.recipe import PRESETS, preset
from qcore.model.size import float_bytes
from qcore.model.workload import Workload


def weight_stats(w: torch.Tensor) -> dict:
    """min, max, std, max|w|/std (how far the largest weight sits from the bulk) and excess kurtosis
    (0 for a normal distribution; large = heavy tails / outliers)."""
    w = w.detach().double().reshape(-1)
    std = float(w.std()) if w.numel() > 1 else 0.0
    centered = w - w.mean()
    var = float((centered**2).mean())
    kurt = float((centered**4).mean() / var**2 - 3.0) if var > 0 else 0.0
    return {"min": float(w.min()), "max": float(w.max()), "std": std,
            "max_over_std": float(w.abs().max()) / std if std > 0 else 0.0, "kurtosis": kurt}


def layer_table(workload: Workload) -> list[dict]:
    """One row per quantizable layer: name, type, weight_shape, params, share (of all model
    parameters, 0..1) and weight statistics (of the BatchNorm-folded weight)."""
    total = sum(p.numel() for p in workload.model.parameters())
    modules = dict(workload.folded[0].named_modules())
    rows = []
    for name, info in workload.layers.items():
        rows.append({"name": name, "type": info.kind, "weight_shape": list(info.weight_shape),
                     "params": info.params, "share": info.params / total,
                     **weight_stats(modules[name].weight)})
    return rows


def preset_sizes(workload: Workload) -> list[dict]:
    """Model size under every preset: name, size_bytes, fraction of FP32, bits per weight (quantized layers)."""
    rows = []
    fp32 = float_bytes(workload.model)
    for name in PRESETS:
        size = workload.size(preset(name, workload.layer_shapes))
        qbytes = sum(r["size_bytes"] for r in size["layers"])
        qnumel = sum(r["fp32_bytes"] / 4 for r in size["layers"])
        rows.append({"preset": name, "size_bytes": size["size_bytes"], "fraction_of_fp32": size["size_bytes"] / fp32,
                     "bits_per_weight": 8 * qbytes / qnumel if qnumel else 32.0})
    return rows


def recipe_totals(w, recipe) -> dict:
    """``size_bytes`` and ``fp32_bytes`` of the whole model (``Workload.size``), ``bits_per_weight``
    over the quantizable layers' weights (scales included) and ``float_share``: the fraction of
    those weights kept in FP32."""
    size = w.size(recipe)
    weights = sum(r["fp32_bytes"] for r in size["layers"])
    return {"size_bytes": size["size_bytes"], "fp32_bytes": size["fp32_bytes"],
            "bits_per_weight": 32 * sum(r["size_bytes"] for r in size["layers"]) / weights if weights else 32.0,
            "float_share": sum(r["fp32_bytes"] for r in size["layers"] if r["format"] == "fp32") / weights if weights else 1.0}

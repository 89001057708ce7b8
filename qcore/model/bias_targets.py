"""Which layers a recipe's ``bias_correction`` transforms correct (``simulate`` applies the correction right after
quantizing each weight, from the layers' input means over the calibration data; the math:
``qcore.algorithms.bias_correction``)."""

from __future__ import annotations

import torch
from torch import nn

from qcore.errors import QcoreError


def bias_targets(recipe, layer_kinds: dict[str, str], modules: dict[str, nn.Module], plans) -> tuple[list[str], list[str]]:
    """``(layers whose bias simulate corrects, notes)`` for the recipe's bias_correction transforms: the named
    layers (each must be a Linear/Conv with a bias and quantized weights, else a one-line error) or every such
    layer."""
    targets, notes = [], []
    for i, t in enumerate(recipe.transforms):
        if t.name != "bias_correction":
            continue

        def fits(n):
            w = plans[n].weights
            return (layer_kinds[n] in ("Linear", "Conv1d", "Conv2d") and w is not None and w.fmt.quantizes
                    and isinstance(getattr(modules[n], "bias", None), torch.Tensor))

        if t.layers is None:
            targets += [n for n in layer_kinds if fits(n) and n not in targets]
            unbiased = [n for n in layer_kinds if layer_kinds[n] in ("Linear", "Conv1d", "Conv2d")
                        and getattr(modules[n], "bias", None) is None]
            if unbiased:
                notes.append(f"bias_correction skipped {len(unbiased)} layer(s) without a bias: {', '.join(unbiased[:6])}")
            continue
        for n in t.layers:
            if n not in layer_kinds:
                raise QcoreError(f"transforms[{i}].bias_correction.layers names {n!r}, which is not a quantizable "
                                 "layer of this model")
            if not fits(n):
                raise QcoreError(f"transforms[{i}].bias_correction cannot apply to layer {n!r} ({layer_kinds[n]}): it "
                                 "applies to Linear/Conv layers with a bias whose weights the recipe quantizes")
            if n not in targets:
                targets.append(n)
    return targets, notes

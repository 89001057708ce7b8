"""SmoothQuant's explicit Mul: a layer's input multiplied per channel by 1/s where no fold can hold the scale.

``InputScale`` is a forward pre-hook registered *first* on the layer (``add_input_scale``), so calibration, the
simulation's input quantizer and every other hook see the smoothed input x * (1/s), and ``torch.onnx.export``
writes it as one ``Mul`` by a (C,) float32 constant before the layer's MatMul -- the file computes what the
simulation does. ``input_scales`` lists them (the ONNX and safetensors exports read it).
"""

from __future__ import annotations

import torch
from torch import nn


class InputScale:
    """Forward pre-hook: the layer's first input multiplied per channel (last axis) by ``inv`` (C,) float32 = 1/s,
    the ``Mul`` SmoothQuant adds where no fold exists (the layer's weight columns hold the s)."""

    def __init__(self, inv: torch.Tensor):
        self.inv = inv

    def __call__(self, module, args):
        x = args[0]
        return (x * self.inv.to(x.dtype),) + tuple(args[1:])


def add_input_scale(layer: nn.Module, s: torch.Tensor) -> None:
    """In place: ``layer`` (a Linear) computes the same with its input times 1/s (an ``InputScale`` run before any
    other pre-hook) and its weight's columns times s."""
    with torch.no_grad():
        layer.weight.mul_(s.to(layer.weight.dtype))
    layer.register_forward_pre_hook(InputScale((1.0 / s.double()).float()), prepend=True)


def input_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer -> 1/s (C,) of every ``InputScale`` in ``model`` (the Mul ops its export writes)."""
    return {n: h.inv for n, m in model.named_modules() for h in m._forward_pre_hooks.values()
            if isinstance(h, InputScale)}

"""ConvTranspose as a quantizable layer whose weight is in the Conv layout (output channel first).

torch and ONNX store a transposed convolution's weight as (C_in, C_out / groups, k...): the output
channel is axis 1, and with groups > 1 an output channel's weights sit in one group's block of rows.
``ConvTransposeLayer`` holds the same numbers as ``weight`` (C_out, C_in / groups, k...), the layout of
the equivalent Conv: so per_channel is one scale per *output* channel, per_group groups run along the
fan-in (C_in / groups * k), and sizes, sensitivity, safetensors and the export treat it as any Conv.
``forward`` puts the weight back into the transposed layout (``to_transposed``) and runs
``F.conv_transpose1d`` / ``2d`` with the original module's stride, padding, output padding, groups and
dilation. ``use_weight_layout(model)`` replaces every ``nn.ConvTranspose1d`` / ``2d`` in place.

ONNX Runtime has no int8 ConvTranspose kernel on CPU: an exported ConvTranspose computes in float on
the dequantized weight (the file still holds the codes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_conv_layout(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_in, C_out / g, k...) -> (C_out, C_in / g, k...): output channel j * C_out / g + o of group j."""
    c_in, out_per_group, *k = w.shape
    return w.reshape(groups, c_in // groups, out_per_group, *k).transpose(1, 2).reshape(
        groups * out_per_group, c_in // groups, *k)


def to_transposed(w: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of ``to_conv_layout``: (C_out, C_in / g, k...) -> (C_in, C_out / g, k...)."""
    c_out, in_per_group, *k = w.shape
    return w.reshape(groups, c_out // groups, in_per_group, *k).transpose(1, 2).reshape(
        groups * in_per_group, c_out // groups, *k)


class ConvTransposeLayer(nn.Module):
    """An ``nn.ConvTranspose1d`` / ``2d`` with ``weight`` (C_out, C_in / groups, k...) (see the module
    docstring) and ``bias`` (C_out) or None; ``kind`` "ConvTranspose1d" | "ConvTranspose2d"."""

    def __init__(self, conv: nn.modules.conv._ConvTransposeNd):
        super().__init__()
        self.kind = type(conv).__name__
        self.stride, self.padding, self.output_padding = conv.stride, conv.padding, conv.output_padding
        self.groups, self.dilation = conv.groups, conv.dilation
        self.weight = nn.Parameter(to_conv_layout(conv.weight.detach(), conv.groups).clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = F.conv_transpose1d if self.kind == "ConvTranspose1d" else F.conv_transpose2d
        return op(x, to_transposed(self.weight, self.groups), self.bias, self.stride, self.padding,
                  self.output_padding, self.groups, self.dilation)


def use_weight_layout(model: nn.Module) -> list[str]:
    """Replace every ``nn.ConvTranspose1d`` / ``2d`` of ``model`` (in place) by a ``ConvTransposeLayer``;
    returns their module paths."""
    done = []
    for name, module in list(model.named_modules()):
        if type(module) in (nn.ConvTranspose1d, nn.ConvTranspose2d) and name:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent._modules[leaf] = ConvTransposeLayer(module)
            done.append(name)
    return done

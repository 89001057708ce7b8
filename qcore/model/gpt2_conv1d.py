"""GPT-2's ``Conv1D`` as the ``nn.Linear`` it is, so it is quantized as every Linear is.

Hugging Face's GPT-2 (``transformers.pytorch_utils.Conv1D``: ``c_attn``, ``c_proj``, ``c_fc``) computes
``y = x @ W + b`` with ``W`` stored ``(in, out)`` -- the transpose of a Linear's ``(out, in)``: its output
channel is axis 1. The preparing step (``simulate.fold_batchnorm``) replaces each one by an ``nn.Linear``
holding ``W.T`` (``(out, in)``) under the same module path, the way ``conv_transpose`` turns a
ConvTranspose into the Conv layout. So per_channel (axis 0) is one scale per *output* feature and
per_group groups run along the input features, exactly as for a Linear; sizes, sensitivity, the ONNX
export (a MatMul) and safetensors see a Linear. A recipe written for the checkpoint's own layout would
name axis 1 for the output channel; here axis 0 is the output channel for every layer.

Detected by class name and module (no transformers import), so models without transformers load too.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (weight ``(in, out)``, ``nf`` output features)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and \
        isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def as_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what ``conv`` computes: weight ``conv.weight.T`` (out, in), same bias."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.detach().t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias.detach())
    return linear.requires_grad_(conv.weight.requires_grad)


def use_linear_layout(model: nn.Module) -> list[str]:
    """Replace every GPT-2 ``Conv1D`` of ``model`` (in place) by its ``nn.Linear``; returns their module paths."""
    done = []
    for name, module in list(model.named_modules()):
        if name and is_conv1d(module):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent._modules[leaf] = as_linear(module)
            done.append(name)
    return done

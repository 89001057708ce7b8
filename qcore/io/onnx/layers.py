"""The weighted nodes of an ONNX graph as torch layers, so quantization finds them by module type:

- ``Gemm`` (alpha = beta = 1, transA = 0) and ``MatMul`` with a constant 2-D weight -> ``nn.Linear``
  (a MatMul's following ``Add`` of a constant bias vector becomes the Linear's bias, ``bias_add``),
- ``Conv`` with a constant weight (1-D or 2-D)                                -> ``nn.Conv1d`` / ``nn.Conv2d``,
- ``Gather`` of rows of a constant 2-D table by run-time indices (axis 0)      -> ``nn.Embedding``.
"""

from __future__ import annotations

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.model.onnx_ops import torch_pads


def layer_for(node, xs: list, consts: dict, attrs: dict):
    """(module, pre_pad, weight name) if ``node`` is a weighted layer with a constant weight, else None."""
    op, names = node.op_type, list(node.input)
    runtime = [n for n in names if n and n not in consts]
    if op == "Gemm" and len(names) >= 2 and names[0] in runtime and names[1] in consts \
            and attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA", 0) and consts[names[1]].dim() == 2 \
            and (len(names) < 3 or not names[2] or (names[2] in consts and attrs.get("beta", 1.0) == 1.0)):
        w = consts[names[1]] if attrs.get("transB", 0) else consts[names[1]].T
        bias = consts[names[2]] if len(names) > 2 and names[2] else None
        if bias is not None and bias.numel() not in (1, w.shape[0]):
            return None
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias.reshape(-1).expand(w.shape[0]))
        return lin, None, names[1]
    if op == "MatMul" and names[0] in runtime and names[1] in consts and consts[names[1]].dim() == 2 \
            and torch.is_floating_point(consts[names[1]]):
        w = consts[names[1]].T
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin, None, names[1]
    if op == "Conv" and names[0] in runtime and names[1] in consts and consts[names[1]].dim() in (3, 4):
        w = consts[names[1]]
        rank = w.dim() - 2
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise QcoreError(f"Conv node {node.name!r} uses auto_pad={attrs['auto_pad']!r}; export with explicit pads")
        pads = list(attrs.get("pads", [0] * 2 * rank))
        sym = pads[:rank] == pads[rank:]
        bias = consts.get(names[2]) if len(names) > 2 and names[2] else None
        if len(names) > 2 and names[2] and bias is None:
            return None
        cls = nn.Conv1d if rank == 1 else nn.Conv2d
        groups = attrs.get("group", 1)
        conv = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(attrs.get("strides", [1] * rank)),
                   padding=tuple(pads[:rank]) if sym else 0, dilation=tuple(attrs.get("dilations", [1] * rank)),
                   groups=groups, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(w)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv, None if sym else torch_pads({"pads": pads}, rank), names[1]
    if op == "Gather" and attrs.get("axis", 0) == 0 and names[0] in consts and names[1] in runtime \
            and consts[names[0]].dim() == 2 and torch.is_floating_point(consts[names[0]]):
        return nn.Embedding.from_pretrained(consts[names[0]].clone(), freeze=False), None, names[0]
    return None


def bias_add(node, module, readers: dict, outputs: set, consts: dict):
    """The ``Add`` that is the only reader of a bias-free Linear's output (a MatMul) and adds a constant
    float vector of its output size (``x @ W^T + b`` exported as MatMul + Add), after copying that vector
    into ``module.bias``; else None."""
    if node.op_type != "MatMul" or node.output[0] in outputs or len(readers.get(node.output[0], [])) != 1:
        return None
    add = readers[node.output[0]][0]
    if add.op_type != "Add" or len(add.input) != 2 or add.domain not in ("", "ai.onnx"):
        return None
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    bias = consts.get(other)
    if bias is None or other == node.output[0] or not torch.is_floating_point(bias) or bias.dim() != 1 \
            or bias.numel() != module.out_features or bias.dtype != module.weight.dtype:
        return None
    module.bias = nn.Parameter(bias.clone())
    return add


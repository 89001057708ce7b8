"""The weighted nodes of an ONNX graph as torch layers, so quantization finds them by module type:

- ``Gemm`` (alpha = beta = 1, transA = 0) and ``MatMul`` with a constant 2-D weight -> ``nn.Linear``
  (a MatMul's following ``Add`` of a constant bias vector becomes the Linear's bias, ``bias_add``),
- ``Conv`` with a constant weight (1-D or 2-D)                                -> ``nn.Conv1d`` / ``nn.Conv2d``,
- ``Gather`` of rows of a constant 2-D table by run-time indices (axis 0)      -> ``nn.Embedding``,
- ``ConvTranspose`` with a constant weight (1-D or 2-D), explicit pads         -> ``nn.ConvTranspose1d`` / ``2d``,
- ``LSTM`` / ``GRU`` with constant W, R (and B, peepholes)                      -> ``OnnxLSTM`` / ``OnnxGRU``.

``layer_for`` returns a ``Layer``: the module, the node inputs it takes at run time (the data first),
and the pads around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.model.onnx_graph import OnnxGRU, OnnxLSTM
from qcore.model.onnx_ops import torch_pads

RNN_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


@dataclass
class Layer:
    """A weighted node as a module: ``inputs`` the node inputs it takes at run time (data first, "" for an
    omitted optional one), ``weight`` the name of its (first) weight input, ``pre_pad``/``post_pad`` the
    F.pad around it (asymmetric Conv pads before; ConvTranspose crops after, as negative pads)."""

    module: nn.Module
    inputs: list[str]
    weight: str
    pre_pad: list[int] | None = None
    post_pad: list[int] | None = None


def _rnn(node, names, consts, attrs) -> Layer | None:
    """LSTM (X, W, R, B, sequence_lens, initial_h, initial_c, P) / GRU (X, W, R, B, sequence_lens, initial_h)."""
    op = node.op_type
    given = lambda i: len(names) > i and bool(names[i])
    if not all(names[i] in consts for i in (1, 2, 3, 7) if given(i)):
        raise QcoreError(f"{op} node {node.name!r} has weights computed at run time; the importer needs constant "
                         "W, R and B")
    dirs = 2 if attrs.get("direction", "forward") == "bidirectional" else 1
    acts = [a.lower() for a in attrs.get("activations", RNN_ACTIVATIONS[op] * dirs)]
    if acts != RNN_ACTIVATIONS[op] * dirs:
        raise QcoreError(f"{op} node {node.name!r} uses activations {acts}; only the defaults "
                         f"{RNN_ACTIVATIONS[op]} are supported")
    w, r = consts[names[1]], consts[names[2]]
    b = consts[names[3]] if given(3) else None
    if op == "LSTM":
        module = OnnxLSTM(w, r, b, consts[names[7]] if given(7) else None, attrs)
        data = [names[i] if given(i) else "" for i in (0, 4, 5, 6)]
    else:
        module = OnnxGRU(w, r, b, attrs)
        data = [names[i] if given(i) else "" for i in (0, 4, 5)]
    return Layer(module, data, names[1])


def _conv_transpose(node, names, consts, attrs) -> Layer | None:
    """ConvTranspose1d/2d; symmetric pads are the layer's padding, others a crop after it (full output
    extended by output_padding at the end, then pads cropped: the ONNX definition)."""
    w = consts[names[1]]
    rank = w.dim() - 2
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None  # pads depend on the run-time input size: the functional operator computes them
    bias = consts.get(names[2]) if len(names) > 2 and names[2] else None
    if len(names) > 2 and names[2] and bias is None:
        return None
    pads = [0] * 2 * rank if attrs.get("auto_pad") == "VALID" else list(attrs.get("pads", [0] * 2 * rank))
    extra = list(attrs.get("output_padding", [0] * rank))
    strides, dilations = tuple(attrs.get("strides", [1] * rank)), tuple(attrs.get("dilations", [1] * rank))
    sym = pads[:rank] == pads[rank:] and all(e < max(s, d) for e, s, d in zip(extra, strides, dilations))
    torch_extra = extra if sym else [max(e - p, 0) for e, p in zip(extra, pads[rank:])]
    if not all(e < max(s, d) for e, s, d in zip(torch_extra, strides, dilations)):
        return None
    groups = attrs.get("group", 1)
    cls = nn.ConvTranspose1d if rank == 1 else nn.ConvTranspose2d
    conv = cls(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), stride=strides,
               padding=tuple(pads[:rank]) if sym else 0, output_padding=tuple(torch_extra), groups=groups,
               bias=bias is not None, dilation=dilations)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias is not None:
            conv.bias.copy_(bias)
    crop = None if sym else torch_pads({"pads": [-p for p in pads[:rank]] +
                                        [-max(p - e, 0) for e, p in zip(extra, pads[rank:])]}, rank)
    return Layer(conv, [names[0]], names[1], post_pad=crop)


def layer_for(node, xs: list, consts: dict, attrs: dict) -> Layer | None:
    """The node as a ``Layer`` if it is a weighted layer with a constant weight, else None."""
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
        return Layer(lin, [names[0]], names[1])
    if op == "MatMul" and names[0] in runtime and names[1] in consts and consts[names[1]].dim() == 2 \
            and torch.is_floating_point(consts[names[1]]):
        w = consts[names[1]].T
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        return Layer(lin, [names[0]], names[1])
    if op == "Conv" and names[0] in runtime and names[1] in consts and consts[names[1]].dim() in (3, 4):
        w = consts[names[1]]
        rank = w.dim() - 2
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None  # SAME pads depend on the run-time input size: the functional operator computes them
        pads = [0] * 2 * rank if attrs.get("auto_pad") == "VALID" else list(attrs.get("pads", [0] * 2 * rank))
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
        return Layer(conv, [names[0]], names[1], pre_pad=None if sym else torch_pads({"pads": pads}, rank))
    if op == "ConvTranspose" and names[0] in runtime and names[1] in consts and consts[names[1]].dim() in (3, 4):
        return _conv_transpose(node, names, consts, attrs)
    if op in ("LSTM", "GRU") and names[0] in runtime:
        return _rnn(node, names, consts, attrs)
    if op == "Gather" and attrs.get("axis", 0) == 0 and names[0] in consts and names[1] in runtime \
            and consts[names[0]].dim() == 2 and torch.is_floating_point(consts[names[0]]):
        return Layer(nn.Embedding.from_pretrained(consts[names[0]].clone(), freeze=False), [names[1]], names[0])
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


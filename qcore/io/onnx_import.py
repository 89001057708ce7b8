"""ONNX -> torch: an ``nn.Module`` that runs an ONNX graph node by node, in the file's order.

Why not a converter library: onnx2torch needs torchvision, which does not import beside this torch.
Why this shape: quantization finds layers by module type, so the weighted nodes become real modules

- ``Gemm`` (alpha = beta = 1, transA = 0) and ``MatMul`` with a constant 2-D weight -> ``nn.Linear``
  (a MatMul's following ``Add`` of a constant bias vector becomes the Linear's bias),
- ``Conv`` with a constant weight (1-D or 2-D)                                -> ``nn.Conv1d`` / ``nn.Conv2d``,
- ``Gather`` of rows of a constant 2-D table by run-time indices (axis 0)      -> ``nn.Embedding``,

and every other operator in ``OPS`` runs as a torch function (a few lines each). Nodes whose inputs
are all constants are evaluated once at import (constant folding), so weight transposes and shape
arithmetic on constants cost nothing at run time.

Layer names follow the original module paths where the export records them: the weight's own name
when it is one (``fc1.weight`` -> ``fc1``, as ``torch.onnx.export`` names untouched parameters), else
the module path in the node's ``namespace`` metadata (the dynamo exporter), else the scopes in the node
name (the TorchScript exporter: ``/features/features.0/Conv`` -> ``features.0``), else the sanitised
node name (``node_MatMul_95``).
The source graph's other weights (LayerNorm's scale and bias, ...) are parameters, so the module counts
what the source model counts; the module keeps the source graph and each layer's place in it
(``LayerSource``), which ``qcore.export`` rewrites. The module returns the graph's first output. An operator not in ``OPS`` raises ``QcoreError``
naming it and its node.

Bounds (the file is untrusted; a 3 KB graph can ask ConstantOfShape for 6 GiB): before a node is
folded, ``output_sizes`` finds its output shapes without allocating them -- from the input shapes,
or by running the operator on torch's "meta" device (shapes and dtypes, no memory) with real values
only for the inputs that decide the shape (``VALUE_INPUTS``: a shape, repeats, pads, axes, Range's
bounds); an expanded view counts as if materialised. Folding stops with one ``QcoreError`` line,
before anything is allocated, when one folded tensor would exceed the upload limit, all folded
tensors together twice it, or all folding together ``MAX_FOLD_WORK`` element operations. At run
time the same check guards the operators whose output size the graph's values decide
(``RUN_CHECKED``), and ``input_shapes`` refuses absurd declared inputs (``MAX_SAMPLE_ELEMENTS``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcore.errors import QcoreError
from qcore import limits
from qcore.limits import human_size

# ---- bounds on what an untrusted graph may ask for (see the module docstring) ------------------------
FOLDED_TENSOR_UPLOADS = 1  # one folded constant: at most 1 x the upload limit, in bytes (default 200 MiB)
FOLDED_TOTAL_UPLOADS = 2  # all folded constants together: at most 2 x the upload limit, in bytes
MAX_FOLD_WORK = 2**32  # element operations (values read + written, x the inner size of a contraction or pool)
MAX_RUN_TENSOR_BYTES = 2**31  # one tensor a RUN_CHECKED operator creates at run time: 2 GiB
MAX_SAMPLE_ELEMENTS = 2**26  # one declared graph input, per sample (no batch dim): 64 Mi values, 256 MiB float32
MAX_SHAPE_VALUES = 256  # a shape, repeats, pads or axes input holds at most this many values

MIN_OPSET = 11
# ONNX TensorProto element types -> torch dtypes (the ones models use).
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


# ---- operators: each takes (inputs, attrs) and returns a tensor or a tuple of tensors ----------
# ``inputs`` is a list (None for an omitted optional input); ``attrs`` holds the node's attributes
# plus "_opset" (the default-domain opset version) and "_n_out" (number of outputs wanted).
def _ints(t) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t)]


def _axes(xs, a, index=1):
    """Axes given as input ``index`` (newer opsets) or as the ``axes`` attribute (older ones)."""
    if len(xs) > index and xs[index] is not None:
        return _ints(xs[index])
    return list(a["axes"]) if "axes" in a else None


def _div(x, y):
    both_int = not torch.is_floating_point(x) and not torch.is_floating_point(y)
    return torch.div(x, y, rounding_mode="trunc") if both_int else x / y


def _softmax(fn):
    def op(xs, a):
        x = xs[0]
        axis = a.get("axis", -1 if a["_opset"] >= 13 else 1)
        if a["_opset"] >= 13:
            return fn(x, dim=axis)
        axis %= x.dim()  # before opset 13: over all dims from ``axis`` on, as one flattened dim
        return fn(x.flatten(axis), dim=-1).reshape(x.shape)
    return op


def _reduce(fn):
    def op(xs, a):
        x, axes = xs[0], _axes(xs, a)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, axes, keep)
    return op


def _reshape(xs, a):
    x, shape = xs[0], _ints(xs[1])
    if not a.get("allowzero", 0):  # 0 = copy that dimension from the input
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(xs, a):
    x = xs[0]
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _unsqueeze(xs, a):
    x, axes = xs[0], _axes(xs, a)
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(xs, a):
    axes = _axes(xs, a)
    if axes is None:
        return xs[0].squeeze()
    return xs[0].squeeze(tuple(ax % xs[0].dim() for ax in axes))


def _gather(xs, a):
    data, idx = xs[0], xs[1].long()
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])


def _gather_nd(xs, a):
    data, idx, b = xs[0], xs[1].long(), a.get("batch_dims", 0)
    m, batch = idx.shape[-1], math.prod(data.shape[:b])
    bounds = torch.tensor(data.shape[b:b + m])
    idx = torch.where(idx < 0, idx + bounds, idx).reshape(batch, *idx.shape[b:])
    rows = torch.arange(batch).reshape(batch, *[1] * (idx.dim() - 2))
    out = data.reshape(batch, *data.shape[b:])[(rows, *idx.unbind(-1))]
    return out.reshape(*data.shape[:b], *out.shape[1:])


def _slice(xs, a):
    x = xs[0]
    if len(xs) > 1:  # opset >= 10: starts, ends, axes, steps are inputs
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
        steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        # Python's slice clamping is numpy's, which ONNX follows; index_select also handles step < 0.
        picked = range(x.shape[axis])[slice(start, end, step)]
        x = x.index_select(axis, torch.tensor(picked, dtype=torch.long))
    return x


def _split(xs, a):
    x, axis = xs[0], a.get("axis", 0)
    sizes = _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else a.get("split")
    if not sizes:
        n = a["_n_out"]  # = the num_outputs attribute in a valid file; the outputs bound the list below
        chunk = math.ceil(x.shape[axis] / n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _expand(xs, a):
    return xs[0].expand(np.broadcast_shapes(tuple(xs[0].shape), tuple(_ints(xs[1]))))


def _constant(xs, a):
    for key, make in (("value", torch.as_tensor), ("value_float", lambda v: torch.tensor(v, dtype=torch.float32)),
                      ("value_floats", lambda v: torch.tensor(v, dtype=torch.float32)),
                      ("value_int", lambda v: torch.tensor(v, dtype=torch.int64)),
                      ("value_ints", lambda v: torch.tensor(v, dtype=torch.int64))):
        if key in a:
            return make(a[key])
    raise QcoreError("a Constant node holds a value type the importer cannot read (strings or sparse tensors)")


def _constant_of_shape(xs, a):
    value = a.get("value")
    if value is None:
        return torch.zeros(_ints(xs[0]))
    return torch.full(_ints(xs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


def _gemm(xs, a):
    x, w = xs[0], xs[1]
    x = x.T if a.get("transA", 0) else x
    w = w.T if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y + a.get("beta", 1.0) * xs[2] if len(xs) > 2 and xs[2] is not None else y


def _pads(a, rank) -> list[int]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end] -> F.pad order (last dim first)."""
    pads = list(a.get("pads", [0] * 2 * rank))
    out = []
    for i in reversed(range(rank)):
        out += [pads[i], pads[i + rank]]
    return out


def _pool(kind):
    def op(xs, a):
        x = xs[0]
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise QcoreError(f"{kind}Pool with auto_pad={a['auto_pad']!r} is not supported; export with explicit pads")
        if a["_n_out"] > 1:
            raise QcoreError("MaxPool with an indices output is not supported; export without return_indices")
        k = list(a["kernel_shape"])
        rank = len(k)
        strides = list(a.get("strides", [1] * rank))
        pads = list(a.get("pads", [0] * 2 * rank))
        ceil = bool(a.get("ceil_mode", 0))
        if rank not in (1, 2):
            raise QcoreError(f"{kind}Pool over {rank} spatial dims is not supported (1-D and 2-D are)")
        sym = pads[:rank] == pads[rank:]
        if kind == "Max":
            if not sym:
                x, pads = F.pad(x, _pads(a, rank), value=-math.inf), [0] * 2 * rank
            fn = F.max_pool1d if rank == 1 else F.max_pool2d
            return fn(x, k, strides, pads[:rank], list(a.get("dilations", [1] * rank)), ceil)
        if not sym:
            raise QcoreError("AveragePool with asymmetric pads is not supported; export with symmetric padding")
        fn = F.avg_pool1d if rank == 1 else F.avg_pool2d
        return fn(x, k, strides, pads[:rank], ceil, bool(a.get("count_include_pad", 0)))
    return op


def _batch_norm(xs, a):
    x, scale, bias, mean, var = xs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _layer_norm(xs, a):
    x = xs[0]
    axis = a.get("axis", -1) % x.dim()
    bias = xs[2] if len(xs) > 2 else None
    return F.layer_norm(x, x.shape[axis:], xs[1], bias, a.get("epsilon", 1e-5))


def _pad(xs, a):
    x = xs[0]
    mode = a.get("mode", "constant")
    pads = _ints(xs[1]) if len(xs) > 1 else list(a["pads"])
    value = float(xs[2].reshape(-1)[0]) if len(xs) > 2 and xs[2] is not None else a.get("value", 0.0)
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(x.dim()))
    full = [0] * 2 * x.dim()
    for i, ax in enumerate(axes):
        full[ax % x.dim()], full[ax % x.dim() + x.dim()] = pads[i], pads[i + len(axes)]
    torch_pad = _pads({"pads": full}, x.dim())
    while len(torch_pad) > 2 and torch_pad[-2:] == [0, 0]:  # F.pad's reflect/edge modes want only trailing dims
        torch_pad = torch_pad[:-2]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise QcoreError(f"Pad mode {mode!r} is not supported (constant, reflect and edge are)")
    return F.pad(x, torch_pad, mode=torch_mode, value=value) if torch_mode == "constant" else F.pad(x, torch_pad, mode=torch_mode)


def _clip(xs, a):
    lo = xs[1] if len(xs) > 1 and xs[1] is not None else a.get("min")
    hi = xs[2] if len(xs) > 2 and xs[2] is not None else a.get("max")
    return torch.clamp(xs[0], lo, hi)


def _arg(fn):
    def op(xs, a):
        x, axis, keep = xs[0], a.get("axis", 0), bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)
    return op


def _trilu(xs, a):
    k = int(xs[1]) if len(xs) > 1 and xs[1] is not None else 0
    return torch.triu(xs[0], k) if a.get("upper", 1) else torch.tril(xs[0], k)


def _unary(fn):
    return lambda xs, a: fn(xs[0])


def _binary(fn):
    return lambda xs, a: fn(xs[0], xs[1])


def _variadic(fn):
    return lambda xs, a: reduce(fn, xs)


OPS = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": lambda xs, a: torch.pow(xs[0], xs[1]).to(xs[0].dtype),
    "Mod": lambda xs, a: (torch.fmod if a.get("fmod", 0) else torch.remainder)(xs[0], xs[1]),
    "MatMul": _binary(torch.matmul), "Gemm": _gemm,
    "Einsum": lambda xs, a: torch.einsum(a["equation"], *xs),
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Not": _unary(torch.logical_not),
    "Identity": _unary(lambda x: x), "Softplus": _unary(F.softplus), "HardSwish": _unary(F.hardswish),
    "Gelu": lambda xs, a: F.gelu(xs[0], approximate=a.get("approximate", "none")),
    "LeakyRelu": lambda xs, a: F.leaky_relu(xs[0], a.get("alpha", 0.01)),
    "Elu": lambda xs, a: F.elu(xs[0], a.get("alpha", 1.0)),
    "HardSigmoid": lambda xs, a: torch.clamp(a.get("alpha", 0.2) * xs[0] + a.get("beta", 0.5), 0, 1),
    "Clip": _clip, "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Where": lambda xs, a: torch.where(xs[0], xs[1], xs[2]),
    "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum), "Sum": _variadic(torch.add),
    "Mean": lambda xs, a: reduce(torch.add, xs) / len(xs),
    "Cast": lambda xs, a: xs[0].to(DTYPES[a["to"]]), "CastLike": lambda xs, a: xs[0].to(xs[1].dtype),
    "Flatten": _flatten,
    "Reshape": _reshape, "Transpose": lambda xs, a: xs[0].permute(a.get("perm", list(range(xs[0].dim()))[::-1])),
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": lambda xs, a: torch.cat([x for x in xs if x is not None], dim=a["axis"]),
    "Split": _split, "Slice": _slice, "Gather": _gather, "GatherND": _gather_nd,
    "GatherElements": lambda xs, a: torch.gather(xs[0], a.get("axis", 0), xs[1].long() % xs[0].shape[a.get("axis", 0)]),
    "Expand": _expand, "Tile": lambda xs, a: xs[0].repeat(_ints(xs[1])),
    "Shape": lambda xs, a: torch.tensor(xs[0].shape[a.get("start", 0):a.get("end", xs[0].dim())], dtype=torch.int64),
    "Size": lambda xs, a: torch.tensor(xs[0].numel(), dtype=torch.int64),
    "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Range": lambda xs, a: (torch.arange(xs[0].item(), xs[1].item(), xs[2].item(), dtype=xs[0].dtype)
                            if (xs[1] - xs[0]).item() * xs[2].item() > 0 else torch.empty(0, dtype=xs[0].dtype)),
    "Dropout": lambda xs, a: xs[0] if a["_n_out"] == 1 else (xs[0], torch.ones_like(xs[0], dtype=torch.bool)),
    "MaxPool": _pool("Max"), "AveragePool": _pool("Average"),
    "GlobalAveragePool": lambda xs, a: xs[0].mean(dim=tuple(range(2, xs[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda xs, a: xs[0].amax(dim=tuple(range(2, xs[0].dim())), keepdim=True),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce(lambda x, ax, k: x.mean(ax, keepdim=k)), "ReduceSum": _reduce(lambda x, ax, k: x.sum(ax, keepdim=k)),
    "ReduceMax": _reduce(lambda x, ax, k: x.amax(ax, keepdim=k)), "ReduceMin": _reduce(lambda x, ax, k: x.amin(ax, keepdim=k)),
    "ReduceProd": _reduce(lambda x, ax, k: reduce(lambda t, d: t.prod(d, keepdim=True), ax, x) if k
                          else reduce(lambda t, d: t.prod(d, keepdim=True), ax, x).squeeze(tuple(ax))),
    "ReduceL1": _reduce(lambda x, ax, k: x.abs().sum(ax, keepdim=k)),
    "ReduceL2": _reduce(lambda x, ax, k: x.square().sum(ax, keepdim=k).sqrt()),
    "ReduceSumSquare": _reduce(lambda x, ax, k: x.square().sum(ax, keepdim=k)),
    "ReduceLogSumExp": _reduce(lambda x, ax, k: torch.logsumexp(x, ax, keepdim=k)),
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin), "Trilu": _trilu, "Pad": _pad,
}
SUPPORTED_OPS = tuple(sorted(OPS))
# Inputs whose values (not just shapes) decide an operator's output shape: kept real on the meta device.
VALUE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
                "Pad": (1, 2, 3), "Slice": (1, 2, 3, 4), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
                "Trilu": (1,), **{op: (1,) for op in OPS if op.startswith("Reduce")}}
RUN_CHECKED = ("ConstantOfShape", "Expand", "Tile", "Range", "Pad")  # output size set by values at run time
BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Min", "Max", "Sum", "Mean",
             "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")  # 1 output, broadcast
BOOL_OUT = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")


# ---- bounds ---------------------------------------------------------------------------------------------
def quoted(text: str) -> str:
    """A name from the file for a one-line message: repr (escapes newlines), at most ~80 characters."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def output_sizes(op: str, xs: list, attrs: dict) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes per value) of each output ``OPS[op](xs, attrs)`` would return, found without
    allocating it: from the input shapes for broadcasting ops, MatMul, Gemm, Concat, Range, Tile and the
    Gathers (exact, or an upper bound where dtypes promote), else by running the operator on torch's
    "meta" device (shapes and dtypes only) with real values for its ``VALUE_INPUTS``. Concat, Range
    and Tile report their value count as a 1-D shape. (Elementwise ops on the meta device, like
    ``torch.broadcast_shapes``, load torch's Python reference kernels, seconds the first time in a
    process: the rules above keep common folds and run-time checks off that path.)"""
    for i in VALUE_INPUTS.get(op, ()):
        if i < len(xs) and xs[i] is not None and xs[i].numel() > MAX_SHAPE_VALUES:
            raise QcoreError(f"input {i} of operator {op!r} has {xs[i].numel():,} values; as a shape, pads or axes "
                             f"it can have at most {MAX_SHAPE_VALUES}: the file is malformed")
    present = [x for x in xs if x is not None]
    widest = max((x.element_size() for x in present), default=8)
    if op in BROADCAST:
        return [(np.broadcast_shapes(*(tuple(x.shape) for x in present)), 1 if op in BOOL_OUT else widest)]
    if op == "Concat":
        return [((sum(x.numel() for x in present),), widest)]
    if op == "MatMul":  # numpy rules: batch dims broadcast; a 1-D operand loses its matrix dim
        a, b = tuple(xs[0].shape), tuple(xs[1].shape)
        return [((*np.broadcast_shapes(a[:-2], b[:-2]), *a[-2:-1], *(b[-1:] if len(b) > 1 else ())), widest)]
    if op == "Gemm":  # (M, K) @ (K, N) + C broadcast to (M, N)
        m, n = xs[0].shape[1 if attrs.get("transA", 0) else 0], xs[1].shape[0 if attrs.get("transB", 0) else 1]
        return [(np.broadcast_shapes((m, n), *(tuple(x.shape) for x in present[2:])), widest)]
    if op == "Range":  # ONNX: max(ceil((limit - start) / delta), 0) values
        start, limit, delta = (x.item() for x in xs[:3])
        return [((max(math.ceil((limit - start) / delta), 0),), xs[0].element_size())]
    if op == "Tile":
        return [((xs[0].numel() * math.prod(max(r, 0) for r in _ints(xs[1])),), xs[0].element_size())]
    if op == "Gather":
        axis = attrs.get("axis", 0) % xs[0].dim()
        return [((*xs[0].shape[:axis], *xs[1].shape, *xs[0].shape[axis + 1:]), xs[0].element_size())]
    if op == "GatherElements":
        return [(tuple(xs[1].shape), xs[0].element_size())]
    if op == "GatherND":
        b, m = attrs.get("batch_dims", 0), xs[1].shape[-1]
        return [((*xs[1].shape[:-1], *xs[0].shape[b + m:]), xs[0].element_size())]
    keep = VALUE_INPUTS.get(op, ())
    with torch.device("meta"):
        out = OPS[op]([x if x is None or i in keep else x.to("meta") for i, x in enumerate(xs)], attrs)
    return [(tuple(o.shape), o.element_size()) for o in (out if isinstance(out, tuple) else (out,))]


def _einsum_inner(equation: str, shapes) -> int:
    """Product of the sizes of an einsum's summed-over letters ('ij,jk->ik': the size of j)."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), shapes):
        head, _, tail = term.partition("...")
        for letter, d in [*zip(head, shape), *zip(tail[::-1], shape[::-1])]:
            sizes[letter] = max(sizes.get(letter, 1), d)
    kept = set(rhs) if arrow else {c for c in sizes if lhs.count(c) == 1}
    return math.prod(d for c, d in sizes.items() if c not in kept)


def _work(op: str, xs: list, out_values: int, attrs: dict) -> int:
    """Element operations to evaluate one node with ``out_values`` output values: values read and
    written, each output value times the inner size it sums over in a contraction (MatMul, Gemm,
    Einsum) or a pool (its kernel)."""
    inner = 1
    if op == "MatMul":
        inner = xs[0].shape[-1]
    elif op == "Gemm":
        inner = xs[0].shape[0 if attrs.get("transA", 0) else -1]
    elif op == "Einsum":
        inner = _einsum_inner(attrs["equation"], [x.shape for x in xs])
    elif op in ("MaxPool", "AveragePool"):
        inner = math.prod(attrs["kernel_shape"])
    return sum(x.numel() for x in xs if x is not None) + out_values * inner


@dataclass
class FoldBudget:
    """What constant folding has used of its limits: bytes of folded tensors (``tensor_limit`` for any
    one, ``total_limit`` for all together) and element operations (see ``_work``)."""

    tensor_limit: int
    total_limit: int
    work_limit: int = MAX_FOLD_WORK
    total: int = 0
    work: int = 0

    @classmethod
    def for_upload(cls, upload_bytes: int) -> FoldBudget:
        return cls(FOLDED_TENSOR_UPLOADS * upload_bytes, FOLDED_TOTAL_UPLOADS * upload_bytes)

    def charge(self, op: str, xs: list, attrs: dict, where: str) -> None:
        """Count what folding this node needs; QcoreError, before anything is allocated, if it does not fit."""
        outs = output_sizes(op, xs, attrs)
        sizes = [math.prod(shape) * per_value for shape, per_value in outs]
        hint = "the file is malformed or built to exhaust memory; export the model again"
        for (shape, _), size in zip(outs, sizes):
            if size > self.tensor_limit:
                raise QcoreError(f"ONNX operator {op!r} ({where}) would create a constant of {human_size(size)} "
                                 f"(shape {shape}) at import, above the limit of {human_size(self.tensor_limit)} "
                                 f"for one folded tensor; {hint}")
        if self.total + sum(sizes) > self.total_limit:
            raise QcoreError(f"ONNX operator {op!r} ({where}) would bring the constants folded at import to "
                             f"{human_size(self.total + sum(sizes))}, above the limit of {human_size(self.total_limit)}; {hint}")
        work = _work(op, xs, sum(math.prod(shape) for shape, _ in outs), attrs)
        if self.work + work > self.work_limit:
            raise QcoreError(f"ONNX operator {op!r} ({where}) would bring the work of folding constants at import to "
                             f"{self.work + work:,} element operations, above the limit of {self.work_limit:,}; {hint}")
        self.total += sum(sizes)
        self.work += work


# ---- the module -----------------------------------------------------------------------------------
@dataclass
class Step:
    """One node to run: its operator, input/output value names, attributes, and the layer it calls (if any)."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    layer: str | None = None
    pre_pad: list[int] | None = None  # Conv with asymmetric pads: F.pad before the conv layer


@dataclass(frozen=True)
class LayerSource:
    """Where a layer's weight sits in the source graph (what an export rewrites): the compute node
    (its index in ``graph.node`` and name), which of its inputs is the weight and which the data, and
    whether the node reads the weight transposed (MatMul and Gemm without transB hold W^T, (in, out))."""

    node_index: int
    node_name: str
    weight_input: int
    data_input: int
    transposed: bool


class OnnxModule(nn.Module):
    """Runs the converted graph: ``forward(*inputs)`` takes the graph inputs in file order and
    returns its first output. Layers are submodules (dotted paths); the other weights of the source
    graph (``parameters``: float initializers of rank >= 1 that run-time nodes read, e.g. LayerNorm's
    scale and bias) are parameters of ``constants``, every other constant a buffer there -- so
    ``model.parameters()`` counts what the source model's parameters counted.

    ``source``: the serialized ``ModelProto`` (external data already inlined and checked) and
    ``layer_sources`` each layer's ``LayerSource``: an export rewrites that graph itself."""

    def __init__(self, input_names, output_names, steps, layers: dict[str, nn.Module], constants: dict,
                 parameters: frozenset = frozenset(), source: bytes | None = None,
                 layer_sources: dict[str, LayerSource] | None = None):
        super().__init__()
        self.input_names, self.output_names, self.steps = list(input_names), list(output_names), steps
        self.source, self.layer_sources = source, dict(layer_sources or {})
        for path, module in layers.items():
            parent = self
            *parents, leaf = path.split(".")
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, module)
        self.constants = nn.Module()
        self._constant_keys = {}
        for i, (name, value) in enumerate(constants.items()):
            if name in parameters:
                self.constants.register_parameter(f"c{i}", nn.Parameter(value, requires_grad=False))
            else:
                self.constants.register_buffer(f"c{i}", value)
            self._constant_keys[name] = f"c{i}"

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise QcoreError(f"the ONNX model takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        env.update({n: getattr(self.constants, k) for n, k in self._constant_keys.items()})
        for s in self.steps:
            xs = [env[n] if n else None for n in s.inputs]
            if s.layer is not None:
                x = xs[0] if s.pre_pad is None else F.pad(xs[0], s.pre_pad)
                layer = self.get_submodule(s.layer)
                if isinstance(layer, nn.Embedding):
                    x = torch.where(x < 0, x + layer.num_embeddings, x).long()
                out = layer(x)
            else:
                if s.op in RUN_CHECKED and any(math.prod(shape) * per_value > MAX_RUN_TENSOR_BYTES
                                               for shape, per_value in output_sizes(s.op, xs, s.attrs)):
                    raise QcoreError(f"ONNX operator {s.op!r} (node {quoted(s.name)}) would create a tensor above "
                                     f"{human_size(MAX_RUN_TENSOR_BYTES)} at run time; check the input shapes, or "
                                     "the file is built to exhaust memory")
                out = OPS[s.op](xs, s.attrs)
            outs = out if isinstance(out, tuple) else (out,)
            env.update((n, v) for n, v in zip(s.outputs, outs) if n)
        return env[self.output_names[0]]


# ---- conversion -------------------------------------------------------------------------------------
def all_tensors(model) -> Iterator[tuple[object, str]]:
    """Every ``TensorProto`` in an ``onnx.ModelProto`` with where it sits ("initializer 'fc.weight'",
    "attribute 'value' of node 'c1'"): the main graph, training graphs, local functions and every
    subgraph of every node (If/Loop/Scan bodies), however deeply nested (walked with a stack)."""
    graphs = [model.graph, *(g for t in model.training_info for g in (t.initialization, t.algorithm))]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            for t in graph.initializer:
                yield t, f"initializer {quoted(t.name)}"
            for sparse in graph.sparse_initializer:
                yield sparse.values, f"sparse initializer {quoted(sparse.values.name)}"
                yield sparse.indices, f"sparse initializer {quoted(sparse.values.name)}"
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for a in node.attribute:
            where = f"attribute {quoted(a.name)} of node {quoted(node.name or node.op_type)}"
            sparse = [*([a.sparse_tensor] if a.HasField("sparse_tensor") else []), *a.sparse_tensors]
            for t in [*([a.t] if a.HasField("t") else []), *a.tensors, *(x for sp in sparse for x in (sp.values, sp.indices))]:
                yield t, where
            graphs.extend([*([a.g] if a.HasField("g") else []), *a.graphs])


def _tensor(proto, where: str) -> torch.Tensor:
    """A ``TensorProto`` held in the file -> torch tensor (never read from another file)."""
    from onnx import numpy_helper

    try:
        return torch.from_numpy(np.array(numpy_helper.to_array(proto)))
    except Exception as e:  # noqa: BLE001 -- whatever fails to parse in an untrusted tensor is the file's fault
        raise QcoreError(f"the ONNX model's {where} is not a valid tensor ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file may be corrupted") from None


def _attrs(node) -> dict:
    from onnx import AttributeProto, helper

    out = {}
    for a in node.attribute:
        if a.type == AttributeProto.TENSOR:
            out[a.name] = _tensor(a.t, f"attribute {quoted(a.name)} of node {quoted(node.name or node.op_type)}")
        elif a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise QcoreError(f"operator {node.op_type!r} (node {node.name!r}) has a subgraph (control flow), which "
                             "the ONNX importer cannot run; export without data-dependent control flow or as .pt2")
        else:
            value = helper.get_attribute_value(a)
            out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _module_path_from_metadata(node) -> str | None:
    """The innermost module path torch.onnx.export recorded, e.g. 'enc.linear1' from
    'namespace' = ': Block/enc: TransformerEncoderLayer/enc.linear1: Linear/linear_2: aten.linear.default'."""
    for p in node.metadata_props:
        if p.key == "namespace":
            parts = [s.split(":")[0].strip() for s in p.value.split("/")]
            modules = [s for s in parts[:-1] if s]  # the last part names the op, not a module
            return modules[-1] if modules else None
    return None


def _module_path_from_node_name(name: str) -> str | None:
    """The module path in a TorchScript-exporter node name, whose parts are the module scopes and then the
    op: '/features/features.0/Conv' -> 'features.0' (a Sequential's child repeats the container's name),
    '/bert/encoder/layer.0/attention/self/query/MatMul' -> 'bert.encoder.layer.0.attention.self.query'."""
    if not name.startswith("/"):
        return None
    segments: list[str] = []
    for part in name.split("/")[1:-1]:
        if segments and part.startswith(segments[-1] + "."):
            segments[-1] = part
        elif part:
            segments.append(part)
    return ".".join(segments) or None


_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def _layer_names(candidates: list[tuple[str | None, str]]) -> list[str]:
    """Unique, nestable layer paths from (preferred dotted path or None, node name) pairs.

    A path shared by several layers or that is the parent of another layer gets the node name appended
    (``enc.self_attn`` -> ``enc.self_attn.node_MatMul_1``); a missing or invalid one becomes the node name."""
    reserved = set(dir(nn.Module())) | {"constants"}
    wanted = [p if p and _PATH.match(p) and not set(p.split(".")) & reserved else None for p, _ in candidates]
    names, used = [], set()
    for path, (_, node_name) in zip(wanted, candidates):
        node_part = _sanitise(node_name) or f"layer_{len(names)}"
        shared = path is not None and (wanted.count(path) > 1 or any(o and o.startswith(path + ".") for o in wanted))
        name = node_part if path is None else f"{path}.{node_part}" if shared else path
        if name in reserved:
            name = f"layer_{len(names)}"
        base, k = name, 1
        while name in used or any(u.startswith(name + ".") or name.startswith(u + ".") for u in used):
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def _layer_for(node, xs: list, consts: dict, attrs: dict):
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
        return conv, None if sym else _pads({"pads": pads}, rank), names[1]
    if op == "Gather" and attrs.get("axis", 0) == 0 and names[0] in consts and names[1] in runtime \
            and consts[names[0]].dim() == 2 and torch.is_floating_point(consts[names[0]]):
        return nn.Embedding.from_pretrained(consts[names[0]].clone(), freeze=False), None, names[0]
    return None


def _bias_add(node, module, readers: dict, outputs: set, consts: dict):
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


def _where(node, index: int) -> str:
    return f"node {node.name!r}" if node.name else f"node #{index}"


def convert(model, max_bytes: int | None = None) -> OnnxModule:
    """An ``OnnxModule`` computing what the ``onnx.ModelProto`` ``model`` computes (float32).

    ``max_bytes``: the upload limit the folding budget derives from (default ``limits.MAX_UPLOAD_BYTES``).
    ``model`` must hold all its data: a tensor referring to an external file is refused here (files
    load theirs with ``onnx_file.load_onnx_file``, which checks where they are)."""
    from onnx import TensorProto

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise QcoreError(f"the ONNX model uses opset {opset}; the importer needs opset {MIN_OPSET} or newer: "
                         "re-export with torch.onnx.export(..., opset_version=17)")
    for t, where in all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise QcoreError(f"the ONNX model's {where} keeps its data in an external file; save it as one "
                             "self-contained .onnx file (torch.onnx.export(..., external_data=False))")
    if graph.sparse_initializer:
        raise QcoreError(f"the ONNX model stores {quoted(graph.sparse_initializer[0].values.name)} as a sparse "
                         "initializer, which the importer does not read; save its weights dense")
    budget = FoldBudget.for_upload(limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes)
    consts: dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        t = _tensor(init, f"initializer {quoted(init.name)}")
        if t.dtype in (torch.float16, torch.bfloat16, torch.float64):
            raise QcoreError(f"the ONNX model stores weight {init.name!r} as {t.dtype}; export it in float32 "
                             "(the engine simulates lower precisions itself)")
        consts[init.name] = t
    inputs = [i.name for i in graph.input if i.name not in consts]
    steps, layers, candidates, sources = [], [], [], []
    readers: dict[str, list] = {}
    for node in graph.node:
        for n in node.input:
            readers.setdefault(n, []).append(node)
    outputs = {o.name for o in graph.output}
    absorbed: set[int] = set()  # the Adds of MatMul + bias, which run inside their Linear
    for index, node in enumerate(graph.node):
        where = _where(node, index)
        if id(node) in absorbed:
            continue
        if node.domain not in ("", "ai.onnx") or (node.op_type not in OPS and node.op_type != "Conv"):
            domain = f" from domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
            raise QcoreError(f"ONNX operator {node.op_type!r}{domain} ({where}) is not supported by the importer; "
                             "export the model as a torch.export program (.pt2) instead, or with a different "
                             f"opset or options that avoid it. Supported: {', '.join(SUPPORTED_OPS + ('Conv',))}")
        attrs = {**_attrs(node), "_opset": opset, "_n_out": len(node.output)}
        names = list(node.input)
        layer = _layer_for(node, names, consts, attrs)
        if layer is not None:
            module, pre_pad, weight_name = layer
            path = (weight_name[:-len(".weight")] if weight_name.endswith(".weight") else
                    _module_path_from_metadata(node) or _module_path_from_node_name(node.name))
            candidates.append((path, node.name or f"{node.op_type}_{index}"))
            layers.append(module)
            weight_input, data_input = (0, 1) if node.op_type == "Gather" else (1, 0)
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0))
            sources.append(LayerSource(index, node.name, weight_input, data_input, transposed))
            out = list(node.output)
            bias_add = _bias_add(node, module, readers, outputs, consts)
            if bias_add is not None:  # MatMul + Add(bias): the bias is the Linear's (and counts with it)
                absorbed.add(id(bias_add))
                out = list(bias_add.output)
            steps.append(Step(node.op_type, node.name, [names[data_input]], out,
                              layer=str(len(layers) - 1), pre_pad=pre_pad))
            continue
        if node.op_type == "Conv":
            raise QcoreError(f"Conv ({where}) has a weight computed at run time or {len(consts.get(names[1], []))}-D; "
                             "the importer supports Conv1d/Conv2d with constant weights")
        if all(not n or n in consts for n in names):
            xs = [consts[n] if n else None for n in names]
            try:  # constant folding: the node's value is the same for every input
                budget.charge(node.op_type, xs, attrs, where)
                out = OPS[node.op_type](xs, attrs)
            except QcoreError:
                raise
            except Exception as e:
                raise QcoreError(f"ONNX operator {node.op_type!r} ({where}) failed on its constant inputs "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the file may be corrupted") from None
            consts.update((n, v) for n, v in zip(node.output, out if isinstance(out, tuple) else (out,)) if n)
            continue
        steps.append(Step(node.op_type, node.name, names, list(node.output), attrs))
    names = _layer_names(candidates)
    for s in steps:
        if s.layer is not None:
            s.layer = names[int(s.layer)]
    used = {n for s in steps for n in s.inputs} | {o.name for o in graph.output}
    kept = {n: t for n, t in consts.items() if n in used}
    # The source model's other weights: float initializers (not folded values, not scalars the exporter
    # lifted) read at run time, except BatchNormalization's running statistics (buffers in torch too).
    statistics = {n for s in steps if s.op == "BatchNormalization" for n in s.inputs[3:5]}
    initializers = {i.name for i in graph.initializer}
    weights = frozenset(n for n, t in kept.items() if n in initializers and n not in statistics
                        and torch.is_floating_point(t) and t.dim() >= 1)
    return OnnxModule(inputs, [o.name for o in graph.output], steps, dict(zip(names, layers)), kept, weights,
                      model.SerializeToString(), dict(zip(names, sources))).eval()


def input_shapes(model) -> list[tuple[str, tuple[int | None, ...], torch.dtype]]:
    """(name, shape, dtype) of each graph input that is not a weight; unknown/symbolic dims are None.
    QcoreError if one declares more than ``MAX_SAMPLE_ELEMENTS`` values per sample (batch dim excluded)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if tt.elem_type not in DTYPES:
            raise QcoreError(f"ONNX input {i.name!r} has element type {tt.elem_type}, which the importer cannot feed")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        per_sample = math.prod(d or 1 for d in dims[1:])
        if per_sample > MAX_SAMPLE_ELEMENTS:
            raise QcoreError(f"ONNX input {quoted(i.name)} declares {per_sample:,} values per sample "
                             f"(shape {str(dims)[:100]}), above the limit of {MAX_SAMPLE_ELEMENTS:,}; "
                             "export the model with the input shape it really takes")
        out.append((i.name, dims, DTYPES[tt.elem_type]))
    return out


def embedding_sizes(model) -> dict[str, int]:
    """Graph input -> rows of the constant table it indexes with Gather (token ids: the vocabulary size)."""
    sizes = {i.name: i.dims[0] for i in model.graph.initializer if len(i.dims) == 2}
    return {n.input[1]: sizes[n.input[0]] for n in model.graph.node
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in sizes}

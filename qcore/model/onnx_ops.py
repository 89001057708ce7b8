"""ONNX operators as torch functions: ``OPS[op_type](inputs, attrs)`` for every operator the executable
graph (``qcore.model.onnx_graph``) runs that is not a weighted layer, a few lines each.

``inputs`` is a list (None for an omitted optional input); ``attrs`` holds the node's attributes plus
"_opset" (the default-domain opset version) and "_n_out" (number of outputs wanted). Each returns a
tensor or a tuple of tensors.

``output_sizes`` finds the output shapes an operator would produce without allocating them -- from the
input shapes, or by running the operator on torch's "meta" device (shapes and dtypes, no memory) with
real values only for the inputs that decide the shape (``VALUE_INPUTS``: a shape, repeats, pads, axes,
Range's bounds); an expanded view counts as if materialised. The importer's constant folding
(``io.onnx.fold``) and the graph's run-time guard (``RUN_CHECKED``) both bound memory with it.

Longer than ~400 lines on purpose: one table of operators (checked case by case against ONNX's own node
tests in ``tests/io/test_onnx_conformance.py``) reads best in one place.
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F

from qcore.errors import QcoreError
from qcore.model.onnx_quant_ops import QUANT_OPS

MAX_SHAPE_VALUES = 256  # a shape, repeats, pads or axes input holds at most this many values

# ONNX TensorProto element types -> torch dtypes (the ones models use).
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}




# ---- operators: each takes (inputs, attrs) and returns a tensor or a tuple of tensors ----------
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


def torch_pads(a, rank) -> list[int]:
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
                x, pads = F.pad(x, torch_pads(a, rank), value=-math.inf), [0] * 2 * rank
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
    y = F.layer_norm(x, x.shape[axis:], xs[1], bias, a.get("epsilon", 1e-5))
    if a["_n_out"] == 1:
        return y
    dims = tuple(range(axis, x.dim()))  # the optional outputs: Mean and 1 / sqrt(Var + epsilon), reduced dims kept
    mean = x.mean(dims, keepdim=True)
    return y, mean, torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + a.get("epsilon", 1e-5))


def _pad(xs, a):
    x = xs[0]
    mode = a.get("mode", "constant")
    pads = _ints(xs[1]) if len(xs) > 1 else list(a["pads"])
    value = float(xs[2].reshape(-1)[0]) if len(xs) > 2 and xs[2] is not None else a.get("value", 0.0)
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(x.dim()))
    full = [0] * 2 * x.dim()
    for i, ax in enumerate(axes):
        full[ax % x.dim()], full[ax % x.dim() + x.dim()] = pads[i], pads[i + len(axes)]
    torch_pad = torch_pads({"pads": full}, x.dim())
    while len(torch_pad) > 2 and torch_pad[-2:] == [0, 0]:  # F.pad's reflect/edge modes want only trailing dims
        torch_pad = torch_pad[:-2]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise QcoreError(f"Pad mode {mode!r} is not supported (constant, reflect, edge and wrap are)")
    return F.pad(x, torch_pad, mode=torch_mode, value=value) if torch_mode == "constant" else F.pad(x, torch_pad, mode=torch_mode)


def _same_pads(a, in_sizes, kernel, strides, dilations) -> list[int]:
    """ONNX pads [begins..., ends...] for ``auto_pad`` SAME_UPPER/SAME_LOWER (output size ceil(in / stride);
    the odd pixel goes at the end for SAME_UPPER, at the start for SAME_LOWER), explicit ``pads`` otherwise."""
    rank = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("NOTSET", "VALID"):
        return list(a.get("pads", [0] * 2 * rank)) if mode == "NOTSET" else [0] * 2 * rank
    total = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
             for n, k, s, d in zip(in_sizes, kernel, strides, dilations)]
    small = [t // 2 for t in total]
    big = [t - t // 2 for t in total]
    return small + big if mode == "SAME_UPPER" else big + small


def _conv(xs, a):
    """Conv with a run-time (or N-d) weight: x (N, C, *spatial), w (C_out, C / group, *kernel)."""
    x, w = xs[0], xs[1]
    rank = w.dim() - 2
    strides, dilations = list(a.get("strides", [1] * rank)), list(a.get("dilations", [1] * rank))
    pads = _same_pads(a, x.shape[2:], w.shape[2:], strides, dilations)
    x = F.pad(x, torch_pads({"pads": pads}, rank))
    fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return fn(x, w, xs[2] if len(xs) > 2 else None, strides, 0, dilations, a.get("group", 1))


def conv_transpose_geometry(a, in_sizes, kernel) -> tuple[list[int], list[int], list[int], list[int]]:
    """(strides, dilations, pads [begins..., ends...], output_padding) of an ONNX ConvTranspose on inputs of
    spatial sizes ``in_sizes``: ``output_shape`` and ``auto_pad`` SAME turned into pads as the ONNX spec says
    (total = stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - out; SAME_UPPER puts the
    smaller half first). The output is the full transposed convolution, extended by output_padding at the
    end, cropped by the pads."""
    rank = len(kernel)
    strides, dilations = list(a.get("strides", [1] * rank)), list(a.get("dilations", [1] * rank))
    extra = list(a.get("output_padding", [0] * rank))
    pads = list(a.get("pads", [0] * 2 * rank))
    out = list(a["output_shape"])[-rank:] if "output_shape" in a else None
    if out is None and a.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        out = [n * s for n, s in zip(in_sizes, strides)]
    if out is not None:
        total = [s * (n - 1) + e + (k - 1) * d + 1 - o
                 for n, k, s, d, e, o in zip(in_sizes, kernel, strides, dilations, extra, out)]
        first = [t // 2 if a.get("auto_pad") == "SAME_UPPER" else t - t // 2 for t in total]
        pads = first + [t - f for t, f in zip(total, first)]
    elif a.get("auto_pad") == "VALID":
        pads = [0] * 2 * rank
    return strides, dilations, pads, extra


def _conv_transpose(xs, a):
    """ConvTranspose with a run-time weight or one the layers do not take: w (C_in, C_out / group, *kernel)."""
    x, w = xs[0], xs[1]
    rank = w.dim() - 2
    strides, dilations, pads, extra = conv_transpose_geometry(a, x.shape[2:], w.shape[2:])
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    y = fn(x, w, None, strides, 0, 0, a.get("group", 1), dilations)
    y = F.pad(y, torch_pads({"pads": [-p for p in pads[:rank]] + [e - p for e, p in zip(extra, pads[rank:])]}, rank))
    return y if len(xs) < 3 or xs[2] is None else y + xs[2].reshape(-1, *[1] * rank)


def _resize_axis(x, axis: int, out_n: int, scale: float, a) -> torch.Tensor:
    """Resize along one axis (ONNX Resize is separable): output coordinate i -> source coordinate by
    ``coordinate_transformation_mode``, then nearest (``nearest_mode``), linear (2 taps) or cubic (4 taps,
    ``cubic_coeff_a``) interpolation; taps outside the input take the edge value, or are dropped and the
    weights renormalised with ``exclude_outside``."""
    n, mode = x.shape[axis], a.get("coordinate_transformation_mode", "half_pixel")
    i = torch.arange(out_n, dtype=torch.float64)
    length = scale * n  # the real-valued output length, as the ONNX reference uses it
    if mode == "align_corners":
        # the integer output length, as onnxruntime and torch use it (ONNX's reference uses scale * n)
        src = i * (n - 1) / (out_n - 1) if out_n != 1 else torch.zeros_like(i)
    elif mode == "asymmetric":
        src = i / scale
    elif mode == "pytorch_half_pixel":
        src = (i + 0.5) / scale - 0.5 if out_n > 1 else torch.full_like(i, -0.5)
    elif mode == "half_pixel":
        src = (i + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        src = n / 2 * (1 - out_n / length) + (i + 0.5) / scale - 0.5
    else:
        raise QcoreError(f"Resize with coordinate_transformation_mode={mode!r} is not supported "
                         "(half_pixel, half_pixel_symmetric, pytorch_half_pixel, asymmetric, align_corners are)")
    kind = a.get("mode", "nearest")
    if kind == "nearest":
        pick = {"round_prefer_floor": lambda v: torch.ceil(v - 0.5), "round_prefer_ceil": lambda v: torch.floor(v + 0.5),
                "floor": torch.floor, "ceil": torch.ceil}[a.get("nearest_mode", "round_prefer_floor")]
        return x.index_select(axis, pick(src).clamp(0, n - 1).long())
    base = torch.floor(src)
    t = src - base
    if kind == "linear":
        offsets, weights = [0, 1], [1 - t, t]
    elif kind == "cubic":
        c = a.get("cubic_coeff_a", -0.75)
        near = lambda d: ((c + 2) * d - (c + 3)) * d * d + 1  # |d| <= 1
        far = lambda d: ((c * d - 5 * c) * d + 8 * c) * d - 4 * c  # 1 < |d| < 2
        offsets, weights = [-1, 0, 1, 2], [far(t + 1), near(t), near(1 - t), far(2 - t)]
    else:
        raise QcoreError(f"Resize mode {kind!r} is not supported (nearest, linear and cubic are)")
    taps = [base.long() + o for o in offsets]
    if a.get("exclude_outside", 0):
        weights = [w * ((k >= 0) & (k < n)) for w, k in zip(weights, taps)]
        total = sum(weights)
        weights = [w / total for w in weights]
    shape = [1] * x.dim()
    shape[axis] = out_n
    out = sum(x.index_select(axis, k.clamp(0, n - 1)) * w.to(x.dtype).reshape(shape) for k, w in zip(taps, weights))
    return out.to(x.dtype)


def _resize(xs, a):
    """Resize (opset >= 11: X, roi, scales, sizes; opset 10: X, scales): per axis, output size
    floor(in * scale) or ``sizes``; a scale of 1 and an unchanged size leave the axis as it is."""
    x = xs[0]
    if a.get("antialias", 0):
        raise QcoreError("Resize with antialias=1 is not supported; export without antialiasing")
    if a.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise QcoreError("Resize with coordinate_transformation_mode='tf_crop_and_resize' is not supported")
    if a["_opset"] < 11:
        a = {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor", **a}
    scales = xs[1] if a["_opset"] < 11 else (xs[2] if len(xs) > 2 else None)
    sizes = xs[3] if len(xs) > 3 and xs[3] is not None else None
    axes = [ax % x.dim() for ax in a.get("axes", range(x.dim()))]
    if sizes is not None and sizes.numel():
        sizes = _ints(sizes)
        wanted = [s / x.shape[ax] for s, ax in zip(sizes, axes)]
        policy = a.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            one = (min if policy == "not_larger" else max)(wanted)
            wanted, sizes = [one] * len(axes), [int(math.floor(one * x.shape[ax] + 0.5)) for ax in axes]
    else:
        wanted = [float(s) for s in scales.reshape(-1).tolist()]
        sizes = [int(math.floor(x.shape[ax] * s)) for s, ax in zip(wanted, axes)]
    for ax, out_n, scale in zip(axes, sizes, wanted):
        if out_n != x.shape[ax] or scale != 1:
            x = _resize_axis(x, ax, out_n, scale, a)
    return x


def _upsample(xs, a):
    """Upsample (deprecated since opset 10): Resize with asymmetric coordinates and floor for nearest."""
    scales = xs[1] if len(xs) > 1 else torch.tensor(a["scales"])
    return _resize([xs[0], scales], {**a, "_opset": 10})


def _prelu(xs, a):
    x, slope = xs
    return torch.where(x >= 0, x, x * slope)


def _clip(xs, a):
    lo = xs[1] if len(xs) > 1 and xs[1] is not None else a.get("min")
    hi = xs[2] if len(xs) > 2 and xs[2] is not None else a.get("max")
    return xs[0].clone() if lo is None and hi is None else torch.clamp(xs[0], lo, hi)


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
    "PRelu": _prelu, "Resize": _resize, "Upsample": _upsample, "Conv": _conv, "ConvTranspose": _conv_transpose,
}
OPS.update(QUANT_OPS)  # QuantizeLinear, DequantizeLinear, ...: ``qcore.model.onnx_quant_ops``
SUPPORTED_OPS = tuple(sorted(OPS))
# Inputs whose values (not just shapes) decide an operator's output shape: kept real on the meta device.
VALUE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
                "Pad": (1, 2, 3), "Slice": (1, 2, 3, 4), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
                "Trilu": (1,), "Resize": (1, 2, 3), "Upsample": (1,), **{op: (1,) for op in OPS if op.startswith("Reduce")}}
RUN_CHECKED = ("ConstantOfShape", "Expand", "Tile", "Range", "Pad", "Resize", "Upsample")  # output size set by values at run time
BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Min", "Max", "Sum", "Mean",
             "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")  # 1 output, broadcast
BOOL_OUT = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")


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


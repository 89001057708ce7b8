"""Activation quantization as graph ops: the simulation's input quantizer (``simulate.input_quantizer``)
written on one layer's input edge (``quantize_input``).

Static int -> ``QuantizeLinear``/``DequantizeLinear`` with the calibrated scale / zero-point (``Clip`` on
the codes below 8 bits); dynamic -> the range method as ops over the whole batch (ReduceMin/ReduceMax,
TopK for percentile, 50 candidate clips for MSE), then the format's scale / zero-point formula, then
Q/DQ with run-time scale; float formats -> ``Clip`` + ``Cast`` pair (``Div``/``Mul`` by the scale when scaled).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from qcore.errors import QcoreError
from qcore.export.onnx.weights import ELEMENT_TYPES, decoder
from qcore.numerics.quantize import quantize
from qcore.numerics.ranges import MSE_GRID
from qcore.numerics.spec import TensorSpec

_TINY = float(torch.finfo(torch.float32).tiny)


def _c(ed, value, hint="c") -> str:
    return ed.const(np.array(value, np.float32), hint)


def _range_ops(ed, x: str, spec: TensorSpec, fmt, before) -> tuple[str, str]:
    """(lo, hi) over the whole tensor ``x`` for ``spec.range``, as graph ops (scalars, float32)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "range", before, **kw)  # noqa: E731
    flat = n("Reshape", [x, ed.const(np.array([-1], np.int64), "flat")])
    method = "minmax" if spec.range == "moving_average" else spec.range
    if method == "minmax" or method == "mse":
        lo, hi = n("ReduceMin", [flat], keepdims=0), n("ReduceMax", [flat], keepdims=0)
        if spec.symmetric:
            amax = n("Max", [n("Abs", [lo]), n("Abs", [hi])])
            lo, hi = n("Neg", [amax]), amax
        return (lo, hi) if method == "minmax" else _mse_ops(ed, flat, lo, hi, spec, fmt, before)
    if method == "percentile":
        p = spec.percentile / 100.0

        def quantile(v: str, q: float) -> str:  # k-th smallest, k = clamp(ceil(round(q * n, 9)), 1, n)
            size = n("Size", [v])
            qn = n("Mul", [n("Cast", [size], to=TensorProto.DOUBLE), ed.const(np.array(q), "q")])
            e9 = ed.const(np.array(1e9), "e9")
            k = n("Cast", [n("Ceil", [n("Div", [n("Round", [n("Mul", [qn, e9])]), e9])])], to=TensorProto.INT64)
            k = n("Max", [n("Min", [k, size]), ed.const(np.array(1, np.int64), "one")])
            smallest = ed.node("TopK", [v, n("Reshape", [k, ed.const(np.array([1], np.int64), "k")])], "range",
                               before, n_outputs=2, largest=0)
            return n("ReduceMax", [smallest], keepdims=0)

        if spec.symmetric:
            amax = quantile(n("Abs", [flat]), p)
            return n("Neg", [amax]), amax
        return quantile(flat, 1.0 - p), quantile(flat, p)
    raise QcoreError(f"dynamic activations with range {spec.range!r} cannot be written as ONNX ops yet (the "
                     "histogram search has no graph form); use minmax, percentile or mse for dynamic inputs, "
                     "or a static range")


def _safe(ed, s: str, before) -> str:
    """formats._safe_scale: scales below float32's smallest normal (or infinite) become 1."""
    ok = ed.node("And", [ed.node("GreaterOrEqual", [s, _c(ed, _TINY)], "scale", before),
                         ed.node("Not", [ed.node("IsInf", [s], "scale", before)], "scale", before)], "scale", before)
    return ed.node("Where", [ok, s, _c(ed, 1.0)], "scale", before)


def _params_ops(ed, lo: str, hi: str, spec: TensorSpec, fmt, before) -> tuple[str, str | None]:
    """(scale, zero_point as float or None) from a range, ``fmt.encode``'s formula as ops (any shape)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "qparams", before, **kw)  # noqa: E731
    if decoder(fmt) == "Cast":
        amax = n("Max", [n("Abs", [lo]), n("Abs", [hi])])
        return _safe(ed, n("Div", [amax, _c(ed, fmt.max_value)]), before), None
    if spec.symmetric:
        amax = n("Max", [n("Abs", [lo]), n("Abs", [hi])])
        return _safe(ed, n("Div", [amax, _c(ed, float(fmt.qmax))]), before), None
    lo, hi = n("Min", [lo, _c(ed, 0.0)]), n("Max", [hi, _c(ed, 0.0)])
    span = _c(ed, float(fmt.qmax - fmt.qmin))
    scale = _safe(ed, n("Sub", [n("Div", [hi, span]), n("Div", [lo, span])]), before)
    zp = n("Round", [n("Sub", [_c(ed, float(fmt.qmin)), n("Div", [lo, scale])])])
    return scale, n("Clip", [zp, _c(ed, float(fmt.qmin)), _c(ed, float(fmt.qmax))])


def _fake_quant_ops(ed, x: str, scale: str, zp: str | None, fmt, before) -> str:
    """Quantize-dequantize ``x`` with broadcastable scale / zero-point, as float ops (the MSE search)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "mse", before, **kw)  # noqa: E731
    if decoder(fmt) == "Cast":
        m = fmt.max_value
        v = n("Clip", [n("Div", [x, scale]), _c(ed, -m), _c(ed, m)])
        return n("Mul", [n("Cast", [n("Cast", [v], to=getattr(TensorProto, fmt.onnx_type))], to=TensorProto.FLOAT),
                         scale])
    q = n("Round", [n("Div", [x, scale])])  # float32, half to even: formats.IntFormat.encode, QuantizeLinear
    if zp is not None:
        q = n("Add", [q, zp])
    q = n("Clip", [q, _c(ed, float(fmt.qmin)), _c(ed, float(fmt.qmax))])
    return n("Mul", [q if zp is None else n("Sub", [q, zp]), scale])


def _mse_ops(ed, flat: str, lo0: str, hi0: str, spec, fmt, before) -> tuple[str, str]:
    """ranges.mse as ops: MSE_GRID shrunken copies of the min-max range side by side, the first of the
    smallest squared errors wins (ties keep the wider range, as the engine's strict ``<``)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "mse", before, **kw)  # noqa: E731
    alphas = ed.const((np.arange(MSE_GRID, 0, -1, dtype=np.float32) / np.float32(MSE_GRID)).reshape(-1, 1), "alpha")
    lo, hi = n("Mul", [lo0, alphas]), n("Mul", [hi0, alphas])  # (G, 1)
    scale, zp = _params_ops(ed, lo, hi, spec, fmt, before)
    row = n("Unsqueeze", [flat, ed.const(np.array([0], np.int64), "axis0")])  # (1, n)
    xq = _fake_quant_ops(ed, row, scale, zp, fmt, before)  # (G, n)
    d = n("Sub", [n("Cast", [xq], to=TensorProto.DOUBLE), n("Cast", [row], to=TensorProto.DOUBLE)])
    err = n("ReduceSum", [n("Mul", [d, d]), ed.const(np.array([1], np.int64), "axis1")], keepdims=0)  # (G,)
    best = n("ArgMin", [err], axis=0, keepdims=0)
    pick = lambda t: n("Gather", [n("Reshape", [t, ed.const(np.array([-1], np.int64), "flat")]), best])  # noqa: E731
    return pick(lo), pick(hi)


def quantize_input(ed, x: str, iq, before) -> tuple[str, str]:
    """The simulation's input quantizer ``iq`` on value ``x`` as ops before node ``before``:
    (output value, description)."""
    spec, fmt = iq.spec, iq.spec.fmt
    n = lambda op, ins, **kw: ed.node(op, ins, "input_q", before, **kw)  # noqa: E731
    static = not spec.dynamic and iq.lo is not None
    op = decoder(fmt)  # "DequantizeLinear" (Q/DQ pair) or "Cast"; codebooks are weight-only formats
    if op == "Cast" and not spec.scaled:  # a plain saturating cast
        m = fmt.max_value
        v = n("Clip", [x, _c(ed, -m), _c(ed, m)])
        return n("Cast", [n("Cast", [v], to=getattr(TensorProto, fmt.onnx_type))], to=TensorProto.FLOAT), \
            f"{fmt.name} Cast pair"
    if static:
        qt = quantize(torch.zeros(1), spec, iq.lo, iq.hi)
        scale = _c(ed, float(qt.scale[0]), "input_scale")
        zp = None if qt.zero_point is None else float(qt.zero_point[0])
    else:
        lo, hi = _range_ops(ed, x, spec, fmt, before)
        scale, zp = _params_ops(ed, lo, hi, spec, fmt, before)
    how = f"static (calibrated {spec.range})" if static else f"dynamic ({spec.range} per batch)"
    if op == "Cast":
        return _fake_quant_ops(ed, x, scale, None, fmt, before), f"{fmt.name} scaled {how}: Div/Cast/Mul"
    codes, zp = _codes(ed, x, scale, zp, fmt, static, before)
    return n("DequantizeLinear", [codes, scale, zp]), f"{fmt.name} {how}: QuantizeLinear/DequantizeLinear"


def _codes(ed, x: str, scale: str, zp, fmt, static: bool, before) -> tuple[str, str]:
    """(codes, zero_point) of ``x``: QuantizeLinear into a container of 8 bits at least (ONNX Runtime's
    QuantizeLinear and its QDQ fusions take 8- and 16-bit codes), clipped to the format's range when it
    is narrower than its container. ``zp``: None (symmetric), a float (static) or a float value (dynamic)."""
    n = lambda op, ins, **kw: ed.node(op, ins, "input_q", before, **kw)  # noqa: E731
    onnx_type = "INT8" if fmt.onnx_type == "INT4" else fmt.onnx_type
    container, container_bits = ELEMENT_TYPES[onnx_type]
    if zp is None:
        zp = ed.const(np.array(0, container), "input_zero_point")
    elif static:
        zp = ed.const(np.array(zp, container), "input_zero_point")
    else:
        zp = n("Cast", [zp], to=getattr(TensorProto, onnx_type))
    codes = n("QuantizeLinear", [x, scale, zp])
    if fmt.bits < container_bits:
        codes = n("Clip", [codes, ed.const(np.array(fmt.qmin, container), "qmin"),
                           ed.const(np.array(fmt.qmax, container), "qmax")])
    return codes, zp


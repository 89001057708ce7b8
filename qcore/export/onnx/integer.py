"""A convolution with int8 weights and dynamic int8 inputs as ``ConvInteger``: the simulation in integer ops.

The simulation computes ``conv(dq(x), dq(w)) + b`` with ``dq(x) = (qx - zx) * sx`` (range of each batch)
and ``dq(w) = (qw - zw) * sw`` (one scale per tensor or per output channel). The convolution is linear,
so the same value is

    y[n, c, ...] = sx * sw[c] * ConvInteger(qx, qw, zx, zw)[n, c, ...] + b[c]

with the integer sum exact in int32: ONNX Runtime runs ``ConvInteger`` as an int8 kernel on CPU
(u8/s8 x s8 GEMM), and the file holds the int8 weight codes, one float32 scale per output channel,
and the input's range-to-codes ops (``activations.dynamic_int8_codes``).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from qcore.export.onnx.activations import dynamic_int8_codes
from qcore.numerics.quantize import QuantizedTensor


def fits(node, weights, iq) -> bool:
    """True if this Conv node's layer runs as ConvInteger: int8 weight codes (per tensor, or per output
    channel with a zero-point per tensor or none) meeting a dynamic integer input quantizer of 8 bits
    or fewer. ``weights``: the layer's ``TensorSpec``; ``iq``: its input quantizer (or None)."""
    if node is None or node.op_type != "Conv" or weights is None or iq is None:
        return False
    w = weights
    per_channel_ok = w.granularity == "per_tensor" or (w.granularity == "per_channel" and w.axis == 0)
    return (w.fmt.step_is_scale and w.fmt.onnx_type == "INT8" and per_channel_ok
            and (w.symmetric or w.granularity == "per_tensor")
            and iq.spec.dynamic and iq.spec.fmt.step_is_scale and iq.spec.fmt.onnx_type in ("INT4", "INT8"))


def conv_integer(ed, node, iq, q: QuantizedTensor) -> tuple[str, str, set[str]]:
    """Replace the Conv ``node`` (inputs x, W, optional bias) by ConvInteger on the input's int8 codes and
    ``q``'s codes, then the float rescale and bias. Returns (activations, weights description, the
    weight's initializers: codes first, then scale and zero-point)."""
    x, bias = node.input[0], node.input[2] if len(node.input) > 2 and node.input[2] else None
    codes, x_scale, x_zp, activations = dynamic_int8_codes(ed, x, iq, node)
    rank = q.codes.dim()
    w_codes = ed.const(q.codes.numpy().astype(np.int8), "codes")
    inputs = [codes, w_codes, x_zp]
    if q.zero_point is not None:
        inputs.append(ed.const(np.array(q.zero_point.reshape(()).item(), np.int8), "zero_point"))
    stored = [w_codes, *inputs[3:]]
    per_channel = q.scale.numel() > 1
    w_scale = ed.const(q.scale.numpy().astype(np.float32).reshape((1, -1) + (1,) * (rank - 2) if per_channel else ()),
                       "scale")
    stored.append(w_scale)
    n = lambda op, ins, **kw: ed.node(op, ins, "conv_integer", node, **kw)  # noqa: E731
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    acc = n("ConvInteger", inputs, **attrs)
    y = n("Mul", [n("Cast", [acc], to=TensorProto.FLOAT), n("Mul", [x_scale, w_scale])])
    out = node.output[0]
    if bias is None:
        final = helper.make_node("Identity", [y], [out], name=ed.fresh(f"{node.name}/rescaled"))
    else:
        shape = ed.const(np.array((1, -1) + (1,) * (rank - 2), np.int64), "bias_shape")
        final = helper.make_node("Add", [y, n("Reshape", [bias, shape])], [out], name=ed.fresh(f"{node.name}/bias"))
    ed.replace(node, final)
    how = "per output channel" if per_channel else "per tensor"
    return activations, f"{q.spec.fmt.name} codes as INT8 ({how} scale) into ConvInteger", stored

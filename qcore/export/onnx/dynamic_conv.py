"""A convolution with integer weights and a dynamic (per-batch) input quantizer: float Conv on the exact
dequantized input and weight, the weight decoded at load.

The simulation computes ``conv(dq(x), dq(w)) + b`` with ``dq(x) = (qx - zx) * sx`` (range of each batch,
``activations.quantize_input``: the range ops, QuantizeLinear, DequantizeLinear) and ``dq(w) = (qw - zw) * sw``.
The file computes exactly that, in float32, on the integer codes it stores.

Why not an int8 kernel: ONNX Runtime's only convolution with a run-time input scale is ``ConvInteger``,
which has no fast CPU kernel (im2col + a generic integer GEMM, one per group): measured here 3-12x slower
than its float ``Conv`` on the same shapes (microsoft/onnxruntime#12206; "no special performance
optimization on ConvInteger", #12854); its ``QLinearConv`` is fast but quantizes the output with a fixed
scale, which the simulation does not. So the weight is written as Cast/Mul ops that ONNX Runtime
constant-folds when it loads the file (``weights.decode_at_load``; a DequantizeLinear would run at every
call), and the float Conv keeps its fusions (BatchNormalization, activation) and blocked layout.
"""

from __future__ import annotations

from qcore.export.onnx.activations import quantize_input
from qcore.export.onnx.weights import decode_at_load, decoder
from qcore.numerics.quantize import QuantizedTensor


def fits(node, weights, iq) -> bool:
    """True if this Conv node's layer is written here: integer weight codes (``weights``: the layer's
    ``TensorSpec``) meeting a dynamic input quantizer ``iq`` (ONNX Runtime fuses only constant scales, so
    such a layer computes in float whatever the file says)."""
    return (node is not None and node.op_type == "Conv" and weights is not None and iq is not None
            and iq.spec.dynamic and weights.fmt.quantizes and decoder(weights.fmt) == "DequantizeLinear")


def write(ed, node, iq, q: QuantizedTensor) -> tuple[str, str, list[str]]:
    """The Conv ``node`` (inputs x, W, optional bias; W's initializer already dropped) given ``iq`` on its
    input and ``q`` decoded into W. Returns (activations, weights description, the weight's initializers:
    codes first)."""
    node.input[0], activations = quantize_input(ed, node.input[0], iq, node)
    before = set(ed.inits)
    what, codes = decode_at_load(ed, q, tuple(q.shape), node.input[1])
    return activations, what, [codes, *sorted(set(ed.inits) - before - {codes})]

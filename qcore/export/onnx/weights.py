"""Weight encoders: a layer's ``QuantizedTensor`` stored as compactly as ONNX allows and decoded by graph
ops to the simulated weight, bit for bit:

===========================  =====================================================================
weights                      written as
===========================  =====================================================================
int2..int8 on a Linear,      ``MatMulNBits`` (bits 2 / 4 / 8; codes + 2^(bits-1), scales per block
float inputs                 of a power of two >= 16 along K) when every block lies in one engine block
int2..int16 otherwise        integer codes (INT4 container for <= 4 bits, INT8, INT16) + ``DequantizeLinear``
                             per tensor, per axis, or blocked (``block_size``, opset 21) on the
                             (C_out, fan_in) view, then ``Reshape`` back
fp16 / bf16 / fp8            values in that type + ``Cast`` (+ ``Mul`` by the scale when ``scaled``)
nf4                          4-bit codebook indices (UINT4) + ``Gather`` from the 16 levels + ``Mul``
===========================  =====================================================================

Initializers are named by role (``codes``/``values``/``indices``, ``scale``, ``zero_point``), which
``stored_bytes`` counts.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import torch
from onnx import TensorProto, helper

from qcore.numerics.formats import NF4_CODEBOOK, CodebookFormat, FloatFormat, IntFormat
from qcore.numerics.granularity import fan_in, from_blocks
from qcore.numerics.quantize import QuantizedTensor

# ONNX element type and numpy dtype holding a float format's values
FLOAT_TYPES = {"fp16": (TensorProto.FLOAT16, np.float16), "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
                "fp8_e4m3": (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
                "fp8_e5m2": (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2)}


def _full(q: QuantizedTensor, per_block: torch.Tensor | None, shape) -> np.ndarray | None:
    """A per-block value (scale or zero-point) broadcast to every element of the weight."""
    if per_block is None:
        return None
    blocks = q._blocks(torch.zeros(shape))
    return from_blocks(per_block[:, None].expand_as(blocks), tuple(shape), q.spec.granularity, q.spec.axis).numpy()


def _scale_view(ed, values: str, q: QuantizedTensor, shape, out: str, before=None) -> str:
    """``values * scale`` in the engine's block view (per_group: (C_out, fan_in/g, g)) -> ``out`` of ``shape``."""
    s = q.spec
    if q.scale is None:
        return ed.node("Reshape", [values, ed.const(np.array(shape, np.int64), "shape")], "w", before, output=out)
    if s.granularity == "per_tensor":
        return ed.node("Mul", [values, ed.const(q.scale.numpy().reshape(()), "scale")], "w", before, output=out)
    if s.granularity == "per_channel":
        b = [1] * len(shape)
        b[s.axis] = shape[s.axis]
        return ed.node("Mul", [values, ed.const(q.scale.numpy().reshape(b), "scale")], "w", before, output=out)
    groups = (shape[0], fan_in(shape) // s.group_size, 1)
    scaled = ed.node("Mul", [values, ed.const(q.scale.numpy().reshape(groups), "scale")], "w", before)
    return ed.node("Reshape", [scaled, ed.const(np.array(shape, np.int64), "shape")], "w", before, output=out)


def _stored_shape(q: QuantizedTensor, shape) -> tuple[int, ...]:
    s = q.spec
    return (shape[0], fan_in(shape) // s.group_size, s.group_size) if s.granularity == "per_group" else tuple(shape)


def _int_container(bits: int):
    return ml_dtypes.int4 if bits <= 4 else np.int8 if bits <= 8 else np.int16


def _dequantize_linear(ed, q: QuantizedTensor, shape, out: str, transposed: bool = False) -> str:
    """Integer codes + DequantizeLinear (per tensor / per axis / blocked on the (C_out, fan_in) view);
    ``transposed``: a 2-D weight stored as W^T (codes, scales and the axis transposed with it)."""
    s, dtype = q.spec, _int_container(q.spec.fmt.bits)
    codes = q.codes.numpy().astype(np.int64)
    zp = None if q.zero_point is None else q.zero_point.numpy().astype(np.int64)
    scale = q.scale.numpy()
    attrs: dict = {}
    if s.granularity == "per_tensor":
        scale, zp = scale.reshape(()), None if zp is None else zp.reshape(())
    elif s.granularity == "per_channel":
        attrs["axis"] = s.axis % len(shape)
    else:
        rows = (shape[0], fan_in(shape))
        codes = codes.reshape(rows)
        scale = scale.reshape(rows[0], -1)
        zp = None if zp is None else zp.reshape(rows[0], -1)
        attrs.update(axis=1, block_size=s.group_size)
    if transposed:
        codes, shape = codes.T, tuple(shape)[::-1]
        if s.granularity != "per_tensor":
            attrs["axis"] = 1 - attrs["axis"]
        if s.granularity == "per_group":
            scale, zp = scale.T, None if zp is None else zp.T
    inputs = [ed.const(codes.astype(dtype), "codes"), ed.const(scale, "scale")]
    if zp is not None:
        inputs.append(ed.const(zp.astype(dtype), "zero_point"))
    if codes.shape == tuple(shape):
        ed.node("DequantizeLinear", inputs, "w", output=out, **attrs)
    else:
        w = ed.node("DequantizeLinear", inputs, "w", **attrs)
        ed.node("Reshape", [w, ed.const(np.array(shape, np.int64), "shape")], "w", output=out)
    return inputs[0]


def decode_weight(ed, q: QuantizedTensor, shape, out: str, transposed: bool = False) -> tuple[str, str]:
    """Graph ops computing ``q.dequantize()`` (the simulated weight) into value ``out``; returns
    (what is stored, the initializer holding the codes)."""
    fmt = q.spec.fmt
    if isinstance(fmt, IntFormat):
        container = {ml_dtypes.int4: "INT4", np.int8: "INT8", np.int16: "INT16"}[_int_container(fmt.bits)]
        return f"{fmt.name} codes as {container} + DequantizeLinear", _dequantize_linear(ed, q, shape, out, transposed)
    stored = q.codes.numpy().reshape(_stored_shape(q, shape))
    if isinstance(fmt, FloatFormat):
        codes = ed.const(stored.astype(FLOAT_TYPES[fmt.name][1]), "values")
        values = ed.node("Cast", [codes], "w", to=TensorProto.FLOAT)
        what = f"{fmt.name} values + Cast" + (" + Mul(scale)" if q.scale is not None else "")
    elif isinstance(fmt, CodebookFormat):
        codes = ed.const(stored.astype(np.uint8).astype(ml_dtypes.uint4), "indices")
        index = ed.node("Cast", [codes], "w", to=TensorProto.INT32)
        values = ed.node("Gather", [ed.const(np.array(NF4_CODEBOOK, np.float32), "codebook"), index], "w")
        what = "nf4 indices as UINT4 + Gather(codebook) + Mul(scale)"
    else:
        raise AssertionError(fmt)
    _scale_view(ed, values, q, shape, out)
    return what, codes


def nbits_block(q: QuantizedTensor, K: int) -> int | None:
    """The largest MatMulNBits block (power of two in [16, 256]) inside which the engine's scale and
    zero-point of a (N, K) weight are constant, or None."""
    N = q.shape[0]
    scale = _full(q, q.scale, q.shape)
    zp = _full(q, q.zero_point, q.shape)
    for b in (256, 128, 64, 32, 16):
        if b > max(16, 2 ** math.ceil(math.log2(K))):
            continue
        kb = -(-K // b)
        ok = True
        for t in (scale, zp):
            if t is None:
                continue
            padded = np.concatenate([t, np.repeat(t[:, -1:], kb * b - K, axis=1)], axis=1).reshape(N, kb, b)
            ok &= bool((padded == padded[:, :, :1]).all())
        if ok:
            return b
    return None


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values (..., m) packed ``8 // bits`` per byte along the last axis, low-order bits first."""
    per = 8 // bits
    m = values.shape[-1]
    v = np.concatenate([values, np.zeros(values.shape[:-1] + (-m % per,), values.dtype)], axis=-1).astype(np.uint8)
    v = v.reshape(values.shape[:-1] + (-1, per))
    return sum((v[..., j] << (bits * j)) for j in range(per)).astype(np.uint8)


def matmul_nbits(ed, q: QuantizedTensor, a: str, bias: str | None, out: str, before, block: int):
    """MatMulNBits(A, packed codes, scales, zero-points, bias) computing A @ W^T (+ bias), W (N, K)."""
    bits = {2: 2, 3: 4, 4: 4}.get(q.spec.fmt.bits, 8)
    offset = 2 ** (bits - 1)  # unsigned code = signed code + offset; MatMulNBits' default zero-point
    N, K = q.shape
    kb = -(-K // block)
    zp = _full(q, q.zero_point, q.shape)
    zp_full = np.zeros((N, K)) if zp is None else zp
    u = (q.codes.numpy() + offset).astype(np.int64)
    pad = (zp_full[:, -1:] + offset).astype(np.int64).repeat(kb * block - K, axis=1)  # padding decodes to 0
    u = np.concatenate([u, pad], axis=1).reshape(N, kb, block)
    scales = np.concatenate([_full(q, q.scale, q.shape), np.zeros((N, kb * block - K), np.float32)], 1)
    scales = scales.reshape(N, kb, block)[:, :, 0].astype(np.float32)
    inputs = [a, ed.const(_pack(u, bits), "codes_packed"), ed.const(scales, "scales")]
    if zp is not None:
        zpb = np.concatenate([zp_full, np.zeros((N, kb * block - K))], 1).reshape(N, kb, block)[:, :, 0]
        inputs.append(ed.const(_pack((zpb + offset).astype(np.int64), bits), "zero_points"))
    else:
        inputs.append("")
    inputs += ["", bias] if bias else []
    return helper.make_node("MatMulNBits", inputs, [out], name=ed.fresh(f"{out}/MatMulNBits"), domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=0), bits



def stored_bytes(ed, names: set[str]) -> dict:
    """Bytes of the initializers holding one layer's weight, by role (from the names ``const`` gave
    them): codes (codes / values / indices), scales, zero_points, other (shapes, codebook), total."""
    roles = {"codes": 0, "scales": 0, "zero_points": 0, "other": 0}
    for name in names:
        role = ("codes" if name.startswith(("codes", "values", "indices")) else "scales" if name.startswith("scale")
                else "zero_points" if name.startswith("zero_point") else "other")
        roles[role] += len(ed.inits[name].raw_data) or ed.array(name).nbytes  # raw_data: 4-bit types packed
    return {**roles, "total": sum(roles.values())}

"""ONNX Runtime's sub-byte layout (MatMulNBits, GatherBlockQuantized): unsigned codes packed ``8 // bits`` per byte
along the last axis, low-order bits first (the first code in bits 0..bits-1). The exporter writes it
(``qcore.export.onnx.weights``) and the ONNX importer reads it back (``qcore.io.onnx.quantized``). The engine's own
stored layout, a most-significant-bit-first stream, is ``qcore.numerics.formats.pack_bits``."""

from __future__ import annotations

import numpy as np


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values (..., m), each < 2^bits, -> uint8 (..., ceil(m / (8 // bits))); the last byte is zero-padded."""
    per = 8 // bits
    m = values.shape[-1]
    v = np.concatenate([values, np.zeros(values.shape[:-1] + (-m % per,), values.dtype)], axis=-1).astype(np.uint8)
    v = v.reshape(values.shape[:-1] + (-1, per))
    return sum((v[..., j] << (bits * j)) for j in range(per)).astype(np.uint8)


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_low_first``: uint8 bytes (..., m) -> the first ``count`` unsigned codes (..., count), uint8."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8(2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]

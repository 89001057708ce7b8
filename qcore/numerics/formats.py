"""Number formats: which grid of values a quantized tensor may take.

A format knows only its grid. Given values already cut into blocks (shape ``(n_blocks, block_len)``,
see ``granularity``) and a clipping range per block (``lo``, ``hi``: shape ``(n_blocks,)``, see
``ranges``), ``encode`` returns the codes and the per-block ``scale`` / ``zero_point`` and
``decode`` maps them back:

    int-b, symmetric :  q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1),  s = max(|lo|, |hi|) / (2^(b-1)-1),  x' = q * s
    int-b, affine    :  q = clamp(round(x / s) + z, qmin, qmax),       s = (hi - lo) / (qmax - qmin),    x' = (q - z) * s
    float (fp16...)  :  x' = cast(clamp(x, -max, max))   (unscaled: a plain saturating cast)
    float, scaled    :  x' = cast(clamp(x / s, -max, max)) * s,  s = max(|lo|, |hi|) / max
    nf4              :  x' = codebook[argmin |x / s - codebook|] * s,  s = max(|lo|, |hi|)

Rounding is round-half-to-even (``torch.round``). Scales are float32; a block whose range is zero
(or below float32's smallest normal, ~1.2e-38) gets scale 1, so it encodes to exact zeros rather
than dividing by zero. Codes, scales and zero-points are always finite for finite input.

``FORMATS`` maps a format name to its implementation, and each format owns its traits: which
quantization parameters a block stores (``params``), how its codes are stored in bytes (``store`` /
``load``), its bit fields (``bit_fields``), whether it may quantize activations, be affine or be
scaled, the spec defaults it implies (nf4: per_group 64), how ONNX Runtime holds and runs it
(``onnx_type``, ``ort_kernels``), the arithmetic a chip needs for it (``compute``) and where the app lists it
(``menus``, ``label``, ``group``).
Adding a format is adding one entry; nothing else switches on format names or classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_TINY = torch.finfo(torch.float32).tiny


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero, subnormal or non-finite scales by 1 (their blocks are all ~0)."""
    ok = torch.isfinite(scale) & (scale >= _TINY)
    return torch.where(ok, scale, torch.ones_like(scale))


def pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (any shape, each < 2^bits, bits <= 8) -> uint8 bit stream, ``bits`` bits each, most
    significant bit first; ceil(numel * bits / 8) bytes."""
    b = np.unpackbits(u.reshape(-1).to(torch.int64).numpy().astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]
    return torch.from_numpy(np.packbits(b.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_bits``: the unsigned codes, int64 of ``shape``."""
    n = math.prod(shape)
    b = np.unpackbits(packed.numpy())[: n * bits].reshape(n, bits)
    full = np.concatenate([np.zeros((n, 8 - bits), np.uint8), b], axis=1)
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1).astype(np.int64)).reshape(shape)


@dataclass(frozen=True)
class Format:
    """Base: name, bits per stored value, and the traits every part of the engine and the app reads.

    onnx_type   : the ONNX element type its codes are stored as in an exported model ("INT4", "FLOAT8E4M3FN",
                  "UINT4" for codebook indices, ...)
    ort_kernels : ONNX Runtime CPU kernels that compute with it in low precision (empty: dequantized to float)
    compute     : the arithmetic a layer of it needs on a chip (``roofline``): "int4", "int8", "fp8", "fp16", ...
    codebook    : the levels its codes index (empty: not a codebook format)
    menus       : ``((list, position), ...)``: the app's choice lists it appears in (see ``choices``)
    label       : its name in the Formats page's list; ``group``: formats sharing a group are one entry
                  there with a Bits slider (the integers)
    """

    name: str
    bits: int
    family: str  # "int" | "float" | "codebook" | "identity" (shown by describe)
    onnx_type: str = "FLOAT"
    ort_kernels: tuple[str, ...] = ()
    menus: tuple[tuple[str, float], ...] = ()
    label: str = ""
    group: str = ""

    # ---- traits (overridden by the format classes) --------------------------------------
    quantizes = True  # False for fp32: the value is kept as it is
    can_be_affine = False  # may use a zero-point (symmetric=False)
    can_be_scaled = False  # may be scaled into its range (scaled=True) instead of a plain cast
    scaled_by_default = False  # the app's suggestion when this format is picked (FP8 recipes scale)
    for_activations = True  # may quantize a layer's input
    step_is_scale = False  # the grid is uniform and its step is the block's scale
    spec_defaults = ()  # ((key, value), ...): what a spec of this format defaults to
    codebook = ()  # a field of CodebookFormat; a class attribute here, so that field positions stay

    @property
    def compute(self) -> str:
        return self.name

    def uses_range(self, scaled: bool) -> bool:
        return True

    def params(self, symmetric: bool, scaled: bool) -> tuple[str, ...]:
        """The quantization parameters stored per block: "scale" and/or "zero_point" (float32 / bits-wide)."""
        return ("scale",)

    def bit_fields(self) -> list[tuple[str, int]]:
        """The fields of one stored value, most significant first: ``[(field, bits), ...]``."""
        raise NotImplementedError

    def store(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (float32, any shape) as stored in a file: ceil(numel * bits / 8) bytes below 8 bits."""
        return codes.contiguous()

    def load(self, stored: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of ``store``: float32 codes of ``shape``."""
        return stored.to(torch.float32).reshape(shape)

    def values(self) -> torch.Tensor:
        """All representable (unscaled) code values, sorted ascending, float64."""
        raise NotImplementedError

    def describe(self) -> dict:
        v = self.values()
        pos = v[v > 0]
        return {
            "name": self.name,
            "family": self.family,
            "bits": self.bits,
            "min": float(v.min()),
            "max": float(v.max()),
            "smallest_step_near_zero": float(pos.min()) if len(pos) else 0.0,
            "levels": int(len(v)),
        }


@dataclass(frozen=True)
class IntFormat(Format):
    """Signed b-bit integers, codes in [-2^(b-1), 2^(b-1) - 1]; symmetric or affine. Stored bit-packed
    (offset by -qmin, so unsigned) up to 8 bits, as int16 above."""

    can_be_affine = True
    step_is_scale = True

    def params(self, symmetric: bool, scaled: bool) -> tuple[str, ...]:
        return ("scale",) if symmetric else ("scale", "zero_point")

    @property
    def compute(self) -> str:
        return f"int{self.bits}"

    def bit_fields(self) -> list[tuple[str, int]]:
        return [("sign", 1), ("magnitude (two's complement)", self.bits - 1)]

    def store(self, codes):
        return codes.to(torch.int16) if self.bits > 8 else pack_bits(codes.to(torch.int64) - self.qmin, self.bits)

    def load(self, stored, shape):
        if self.bits > 8:
            return stored.to(torch.float32).reshape(shape)
        return (unpack_bits(stored, self.bits, shape) + self.qmin).to(torch.float32)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def values(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float64)

    def encode(self, x, lo, hi, symmetric: bool, scaled: bool = True):
        if symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = _safe_scale(amax / self.qmax)
            zero_point = torch.zeros_like(scale)
        else:
            # The range must contain 0 so that 0 (padding, ReLU zeros) is exactly representable.
            lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
            n = self.qmax - self.qmin
            scale = _safe_scale(hi / n - lo / n)  # written so that hi - lo cannot overflow
            zero_point = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        # x / scale in float32, rounded half to even, then + zero-point: ONNX's QuantizeLinear, so a file's
        # codes are the simulation's bit for bit. (A near-tie whose exact quotient lies just off .5 can round
        # to .5 in float32 and go to the even level: ONNX Runtime does the same; float64 would not.)
        q = torch.round(x.float() / scale.float()[:, None]) + zero_point[:, None]
        codes = torch.clamp(q, self.qmin, self.qmax)
        return codes, scale, zero_point

    def decode(self, codes, scale, zero_point):
        shifted = codes if zero_point is None else codes - zero_point[:, None]
        return shifted * scale[:, None]


@dataclass(frozen=True)
class FloatFormat(Format):
    """IEEE-like float with ``exponent_bits`` / ``mantissa_bits``; saturates at +-``max_value``."""

    dtype: torch.dtype = torch.float16
    exponent_bits: int = 5
    mantissa_bits: int = 10

    can_be_scaled = True

    @property
    def scaled_by_default(self) -> bool:
        return self.bits == 8  # FP8 recipes scale; FP16/BF16 are usually a plain cast

    @property
    def compute(self) -> str:
        return "fp8" if self.bits == 8 else self.name  # FP8 units take both E4M3 and E5M2

    def params(self, symmetric: bool, scaled: bool) -> tuple[str, ...]:
        return ("scale",) if scaled else ()

    def bit_fields(self) -> list[tuple[str, int]]:
        return [("sign", 1), ("exponent", self.exponent_bits), ("mantissa", self.mantissa_bits)]

    def store(self, codes):
        return codes.to(self.dtype).contiguous()

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.dtype).max)

    def uses_range(self, scaled: bool) -> bool:
        return scaled

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Saturating round-to-nearest-even cast; returns float32 holding the format's values."""
        m = self.max_value
        return torch.clamp(x, -m, m).to(self.dtype).to(torch.float32)

    def values(self) -> torch.Tensor:
        # Enumerate every bit pattern of the format and keep the finite values.
        int_dtype = {8: torch.uint8, 16: torch.int16}[self.bits]
        patterns = torch.arange(2**self.bits, dtype=torch.int64)
        if self.bits == 16:
            patterns = patterns - 2**15
        v = patterns.to(int_dtype).view(self.dtype).to(torch.float64)
        return torch.unique(v[torch.isfinite(v)])

    def encode(self, x, lo, hi, symmetric: bool = True, scaled: bool = False):
        if not scaled:
            return self.cast(x), None, None
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = _safe_scale(amax / self.max_value)
        return self.cast(x / scale[:, None]), scale, None

    def decode(self, codes, scale, zero_point):
        return codes if scale is None else codes * scale[:, None]


@dataclass(frozen=True)
class CodebookFormat(Format):
    """A fixed codebook in [-1, 1] scaled per block by the block's absmax (NF4). Codes are indices into
    the codebook, stored bit-packed; weights only, and per block of 64 unless a spec says otherwise."""

    codebook: tuple[float, ...] = ()

    for_activations = False
    spec_defaults = (("granularity", "per_group"), ("group_size", 64))  # NF4 is defined block-wise (QLoRA)

    def bit_fields(self) -> list[tuple[str, int]]:
        return [("codebook index", self.bits)]

    @property
    def compute(self) -> str:
        return f"int{self.bits}"  # its b-bit indices move like int-b codes (the lookup is expanded before multiplying)

    def store(self, codes):
        return pack_bits(codes, self.bits)

    def load(self, stored, shape):
        return unpack_bits(stored, self.bits, shape).to(torch.float32)

    def values(self) -> torch.Tensor:
        return torch.tensor(self.codebook, dtype=torch.float64)

    def encode(self, x, lo, hi, symmetric: bool = True, scaled: bool = True):
        cb = torch.tensor(self.codebook, dtype=torch.float32)
        scale = _safe_scale(torch.maximum(lo.abs(), hi.abs()))
        normalized = torch.clamp(x / scale[:, None], -1.0, 1.0)
        midpoints = (cb[1:] + cb[:-1]) / 2  # nearest code = how many midpoints lie below
        codes = torch.bucketize(normalized, midpoints).to(torch.float32)
        return codes, scale, None

    def decode(self, codes, scale, zero_point):
        cb = torch.tensor(self.codebook, dtype=torch.float32)
        return cb[codes.long()] * scale[:, None]


@dataclass(frozen=True)
class IdentityFormat(Format):
    """fp32: the layer stays in float. Codes are the values themselves."""

    quantizes = False

    def params(self, symmetric: bool, scaled: bool) -> tuple[str, ...]:
        return ()

    def bit_fields(self) -> list[tuple[str, int]]:
        return [("sign", 1), ("exponent", 8), ("mantissa", 23)]

    def uses_range(self, scaled: bool) -> bool:
        return False

    def values(self) -> torch.Tensor:
        return FloatFormat("fp16", 16, "float").values()  # a readable stand-in for the number line

    def describe(self) -> dict:
        fi = torch.finfo(torch.float32)
        return {"name": self.name, "family": self.family, "bits": 32, "min": float(fi.min),
                "max": float(fi.max), "smallest_step_near_zero": float(fi.smallest_normal) * 2.0**-23,
                "levels": 2**32 - 2**24}

    def encode(self, x, lo, hi, symmetric: bool = True, scaled: bool = False):
        return x, None, None

    def decode(self, codes, scale, zero_point):
        return codes


# The 16 NormalFloat levels of QLoRA (Dettmers et al. 2023), as in bitsandbytes.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# The app's choice lists, by position: "weights" (the Mixed precision table's weights column), "inputs static",
# "inputs dynamic", "inputs cast" (its inputs column: "<format> static", "<format> dynamic", "<format>"),
# "activations" (the Activations page), "formats" (the Formats page).
_INT_WEIGHTS = {8: 5, 6: 6, 5: 7, 4: 8, 3: 9, 2: 10}
_INT_ACTIVATIONS = {8: 0, 4: 1, 6: 2, 16: 3}


def _int(b: int) -> IntFormat:
    menus = [("formats", b)]
    menus += [("weights", _INT_WEIGHTS[b])] if b in _INT_WEIGHTS else []
    menus += [("activations", _INT_ACTIVATIONS[b])] if b in _INT_ACTIVATIONS else []
    menus += [("inputs static", {8: 1, 16: 3}[b])] if b in (8, 16) else []
    menus += [("inputs dynamic", 2)] if b == 8 else []
    kernels = ("MatMulNBits",) if b <= 8 else ()  # Linear weights as packed blocks, any width up to 8 bits
    kernels += ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger") if b == 8 else ()
    return IntFormat(f"int{b}", b, "int", "INT4" if b <= 4 else "INT8" if b <= 8 else "INT16", kernels, tuple(menus),
                     "Integer (int-b)", "integer")


FORMATS: dict[str, Format] = {
    "fp32": IdentityFormat("fp32", 32, "identity", "FLOAT", menus=(("weights", 0),), label="FP32"),
    "fp16": FloatFormat("fp16", 16, "float", "FLOAT16", (), (("weights", 1), ("inputs cast", 5), ("activations", 6),
                        ("formats", 104)), "FP16 (half)", "", torch.float16, 5, 10),
    "bf16": FloatFormat("bf16", 16, "float", "BFLOAT16", (), (("weights", 2), ("inputs cast", 6), ("activations", 7),
                        ("formats", 105)), "BF16 (bfloat16)", "", torch.bfloat16, 8, 7),
    "fp8_e4m3": FloatFormat("fp8_e4m3", 8, "float", "FLOAT8E4M3FN", (), (("weights", 3), ("inputs dynamic", 4),
                            ("activations", 4), ("formats", 101)), "FP8 E4M3", "", torch.float8_e4m3fn, 4, 3),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 8, "float", "FLOAT8E5M2", (), (("weights", 4), ("activations", 5),
                            ("formats", 102)), "FP8 E5M2", "", torch.float8_e5m2, 5, 2),
    **{f"int{b}": _int(b) for b in (2, 3, 4, 5, 6, 7, 8, 16)},
    "nf4": CodebookFormat("nf4", 4, "codebook", "UINT4", (), (("weights", 11), ("formats", 103)),
                          "NF4 (4-bit NormalFloat)", "", NF4_CODEBOOK),
}


def choices(menu: str) -> list[str]:
    """The names of the formats listed in the app's choice list ``menu``, in that list's order."""
    listed = [(dict(f.menus)[menu], i, name) for i, (name, f) in enumerate(FORMATS.items()) if menu in dict(f.menus)]
    return [name for _, _, name in sorted(listed)]

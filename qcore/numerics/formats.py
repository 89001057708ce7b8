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

``FORMATS`` maps a format name to its implementation; adding a format is adding one entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TINY = torch.finfo(torch.float32).tiny


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero, subnormal or non-finite scales by 1 (their blocks are all ~0)."""
    ok = torch.isfinite(scale) & (scale >= _TINY)
    return torch.where(ok, scale, torch.ones_like(scale))


@dataclass(frozen=True)
class Format:
    """Base: name, bits per stored value, and whether a clipping range matters."""

    name: str
    bits: int
    family: str  # "int" | "float" | "codebook" | "identity"

    def uses_range(self, scaled: bool) -> bool:
        return True

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
    """Signed b-bit integers, codes in [-2^(b-1), 2^(b-1) - 1]; symmetric or affine."""

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
        # x / scale in float64: float32 has only 24 - b fraction bits left at code magnitude 2^b, so a
        # near-tie (52782.5013 for int16) could round to the wrong level and the grid's top go unused
        q = torch.round(x.double() / scale.double()[:, None]).float() + zero_point[:, None]
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
    """A fixed codebook in [-1, 1] scaled per block by the block's absmax (NF4)."""

    codebook: tuple[float, ...] = ()

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

FORMATS: dict[str, Format] = {
    "fp32": IdentityFormat("fp32", 32, "identity"),
    "fp16": FloatFormat("fp16", 16, "float", torch.float16, 5, 10),
    "bf16": FloatFormat("bf16", 16, "float", torch.bfloat16, 8, 7),
    "fp8_e4m3": FloatFormat("fp8_e4m3", 8, "float", torch.float8_e4m3fn, 4, 3),
    "fp8_e5m2": FloatFormat("fp8_e5m2", 8, "float", torch.float8_e5m2, 5, 2),
    **{f"int{b}": IntFormat(f"int{b}", b, "int") for b in (2, 3, 4, 5, 6, 7, 8, 16)},
    "nf4": CodebookFormat("nf4", 4, "codebook", NF4_CODEBOOK),
}

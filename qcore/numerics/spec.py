"""``TensorSpec``: how one tensor is quantized -- a format x a granularity x a range method.

The spec is plain, frozen data that round-trips to JSON (``to_dict`` / ``from_dict``); ``from_dict``
validates an untrusted mapping and raises ``QcoreError`` naming the key and what is allowed.
A recipe (``qcore.recipe``) is built from specs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from qcore.errors import QcoreError, shown as _show
from qcore.numerics.formats import FORMATS
from qcore.numerics.granularity import GRANULARITIES, fan_in, group_size_for
from qcore.numerics.ranges import ACTIVATION_ONLY_METHODS, RANGE_METHODS

MAX_GROUP_SIZE = 2**20  # elements per group
MAX_AXIS = 8  # axis in [-8, 8): weights have at most 8 dimensions
ROUNDINGS = ("nearest", "gptq", "adaround")  # how a weight's values go to grid points (weights only)
COMPUTES = ("float", "int8")  # the precision a weight-only Linear multiplies in (weights only)
INT8_COMPUTE_BLOCKS = (16, 32, 64, 128, 256)  # the group sizes ONNX Runtime's int8-compute MatMulNBits takes


@dataclass(frozen=True)
class GPTQOptions:
    """``"gptq": {...}`` of a weight spec (``qcore.algorithms.gptq``): ``damp`` the Hessian damping as a fraction
    of its mean diagonal, ``act_order`` round the most-used input columns first, ``block_size`` columns per
    lazy update, ``clip`` the steps of the clipping grid searched per group on the output error (0: the range
    ``spec.range`` gives; ``qcore.algorithms.clip``), ``sequential`` round layers in execution order, each
    from the inputs of the model with the earlier ones already rounded (``qcore.model.rounding``), ``embeddings``
    also round the Embedding tables summed into one input (BERT's word + position + token type) with error
    feedback from one table to the next, their rows by GPTQ under the output's metric M
    (``qcore.algorithms.embedding_feedback``, ``qcore.model.embedding_sums.output_metric``). ``clip`` 0, ``sequential`` and
    ``embeddings`` false are left out of JSON (recipes written before them keep their JSON)."""

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    clip: int = 0
    sequential: bool = False
    embeddings: bool = False


@dataclass(frozen=True)
class AdaRoundOptions:
    """``"adaround": {...}`` of a weight spec (``qcore.algorithms.adaround``): ``iters`` optimisation steps,
    ``reg`` the weight of the regulariser pushing each rounding to up or down."""

    iters: int = 500
    reg: float = 0.01


ROUNDING_OPTIONS = {"gptq": GPTQOptions, "adaround": AdaRoundOptions}  # rounding -> its options' type
LIMITS = {("gptq", "damp"): (0, 1), ("gptq", "block_size"): (1, 2**16), ("gptq", "clip"): (0, 100),
          ("adaround", "iters"): (1, 100_000),
          ("adaround", "reg"): (0, 1e3)}  # (exclusive low for damp, else inclusive low; inclusive high)


def _options(rounding: str, value, where: str):
    """The options mapping ``value`` of ``rounding`` validated into its dataclass (defaults filled in)."""
    cls = ROUNDING_OPTIONS[rounding]
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise QcoreError(f"{where}.{rounding} must be an object like {_show(asdict(cls()))}, got {_show(value)}")
    allowed = [f.name for f in fields(cls)]
    for key in value:
        if key not in allowed:
            raise QcoreError(f"unknown key {where}.{rounding}.{_show(key)}; allowed keys: {', '.join(allowed)}")
    for f in fields(cls):
        if f.name not in value:
            continue
        v, default = value[f.name], f.default
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise QcoreError(f"{where}.{rounding}.{f.name}={_show(v)} must be true or false")
            continue
        lo, hi = LIMITS[rounding, f.name]
        kind = int if isinstance(default, int) else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind) or not ((v > lo if f.name == "damp" else v >= lo) and v <= hi):
            what = "an integer" if kind is int else "a number"
            raise QcoreError(f"{where}.{rounding}.{f.name}={_show(v)} must be {what} in "
                             f"{'(' if f.name == 'damp' else '['}{lo}, {hi}], e.g. {default}")
    defaults = cls()
    return cls(**{k: float(v) if isinstance(getattr(defaults, k), float) else v for k, v in value.items()})


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized.

    format      : a name in ``formats.FORMATS`` (int2..int8, int16, fp16, bf16, fp8_e4m3, fp8_e5m2, nf4, fp32)
    granularity : per_tensor | per_channel | per_group (see ``granularity``)
    axis        : channel axis for per_channel (0 = output channel of a weight)
    group_size  : per_group only: the largest group, in elements along the fan-in (default 128, nf4 64);
                  a tensor whose fan-in it does not divide uses the largest divisor below it (``for_shape``)
    symmetric   : zero-point fixed at 0 (int formats); float and nf4 formats are always symmetric
    range       : minmax | percentile | mse | entropy (| moving_average for static activations)
    percentile  : for range=percentile, in (50, 100]
    dynamic     : activations only: range computed from each batch at run time instead of calibration
    scaled      : float formats only: scale into the format's range (as FP8 recipes do) instead of a plain cast
    rounding    : weights of integer formats only: nearest | gptq | adaround (``qcore.algorithms``: which grid
                  point each weight goes to; the grid -- blocks, ranges, scales -- is the same)
    gptq, adaround : that rounding's options (``GPTQOptions`` / ``AdaRoundOptions``), set iff it is the rounding
    compute     : weights only: float | int8 -- int8: a Linear's input is quantized at run time to symmetric int8
                  per block of ``group_size`` along K (``qcore.model.int8_compute``), as ONNX Runtime's
                  MatMulNBits does with accuracy_level=4; integer formats <= 8 bits, per_group (a layer whose
                  resolved group size is not in ``INT8_COMPUTE_BLOCKS`` computes in float)
    """

    format: str = "int8"
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: int = 128
    symmetric: bool = True
    range: str = "minmax"
    percentile: float = 99.99
    dynamic: bool = False
    scaled: bool = False
    rounding: str = "nearest"
    gptq: GPTQOptions | None = None
    adaround: AdaRoundOptions | None = None
    compute: str = "float"

    @property
    def fmt(self):
        return FORMATS[self.format]

    def to_dict(self) -> dict:
        """Every field; ``group_size`` only for per_group (elsewhere it means nothing); ``rounding`` and its
        options only when not nearest, ``compute`` only when int8 (so recipes written before they existed keep
        their JSON)."""
        d = asdict(self)
        if self.granularity != "per_group":
            del d["group_size"]
        if self.rounding == "nearest":
            del d["rounding"]
        if self.compute == "float":
            del d["compute"]
        for key in ROUNDING_OPTIONS:
            if d[key] is None:
                del d[key]
        for key, default in (("clip", 0), ("sequential", False), ("embeddings", False)):  # older recipes keep their JSON
            if key in d.get("gptq", {}) and d["gptq"][key] == default:
                del d["gptq"][key]
        return d

    def for_shape(self, shape: tuple[int, ...]) -> "TensorSpec":
        """This spec as applied to a tensor of ``shape``: the group size resolved to the fan-in."""
        if self.granularity != "per_group":
            return self
        g = group_size_for(fan_in(tuple(shape)), self.group_size)
        return self if g == self.group_size else replace(self, group_size=g)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "spec", activation: bool = False) -> "TensorSpec":
        if isinstance(d, TensorSpec):
            d = d.to_dict()
        if not isinstance(d, Mapping):
            raise QcoreError(f"{where} must be an object like {{\"format\": \"int8\"}} or null, got {_show(d)}")
        allowed = [f.name for f in fields(cls)]
        for key in d:
            if key not in allowed:
                raise QcoreError(f"unknown key {where}.{_show(key)}; allowed keys: {', '.join(allowed)}")
        fmt = d.get("format", cls.format)
        if not isinstance(fmt, str) or fmt not in FORMATS:
            hint = " (1-bit integers are not supported: the smallest integer format is int2)" if fmt in ("int1", "uint1", "binary") else ""
            raise QcoreError(f"unknown format {where}.format={_show(fmt)}{hint}; allowed: {', '.join(FORMATS)}")
        merged = {**dict(FORMATS[fmt].spec_defaults), **dict(d)}  # nf4: per_group 64
        if merged.get("granularity", cls.granularity) != "per_group":
            merged.pop("group_size", None)  # means nothing here (a recipe refuses it: see Recipe)
        rounding = merged.get("rounding", cls.rounding)
        if not isinstance(rounding, str) or rounding not in ROUNDINGS:
            raise QcoreError(f"{where}.rounding={_show(rounding)} is not a rounding; allowed: {', '.join(ROUNDINGS)}")
        for key in ROUNDING_OPTIONS:
            if merged.get(key) is not None and key != rounding:
                raise QcoreError(f"{where}.{key} is given with rounding {rounding}, where it does nothing; "
                                 f"remove {key} or set \"rounding\": \"{key}\"")
        if rounding in ROUNDING_OPTIONS:
            merged[rounding] = _options(rounding, merged.get(rounding) or {}, where)
        spec = cls(**merged)
        spec._check(where, activation)
        return spec

    def _check(self, where: str, activation: bool) -> None:
        def bad(key, msg):
            raise QcoreError(f"{where}.{key}={_show(getattr(self, key))} {msg}")

        fmt = self.fmt
        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            bad("granularity", f"is not a granularity; allowed: {', '.join(GRANULARITIES)}")
        methods = list(RANGE_METHODS) + (list(ACTIVATION_ONLY_METHODS) if activation else [])
        if not isinstance(self.range, str) or self.range not in methods:
            bad("range", f"is not a range method; allowed here: {', '.join(methods)}")
        for key, typ in (("axis", int), ("group_size", int)):
            if not isinstance(getattr(self, key), int) or isinstance(getattr(self, key), bool):
                bad(key, "must be an integer")
        if not 1 <= self.group_size <= MAX_GROUP_SIZE:
            bad("group_size", f"must be a positive integer such as 32, 64 or 128 (at most {MAX_GROUP_SIZE})")
        if not -MAX_AXIS <= self.axis < MAX_AXIS:
            bad("axis", f"must be a dimension index in [{-MAX_AXIS}, {MAX_AXIS}), e.g. 0 (output channel) or 1")
        for key in ("symmetric", "dynamic", "scaled"):
            if not isinstance(getattr(self, key), bool):
                bad(key, "must be true or false")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50 < self.percentile <= 100:
            bad("percentile", "must be a number in (50, 100], e.g. 99.9 or 99.99")
        if not fmt.can_be_affine and not self.symmetric:
            bad("symmetric", f"is only possible for integer formats; {self.format} is symmetric by construction")
        if self.scaled and not fmt.can_be_scaled:
            bad("scaled", "applies to float formats (fp8/fp16/bf16) only; integer and nf4 formats are always scaled")
        if not activation and self.dynamic:
            bad("dynamic", "applies to activations only (weights are always quantized ahead of time)")
        if activation and self.granularity != "per_tensor":
            bad("granularity", "is not supported for activations; use per_tensor")
        if activation and not fmt.for_activations:
            bad("format", "is a weight-only format; use an int or float format for activations")
        if self.rounding != "nearest":
            if activation:
                bad("rounding", "applies to weights only (activations are rounded to nearest at run time)")
            if not fmt.can_be_affine:
                bad("rounding", f"applies to integer formats (int2..int8, int16) only, not {self.format}; "
                                "use rounding nearest or an integer format")
            if self.granularity == "per_channel" and self.axis != 0:
                bad("rounding", "needs per_channel along axis 0 (output channels); set axis 0")
        if not isinstance(self.compute, str) or self.compute not in COMPUTES:
            bad("compute", f"is not a compute precision; allowed: {', '.join(COMPUTES)}")
        if self.compute == "int8":
            if activation:
                bad("compute", "applies to weights only (it says how a weight-only layer multiplies)")
            if not fmt.can_be_affine or fmt.bits > 8:
                bad("compute", f"needs an integer weight format of at most 8 bits (int2..int8), not {self.format}")
            if self.granularity != "per_group":
                bad("compute", "needs per_group weights (the input is quantized in blocks of the weight's groups); "
                               "set granularity per_group, e.g. with group_size 32")

"""The recipe types: ``LayerPlan`` (what happens to one layer), ``LayerOverride`` (one layer's entry of a
recipe, and the merge rule) and ``Recipe`` (defaults + overrides, resolved once against a model's layers).

All three are frozen and hashable: a ``Recipe`` is a cache key as it is (``functools.lru_cache``, dict keys,
``st.cache_data``), and two recipes are equal when they have the same JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from qcore.errors import QcoreError, shown as _show
from qcore.numerics.formats import FORMATS
from qcore.numerics.spec import ROUNDING_OPTIONS, TensorSpec
from qcore.recipe.kv_cache import KVCacheSpec
from qcore.recipe.parse import MAX_LAYERS, MAX_NAME_CHARS, parse_json
from qcore.recipe.transforms import Transform, parse_transforms

PARTS = ("weights", "activations")


class Frozen(Mapping):
    """A read-only dict that can be hashed. It keeps its order (the JSON's, so ``to_json`` writes what was
    read); equality and hash ignore the order, as JSON objects do."""

    def __init__(self, items: Mapping | Any = ()):
        self._d = dict(items)

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __repr__(self) -> str:
        return f"Frozen({self._d!r})"


def freeze(part: Mapping) -> Frozen:
    """A spec mapping as ``Frozen``, its rounding options (``"gptq": {...}``) too, so it can be hashed."""
    return Frozen({k: Frozen(v) if k in ROUNDING_OPTIONS and isinstance(v, Mapping) else v for k, v in part.items()})


def thaw(part: Mapping) -> dict:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in part.items()}


def recipe_spec(d, where: str, activation: bool, written: Mapping | None = None) -> TensorSpec | None:
    """A spec of a recipe: as ``TensorSpec.from_dict``, but a group_size the recipe writes (in ``written``,
    default ``d``; an override's inherited keys are not written by it) next to a granularity other than
    per_group is refused: it would be stored and do nothing."""
    if d is None:
        return None
    spec = TensorSpec.from_dict(d, where, activation)
    written = d if written is None else written
    if "group_size" in written and spec.granularity != "per_group":
        raise QcoreError(f"{where}.group_size={_show(written['group_size'])} is given with granularity "
                         f"{spec.granularity}, where it does nothing; remove group_size or set granularity per_group")
    return spec


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its weight spec and input-activation spec (None = stays float)."""

    weights: TensorSpec | None
    activations: TensorSpec | None

    @property
    def is_float(self) -> bool:
        return self.weights is None and self.activations is None


class Keep(Enum):
    """A part a layer entry does not mention: the recipe's default spec applies to it."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class LayerOverride:
    """One layer's entry of ``recipe.layers`` -- JSON ``null`` (``FLOAT``: weights and inputs stay float) or
    ``{"weights": {...} | null, "activations": {...} | null}``, either key optional.

    weights / activations : the keys this layer writes over the default spec (a partial spec, ``Frozen``), None
                            (that part stays float) or KEEP (not mentioned: the default applies)
    keep_float            : the whole entry is null
    """

    weights: Frozen | None | Keep = KEEP
    activations: Frozen | None | Keep = KEEP
    keep_float: bool = False

    @classmethod
    def from_json(cls, value, where: str = "layer") -> "LayerOverride":
        """A layer entry as read from JSON (or an override already typed); checks its shape, not its specs."""
        if isinstance(value, LayerOverride):
            return value
        if value is None:
            return FLOAT
        if not isinstance(value, Mapping):
            raise QcoreError(f"{where} must be an object like {{\"weights\": {{\"format\": \"int4\"}}}} or null")
        for key in value:
            if key not in PARTS:
                raise QcoreError(f"unknown key {where}.{_show(key)}; allowed keys: weights, activations")
        parts = {}
        for part in PARTS:
            v = value.get(part, KEEP)
            if v is not KEEP and v is not None and not isinstance(v, Mapping):
                raise QcoreError(f"{where}.{part} must be an object like {{\"format\": \"int8\"}} or null, got {_show(v)}")
            parts[part] = freeze(v) if isinstance(v, Mapping) else v
        return cls(**parts)

    def to_json(self) -> dict | None:
        if self.keep_float:
            return None
        return {part: None if v is None else thaw(v) for part in PARTS if (v := getattr(self, part)) is not KEEP}

    def apply(self, defaults: LayerPlan, where: str = "layer") -> LayerPlan:
        """The merge rule: the layer's plan from the recipe's default specs. A part the entry writes overrides
        the default key by key; a part written null stays float; a new format drops the inherited keys it
        cannot take (``symmetric`` unless it can be affine, ``scaled`` unless it can be scaled)."""
        if self.keep_float:
            return LayerPlan(None, None)
        specs = []
        for part in PARTS:
            written, default = getattr(self, part), getattr(defaults, part)
            if written is KEEP or written is None:
                specs.append(default if written is KEEP else None)
                continue
            base = default.to_dict() if default else {}
            fmt = written.get("format", base.get("format"))
            if fmt != base.get("format"):
                new = FORMATS.get(fmt) if isinstance(fmt, str) else None
                base.pop("format", None)
                if not (new and new.can_be_affine):
                    base.pop("symmetric", None)
                if not (new and new.can_be_scaled):
                    base.pop("scaled", None)
                if not (new and new.can_be_affine):  # rounding algorithms need an integer grid
                    base.pop("rounding", None)
                if not (new and new.can_be_affine and new.bits <= 8):  # int8 compute needs <= 8-bit integers
                    base.pop("compute", None)
            rounding = written.get("rounding", base.get("rounding", "nearest"))
            for key in ROUNDING_OPTIONS:  # the inherited options of another rounding
                if key != rounding:
                    base.pop(key, None)
            specs.append(recipe_spec({**base, **written}, f"{where}.{part}", part == "activations", written=written))
        return LayerPlan(*specs)

    @classmethod
    def of(cls, plan: LayerPlan) -> "LayerOverride":
        """The entry spelling ``plan`` out in full (both parts, every key)."""
        if plan.is_float:
            return FLOAT
        return cls(*(None if s is None else freeze(s.to_dict()) for s in (plan.weights, plan.activations)))

    @classmethod
    def to_reach(cls, defaults: LayerPlan, current: LayerPlan, target: LayerPlan) -> "LayerOverride | None":
        """The shortest entry giving ``target`` over ``defaults`` for a layer whose plan is ``current``
        (None: ``current`` is ``target`` already): only the parts, and of them only the keys, that differ
        from ``current``, or every key of those parts when the short form would inherit something else."""
        if current == target:
            return None
        if target.is_float:
            return FLOAT
        short, full = {}, {}
        for part in PARTS:
            t, c = getattr(target, part), getattr(current, part)
            if t == c:
                continue
            full[part] = short[part] = None if t is None else t.to_dict()
            if t is not None and c is not None:
                short[part] = {k: v for k, v in t.to_dict().items() if v != getattr(c, k)}
                if t.rounding != c.rounding:  # to_dict omits nearest: say it when it differs
                    short[part] = {**short[part], "rounding": t.rounding}
                if t.compute != c.compute:  # to_dict omits float: say it when it differs
                    short[part] = {**short[part], "compute": t.compute}
            d = getattr(defaults, part)
            if t is not None and t.rounding == "nearest" and d is not None and d.rounding != "nearest":
                full[part] = {**full[part], "rounding": "nearest"}  # not inherited from the default
            if t is not None and t.compute == "float" and d is not None and d.compute != "float":
                full[part] = {**full[part], "compute": "float"}
        entry = cls.from_json(short)
        return entry if entry.apply(defaults) == target else cls.from_json(full)


FLOAT = LayerOverride(None, None, keep_float=True)


@dataclass(frozen=True)
class Recipe:
    """Default weight/activation specs plus per-layer overrides (``layers``: name -> ``LayerOverride``; plain
    JSON entries given to the constructor are typed on the way in) and the model-level ``transforms``, in order
    (``qcore.recipe.transforms``). Frozen and hashable; equal = same JSON.
    ``kv_cache``: how a language model's attention cache is quantized (``recipe.kv_cache``); None: it stays float."""

    name: str = "recipe"
    weights: TensorSpec | None = None
    activations: TensorSpec | None = None
    layers: Mapping[str, LayerOverride] = field(default_factory=Frozen)
    transforms: tuple[Transform, ...] = ()
    kv_cache: KVCacheSpec | None = None

    def __post_init__(self):
        object.__setattr__(self, "transforms", parse_transforms(self.transforms))
        if not isinstance(self.layers, Frozen) or not all(isinstance(v, LayerOverride) for v in self.layers.values()):
            object.__setattr__(self, "layers", Frozen(
                {k: LayerOverride.from_json(v, f"layers[{_show(k)}]") for k, v in self.layers.items()}))

    # ---- reading and writing -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        if not isinstance(d, Mapping):
            raise QcoreError("a recipe must be a JSON object with keys name, weights, activations, layers")
        allowed = ("name", "weights", "activations", "layers", "transforms", "kv_cache")
        for key in d:
            if key not in allowed:
                raise QcoreError(f"unknown recipe key {_show(key)}; allowed keys: {', '.join(allowed)}")
        name = d.get("name", "recipe")
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise QcoreError(f"recipe.name={_show(name)} must be a string of at most {MAX_NAME_CHARS} characters")
        weights = recipe_spec(d.get("weights"), "weights", False)
        activations = recipe_spec(d.get("activations"), "activations", True)
        layers = d.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise QcoreError("recipe.layers must be an object mapping layer names to overrides or null")
        if len(layers) > MAX_LAYERS:
            raise QcoreError(f"recipe.layers has {len(layers):,} entries, more than the limit of {MAX_LAYERS:,}")
        for layer in layers:
            if not isinstance(layer, str) or len(layer) > MAX_NAME_CHARS:
                raise QcoreError(f"recipe.layers key {_show(layer)} must be a layer name of at most "
                                 f"{MAX_NAME_CHARS} characters")
        defaults, typed = LayerPlan(weights, activations), {}
        for layer, entry in layers.items():
            where = f"layers[{_show(layer)}]"
            typed[layer] = LayerOverride.from_json(entry, where)
            typed[layer].apply(defaults, where)  # validates the override's specs
        kv_cache = None if d.get("kv_cache") is None else KVCacheSpec.from_dict(d["kv_cache"])
        return cls(name, weights, activations, Frozen(typed), parse_transforms(d.get("transforms")), kv_cache)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Recipe":
        """Parse and validate recipe JSON (text, or bytes in UTF-8), bounded in size, depth and number size."""
        return cls.from_dict(parse_json(text))

    def to_dict(self) -> dict:
        """The recipe's JSON; ``transforms`` and ``kv_cache`` only when set, so a recipe without them writes what it always did."""
        d = {
            "name": self.name,
            "weights": self.weights.to_dict() if self.weights else None,
            "activations": self.activations.to_dict() if self.activations else None,
            "layers": {k: v.to_json() for k, v in self.layers.items()},
        }
        if self.transforms:
            d["transforms"] = [t.to_json() for t in self.transforms]
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---- resolving -----------------------------------------------------------------------
    @property
    def defaults(self) -> LayerPlan:
        """The plan of a layer without an override."""
        return LayerPlan(self.weights, self.activations)

    def plan(self, layer: str) -> LayerPlan:
        """``layer``'s specs as the recipe writes them (defaults merged with its override), before the group
        size is fitted to a weight shape: ``resolve`` gives what is done to a model."""
        entry = self.layers.get(layer)
        return self.defaults if entry is None else entry.apply(self.defaults, f"layers[{_show(layer)}]")

    def resolve(self, layers: Mapping[str, tuple[int, ...]]) -> Mapping[str, LayerPlan]:
        """Every layer's plan for a model whose quantizable layers are ``layers`` (name -> weight shape, as
        ``Workload.layer_shapes``), validated once: each override names a layer of the model, a per_channel
        axis exists in the weight, and a per_group weight spec holds the group size its fan-in takes
        (``TensorSpec.for_shape``). Read-only mapping, in ``layers``' order."""
        for name in self.layers:
            if name not in layers:
                known = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
                raise QcoreError(f"recipe.layers names {name!r}, which is not a quantizable layer of this model; "
                                 f"layers are: {known}")
        plans = {}
        for name, shape in layers.items():
            plan = self.plan(name)
            w = plan.weights
            if w is not None and w.granularity == "per_channel" and not -len(shape) <= w.axis < len(shape):
                raise QcoreError(f"weights.axis={w.axis} is out of range for layer {name!r} with weight shape {tuple(shape)}")
            plans[name] = plan if w is None else LayerPlan(w.for_shape(shape), plan.activations)
        return MappingProxyType(plans)

    def check_against(self, layers: Mapping[str, tuple[int, ...]]) -> None:
        """Validate against a model's quantizable layers (name -> weight shape): ``resolve``'s checks."""
        self.resolve(layers)

    def with_layer(self, layer: str, override: LayerOverride | Mapping | None) -> "Recipe":
        """A copy with ``layer``'s override replaced (a JSON entry or a ``LayerOverride``; ``None`` = keep the
        layer in fp32)."""
        return replace(self, layers=Frozen({**self.layers, layer: LayerOverride.from_json(override, f"layers[{_show(layer)}]")}))

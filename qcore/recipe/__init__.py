"""Recipes: the one JSON description of how a model is quantized.

A ``TensorSpec`` says how one tensor is quantized (format x granularity x range method). A
``Recipe`` gives default specs for weights and activations plus per-layer overrides:

    {"name": "w8a8", "weights": {...spec...}, "activations": {...spec...} | null,
     "layers": {"features.0": {"weights": {"format": "int4"}}, "classifier.2": null}}

- ``"activations": null`` -> weight-only. A layer mapped to ``null`` stays fp32.
- A layer entry overrides the defaults key by key; ``"weights": null`` / ``"activations": null``
  inside a layer entry turns that part off for that layer.
- Activation quantization applies to the *input* of Linear and Conv layers (Embedding inputs are
  indices and are never quantized).
- ``group_size`` (per_group only) is the largest group: each layer uses the largest divisor of its
  input dimension (fan-in) that is not above it -- fan-in 96 with group_size 64 gives groups of 48, a
  3x3 conv with one input channel (fan-in 9) and group_size 32 gives groups of 9, and a prime fan-in
  above the size gives groups of 1. This holds for presets and recipe files alike; ``preset(name,
  layers)`` writes each layer's resolved size as an override, so the recipe says exactly what was done.
  Sizes (``size``) and exports count the resolved groups.
- A ``group_size`` written next to any granularity other than per_group would do nothing, so a recipe
  (file, JSON text, CLI) that has one is refused. ``TensorSpec.from_dict`` on its own (how the app
  builds a spec from a table row) drops it instead, and ``to_dict`` never writes it.

Pages, CLI and exports all read and write this format; ``Recipe.from_dict`` validates it and
raises ``QcoreError`` naming the offending key or layer and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

from qcore.errors import QcoreError, shown as _show
from qcore.numerics.formats import FORMATS
from qcore.numerics.spec import TensorSpec

# Bounds on a recipe (untrusted when uploaded). A real recipe is a few KiB, four levels deep
# (recipe -> layers -> layer -> weights -> values), with small integers.
MAX_RECIPE_BYTES = 2**20  # 1 MiB: the most read from a recipe file or accepted as recipe text
MAX_DEPTH = 8  # nesting of JSON objects/arrays
MAX_INT_DIGITS = 12  # digits of any integer in the JSON text
MAX_NAME_CHARS = 1000  # recipe name and layer names
MAX_LAYERS = 100_000  # per-layer overrides

def _recipe_spec(d, where: str, activation: bool, written: Mapping | None = None) -> TensorSpec | None:
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


def _parse_json(text: str | bytes):
    """Recipe JSON -> plain Python values. Refuses what no recipe needs and what could exhaust the parser:
    more than MAX_RECIPE_BYTES, nesting deeper than MAX_DEPTH, integers longer than MAX_INT_DIGITS digits,
    NaN/Infinity/1e999, and bytes that are not UTF-8."""
    if len(text) > MAX_RECIPE_BYTES:
        raise QcoreError(f"the recipe is larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe is a small JSON file")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise QcoreError(f"the recipe is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from None

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise QcoreError(f"the recipe holds an integer with {len(digits.lstrip('-')):,} digits; recipe numbers "
                             f"are small (at most {MAX_INT_DIGITS} digits), e.g. group_size 128")
        return int(digits)

    def number(digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            raise QcoreError(f"the recipe holds the number {digits[:40]}, which is not finite; use a number such as 99.99")
        return value

    def constant(word: str):
        raise QcoreError(f"the recipe holds {word}, which is not a JSON number; use a finite number such as 99.99")

    try:
        value = json.loads(text, parse_int=integer, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise QcoreError(f"the recipe is not valid JSON ({e.msg} at line {e.lineno}); fix the file and retry") from None
    except RecursionError:
        value = None  # nested far deeper than MAX_DEPTH: reported below
    else:
        level, stack = 0, [(value, 1)]  # iterative walk: the depth check itself cannot recurse
        while stack and level <= MAX_DEPTH:
            v, level = stack.pop()
            children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
            stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
        if level <= MAX_DEPTH:
            return value
    raise QcoreError(f"the recipe is nested more than {MAX_DEPTH} levels deep; a recipe is recipe -> layers -> "
                     "layer -> weights -> values")


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its weight spec and input-activation spec (None = stays float)."""

    weights: TensorSpec | None
    activations: TensorSpec | None

    @property
    def is_float(self) -> bool:
        return self.weights is None and self.activations is None


@dataclass(frozen=True)
class Recipe:
    """Default weight/activation specs plus per-layer overrides (raw partial dicts, validated)."""

    name: str = "recipe"
    weights: TensorSpec | None = None
    activations: TensorSpec | None = None
    layers: Mapping[str, Mapping | None] = field(default_factory=lambda: MappingProxyType({}))

    # ---- reading and writing -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        if not isinstance(d, Mapping):
            raise QcoreError("a recipe must be a JSON object with keys name, weights, activations, layers")
        allowed = ("name", "weights", "activations", "layers")
        for key in d:
            if key not in allowed:
                raise QcoreError(f"unknown recipe key {_show(key)}; allowed keys: {', '.join(allowed)}")
        name = d.get("name", "recipe")
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise QcoreError(f"recipe.name={_show(name)} must be a string of at most {MAX_NAME_CHARS} characters")
        weights = _recipe_spec(d.get("weights"), "weights", False)
        activations = _recipe_spec(d.get("activations"), "activations", True)
        layers = d.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise QcoreError("recipe.layers must be an object mapping layer names to overrides or null")
        if len(layers) > MAX_LAYERS:
            raise QcoreError(f"recipe.layers has {len(layers):,} entries, more than the limit of {MAX_LAYERS:,}")
        for layer in layers:
            if not isinstance(layer, str) or len(layer) > MAX_NAME_CHARS:
                raise QcoreError(f"recipe.layers key {_show(layer)} must be a layer name of at most "
                                 f"{MAX_NAME_CHARS} characters")
        recipe = cls(name, weights, activations, MappingProxyType(dict(layers)))
        for layer in layers:
            recipe.plan(layer)  # validates each override
        return recipe

    @classmethod
    def from_json(cls, text: str | bytes) -> "Recipe":
        """Parse and validate recipe JSON (text, or bytes in UTF-8), bounded in size, depth and number size."""
        return cls.from_dict(_parse_json(text))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "weights": self.weights.to_dict() if self.weights else None,
            "activations": self.activations.to_dict() if self.activations else None,
            "layers": {k: (dict(v) if v is not None else None) for k, v in self.layers.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---- resolving -----------------------------------------------------------------------
    def plan(self, layer: str) -> LayerPlan:
        """The resolved specs for ``layer``: defaults merged key by key with its override."""
        if layer not in self.layers:
            return LayerPlan(self.weights, self.activations)
        override = self.layers[layer]
        if override is None:
            return LayerPlan(None, None)
        where = f"layers[{_show(layer)}]"
        if not isinstance(override, Mapping):
            raise QcoreError(f"{where} must be an object like {{\"weights\": {{\"format\": \"int4\"}}}} or null")
        for key in override:
            if key not in ("weights", "activations"):
                raise QcoreError(f"unknown key {where}.{_show(key)}; allowed keys: weights, activations")
        parts = []
        for part, default in (("weights", self.weights), ("activations", self.activations)):
            if part not in override:
                parts.append(default)
            elif override[part] is None:
                parts.append(None)
            else:
                if not isinstance(override[part], Mapping):
                    raise QcoreError(f"{where}.{part} must be an object like {{\"format\": \"int8\"}} or null, "
                                     f"got {_show(override[part])}")
                base = default.to_dict() if default else {}
                if override[part].get("format", base.get("format")) != base.get("format"):
                    # Key by key, but drop inherited keys the new format cannot take.
                    fmt = override[part]["format"]
                    family = FORMATS[fmt].family if isinstance(fmt, str) and fmt in FORMATS else None
                    base.pop("format", None)
                    if family != "int":
                        base.pop("symmetric", None)
                    if family != "float":
                        base.pop("scaled", None)
                parts.append(_recipe_spec({**base, **override[part]}, f"{where}.{part}", part == "activations",
                                          written=override[part]))
        return LayerPlan(*parts)

    def with_layer(self, layer: str, override: Mapping | None) -> "Recipe":
        """A copy with ``layer``'s override replaced (``None`` = keep the layer in fp32)."""
        layers = dict(self.layers)
        layers[layer] = override
        return replace(self, layers=MappingProxyType(layers))

    def check_against(self, layers: Mapping[str, tuple[int, ...]]) -> None:
        """Validate against a model's quantizable layers (name -> weight shape)."""
        for name in self.layers:
            if name not in layers:
                known = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
                raise QcoreError(f"recipe.layers names {name!r}, which is not a quantizable layer of this model; layers are: {known}")
        for name, shape in layers.items():
            w = self.plan(name).weights
            if w is not None and w.granularity == "per_channel" and not -len(shape) <= w.axis < len(shape):
                raise QcoreError(f"weights.axis={w.axis} is out of range for layer {name!r} with weight shape {tuple(shape)}")


# ---- presets ---------------------------------------------------------------------------------
_W8 = {"format": "int8", "granularity": "per_channel", "symmetric": True, "range": "minmax"}
PRESETS: dict[str, dict] = {
    "fp32": {"weights": None, "activations": None},
    "fp16": {"weights": {"format": "fp16"}, "activations": {"format": "fp16"}},
    "bf16": {"weights": {"format": "bf16"}, "activations": {"format": "bf16"}},
    "int8-weight-only": {"weights": _W8, "activations": None},
    "int8-dynamic": {"weights": _W8, "activations": {"format": "int8", "symmetric": False, "range": "minmax", "dynamic": True}},
    "int8-static": {"weights": _W8, "activations": {"format": "int8", "symmetric": False, "range": "minmax", "dynamic": False}},
    "int4-weight-only": {"weights": {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False, "range": "minmax"}, "activations": None},
    "nf4": {"weights": {"format": "nf4", "granularity": "per_group", "group_size": 64}, "activations": None},
    "fp8": {"weights": {"format": "fp8_e4m3", "granularity": "per_channel", "scaled": True},
            "activations": {"format": "fp8_e4m3", "scaled": True, "dynamic": True}},
}
PRESET_DESCRIPTIONS = {
    "fp32": "no quantization (reference)",
    "fp16": "weights and activations cast to IEEE half precision",
    "bf16": "weights and activations cast to bfloat16",
    "int8-weight-only": "int8 per-channel symmetric weights, float activations",
    "int8-dynamic": "int8 per-channel weights; int8 activations with ranges computed from each batch at run time",
    "int8-static": "int8 per-channel weights; int8 activations with ranges fixed by calibration (W8A8)",
    "int4-weight-only": "int4 affine weights in groups of 32 along the input dimension, float activations",
    "nf4": "4-bit NormalFloat weights, absmax per block of 64 (QLoRA), float activations",
    "fp8": "FP8 E4M3 weights scaled per channel; FP8 E4M3 activations scaled per batch",
}


def preset(name: str, layers: Mapping[str, tuple[int, ...]] | None = None) -> Recipe:
    """The preset ``name`` as a Recipe. Given the model's layers (name -> weight shape), a layer whose
    fan-in the preset's group size does not divide gets its resolved group size (the largest divisor
    not above the preset's) as an explicit override, so the written recipe says exactly what was done."""
    if name not in PRESETS:
        raise QcoreError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    recipe = Recipe.from_dict({"name": name, **PRESETS[name]})
    w = recipe.weights
    for layer, shape in (layers or {}).items():
        if w is not None and (g := w.for_shape(shape).group_size) != w.group_size:
            recipe = recipe.with_layer(layer, {"weights": {"group_size": g}})
    return recipe


def load_recipe(arg: str, layers: Mapping[str, tuple[int, ...]] | None = None) -> Recipe:
    """A preset name, a path to a recipe JSON file, or a JSON string -> validated Recipe.

    A file must be a regular file; at most MAX_RECIPE_BYTES + 1 bytes are read from it."""
    import stat

    if arg in PRESETS:
        return preset(arg, layers)
    text: str | bytes = arg
    if not arg.lstrip().startswith("{"):
        try:
            if not stat.S_ISREG(os.stat(arg).st_mode):  # a directory, a device such as /dev/zero, a pipe
                raise QcoreError(f"recipe file {_show(arg)} is not a regular file; give a JSON file")
            with open(arg, "rb") as f:  # bounded, even if the file grows while it is read
                text = f.read(MAX_RECIPE_BYTES + 1)
        except FileNotFoundError:
            raise QcoreError(f"{_show(arg)} is neither a preset ({', '.join(PRESETS)}) nor a recipe file that exists") from None
        except OSError as e:
            raise QcoreError(f"recipe file {_show(arg)} could not be read ({e.strerror}); give a readable JSON file") from None
    recipe = Recipe.from_json(text)
    if layers is not None:
        recipe.check_against(layers)
    return recipe

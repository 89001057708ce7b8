"""The recipe's ``"transforms"``: model-level steps applied, in order, before (and, for bias correction,
right after) the weights are quantized.

    "transforms": [{"smoothquant": {"alpha": 0.5}}, {"awq": {"grid": 20}}, {"cle": {}},
                   {"bias_correction": {"layers": ["fc1"]}}]

Each entry is an object with one key, the transform's name, whose value holds its options and, optionally,
``"layers"``: the quantizable layers it is restricted to (default: every layer it applies to). SmoothQuant, AWQ
and CLE scale a group of layers reading one producer's channels (a LayerNorm's or a Linear/Conv's outputs)
together, so naming one layer of a group transforms the whole group. SmoothQuant's ``"unfoldable": "mul"`` also
smooths the Linear layers no fold reaches (after a GELU, or a LayerNorm that also feeds a residual add), each with
an explicit per-channel ``Mul`` by 1/s before it: the float model is unchanged, the graph has one op more per such
layer (the default, ``"skip"``, leaves them alone and adds no op). ``Transform`` is frozen and hashable; a
recipe holds a tuple of them. What each transform computes: ``qcore.algorithms``; where it applies in a model:
``qcore.model.transforms``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qcore.errors import QcoreError
from qcore.errors import shown as _show
from qcore.recipe.parse import MAX_LAYERS, MAX_NAME_CHARS

MAX_TRANSFORMS = 16

# name -> {option: (default, check(value) -> bool, what is allowed)}
OPTIONS: dict[str, dict[str, tuple[Any, Any, str]]] = {
    "smoothquant": {"alpha": (0.5, lambda v: v == "search" or (_number(v) and 0 <= v <= 1),
                              'a number from 0 to 1 (0.5 in the paper) or "search" (chosen per layer on calibration '
                              'data)'),
                    "unfoldable": ("skip", lambda v: v in ("skip", "mul"),
                                   '"skip" (only layers a fold reaches) or "mul" (a Mul op before each Linear no fold '
                                   'reaches)')},
    "awq": {"grid": (20, lambda v: _integer(v) and 2 <= v <= 100, "an integer from 2 to 100 (20 in the paper)")},
    "cle": {},
    "bias_correction": {},
}
# Options added after recipes were saved: written only when not at their default, so older recipe files, links and
# their hashes stay byte-identical.
WRITTEN_IF_SET = {("smoothquant", "unfoldable")}
APPLIES_TO = {
    "smoothquant": "Linear/Conv layers whose input is a LayerNorm's or a Linear/Conv's output that a per-channel "
                   "scale can fold into (not one after a GELU, a residual add or a softmax)",
    "awq": "Linear/Conv layers whose input is a LayerNorm's or a Linear/Conv's output that a per-channel scale can "
           "fold into (not one after a GELU, a residual add or a softmax)",
    "cle": "Linear/Conv layers that are the only reader of a preceding Linear/Conv's output, through a ReLU, "
           "pooling or nothing",
    "bias_correction": "Linear/Conv layers whose weights the recipe quantizes",
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Transform:
    """One entry: ``name`` (a key of ``OPTIONS``), its options as sorted (key, value) pairs (every option,
    defaults filled in), and ``layers`` (None: every layer it applies to)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    layers: tuple[str, ...] | None = None

    def option(self, key: str):
        return dict(self.options)[key]

    @classmethod
    def from_json(cls, value, where: str) -> Transform:
        if isinstance(value, Transform):
            return value
        if not isinstance(value, Mapping) or len(value) != 1:
            raise QcoreError(f"{where} must be an object with one key, the transform's name "
                             f"({', '.join(OPTIONS)}), e.g. {{\"smoothquant\": {{\"alpha\": 0.5}}}}")
        (name, opts), = value.items()
        if name not in OPTIONS:
            raise QcoreError(f"unknown transform {_show(name)} at {where}; transforms are: {', '.join(OPTIONS)}")
        where = f"{where}.{name}"
        if opts is None:
            opts = {}
        if not isinstance(opts, Mapping):
            raise QcoreError(f"{where} must be an object of options (or {{}}), got {_show(opts)}")
        allowed = [*OPTIONS[name], "layers"]
        for key in opts:
            if key not in allowed:
                raise QcoreError(f"unknown option {where}.{_show(key)}; allowed: {', '.join(allowed)}")
        options = {}
        for key, (default, ok, what) in OPTIONS[name].items():
            v = opts.get(key, default)
            if not ok(v):
                raise QcoreError(f"{where}.{key}={_show(v)} must be {what}")
            options[key] = v
        layers = opts.get("layers")
        if layers is not None:
            if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS or not all(
                    isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in layers):
                raise QcoreError(f"{where}.layers must be a non-empty list of layer names (or left out for every "
                                 f"layer it applies to), got {_show(layers)}")
            layers = tuple(dict.fromkeys(layers))
        return cls(name, tuple(sorted(options.items())), layers)

    def to_json(self) -> dict:
        """The entry as JSON, every option written (defaults too: the recipe says what was done), but those of
        ``WRITTEN_IF_SET`` only when they differ from their default."""
        d = {k: v for k, v in self.options
             if (self.name, k) not in WRITTEN_IF_SET or v != OPTIONS[self.name][k][0]}
        if self.layers is not None:
            d["layers"] = list(self.layers)
        return {self.name: d}


def parse_transforms(value, where: str = "transforms") -> tuple[Transform, ...]:
    """A recipe's ``"transforms"`` (a list of entries, or null/absent for none) -> a tuple of ``Transform``."""
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(t, Transform) for t in value):
        return value
    if not isinstance(value, list):
        raise QcoreError(f"recipe.{where} must be a list like [{{\"smoothquant\": {{\"alpha\": 0.5}}}}], got {_show(value)}")
    if len(value) > MAX_TRANSFORMS:
        raise QcoreError(f"recipe.{where} has {len(value)} entries, more than the limit of {MAX_TRANSFORMS}")
    return tuple(Transform.from_json(v, f"{where}[{i}]") for i, v in enumerate(value))

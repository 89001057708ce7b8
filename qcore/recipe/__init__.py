"""Recipes: the one JSON description of how a model is quantized.

A ``TensorSpec`` says how one tensor is quantized (format x granularity x range method). A
``Recipe`` gives default specs for weights and activations plus per-layer overrides:

    {"name": "w8a8", "weights": {...spec...}, "activations": {...spec...} | null,
     "layers": {"features.0": {"weights": {"format": "int4"}}, "classifier.2": null}}

- ``"weights": {..., "rounding": "gptq" | "adaround", "gptq": {...}}`` chooses which grid point each weight
  goes to (``qcore.algorithms``) from the calibration data; ``"nearest"`` (the default) is not written.
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
raises ``QcoreError`` naming the offending key or layer and what is allowed. ``Recipe.resolve(layers)``
gives every layer's plan for a model, group sizes fitted, checked once. A layer entry is a
``LayerOverride`` (it owns the merge rule above); a ``Recipe`` is frozen and hashable, a cache key as it is. The types live in ``core``,
the bounded JSON parser in ``parse``; links and the Mixed precision table in ``links`` and ``table``.
"""

from __future__ import annotations

import os
from typing import Mapping

from qcore.errors import QcoreError, shown as _show
from qcore.recipe.core import FLOAT, LayerOverride, LayerPlan, Recipe
from qcore.recipe.parse import MAX_RECIPE_BYTES

__all__ = ["FLOAT", "LayerOverride", "LayerPlan", "PRESETS", "PRESET_DESCRIPTIONS", "Recipe", "load_recipe", "preset"]

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
    "int4-gptq": {"weights": {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False,
                              "range": "minmax", "rounding": "gptq", "gptq": {"damp": 0.1}}, "activations": None},
    "int3-adaround": {"weights": {"format": "int3", "granularity": "per_channel", "symmetric": True, "range": "minmax",
                                  "rounding": "adaround"}, "activations": None},
    "int4-awq": {"weights": {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False, "range": "minmax"},
                 "activations": None, "transforms": [{"awq": {}}]},
    "w8a8-smoothquant": {"weights": _W8, "activations": {"format": "int8", "symmetric": False, "range": "minmax", "dynamic": False},
                         "transforms": [{"smoothquant": {"alpha": 0.5}}]},
    "int4-int8compute": {"weights": {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False,
                                     "range": "minmax", "compute": "int8"}, "activations": None},
    "w8a8-smoothquant-mul": {"weights": _W8, "activations": {"format": "int8", "symmetric": False, "range": "minmax", "dynamic": False},
                             "transforms": [{"smoothquant": {"alpha": "search", "unfoldable": "mul"}}]},
    "int4-gptq-embeddings": {"weights": {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False,
                                         "range": "minmax", "rounding": "gptq", "gptq": {"damp": 0.1, "embeddings": True}},
                             "activations": None},
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
    "int4-gptq": "int4 affine weights in groups of 32, rounded by GPTQ (damping 0.1) on the calibration data, "
                 "float activations",
    "int3-adaround": "int3 per-channel symmetric weights, rounded by AdaRound on the calibration data, float activations",
    "int4-awq": "int4-weight-only after AWQ's activation-aware per-channel scales (folded into the preceding layer)",
    "w8a8-smoothquant": "int8-static after SmoothQuant (alpha 0.5) moves activation outliers into the weights",
    "int4-int8compute": "int4-weight-only weights; each Linear's input quantized at run time to int8 per block of 32 "
                        "along K (symmetric, absmax) so the matmul runs in int8 (ONNX Runtime MatMulNBits accuracy_level 4)",
    "w8a8-smoothquant-mul": "int8-static after SmoothQuant with alpha searched per layer, reaching the Linear layers no fold "
                            "can (after a GELU or a residual-fed LayerNorm) with a Mul op before each",
    "int4-gptq-embeddings": "int4-gptq, and the embedding tables summed into one input (word + position + token type) "
                            "rounded too: in turn, each one's mean error on the calibration tokens pushed onto the "
                            "next, their rows by GPTQ under the model output's sensitivity to them",
}


def preset(name: str, layers: Mapping[str, tuple[int, ...]] | None = None) -> Recipe:
    """The preset ``name`` as a Recipe. Given the model's layers (name -> weight shape), a layer whose
    fan-in the preset's group size does not divide gets its resolved group size (the largest divisor
    not above the preset's) as an explicit override, so the written recipe says exactly what was done."""
    if name not in PRESETS:
        raise QcoreError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    recipe = Recipe.from_dict({"name": name, **PRESETS[name]})
    for layer, plan in recipe.resolve(layers or {}).items():
        if plan.weights is not None and (g := plan.weights.group_size) != recipe.weights.group_size:
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
        recipe.resolve(layers)  # validates it against the model
    return recipe

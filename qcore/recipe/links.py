"""A recipe as a shareable link, and a recipe's identity.

A link carries a recipe as a preset name plus per-layer overrides (``Recipe`` layer entries, only
for layers that differ from the preset): ``?preset=int8-static&layers=<url-safe base64 of the
overrides as compact JSON>``, plus ``&kv=int8.per_token`` (``encode_kv_cache``) when the recipe quantizes a
language model's KV cache, and ``&transforms=<url-safe base64 of the recipe's transforms as compact JSON>``
(``encode_transforms``) when they differ from the preset's (absent otherwise, so older links read the same). ``compact`` finds the shortest such pair for any recipe;
``build_recipe`` is its inverse. ``recipe_id`` / ``recipe_hash`` name what a recipe does to a
model's layers, whatever its name or spelling.
"""

from __future__ import annotations

import base64
import hashlib
import json

from qcore.errors import QcoreError
from dataclasses import replace

from qcore.recipe import PRESETS, LayerOverride, Recipe, preset
from qcore.recipe.kv_cache import KVCacheSpec

PRESET_PARAM, LAYERS_PARAM, KV_PARAM, TRANSFORMS_PARAM = "preset", "layers", "kv", "transforms"
MAX_LAYERS_PARAM_CHARS = 200_000


def encode_layers(layers: dict) -> str:
    """Per-layer overrides -> url-safe base64 (no padding) of their compact JSON."""
    return _encode(layers)


def decode_layers(text: str) -> dict:
    """Inverse of ``encode_layers``; QcoreError when the text is not such an encoding."""
    return _decode(text, LAYERS_PARAM, dict)


def encode_transforms(transforms: list) -> str:
    """A recipe's ``transforms`` (their JSON entries, in order) -> url-safe base64 (no padding) of compact JSON."""
    return _encode(transforms)


def decode_transforms(text: str) -> list:
    """Inverse of ``encode_transforms``; QcoreError when the text is not such an encoding (``build_recipe`` then
    checks each entry, one line too)."""
    return _decode(text, TRANSFORMS_PARAM, list)


def _encode(value) -> str:
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(text: str, param: str, kind: type):
    if len(text) > MAX_LAYERS_PARAM_CHARS:
        raise QcoreError(f"the link's {param}= parameter is longer than {MAX_LAYERS_PARAM_CHARS:,} characters; "
                         "copy the whole link again or remove that parameter")
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, kind):
        raise QcoreError(f"the link's {param}= parameter is not a recipe encoding (it was cut or changed); "
                         "copy the whole link again or remove that parameter")
    return value


def encode_kv_cache(spec: KVCacheSpec | None) -> str | None:
    """``"int8.per_token"`` (``".affine"`` appended when not symmetric); None for no KV-cache quantization."""
    if spec is None:
        return None
    return f"{spec.format}.{spec.granularity}" + ("" if spec.symmetric else ".affine")


def decode_kv_cache(text: str | None) -> KVCacheSpec | None:
    """Inverse of ``encode_kv_cache``; QcoreError (one line) when the text is not such an encoding."""
    if not text:
        return None
    parts = str(text)[:100].split(".")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "affine"):
        raise QcoreError(f"the link's {KV_PARAM}= parameter {str(text)[:40]!r} is not FORMAT.GRANULARITY (e.g. "
                         "int8.per_token); copy the whole link again or remove that parameter")
    return KVCacheSpec.from_dict({"format": parts[0], "granularity": parts[1], "symmetric": len(parts) == 2},
                                 f"the link's {KV_PARAM}=")


def build_recipe(w, preset_name: str, layers: dict, transforms: list | None = None,
                 kv_cache: KVCacheSpec | None = None) -> Recipe:
    """The preset with ``layers`` overrides applied (``transforms`` instead of the preset's, when given, and
    ``kv_cache``), validated against ``w``'s layers."""
    base = preset(preset_name, w.layer_shapes).to_dict()
    if transforms is not None:
        base["transforms"] = transforms
    recipe = Recipe.from_dict({**base, "name": f"{w.name}-{preset_name}" + ("-mixed" if layers else ""),
                               "layers": {**base["layers"], **layers}})
    recipe.resolve(w.layer_shapes)  # validates it against the model
    return recipe if kv_cache is None else replace(recipe, kv_cache=kv_cache)


def compact(w, recipe: Recipe, presets=tuple(PRESETS)) -> tuple[str, dict]:
    """``(preset, overrides)`` reproducing ``recipe`` on ``w``: of ``presets``, the one needing the
    shortest overrides."""
    best = None
    for name in presets:
        base = preset(name, w.layer_shapes)
        layers = {}
        for layer in w.layers:  # the plans as written (a group size as given): the link repeats the recipe
            entry = LayerOverride.to_reach(base.defaults, base.plan(layer), recipe.plan(layer))
            if entry is not None:
                layers[layer] = entry.to_json()
        rank = (base.transforms != recipe.transforms, len(json.dumps(layers)))  # a preset with the same transforms first
        if best is None or rank < best[0]:
            best = (rank, name, layers)
    return best[1:]


def recipe_hash(w, recipe: Recipe) -> str:
    """First 8 hex digits of the SHA-256 of ``recipe_id``: the same plans give the same hash under any
    name and any spelling of the recipe; two different recipes (almost surely) two hashes."""
    return hashlib.sha256(recipe_id(w, recipe).encode()).hexdigest()[:8]


def recipe_id(w, recipe: Recipe) -> str:
    """The recipe's canonical JSON: what it does to each of ``w``'s layers, ``{layer: {"weights",
    "activations"}}`` (spec dicts or null, as ``Recipe.resolve`` gives them: group sizes fitted), sorted keys,
    compact. A preset with overrides and the same plans spelled layer by layer (as the search writes them) are
    one recipe, and so are a group size and the one it resolves to; the name is not part of it. A KV-cache spec
    adds the key ``"(kv_cache)"`` (no module path has parentheses); a recipe with ``transforms`` has them appended
    (`` transforms=`` and their compact JSON); one without either reads as before."""
    plans = {n: {"weights": p.weights.to_dict() if p.weights else None,
                 "activations": p.activations.to_dict() if p.activations else None}
             for n, p in recipe.resolve(w.layer_shapes).items()}
    if recipe.kv_cache is not None:
        plans["(kv_cache)"] = recipe.kv_cache.to_dict()
    text = json.dumps(plans, sort_keys=True, separators=(",", ":"))
    if recipe.transforms:
        text += " transforms=" + json.dumps([t.to_json() for t in recipe.transforms], sort_keys=True, separators=(",", ":"))
    return text

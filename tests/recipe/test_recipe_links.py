"""Recipes stay compatible: recipe files and shareable links as the previous version wrote them load to the same
plans for every layer, ``compact`` still writes links that version reads, and random recipes round-trip through
JSON, links and the Mixed precision table to identical ``Recipe.resolve`` results."""

import json
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcore.errors import QcoreError
from qcore.model.simulate import LayerInfo
from qcore.numerics.formats import FORMATS
from qcore.recipe import PRESETS, Recipe
from qcore.recipe.links import build_recipe, compact, decode_layers, encode_layers, recipe_id
from qcore.recipe.table import apply_rows, table_rows

# fan-ins 9, 144, 96 (groups of 48 under 64), 97 (prime: groups of 1): every way a group size resolves
SHAPES = {"features.0": ("Conv2d", (16, 1, 3, 3)), "features.3": ("Conv2d", (32, 16, 3, 3)),
          "embed": ("Embedding", (50, 96)), "classifier.1": ("Linear", (96, 96)), "classifier.3": ("Linear", (10, 97))}
TOY = SimpleNamespace(name="toy", layers={n: LayerInfo(n, k, s, 0) for n, (k, s) in SHAPES.items()},
                      layer_shapes={n: s for n, (k, s) in SHAPES.items()})

# Written by the version before `Recipe.resolve` (commit c2efdf7): Recipe.to_json() (a recipe file), the link
# compact() made for it (preset + encode_layers) and recipe_id() (every layer's plan), on TOY's layers.
TODAYS = {
    'int8_static_mixed': {
        'json': '{\n  "name": "int8-static",\n  "weights": {\n    "format": "int8",\n    "granularity": "per_channel",\n    "axis": 0,\n    "symmetric": true,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "activations": {\n    "format": "int8",\n    "granularity": "per_tensor",\n    "axis": 0,\n    "symmetric": false,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "layers": {\n    "features.0": {\n      "weights": {\n        "format": "int4",\n        "granularity": "per_group",\n        "group_size": 3\n      }\n    },\n    "classifier.3": null,\n    "embed": {\n      "activations": null\n    }\n  }\n}',
        'preset': 'int8-static',
        'layers': 'eyJjbGFzc2lmaWVyLjMiOm51bGwsImVtYmVkIjp7ImFjdGl2YXRpb25zIjpudWxsfSwiZmVhdHVyZXMuMCI6eyJ3ZWlnaHRzIjp7ImZvcm1hdCI6ImludDQiLCJncmFudWxhcml0eSI6InBlcl9ncm91cCIsImdyb3VwX3NpemUiOjN9fX0',
        'plans': '{"classifier.1":{"activations":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":false,"symmetric":false},"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"classifier.3":{"activations":null,"weights":null},"embed":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"features.0":{"activations":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":false,"symmetric":false},"weights":{"axis":0,"dynamic":false,"format":"int4","granularity":"per_group","group_size":3,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"features.3":{"activations":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":false,"symmetric":false},"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}}}',
    },
    'int4_resolved_groups': {
        'json': '{\n  "name": "int4-weight-only",\n  "weights": {\n    "format": "int4",\n    "granularity": "per_group",\n    "axis": 0,\n    "group_size": 32,\n    "symmetric": false,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "activations": null,\n  "layers": {\n    "features.0": {\n      "weights": {\n        "group_size": 9\n      }\n    },\n    "features.3": {\n      "weights": {\n        "group_size": 24\n      }\n    },\n    "classifier.3": {\n      "weights": {\n        "group_size": 1\n      }\n    }\n  }\n}',
        'preset': 'int4-weight-only',
        'layers': 'e30',
        'plans': '{"classifier.1":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int4","granularity":"per_group","group_size":32,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":false}},"classifier.3":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int4","granularity":"per_group","group_size":1,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":false}},"embed":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int4","granularity":"per_group","group_size":32,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":false}},"features.0":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int4","granularity":"per_group","group_size":9,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":false}},"features.3":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int4","granularity":"per_group","group_size":24,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":false}}}',
    },
    'nf4_with_int8': {
        'json': '{\n  "name": "nf4",\n  "weights": {\n    "format": "nf4",\n    "granularity": "per_group",\n    "axis": 0,\n    "group_size": 64,\n    "symmetric": true,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "activations": null,\n  "layers": {\n    "features.0": {\n      "weights": {\n        "group_size": 9\n      }\n    },\n    "features.3": {\n      "weights": {\n        "group_size": 48\n      }\n    },\n    "embed": {\n      "weights": {\n        "group_size": 48\n      }\n    },\n    "classifier.1": {\n      "weights": {\n        "format": "int8",\n        "granularity": "per_channel"\n      }\n    },\n    "classifier.3": {\n      "weights": {\n        "group_size": 1\n      }\n    }\n  }\n}',
        'preset': 'nf4',
        'layers': 'eyJjbGFzc2lmaWVyLjEiOnsid2VpZ2h0cyI6eyJmb3JtYXQiOiJpbnQ4IiwiZ3JhbnVsYXJpdHkiOiJwZXJfY2hhbm5lbCJ9fX0',
        'plans': '{"classifier.1":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"classifier.3":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"nf4","granularity":"per_group","group_size":1,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"embed":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"nf4","granularity":"per_group","group_size":48,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"features.0":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"nf4","granularity":"per_group","group_size":9,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"features.3":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"nf4","granularity":"per_group","group_size":48,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}}}',
    },
    'fp8_scaled_mixed': {
        'json': '{\n  "name": "fp8",\n  "weights": {\n    "format": "fp8_e4m3",\n    "granularity": "per_channel",\n    "axis": 0,\n    "symmetric": true,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": true\n  },\n  "activations": {\n    "format": "fp8_e4m3",\n    "granularity": "per_tensor",\n    "axis": 0,\n    "symmetric": true,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": true,\n    "scaled": true\n  },\n  "layers": {\n    "features.3": {\n      "weights": {\n        "format": "fp8_e5m2"\n      },\n      "activations": null\n    },\n    "classifier.1": {\n      "weights": null\n    }\n  }\n}',
        'preset': 'fp8',
        'layers': 'eyJjbGFzc2lmaWVyLjEiOnsid2VpZ2h0cyI6bnVsbH0sImZlYXR1cmVzLjMiOnsiYWN0aXZhdGlvbnMiOm51bGwsIndlaWdodHMiOnsiZm9ybWF0IjoiZnA4X2U1bTIifX19',
        'plans': '{"classifier.1":{"activations":{"axis":0,"dynamic":true,"format":"fp8_e4m3","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true},"weights":null},"classifier.3":{"activations":{"axis":0,"dynamic":true,"format":"fp8_e4m3","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"fp8_e4m3","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true}},"embed":{"activations":{"axis":0,"dynamic":true,"format":"fp8_e4m3","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"fp8_e4m3","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true}},"features.0":{"activations":{"axis":0,"dynamic":true,"format":"fp8_e4m3","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"fp8_e4m3","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true}},"features.3":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"fp8_e5m2","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true}}}',
    },
    'weight_only_fp16': {
        'json': '{\n  "name": "wo",\n  "weights": {\n    "format": "int8",\n    "granularity": "per_channel",\n    "axis": 0,\n    "symmetric": true,\n    "range": "mse",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "activations": null,\n  "layers": {\n    "classifier.1": {\n      "weights": {\n        "format": "fp16"\n      }\n    },\n    "classifier.3": {\n      "activations": {\n        "format": "int8",\n        "symmetric": false,\n        "dynamic": true\n      }\n    },\n    "features.0": null\n  }\n}',
        'preset': 'int8-dynamic',
        'layers': 'eyJjbGFzc2lmaWVyLjEiOnsiYWN0aXZhdGlvbnMiOm51bGwsIndlaWdodHMiOnsiZm9ybWF0IjoiZnAxNiIsInJhbmdlIjoibXNlIn19LCJjbGFzc2lmaWVyLjMiOnsid2VpZ2h0cyI6eyJyYW5nZSI6Im1zZSJ9fSwiZW1iZWQiOnsiYWN0aXZhdGlvbnMiOm51bGwsIndlaWdodHMiOnsicmFuZ2UiOiJtc2UifX0sImZlYXR1cmVzLjAiOm51bGwsImZlYXR1cmVzLjMiOnsiYWN0aXZhdGlvbnMiOm51bGwsIndlaWdodHMiOnsicmFuZ2UiOiJtc2UifX19',
        'plans': '{"classifier.1":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"fp16","granularity":"per_channel","percentile":99.99,"range":"mse","scaled":false,"symmetric":true}},"classifier.3":{"activations":{"axis":0,"dynamic":true,"format":"int8","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":false,"symmetric":false},"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"mse","scaled":false,"symmetric":true}},"embed":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"mse","scaled":false,"symmetric":true}},"features.0":{"activations":null,"weights":null},"features.3":{"activations":null,"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"mse","scaled":false,"symmetric":true}}}',
    },
    'per_group_custom': {
        'json': '{\n  "name": "g",\n  "weights": {\n    "format": "int3",\n    "granularity": "per_group",\n    "axis": 0,\n    "group_size": 64,\n    "symmetric": false,\n    "range": "percentile",\n    "percentile": 99.9,\n    "dynamic": false,\n    "scaled": false\n  },\n  "activations": {\n    "format": "int16",\n    "granularity": "per_tensor",\n    "axis": 0,\n    "symmetric": true,\n    "range": "moving_average",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "layers": {\n    "classifier.3": {\n      "weights": {\n        "group_size": 16\n      }\n    },\n    "embed": {\n      "weights": {\n        "format": "nf4"\n      }\n    }\n  }\n}',
        'preset': 'fp16',
        'layers': 'eyJjbGFzc2lmaWVyLjEiOnsiYWN0aXZhdGlvbnMiOnsiZm9ybWF0IjoiaW50MTYiLCJyYW5nZSI6Im1vdmluZ19hdmVyYWdlIn0sIndlaWdodHMiOnsiZm9ybWF0IjoiaW50MyIsImdyYW51bGFyaXR5IjoicGVyX2dyb3VwIiwiZ3JvdXBfc2l6ZSI6NjQsInBlcmNlbnRpbGUiOjk5LjksInJhbmdlIjoicGVyY2VudGlsZSIsInN5bW1ldHJpYyI6ZmFsc2V9fSwiY2xhc3NpZmllci4zIjp7ImFjdGl2YXRpb25zIjp7ImZvcm1hdCI6ImludDE2IiwicmFuZ2UiOiJtb3ZpbmdfYXZlcmFnZSJ9LCJ3ZWlnaHRzIjp7ImZvcm1hdCI6ImludDMiLCJncmFudWxhcml0eSI6InBlcl9ncm91cCIsImdyb3VwX3NpemUiOjE2LCJwZXJjZW50aWxlIjo5OS45LCJyYW5nZSI6InBlcmNlbnRpbGUiLCJzeW1tZXRyaWMiOmZhbHNlfX0sImVtYmVkIjp7ImFjdGl2YXRpb25zIjp7ImZvcm1hdCI6ImludDE2IiwicmFuZ2UiOiJtb3ZpbmdfYXZlcmFnZSJ9LCJ3ZWlnaHRzIjp7ImZvcm1hdCI6Im5mNCIsImdyYW51bGFyaXR5IjoicGVyX2dyb3VwIiwiZ3JvdXBfc2l6ZSI6NjQsInBlcmNlbnRpbGUiOjk5LjksInJhbmdlIjoicGVyY2VudGlsZSJ9fSwiZmVhdHVyZXMuMCI6eyJhY3RpdmF0aW9ucyI6eyJmb3JtYXQiOiJpbnQxNiIsInJhbmdlIjoibW92aW5nX2F2ZXJhZ2UifSwid2VpZ2h0cyI6eyJmb3JtYXQiOiJpbnQzIiwiZ3JhbnVsYXJpdHkiOiJwZXJfZ3JvdXAiLCJncm91cF9zaXplIjo2NCwicGVyY2VudGlsZSI6OTkuOSwicmFuZ2UiOiJwZXJjZW50aWxlIiwic3ltbWV0cmljIjpmYWxzZX19LCJmZWF0dXJlcy4zIjp7ImFjdGl2YXRpb25zIjp7ImZvcm1hdCI6ImludDE2IiwicmFuZ2UiOiJtb3ZpbmdfYXZlcmFnZSJ9LCJ3ZWlnaHRzIjp7ImZvcm1hdCI6ImludDMiLCJncmFudWxhcml0eSI6InBlcl9ncm91cCIsImdyb3VwX3NpemUiOjY0LCJwZXJjZW50aWxlIjo5OS45LCJyYW5nZSI6InBlcmNlbnRpbGUiLCJzeW1tZXRyaWMiOmZhbHNlfX19',
        'plans': '{"classifier.1":{"activations":{"axis":0,"dynamic":false,"format":"int16","granularity":"per_tensor","percentile":99.99,"range":"moving_average","scaled":false,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"int3","granularity":"per_group","group_size":64,"percentile":99.9,"range":"percentile","scaled":false,"symmetric":false}},"classifier.3":{"activations":{"axis":0,"dynamic":false,"format":"int16","granularity":"per_tensor","percentile":99.99,"range":"moving_average","scaled":false,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"int3","granularity":"per_group","group_size":16,"percentile":99.9,"range":"percentile","scaled":false,"symmetric":false}},"embed":{"activations":{"axis":0,"dynamic":false,"format":"int16","granularity":"per_tensor","percentile":99.99,"range":"moving_average","scaled":false,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"nf4","granularity":"per_group","group_size":64,"percentile":99.9,"range":"percentile","scaled":false,"symmetric":true}},"features.0":{"activations":{"axis":0,"dynamic":false,"format":"int16","granularity":"per_tensor","percentile":99.99,"range":"moving_average","scaled":false,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"int3","granularity":"per_group","group_size":64,"percentile":99.9,"range":"percentile","scaled":false,"symmetric":false}},"features.3":{"activations":{"axis":0,"dynamic":false,"format":"int16","granularity":"per_tensor","percentile":99.99,"range":"moving_average","scaled":false,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"int3","granularity":"per_group","group_size":64,"percentile":99.9,"range":"percentile","scaled":false,"symmetric":false}}}',
    },
    'table_edit': {
        'json': '{\n  "name": "int8-static",\n  "weights": {\n    "format": "int8",\n    "granularity": "per_channel",\n    "axis": 0,\n    "symmetric": true,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "activations": {\n    "format": "int8",\n    "granularity": "per_tensor",\n    "axis": 0,\n    "symmetric": false,\n    "range": "minmax",\n    "percentile": 99.99,\n    "dynamic": false,\n    "scaled": false\n  },\n  "layers": {\n    "features.0": {\n      "weights": {\n        "format": "nf4",\n        "granularity": "per_group",\n        "axis": 0,\n        "group_size": 64,\n        "symmetric": true,\n        "range": "minmax",\n        "percentile": 99.99,\n        "dynamic": false,\n        "scaled": false\n      },\n      "activations": {\n        "format": "int8",\n        "granularity": "per_tensor",\n        "axis": 0,\n        "symmetric": false,\n        "range": "minmax",\n        "percentile": 99.99,\n        "dynamic": false,\n        "scaled": false\n      }\n    },\n    "embed": null,\n    "classifier.1": {\n      "weights": {\n        "format": "fp8_e4m3",\n        "granularity": "per_channel",\n        "axis": 0,\n        "symmetric": true,\n        "range": "minmax",\n        "percentile": 99.99,\n        "dynamic": false,\n        "scaled": true\n      },\n      "activations": {\n        "format": "fp8_e4m3",\n        "granularity": "per_tensor",\n        "axis": 0,\n        "symmetric": true,\n        "range": "minmax",\n        "percentile": 99.99,\n        "dynamic": true,\n        "scaled": true\n      }\n    }\n  }\n}',
        'preset': 'int8-static',
        'layers': 'eyJjbGFzc2lmaWVyLjEiOnsiYWN0aXZhdGlvbnMiOnsiZHluYW1pYyI6dHJ1ZSwiZm9ybWF0IjoiZnA4X2U0bTMiLCJzY2FsZWQiOnRydWUsInN5bW1ldHJpYyI6dHJ1ZX0sIndlaWdodHMiOnsiZm9ybWF0IjoiZnA4X2U0bTMiLCJzY2FsZWQiOnRydWV9fSwiZW1iZWQiOm51bGwsImZlYXR1cmVzLjAiOnsid2VpZ2h0cyI6eyJmb3JtYXQiOiJuZjQiLCJncmFudWxhcml0eSI6InBlcl9ncm91cCIsImdyb3VwX3NpemUiOjY0fX19',
        'plans': '{"classifier.1":{"activations":{"axis":0,"dynamic":true,"format":"fp8_e4m3","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true},"weights":{"axis":0,"dynamic":false,"format":"fp8_e4m3","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":true,"symmetric":true}},"classifier.3":{"activations":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":false,"symmetric":false},"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"embed":{"activations":null,"weights":null},"features.0":{"activations":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":false,"symmetric":false},"weights":{"axis":0,"dynamic":false,"format":"nf4","granularity":"per_group","group_size":64,"percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}},"features.3":{"activations":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_tensor","percentile":99.99,"range":"minmax","scaled":false,"symmetric":false},"weights":{"axis":0,"dynamic":false,"format":"int8","granularity":"per_channel","percentile":99.99,"range":"minmax","scaled":false,"symmetric":true}}}',
    },
}


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(at_most, n) + 1) if n % d == 0)


def fitted(plans: str) -> str:
    """``recipe_id`` JSON with each per_group weight's group size fitted to its layer's fan-in (the largest
    divisor not above it), as the simulation has always used it."""
    d = json.loads(plans)
    for name, plan in d.items():
        w = plan["weights"]
        if w is not None and w["granularity"] == "per_group":
            fan_in = 1
            for n in TOY.layer_shapes[name][1:]:
                fan_in *= n
            w["group_size"] = largest_divisor(fan_in, w["group_size"])
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def todays_plan(recipe: dict, layer: str) -> dict:
    """The previous version's reading of a recipe dict for one layer, written out independently: ``{"weights",
    "activations"}`` as spec dicts (every field, group_size only for per_group) or None. A layer entry overrides
    the defaults key by key; a changed format drops the inherited keys it cannot take (symmetric unless int,
    scaled unless float); nf4 defaults to per_group 64."""
    defaults = {"format": "int8", "granularity": "per_tensor", "axis": 0, "group_size": 128, "symmetric": True,
                "range": "minmax", "percentile": 99.99, "dynamic": False, "scaled": False}

    def full(d):
        if d is None:
            return None
        d = {**({"granularity": "per_group", "group_size": 64} if d.get("format") == "nf4" else {}), **d}
        d = {**defaults, **d}
        if d["granularity"] != "per_group":
            del d["group_size"]
        return d

    layers = recipe.get("layers") or {}
    if layer not in layers:
        return {part: full(recipe.get(part)) for part in ("weights", "activations")}
    if layers[layer] is None:
        return {"weights": None, "activations": None}
    out = {}
    for part in ("weights", "activations"):
        over, base = layers[layer].get(part, "inherit"), full(recipe.get(part))
        if over == "inherit":
            out[part] = base
        elif over is None:
            out[part] = None
        else:
            base = dict(base or {})
            if "format" in over and over["format"] != base.get("format"):
                base.pop("format", None)
                if not over["format"].startswith("int"):
                    base.pop("symmetric", None)
                if not over["format"].startswith(("fp8", "fp16", "bf16")):
                    base.pop("scaled", None)
            out[part] = full({**base, **over})
    return out


def todays_link_plans(preset_name: str, layers: dict) -> str:
    """What the previous version made of a link: the preset (its resolved group sizes as overrides) plus the
    link's overrides, every layer's plan as ``recipe_id`` JSON."""
    base = {"name": preset_name, **PRESETS[preset_name]}
    resolved = {}
    w = base["weights"]
    if w is not None and w.get("granularity", "per_group" if w.get("format") == "nf4" else "") == "per_group":
        size = w.get("group_size", 64 if w["format"] == "nf4" else 128)
        for name, shape in TOY.layer_shapes.items():
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            if (g := largest_divisor(fan_in, size)) != size:
                resolved[name] = {"weights": {"group_size": g}}
    recipe = {**base, "layers": {**resolved, **layers}}
    return json.dumps({n: todays_plan(recipe, n) for n in TOY.layers}, sort_keys=True, separators=(",", ":"))


def plans_of(recipe: Recipe) -> str:
    """Every layer's plan under ``Recipe.resolve``, as ``recipe_id`` JSON."""
    plans = recipe.resolve(TOY.layer_shapes)
    return json.dumps({n: {part: spec.to_dict() if spec else None for part, spec in
                           (("weights", p.weights), ("activations", p.activations))} for n, p in plans.items()},
                      sort_keys=True, separators=(",", ":"))


def test_todays_recipe_files_load_to_the_same_plans_and_write_the_same_text():
    for name, case in TODAYS.items():
        recipe = Recipe.from_json(case["json"])
        assert plans_of(recipe) == fitted(case["plans"]), name
        assert recipe_id(TOY, recipe) == fitted(case["plans"]), name
        assert recipe.to_json() == case["json"], name


def test_todays_links_decode_to_the_same_plans():
    for name, case in TODAYS.items():
        recipe = build_recipe(TOY, case["preset"], decode_layers(case["layers"]))
        assert plans_of(recipe) == fitted(case["plans"]), name


def test_compact_writes_the_links_today_wrote_and_today_reads():
    for name, case in TODAYS.items():
        preset_name, layers = compact(TOY, Recipe.from_json(case["json"]))
        assert (preset_name, encode_layers(layers)) == (case["preset"], case["layers"]), name
        assert fitted(todays_link_plans(preset_name, layers)) == fitted(case["plans"]), name


def test_the_oracle_reads_todays_files():
    """``todays_plan`` (the test's own reading of the rules) agrees with the stored plans, so it is fit to judge
    links that ``compact`` writes for random recipes below."""
    for name, case in TODAYS.items():
        d = json.loads(case["json"])
        assert json.dumps({n: todays_plan(d, n) for n in TOY.layers}, sort_keys=True,
                          separators=(",", ":")) == case["plans"], name


# ---- random recipes, drawn from the format registry by the formats' own traits ------------------------------
def spec_of(fmt_names, activation: bool, partial: bool):
    """A spec dict for one of ``fmt_names``; ``partial`` leaves out keys at random (an override's)."""
    from qcore.numerics.ranges import ACTIVATION_ONLY_METHODS, RANGE_METHODS

    @st.composite
    def draw(d):
        name = d(st.sampled_from(fmt_names))
        fmt = FORMATS[name]
        spec = {"format": name, "range": d(st.sampled_from(list(RANGE_METHODS) + (list(ACTIVATION_ONLY_METHODS)
                                                                                   if activation else [])))}
        if not activation:
            spec["granularity"] = d(st.sampled_from(["per_tensor", "per_channel", "per_group"]))
            if spec["granularity"] == "per_group":
                spec["group_size"] = d(st.sampled_from([8, 16, 32, 64, 128]))
        else:
            spec["dynamic"] = d(st.booleans())
        if fmt.can_be_affine:
            spec["symmetric"] = d(st.booleans())
        if fmt.can_be_scaled:
            spec["scaled"] = d(st.booleans())
        if spec["range"] == "percentile":
            spec["percentile"] = d(st.sampled_from([99.0, 99.9, 100.0]))
        if partial:
            keep = d(st.sets(st.sampled_from(sorted(spec))))
            spec = {k: v for k, v in spec.items() if k in keep or k == "format" and d(st.booleans())}
        return spec
    return draw()


WEIGHT_FORMATS = list(FORMATS)
ACTIVATION_FORMATS = [n for n, f in FORMATS.items() if f.for_activations]
entries = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "weights": st.one_of(st.none(), spec_of(WEIGHT_FORMATS, False, True)),
    "activations": st.one_of(st.none(), spec_of(ACTIVATION_FORMATS, True, True))}))
recipe_dicts = st.fixed_dictionaries({
    "name": st.just("random"), "weights": st.one_of(st.none(), spec_of(WEIGHT_FORMATS, False, False)),
    "activations": st.one_of(st.none(), spec_of(ACTIVATION_FORMATS, True, False)),
    "layers": st.dictionaries(st.sampled_from(list(TOY.layers)), entries, max_size=4)})


def valid(d: dict) -> Recipe | None:
    from qcore.errors import QcoreError

    try:
        return Recipe.from_dict(d)
    except QcoreError:  # e.g. a partial override keeping symmetric=False onto a float default
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(d=recipe_dicts)
def test_random_recipes_round_trip_through_json_links_and_the_table(d):
    recipe = valid(d)
    if recipe is None:
        return
    plans = recipe.resolve(TOY.layer_shapes)
    expected = fitted(json.dumps({n: todays_plan(d, n) for n in TOY.layers}, sort_keys=True, separators=(",", ":")))
    assert plans_of(recipe) == expected  # resolve agrees with the independent reading of the rules
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe and hash(again) == hash(recipe) and again.resolve(TOY.layer_shapes) == plans
    preset_name, layers = compact(TOY, recipe)
    assert build_recipe(TOY, preset_name, decode_layers(encode_layers(layers))).resolve(TOY.layer_shapes) == plans
    assert fitted(todays_link_plans(preset_name, layers)) == expected  # the previous version reads the link
    assert apply_rows(TOY, recipe, table_rows(TOY, recipe)).resolve(TOY.layer_shapes) == plans


def test_a_recipe_is_a_cache_key_and_equal_means_same_json():
    import functools
    import pickle

    d = json.loads(TODAYS["int8_static_mixed"]["json"])
    r = Recipe.from_dict(d)
    shuffled = Recipe.from_dict({**d, "layers": dict(reversed(list(d["layers"].items())))})
    assert r == shuffled and hash(r) == hash(shuffled)  # same JSON objects, keys in another order
    assert {r: 1}[shuffled] == 1
    assert pickle.loads(pickle.dumps(r)) == r  # st.cache_data hashes and stores pickles
    assert r.with_layer("features.3", None) != r and r.with_layer("features.3", None) == r.with_layer("features.3", None)
    assert Recipe.from_dict({**d, "name": "other"}) != r  # the name is part of the JSON
    calls = []

    @functools.lru_cache
    def size_of(recipe: Recipe) -> int:
        calls.append(recipe)
        return len(recipe.to_json())

    assert size_of(r) == size_of(shuffled) == size_of(Recipe.from_json(r.to_json())) and len(calls) == 1
    assert r.to_json() == TODAYS["int8_static_mixed"]["json"]  # equality does not reorder what is written


def test_a_layer_switching_format_drops_what_the_new_format_cannot_take():
    """Every pair of registry formats: a default using all its options (affine, scaled) and a layer entry naming
    only another format is valid, and resolves as the independent reading says."""
    for a, fa in FORMATS.items():
        default = {"format": a, "granularity": "per_channel", **({"symmetric": False} if fa.can_be_affine else {}),
                   **({"scaled": True} if fa.can_be_scaled else {})}
        for b in FORMATS:
            d = {"name": "switch", "weights": default, "activations": None,
                 "layers": {"classifier.1": {"weights": {"format": b}}}}
            expected = fitted(json.dumps({n: todays_plan(d, n) for n in TOY.layers}, sort_keys=True, separators=(",", ":")))
            assert plans_of(Recipe.from_dict(d)) == expected, (a, b)



@pytest.mark.parametrize("text", ["%%%", "abc", "W10", "bnVsbA", "x" * 200_001])
def test_a_broken_layers_parameter_is_one_plain_line(text):
    """A cut, edited or non-object ``layers=`` value ("W10" is ``[]``, "bnVsbA" is ``null``): one line that says
    what to do, without the decoder's own words (e.g. "Incorrect padding", "Expecting value")."""
    with pytest.raises(QcoreError) as err:
        decode_layers(text)
    msg = str(err.value)
    assert "\n" not in msg and "layers= parameter" in msg and "copy the whole link again" in msg
    assert not any(w in msg for w in ("padding", "Expecting", "codec", "char ", "Error"))
    assert decode_layers("e30") == {}  # the encoding of {}: valid and empty

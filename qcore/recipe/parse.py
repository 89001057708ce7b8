"""Recipe JSON text -> plain Python values, bounded: a recipe is untrusted when uploaded."""

from __future__ import annotations

import json
import math

from qcore.errors import QcoreError

# Bounds on a recipe (untrusted when uploaded). A real recipe is a few KiB, four levels deep
# (recipe -> layers -> layer -> weights -> values), with small integers.
MAX_RECIPE_BYTES = 2**20  # 1 MiB: the most read from a recipe file or accepted as recipe text
MAX_DEPTH = 8  # nesting of JSON objects/arrays
MAX_INT_DIGITS = 12  # digits of any integer in the JSON text
MAX_NAME_CHARS = 1000  # recipe name and layer names
MAX_LAYERS = 100_000  # per-layer overrides


def parse_json(text: str | bytes):
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

"""A recipe as the Mixed precision page's table: one editable row per quantizable layer, and back.

``table_rows(w, recipe)`` gives the rows; ``apply_rows(w, recipe, rows)`` the recipe the edited rows
say. Column names and the choice lists of the ``weights`` / ``inputs`` columns are defined here.
"""

from __future__ import annotations

from qcore.numerics.formats import FORMATS, choices
from qcore.numerics.spec import TensorSpec
from qcore.recipe import FLOAT, LayerOverride, LayerPlan, Recipe

WEIGHT_CHOICES = choices("weights")
# "float", then each format's input choices in the order their positions say ("<format> static|dynamic", "<format>")
INPUT_CHOICES = ["float"] + [label for _, label in sorted(
    (dict(FORMATS[name].menus)[menu], f"{name} {menu.removeprefix('inputs ')}".removesuffix(" cast"))
    for menu in ("inputs static", "inputs dynamic", "inputs cast") for name in choices(menu))]
NEW_WEIGHTS = TensorSpec(format="int8", granularity="per_channel")  # options a float layer's row starts from


def input_label(spec: TensorSpec | None) -> str:
    """How the table names an input spec: "float", "fp16" (a plain cast) or "<format> static|dynamic"."""
    if spec is None:
        return "float"
    if spec.fmt.can_be_scaled and not spec.scaled:
        return spec.format
    return f"{spec.format} {'dynamic' if spec.dynamic else 'static'}"


def input_spec(label: str, old: TensorSpec | None) -> TensorSpec | None:
    """Inverse of ``input_label``: ``old`` when it has that label, else the usual spec for it."""
    if label == input_label(old):
        return old
    if label == "float":
        return None
    fmt, _, how = label.partition(" ")
    if not how:
        return TensorSpec.from_dict({"format": fmt}, "inputs", True)
    extra = {"symmetric": False} if FORMATS[fmt].can_be_affine else {"scaled": True}
    return TensorSpec.from_dict({"format": fmt, "range": "minmax", "dynamic": how == "dynamic", **extra}, "inputs", True)


FLOAT_LAYER = "keep in float"  # the table's column: weights AND inputs stay float (the layer is not quantized)
WEIGHTS_HELP = ("the weight's format. fp32 keeps only the weights in float: the input is still quantized as the "
                f"inputs column says. Tick \"{FLOAT_LAYER}\" to keep the whole layer (weights and inputs) in float.")


def weight_choice_label(choice: str) -> str:
    return "fp32 (float weights only)" if choice == "fp32" else choice


def drop_text(name: str, estimate: dict | None) -> str:
    """The table's "drop (estimate)" cell: the layer's swept drop, "not swept", or "" without an estimate."""
    if estimate is None:
        return ""
    return f"{estimate['drops'][name]:+.4f}" if name in estimate["drops"] else "not swept"


def table_rows(w, recipe: Recipe, estimate: dict | None = None) -> list[dict]:
    """One editable row per quantizable layer; ``estimate`` is ``search.estimate_metric``'s (drops, missing)."""
    from qcore.model.size import weight_bytes

    rows, plans = [], recipe.resolve(w.layer_shapes)
    for name, info in w.layers.items():
        plan = plans[name]
        spec = plan.weights or NEW_WEIGHTS
        rows.append({"layer": name, "type": info.kind, "weight shape": "×".join(map(str, info.weight_shape)),
                     FLOAT_LAYER: plan.is_float, "weights": plan.weights.format if plan.weights else "fp32", "granularity": spec.granularity,
                     "group size": spec.group_size, "symmetric": spec.symmetric, "range": spec.range,
                     "inputs": input_label(plan.activations) if info.kind != "Embedding" else "float",
                     "size (bytes)": weight_bytes(info.weight_shape, plan.weights)["total"],
                     "drop (estimate)": drop_text(name, estimate)})
    return rows


def apply_rows(w, recipe: Recipe, rows: list[dict]) -> Recipe:
    """``recipe`` with every layer set to what its (possibly edited) table row says. Ticking "keep in float"
    makes the layer float; unticking it (weights and inputs untouched) gives it int8 per-channel weights."""
    plans = recipe.resolve(w.layer_shapes)
    for row in rows:
        layer = row["layer"]
        plan = plans[layer]
        ticked = bool(row.get(FLOAT_LAYER, plan.is_float))
        if ticked and not plan.is_float:
            recipe = recipe.with_layer(layer, FLOAT)
            continue
        if not ticked and plan.is_float and row["weights"] == "fp32" and row["inputs"] == "float":
            row = {**row, "weights": NEW_WEIGHTS.format}
        weights = plan.weights if plan.weights and not plan.weights.fmt.quantizes else None  # fp32 = float weights
        if row["weights"] != "fp32":
            old = plan.weights or NEW_WEIGHTS
            d = {**old.to_dict(), "format": row["weights"], "granularity": row["granularity"],
                 "group_size": int(row["group size"]), "symmetric": bool(row["symmetric"]), "range": row["range"]}
            fmt = TensorSpec.from_dict({"format": row["weights"]}).fmt
            if not fmt.can_be_affine:
                d["symmetric"] = True
            if not fmt.can_be_scaled:
                d["scaled"] = False
            elif row["weights"] != old.format:
                d["scaled"] = fmt.scaled_by_default
            if old.format != row["weights"]:
                d |= dict(fmt.spec_defaults)  # NF4 is defined per block of 64
            weights = TensorSpec.from_dict(d, f"layer {layer} weights")
        inputs = input_spec(row["inputs"], plan.activations) if w.layers[layer].kind != "Embedding" else plan.activations
        target = LayerPlan(weights, inputs)
        if target != plan:
            recipe = recipe.with_layer(layer, LayerOverride.of(target))
    return recipe

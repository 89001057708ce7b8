"""A quantized model as one safetensors file: what the simulation holds, loadable back.

``export_safetensors`` writes, for every quantized layer, its codes as its format stores them
(``Format.store``: integers bit-packed below 8 bits, most significant bit first; NF4 as 4-bit codebook
indices; int16 as int16; float formats in their own dtype), float32 scales, zero-points (int8, or int16 above 8 bits), static input ranges and SmoothQuant's 1/s of a layer smoothed by a
Mul (``<layer>.input.smooth``), plus every
other tensor of the BatchNorm-folded model, with the recipe JSON in the metadata. ``load_safetensors``
rebuilds the identical simulated model (same codes, scales and ranges, so the same outputs).
No pickle anywhere: the file is plain tensors and string metadata.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from qcore.errors import QcoreError
from qcore.recipe import Recipe
from qcore.model.simulate import InputQuantizer, input_quantizer, modules_by_name
from qcore.model.input_scale import InputScale, input_scales

FORMAT_VERSION = "1"


def export_safetensors(workload, recipe: Recipe, out: str) -> dict:
    """Write codes, scales, zero-points and static input ranges of every quantized layer plus every
    other tensor of the (BatchNorm-folded) model, with the recipe in the metadata."""
    from safetensors.torch import save_file

    from qcore.export.onnx.float_graph import source_model

    plans = recipe.resolve(workload.layer_shapes)
    model = source_model(workload, recipe)  # SmoothQuant/AWQ/CLE scales folded in
    sim = workload.simulate(recipe)
    tensors, skip = {}, set()
    for name, mod in modules_by_name(model, workload.layers).items():
        spec = plans[name].weights
        if spec is None or spec.format == "fp32":
            continue
        q = sim.weights[name]  # the codes the simulation applied (nearest, GPTQ or AdaRound)
        tensors[f"{name}.weight.codes"] = spec.fmt.store(q.codes)
        if q.scale is not None:
            tensors[f"{name}.weight.scale"] = q.scale.contiguous()
        if q.zero_point is not None:
            tensors[f"{name}.weight.zero_point"] = q.zero_point.to(torch.int16 if spec.fmt.bits > 8 else torch.int8)
        skip.add(f"{name}.weight")
    for name, inv in input_scales(model).items():  # SmoothQuant's Mul before a layer no fold reaches
        tensors[f"{name}.input.smooth"] = inv.contiguous()
    for name, mod in modules_by_name(sim.model, workload.layers).items():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, InputQuantizer) and hook.lo is not None and not hook.spec.dynamic:
                tensors[f"{name}.input.range"] = torch.tensor([hook.lo, hook.hi], dtype=torch.float32)
    seen = set()
    for key, t in sim.model.state_dict(keep_vars=False).items():  # float tensors as simulated (corrected biases)
        if key in skip or (t.data_ptr(), t.numel()) in seen:  # shared tensors once
            continue
        seen.add((t.data_ptr(), t.numel()))
        tensors[key] = t.detach().contiguous()
    meta = {"qcore_format_version": FORMAT_VERSION, "qcore_model": workload.name, "qcore_recipe": recipe.to_json(),
            "qcore_folded": json.dumps(workload.folded[1]),
            "qcore_weight_shapes": json.dumps({n: list(s) for n, s in workload.layer_shapes.items()})}
    save_file(tensors, out, metadata=meta)
    return {"unsupported": []}


def load_safetensors(path: str, workload=None):
    """``(recipe, simulated model)`` from a file written by ``export(..., "safetensors", ...)``.

    ``workload`` gives the architecture; when omitted, the zoo model named in the file is used. The
    model's outputs equal the simulated model's exactly (same codes, scales and ranges)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from qcore.limits import MAX_UPLOAD_BYTES
    from qcore.numerics.quantize import QuantizedTensor

    p = Path(path)
    if not p.is_file():
        raise QcoreError(f"{path} does not exist; give the .safetensors file written by `python -m qcore export`")
    if p.stat().st_size > MAX_UPLOAD_BYTES:
        raise QcoreError(f"{path} is larger than the upload limit ({MAX_UPLOAD_BYTES / 2**20:.0f} MiB)")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except Exception as e:  # a corrupt or foreign file: safetensors raises its own types
        raise QcoreError(f"{path} is not a readable safetensors file ({type(e).__name__}); re-export it") from None
    if meta.get("qcore_format_version") != FORMAT_VERSION or "qcore_recipe" not in meta:
        raise QcoreError(f"{path} was not written by `python -m qcore export --format safetensors` (no qcore metadata)")
    recipe = Recipe.from_json(meta["qcore_recipe"])
    if workload is None:
        from qcore.zoo import ZOO, load

        if meta.get("qcore_model") not in ZOO:
            raise QcoreError(f"{path} holds model {meta.get('qcore_model')!r}, not a zoo model; load it with its workload")
        workload = load(meta["qcore_model"])
    if json.loads(meta.get("qcore_weight_shapes", "{}")) != {n: list(s) for n, s in workload.layer_shapes.items()}:
        raise QcoreError(f"{path} was exported from a different model than {workload.name!r} (layer shapes differ)")
    model = copy.deepcopy(workload.folded[0]).eval()
    state = {k: v for k, v in tensors.items() if not any(k.endswith(s) for s in (".codes", ".scale", ".zero_point", ".input.range",
                                                                                  ".input.smooth"))}
    modules, plans = modules_by_name(model, workload.layers), recipe.resolve(workload.layer_shapes)
    for name, mod in modules.items():
        plan = plans[name]
        spec = plan.weights
        if spec is not None and spec.format != "fp32":
            shape = tuple(mod.weight.shape)
            zp = tensors.get(f"{name}.weight.zero_point")
            q = QuantizedTensor(spec.fmt.load(tensors[f"{name}.weight.codes"], shape),
                                tensors.get(f"{name}.weight.scale"), None if zp is None else zp.to(torch.float32),
                                None, None, spec)
            state[f"{name}.weight"] = q.dequantize()
        if f"{name}.input.smooth" in tensors:  # the input times 1/s, before it is quantized
            mod.register_forward_pre_hook(InputScale(tensors[f"{name}.input.smooth"]))
        rng = tensors.get(f"{name}.input.range")
        hook = input_quantizer(name, workload.layers[name].kind, plan.activations, None if rng is not None else {})
        if rng is not None:
            hook = InputQuantizer(name, plan.activations, float(rng[0]), float(rng[1]))
        if hook is not None:
            mod.register_forward_pre_hook(hook)
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise QcoreError(f"{path} lacks tensors {sorted(missing)[:3]}...; re-export it")
    return recipe, model

"""The product of QAT: a ``Workload`` whose model holds the fine-tuned weights, and its files.

``finetuned_workload(base, model)`` wraps a fine-tuned copy of ``base.folded[0]`` (BatchNorms already
folded into the convolutions, which is what QAT trained) as a Workload with ``base``'s calibration and
evaluation data and task, and its own ``content_hash`` (``base``'s plus the fine-tuned tensors). Its
metrics compare with ``base``'s FP32 outputs (``reference_outputs`` is ``base``'s), so "agreement" and
"cosine_to_fp32" still mean "with the original FP32 model". Everything that takes a Workload --
``evaluate``, sensitivity, Trade-offs, ONNX and safetensors export -- takes it unchanged; its static
activation ranges come, as for any workload, from calibrating *its* weights on the calibration data.

Its FP32 size is that of the folded model (the BatchNorm parameters are inside the convolutions).

Files (``save``): ``weights.safetensors`` (the fine-tuned folded state dict, float32; metadata: the base
model's name and content hash, the recipe JSON) and ``recipe.json``. ``load_finetuned(base, path)``
rebuilds the same Workload from them: ``evaluate MODEL --weights DIR/weights.safetensors`` reproduces the
QAT metric exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.model.workload import Workload, content_hash
from qcore.recipe import Recipe

WEIGHTS_FILE, RECIPE_FILE = "weights.safetensors", "recipe.json"


def finetuned_workload(base: Workload, model: nn.Module) -> Workload:
    """``model`` (a fine-tuned copy of ``base.folded[0]``) as a Workload of its own (see the module docstring)."""
    state = model.state_dict()
    w = Workload(
        name=f"{base.name}+qat", model=model.eval(), calibration=base.calibration, evaluation=base.evaluation,
        task=base.task, description=f"{base.name} fine-tuned with quantization-aware training. {base.description}",
        source=base.source, notes=list(base.notes), batch_size=base.batch_size,
        content_hash=content_hash("qat", base.content_hash, [[k, state[k]] for k in sorted(state)]))
    w.__dict__["reference_outputs"] = base.reference_outputs  # the cached_property's slot: compare with base's FP32
    return w


def save(workload: Workload, base: Workload, recipe: Recipe, out_dir: str | Path) -> dict[str, str]:
    """Write ``workload``'s fine-tuned weights and ``recipe`` into ``out_dir`` (created). Returns the paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in workload.model.state_dict().items()}
        meta = {"format": "qcore-qat", "base_model": base.name, "base_content_hash": base.content_hash,
                "recipe": json.dumps(recipe.to_dict())}
        save_file(state, out / WEIGHTS_FILE, metadata=meta)
        (out / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2))
    except OSError as e:
        raise QcoreError(f"--out {str(out_dir)[:200]!r} cannot be written ({e.strerror}); choose another directory") from None
    return {"weights": str(out / WEIGHTS_FILE), "recipe": str(out / RECIPE_FILE)}


def load_finetuned(base: Workload, path: str | Path) -> Workload:
    """The fine-tuned Workload saved at ``path`` (a weights.safetensors, or the directory holding one) for ``base``."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- a safe_open handle, not a dict
    except (OSError, FileNotFoundError) as e:
        raise QcoreError(f"--weights {str(path)[:200]!r} cannot be read ({getattr(e, 'strerror', None) or e}); "
                         f"give the {WEIGHTS_FILE} that `qat --out DIR` wrote") from None
    except SafetensorError as e:  # a damaged or foreign header
        raise QcoreError(f"--weights {str(path)[:200]!r} is not a readable safetensors file ({str(e)[:100]})") from None
    if meta.get("format") != "qcore-qat":
        raise QcoreError(f"{str(p)[:200]!r} was not written by `qat`; give the {WEIGHTS_FILE} of a `qat --out DIR` run")
    if meta.get("base_content_hash") != base.content_hash:
        raise QcoreError(f"these weights were fine-tuned from {meta.get('base_model')!r} with other weights or data, "
                         f"not from this {base.name!r}; give the model (and --data) the QAT run used")
    model = copy.deepcopy(base.folded[0])
    try:
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as e:
        raise QcoreError(f"the weights do not fit {base.name!r}'s layers ({str(e).splitlines()[0][:150]})") from None
    return finetuned_workload(base, model)

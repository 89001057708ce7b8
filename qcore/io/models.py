"""Model files -> ``LoadedModel``: the extension says the format, the content must agree.

Models (the extension says the format, the content must agree):

- ``.pt2``  ``torch.export.save`` program -> ``pt2.load_pt2_file``: a module tree with the original module
  paths (``features.0``), so recipes name layers as in the source model and weights, static/dynamic
  activations, per-layer recipes and BatchNorm folding all work as for the source ``nn.Module``.
- ``.onnx`` -> ``onnx.convert.convert`` (Gemm/MatMul -> Linear, Conv -> Conv1d/2d, Gather -> Embedding);
  weights exported to a separate ``model.onnx.data`` are read when that file sits beside the model.
- ``.pt`` / ``.pth`` / ``.ts``: a state dict of a zoo architecture, or a TorchScript archive.
- ``.safetensors``: a state dict of a zoo architecture (digits-mlp, digits-cnn), found by key and shape.

Uploaded files are untrusted, and nothing loaded may run: ``.pt`` files load with ``weights_only=True``;
torch only ever sees a ``.pt2`` archive's checked copy (``pt2.sanitized_copy``); every file is bounded
by ``MAX_UPLOAD_BYTES`` (env ``QCORE_MAX_UPLOAD_MB``, default 200 MiB). Two kinds of file are code, and
are refused unless ``allow_pickle=True`` (CLI ``--trust-pickle`` or env ``QCORE_TRUST_PICKLE=1``, which
runs code from the file -- only for files you trust; the app never sets it):

- a TorchScript archive (``torch.jit.save``) is compiled code: ``torch.jit.load`` runs its
  ``__setstate__`` and the model runs its ``forward``, either of which may call any TorchScript op
  (``torch.from_file`` writes files). Trusted, it loads for weights and weight-only recipes (input
  hooks never fire inside TorchScript);
- a pickled whole model (``torch.save(model)``) runs code when unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore import limits
from qcore.limits import checked_file, checked_torch_file, first_line, reading, sniff, zip_members

MODEL_EXTENSIONS = (".pt2", ".onnx", ".pt", ".pth", ".ts", ".safetensors")
EXPORT_HINT = ("export the model instead: ep = torch.export.export(model, (example_input,)); "
               "torch.export.save(ep, 'model.pt2')")


@dataclass(frozen=True)
class InputSpec:
    """One model input, per sample (no batch dim): its example shape, which dims may vary, dtype, and for
    integer inputs the range synthetic values are drawn from (e.g. token ids below the vocabulary size)."""

    sample_shape: tuple[int, ...]
    dynamic: frozenset[int] = frozenset()
    dtype: torch.dtype = torch.float32
    int_range: tuple[int, int] = (0, 1)
    first_dim: int | None = None  # the size the file declares at axis 0, taken as the batch (None: symbolic or unknown)

    def along(self, axis: int) -> "InputSpec":
        """This input's spec when its batch is on ``axis``, not 0 (``Data.batch_axes``): the declared axis 0 is
        then a per-sample dimension (dynamic if symbolic) and ``axis`` the batch."""
        if axis == 0:
            return self
        full = (self.first_dim or 1, *self.sample_shape)
        dynamic = {j + 1 for j in self.dynamic} | ({0} if self.first_dim is None else set())
        return replace(self, sample_shape=full[:axis] + full[axis + 1:],
                       dynamic=frozenset(j - (j > axis) for j in dynamic if j != axis),
                       first_dim=None if axis in dynamic else full[axis])


@dataclass
class LoadedModel:
    """A model file turned into an ``nn.Module`` plus what is known about its inputs (None: unknown)."""

    model: nn.Module
    format: str
    inputs: list[InputSpec] | None
    example_batch: int = 1
    notes: list[str] = field(default_factory=list)
    weight_only: bool = False  # input hooks cannot run (TorchScript): weight quantization only
    task_kind: str | None = None  # "classification" | "embedding" when known (zoo models)
    output_activations: tuple[str | None, ...] = ()  # per output: "sigmoid" | "softmax" when it ends in one, else None
    input_names: tuple[str, ...] | None = None  # the graph's input names, in order (matched by name in .npz data)

    @property
    def final_activation(self) -> str | None:
        """How the first output (the one scored) ends: "sigmoid" | "softmax" | None."""
        return self.output_activations[0] if self.output_activations else None



def _load_torchscript(p: Path, allow_pickle: bool) -> LoadedModel:
    if not allow_pickle:
        raise QcoreError(f"{p.name} is a TorchScript archive: compiled code that would run when loaded, so it is "
                         "refused. Export the model instead: torch.export.save(torch.export.export(model, (x,)), "
                         "'model.pt2') or torch.onnx.export(model, (x,), 'model.onnx') -- or, for a file you trust, "
                         "start the CLI with --trust-pickle (env QCORE_TRUST_PICKLE=1), which runs code from the file")
    with reading(p.name, "the TorchScript archive is truncated or corrupted; save it again with torch.jit.save"):
        model = torch.jit.load(str(p), map_location="cpu")
    return LoadedModel(model.eval(), "torchscript", None, notes=[
        "TorchScript model: weight quantization only; activation quantization (static or dynamic) is unavailable "
        "because TorchScript runs compiled code that input hooks cannot reach; export with torch.export.save (.pt2) "
        "for full support"], weight_only=True)


def _zoo_architecture(state: dict, source: str) -> LoadedModel:
    """The zoo architecture whose parameters match ``state`` (keys and shapes), loaded with it."""
    from qcore.zoo.digits import ARCHITECTURES

    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise QcoreError(f"{source} is not a state dict (name -> tensor); save one with "
                         "safetensors.torch.save_file(model.state_dict(), path), or " + EXPORT_HINT)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name, cls in ARCHITECTURES.items():
        model = cls()
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        if expected == {k: tuple(v.shape) for k, v in state.items()}:
            model.load_state_dict(state, strict=False)
            if not all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v)):
                raise QcoreError(f"{source} contains NaN or Inf weights; check the training run that produced it")
            return LoadedModel(model.eval(), f"state dict ({name})", [InputSpec((1, 8, 8))],
                               task_kind="classification", notes=[f"weights loaded into the {name} architecture"])
    shapes = "; ".join(f"{n}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(c().state_dict().items())[:3]) + ", ..."
                       for n, c in ARCHITECTURES.items())
    raise QcoreError(f"{source}: its keys and shapes match none of the architectures a state dict can be loaded into "
                     f"({shapes}); for any other model, " + EXPORT_HINT)


def _load_torch_file(p: Path, allow_pickle: bool, limit: int) -> LoadedModel:
    kind = sniff(p)
    if kind == "zip":
        names = zip_members(p, limit)
        if any(n.endswith("/archive_format") for n in names):
            raise QcoreError(f"{p.name} is a torch.export program; give it the .pt2 extension")
        inside = [n.split("/", 1)[-1] for n in names]  # paths below the archive's root folder
        if any(r.startswith("code/") or r in ("constants.pkl", "bytecode.pkl") for r in inside):
            return _load_torchscript(p, allow_pickle)
    elif kind != "pickle":
        raise QcoreError(f"{p.name} is not a PyTorch file (its first bytes are neither a zip archive nor a pickle); "
                         + ("it looks like safetensors: rename it to .safetensors" if kind == "safetensors" else
                            "check that it is the file you meant"))
    import pickle

    if not allow_pickle:
        checked_torch_file(p, limit, "save only the weights: safetensors.torch.save_file(model.state_dict(), path)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower() or "invalid load key" in str(e).lower():
            raise QcoreError(f"{p.name} could not be read ({first_line(e)}); the file is truncated or corrupted") from None
        if not allow_pickle:
            raise QcoreError(f"{p.name} is a pickled Python object (e.g. torch.save(model)); loading it would run code "
                             f"from the file, so it is refused. {EXPORT_HINT} -- or, for a file you trust, start the "
                             "CLI with --trust-pickle (env QCORE_TRUST_PICKLE=1)") from None
        with reading(p.name, "the pickle could not be loaded even with --trust-pickle"):
            obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise QcoreError(f"{p.name} could not be read ({first_line(e)}); the file is truncated or corrupted") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickled model (trusted)", None)
    if isinstance(obj, torch.Tensor):
        raise QcoreError(f"{p.name} holds a single tensor, not a model; pass data files with --data")
    return _zoo_architecture(dict(obj) if isinstance(obj, dict) else {}, p.name)



def load_model_file(path, allow_pickle: bool = False, max_bytes: int | None = None,
                    constants: dict | None = None) -> LoadedModel:
    """A model file (.pt2, .onnx, .pt/.pth/.ts, .safetensors) -> ``LoadedModel``; QcoreError if unusable.
    ``constants``: values of an ONNX model's scalar (rank-0) inputs by name, from the data file."""
    p = checked_file(path, MODEL_EXTENSIONS, "model", max_bytes)
    limit = limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    ext, kind = p.suffix.lower(), sniff(p)
    if ext == ".pt2":
        if kind != "zip":
            raise QcoreError(f"{p.name} is not a torch.export archive (not a zip file); save it with torch.export.save")
        zip_members(p, limit)
        from qcore.io.pt2.file import load_pt2_file

        return load_pt2_file(p, allow_pickle)
    if ext == ".onnx":
        if kind in ("zip", "pickle"):
            raise QcoreError(f"{p.name} is a PyTorch file, not ONNX; use the .pt2/.pt extension it was saved with")
        from qcore.io.onnx.file import load_onnx_file

        return load_onnx_file(p, limit, constants)
    if ext == ".safetensors":
        if kind != "safetensors":
            raise QcoreError(f"{p.name} is not a safetensors file (bad header); save it with safetensors.torch.save_file")
        from safetensors.torch import load_file

        with reading(p.name, "the safetensors file is truncated or corrupted; save it again"):
            state = load_file(str(p))
        return _zoo_architecture(state, p.name)
    return _load_torch_file(p, allow_pickle, limit)


"""Bring your own model and data: a file (or a zoo name plus a data file) -> ``Workload``.

Models (the extension says the format, the content must agree):

- ``.pt2``  ``torch.export.save`` program -> ``pt2_import.load``: a module tree with the original module
  paths (``features.0``), so recipes name layers as in the source model and weights, static/dynamic
  activations, per-layer recipes and BatchNorm folding all work as for the source ``nn.Module``.
- ``.onnx`` -> ``onnx_import.convert`` (Gemm/MatMul -> Linear, Conv -> Conv1d/2d, Gather -> Embedding);
  weights exported to a separate ``model.onnx.data`` are read when that file sits beside the model.
- ``.pt`` / ``.pth`` / ``.ts``: a TorchScript archive (``torch.jit.save``; weights and weight-only
  recipes: hooks never fire inside TorchScript), or a state dict of a zoo architecture.
- ``.safetensors``: a state dict of a zoo architecture (digits-mlp, digits-cnn), found by key and shape.
- A pickled whole model (``torch.save(model)``) runs code when loaded: refused unless
  ``allow_pickle=True`` (CLI ``--trust-pickle`` or env ``QCORE_TRUST_PICKLE=1``, for files you trust).

Uploaded files are untrusted: ``.pt`` files load with ``weights_only=True``; a ``.pt2`` archive is
screened before ``torch.export.load`` (``pt2_import.screen``); every file is bounded by
``MAX_UPLOAD_BYTES`` (env ``QCORE_MAX_UPLOAD_MB``, default 200 MiB).

Data: ``.npz`` (``x`` [or ``x0``, ``x1``, ... for several inputs] and optional ``y``), ``.pt`` (a tensor,
a ``(x, y)`` tuple or a ``{"x", "y"}`` dict; ``weights_only=True``), ``.csv`` (numeric feature columns;
labels in the column named by ``label_column``). It is split with a seeded permutation into
calibration (25 %, at least 1) and evaluation (the rest). Without data the inputs are synthetic
(seeded standard normal, shaped like the model's example input) and metrics compare with FP32 only.
``data="shape:1x3x32x32"`` gives the example input shape for models that do not record one (TorchScript).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import QcoreError
from .metrics import mean_cosine, sqnr_db
from .workload import Data, Task, Workload, classification_task


def _max_upload_bytes() -> int:
    raw = os.environ.get("QCORE_MAX_UPLOAD_MB", "200")
    try:
        mb = float(raw)
    except ValueError:
        raise QcoreError(f"QCORE_MAX_UPLOAD_MB={raw!r} is not a number; set it to a size in MiB such as 200") from None
    return int(mb * 2**20)


MAX_UPLOAD_BYTES = _max_upload_bytes()  # the engine's own size limit for model and data files (default 200 MiB)
MODEL_EXTENSIONS = (".pt2", ".onnx", ".pt", ".pth", ".ts", ".safetensors")
DATA_EXTENSIONS = (".npz", ".pt", ".pth", ".csv")
CALIBRATION_FRACTION, SPLIT_SEED, N_SYNTHETIC = 0.25, 0, 256
FIDELITY_NOTE = "metrics are fidelity-only (agreement with the FP32 model), not accuracy"
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


# ---- small helpers ----------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@contextmanager
def _reading(what: str, hint: str):
    """Turn any failure while parsing an untrusted file into one QcoreError line."""
    try:
        yield
    except QcoreError:
        raise
    except Exception as e:
        raise QcoreError(f"{what} could not be read ({_first_line(e)}); {hint}") from None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes:,} bytes"


def _checked_file(path, kinds: tuple[str, ...], what: str, max_bytes: int | None) -> Path:
    p = Path(path)
    if not p.is_file():
        raise QcoreError(f"{what} file {str(path)!r} does not exist")
    limit = MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    size = p.stat().st_size
    if size > limit:
        raise QcoreError(f"{p.name} is {_size(size)}, above the limit of {_size(limit)}; "
                         "use a smaller file or raise the limit (env QCORE_MAX_UPLOAD_MB)")
    if size == 0:
        raise QcoreError(f"{p.name} is empty")
    if p.suffix.lower() not in kinds:
        raise QcoreError(f"{p.name}: unsupported {what} file extension {p.suffix or '(none)'!r}; "
                         f"supported: {', '.join(kinds)}")
    return p


def _content(p: Path) -> str:
    """What the first bytes say: 'zip', 'pickle', 'safetensors' or 'other'."""
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < p.stat().st_size:
        return "safetensors"
    return "other"


def _zip_names(p: Path, limit: int) -> list[str]:
    with _reading(p.name, "the file is truncated or corrupted; save it again"):
        with zipfile.ZipFile(p) as zf:
            if sum(i.file_size for i in zf.infolist()) > 4 * limit:
                raise QcoreError(f"{p.name} unpacks to more than 4x the upload limit; refusing to read it")
            return zf.namelist()


# ---- torch.export programs (.pt2) -------------------------------------------------------------------
def _load_pt2(p: Path, allow_pickle: bool) -> LoadedModel:
    from . import pt2_import

    with _reading(p.name, "the file is truncated or corrupted, or was saved by an incompatible torch version; "
                          "save it again with torch.export.save"):
        ep, module = pt2_import.load(p, allow_pickle)
    args, kwargs = ep.example_inputs if ep.example_inputs else ((), {})
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    fakes = [placeholders[name].meta.get("val") for name in ep.graph_signature.user_inputs]
    if kwargs or not fakes or not all(isinstance(f, torch.Tensor) for f in fakes):
        raise QcoreError(f"{p.name}: the program must take tensors as positional inputs; export it with "
                         "torch.export.export(model, (x,)) (no keyword or non-tensor inputs)")
    specs, batch = [], 1
    for i, fake in enumerate(fakes):
        example = args[i] if i < len(args) and isinstance(args[i], torch.Tensor) else None
        dims = [d if isinstance(d, int) else None for d in fake.shape]
        if not dims:
            raise QcoreError(f"{p.name}: input {i} is a scalar; the engine needs a batch dimension first")
        shape = tuple(example.shape[1:]) if example is not None else tuple(d or 1 for d in dims[1:])
        dynamic = frozenset(j for j, d in enumerate(dims[1:]) if d is None)
        int_range = (int(example.min()), int(example.max())) if example is not None and example.numel() \
            and not torch.is_floating_point(example) else (0, 1)
        specs.append(InputSpec(shape, dynamic, fake.dtype, int_range))
        batch = dims[0] if i == 0 and dims[0] else batch
    return LoadedModel(module, "torch.export", specs, batch)


# ---- ONNX, TorchScript, state dicts, pickles ---------------------------------------------------------
def _load_external_data(proto, p: Path, limit: int) -> None:
    """Weights the exporter wrote beside the model (torch.onnx.export's default ``model.onnx.data``):
    read them if they sit in the same folder under a plain file name and fit the size limit."""
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

    files = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    if not files:
        return
    hint = "export a single file with torch.onnx.export(..., external_data=False)"
    for name in files:
        if Path(name).name != name or not (p.parent / name).is_file():
            raise QcoreError(f"{p.name} keeps its weights in a separate file {name!r}, which is not beside it; {hint}")
    total = p.stat().st_size + sum((p.parent / name).stat().st_size for name in files)
    if total > limit:
        raise QcoreError(f"{p.name} and its weight file are {_size(total)}, above the limit of {_size(limit)}; "
                         "use a smaller model or raise the limit (env QCORE_MAX_UPLOAD_MB)")
    with _reading(p.name, f"its weight file is truncated or corrupted; {hint}"):
        load_external_data_for_model(proto, str(p.parent))


def _load_onnx(p: Path, limit: int) -> LoadedModel:
    import onnx

    from . import onnx_import

    with _reading(p.name, "it is not a valid ONNX model (truncated or corrupted?); export it again"):
        proto = onnx.load(str(p), load_external_data=False)
    _load_external_data(proto, p, limit)
    with _reading(p.name, "it is not a valid ONNX model (truncated or corrupted?); export it again"):
        onnx.checker.check_model(proto)
    model = onnx_import.convert(proto)
    vocab = onnx_import.embedding_sizes(proto)
    specs, batch = [], 1
    for i, (name, dims, dtype) in enumerate(onnx_import.input_shapes(proto)):
        if not dims:
            raise QcoreError(f"{p.name}: input {name!r} has no shape; the engine needs inputs with a batch dimension first")
        shape = tuple(d or 1 for d in dims[1:])
        int_range = (0, vocab[name] - 1) if name in vocab else (1, 1)
        specs.append(InputSpec(shape, frozenset(j for j, d in enumerate(dims[1:]) if d is None), dtype, int_range))
        batch = dims[0] if i == 0 and dims[0] else batch
    notes = []
    if len(model.output_names) > 1:
        notes.append(f"the ONNX model has {len(model.output_names)} outputs; the engine scores the first, "
                     f"{model.output_names[0]!r}")
    return LoadedModel(model, "onnx", specs, batch, notes)


def _load_torchscript(p: Path) -> LoadedModel:
    with _reading(p.name, "the TorchScript archive is truncated or corrupted; save it again with torch.jit.save"):
        model = torch.jit.load(str(p), map_location="cpu")
    return LoadedModel(model.eval(), "torchscript", None, notes=[
        "TorchScript model: weight quantization only; activation quantization (static or dynamic) is unavailable "
        "because TorchScript runs compiled code that input hooks cannot reach; export with torch.export.save (.pt2) "
        "for full support"], weight_only=True)


def _zoo_architecture(state: dict, source: str) -> LoadedModel:
    """The zoo architecture whose parameters match ``state`` (keys and shapes), loaded with it."""
    from .zoo.digits import ARCHITECTURES

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
    kind = _content(p)
    if kind == "zip":
        names = _zip_names(p, limit)
        if any(n.endswith("/archive_format") for n in names):
            raise QcoreError(f"{p.name} is a torch.export program; give it the .pt2 extension")
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return _load_torchscript(p)
    elif kind != "pickle":
        raise QcoreError(f"{p.name} is not a PyTorch file (its first bytes are neither a zip archive nor a pickle); "
                         + ("it looks like safetensors: rename it to .safetensors" if kind == "safetensors" else
                            "check that it is the file you meant"))
    import pickle

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower() or "invalid load key" in str(e).lower():
            raise QcoreError(f"{p.name} could not be read ({_first_line(e)}); the file is truncated or corrupted") from None
        if not allow_pickle:
            raise QcoreError(f"{p.name} is a pickled Python object (e.g. torch.save(model)); loading it would run code "
                             f"from the file, so it is refused. {EXPORT_HINT} -- or, for a file you trust, start the "
                             "CLI with --trust-pickle (env QCORE_TRUST_PICKLE=1)") from None
        with _reading(p.name, "the pickle could not be loaded even with --trust-pickle"):
            obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise QcoreError(f"{p.name} could not be read ({_first_line(e)}); the file is truncated or corrupted") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickled model (trusted)", None)
    if isinstance(obj, torch.Tensor):
        raise QcoreError(f"{p.name} holds a single tensor, not a model; pass data files with --data")
    return _zoo_architecture(dict(obj) if isinstance(obj, dict) else {}, p.name)


def load_model_file(path, allow_pickle: bool = False, max_bytes: int | None = None) -> LoadedModel:
    """A model file (.pt2, .onnx, .pt/.pth/.ts, .safetensors) -> ``LoadedModel``; QcoreError if unusable."""
    p = _checked_file(path, MODEL_EXTENSIONS, "model", max_bytes)
    limit = MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    ext, kind = p.suffix.lower(), _content(p)
    if ext == ".pt2":
        if kind != "zip":
            raise QcoreError(f"{p.name} is not a torch.export archive (not a zip file); save it with torch.export.save")
        _zip_names(p, limit)
        return _load_pt2(p, allow_pickle)
    if ext == ".onnx":
        if kind in ("zip", "pickle"):
            raise QcoreError(f"{p.name} is a PyTorch file, not ONNX; use the .pt2/.pt extension it was saved with")
        return _load_onnx(p, limit)
    if ext == ".safetensors":
        if kind != "safetensors":
            raise QcoreError(f"{p.name} is not a safetensors file (bad header); save it with safetensors.torch.save_file")
        from safetensors.torch import load_file

        with _reading(p.name, "the safetensors file is truncated or corrupted; save it again"):
            state = load_file(str(p))
        return _zoo_architecture(state, p.name)
    return _load_torch_file(p, allow_pickle, limit)


# ---- data ----------------------------------------------------------------------------------------
def _as_tensor(a, what: str) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dtype == torch.bool or not (torch.is_floating_point(t) or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                                                torch.int64, torch.uint8)):
        raise QcoreError(f"{what} has dtype {t.dtype}; data must be numbers (float or integer arrays)")
    if t.dim() == 0:
        raise QcoreError(f"{what} is a single number; it needs one row per sample")
    return t


def load_data_file(path, label_column: str | None = None, max_bytes: int | None = None) -> Data:
    """Samples (and labels, if any) from .npz, .pt/.pth or .csv; inputs keep the file's shape."""
    p = _checked_file(path, DATA_EXTENSIONS, "data", max_bytes)
    ext = p.suffix.lower()
    hint = "the file is truncated or corrupted, or not in the documented layout"
    if ext == ".npz":
        import numpy as np

        _zip_names(p, MAX_UPLOAD_BYTES if max_bytes is None else max_bytes)
        with _reading(p.name, hint + " (arrays x and optional y, saved with numpy.savez)"):
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        keys = ["x"] if "x" in arrays else sorted((k for k in arrays if re.fullmatch(r"x\d+", k)), key=lambda k: int(k[1:]))
        if not keys:
            raise QcoreError(f"{p.name} has arrays {sorted(arrays)} but no 'x'; save it with numpy.savez(path, x=..., y=...)")
        xs, y = [arrays[k] for k in keys], arrays.get("y")
    elif ext == ".csv":
        import pandas as pd

        with _reading(p.name, hint + " (a header row, then one numeric row per sample)"):
            df = pd.read_csv(p)
        if label_column is not None and label_column not in df.columns:
            raise QcoreError(f"{p.name} has no column {label_column!r}; columns are: {', '.join(map(str, df.columns[:20]))}")
        features = df.drop(columns=[label_column]) if label_column else df
        bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
        if bad:
            raise QcoreError(f"{p.name}: columns {', '.join(map(str, bad[:5]))} are not numeric; remove them or name the "
                             "label column with --label-column")
        if features.shape[1] == 0 or len(df) == 0:
            raise QcoreError(f"{p.name} has no feature values")
        xs = [features.to_numpy(dtype="float32")]
        y = df[label_column].to_numpy() if label_column else None
    else:
        if _content(p) not in ("zip", "pickle"):
            raise QcoreError(f"{p.name} is not a PyTorch file; save data with torch.save({{'x': x, 'y': y}}, path)")
        with _reading(p.name, hint + " ({'x': tensor, 'y': tensor} saved with torch.save; only tensors are loaded)"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "x" in obj:
            x, y = obj["x"], obj.get("y")
        elif isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
            x, y = obj[0], obj[1] if len(obj) == 2 else None
        elif isinstance(obj, torch.Tensor):
            x, y = obj, None
        else:
            raise QcoreError(f"{p.name} holds {type(obj).__name__}; data .pt files hold a tensor, (x, y) or {{'x', 'y'}}")
        xs = list(x) if isinstance(x, (tuple, list)) else [x]
    inputs = tuple(_as_tensor(x, f"{p.name} input {i}") for i, x in enumerate(xs))
    n = len(inputs[0])
    if any(len(t) != n for t in inputs):
        raise QcoreError(f"{p.name}: the input arrays have different numbers of samples ({[len(t) for t in inputs]})")
    labels = None
    if y is not None:
        labels = _as_tensor(y, f"{p.name} labels").reshape(len(y), -1)
        if labels.shape[1] != 1:
            raise QcoreError(f"{p.name}: labels must be one class index per sample, got shape {tuple(y.shape)}")
        labels = labels[:, 0]
        if len(labels) != n:
            raise QcoreError(f"{p.name} has {n} samples but {len(labels)} labels; give one label per sample")
        if torch.is_floating_point(labels) and bool((labels == labels.round()).all()):
            labels = labels.long()
    return Data(inputs, labels)


def _fit(data: Data, specs: list[InputSpec] | None, source: str) -> Data:
    """Data reshaped and cast to the model's inputs (per-sample element counts must match)."""
    if specs is not None and len(data.inputs) != len(specs):
        raise QcoreError(f"the model takes {len(specs)} inputs but {source} has {len(data.inputs)}; "
                         "give one array per input (npz: x0, x1, ...; pt: {'x': (x0, x1)})")
    out = []
    for i, x in enumerate(data.inputs):
        spec = specs[i] if specs is not None else InputSpec(tuple(x.shape[1:]))
        sample = tuple(x.shape[1:])
        fits = len(sample) == len(spec.sample_shape) and all(
            a == b or j in spec.dynamic for j, (a, b) in enumerate(zip(sample, spec.sample_shape)))
        if not fits:
            if spec.dynamic or math.prod(sample) != math.prod(spec.sample_shape):
                raise QcoreError(f"{source}: input {i} has samples of shape {sample} ({math.prod(sample)} values) but the "
                                 f"model expects {spec.sample_shape} ({math.prod(spec.sample_shape)} values); reshape the "
                                 "data, or export the model for that shape")
            x = x.reshape(len(x), *spec.sample_shape)
        if torch.is_floating_point(torch.empty(0, dtype=spec.dtype)):
            x = x.to(spec.dtype)
            if not torch.isfinite(x).all():
                raise QcoreError(f"{source}: input {i} contains NaN or Inf; clean the data first")
        else:
            if torch.is_floating_point(x) and not bool((x == x.round()).all()):
                raise QcoreError(f"{source}: input {i} must hold whole numbers (e.g. token ids) for this model")
            x = x.to(spec.dtype)
        out.append(x)
    return Data(tuple(out), data.labels)


def synthetic_data(specs: list[InputSpec], n: int = N_SYNTHETIC, seed: int = SPLIT_SEED) -> Data:
    """``n`` seeded samples per input: standard normal floats; integers uniform in ``int_range``."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for s in specs:
        if torch.is_floating_point(torch.empty(0, dtype=s.dtype)):
            inputs.append(torch.randn((n, *s.sample_shape), generator=g).to(s.dtype))
        else:
            lo, hi = s.int_range
            inputs.append(torch.randint(lo, hi + 1, (n, *s.sample_shape), generator=g).to(s.dtype))
    return Data(tuple(inputs))


def _parse_shape(text: str) -> list[InputSpec]:
    dims = [d for d in re.split(r"[x,\s]+", text.strip()) if d]
    if len(dims) < 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise QcoreError(f"input shape {text!r} is not like 1x3x32x32 (batch first, positive integers)")
    return [InputSpec(tuple(int(d) for d in dims[1:]))]


# ---- the workload ------------------------------------------------------------------------------------
def _run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except QcoreError:
        raise
    except Exception as e:  # the user's model failing on the user's data
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise QcoreError(f"the model failed on inputs of shape {shapes} ({_first_line(e)}); check that the data "
                         "matches the model's input shape and dtype") from None
    if not isinstance(out, torch.Tensor):
        raise QcoreError(f"the model returns {type(out).__name__}, not one tensor; export a wrapper whose forward "
                         "returns the one output to compare")
    return out.float()


def _batch_size(model: nn.Module, data: Data, example_batch: int) -> int | None:
    """None if the model runs any batch size with the same per-sample results, else the one size it
    accepts (a program exported with a fixed batch dimension)."""
    n = min(3, len(data))
    try:
        one, many = _run(model, data.subset(slice(0, 1)).inputs), _run(model, data.subset(slice(0, n)).inputs)
        tol = 1e-4 * (1 + float(one.abs().max())) if one.numel() else 0.0
        if one.shape[:1] == (1,) and many.shape[:1] == (n,) and torch.allclose(many[:1], one, rtol=1e-3, atol=tol):
            return None
        problem = QcoreError("the model's output does not have the batch dimension first; export a model whose "
                             "output is (batch, ...)")
    except QcoreError as e:
        problem = e
    if 1 < example_batch <= len(data):
        try:
            if _run(model, data.subset(slice(0, example_batch)).inputs).shape[:1] == (example_batch,):
                return example_batch
        except QcoreError:
            pass
    raise problem


def _fidelity_task() -> Task:
    return Task("embedding", "cosine_to_fp32",
                lambda out, ref, labels: {"cosine_to_fp32": mean_cosine(out, ref), "sqnr_db": sqnr_db(out, ref)})


def _split(data: Data, fixed_batch: int | None) -> tuple[Data, Data]:
    n = len(data)
    if n < 2:
        raise QcoreError(f"the data has {n} sample; at least 2 are needed (calibration and evaluation)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    k = min(n - 1, max(1, round(CALIBRATION_FRACTION * n)))
    calib, evaluation = perm[:k], perm[k:]
    if fixed_batch:
        calib, evaluation = calib[:len(calib) // fixed_batch * fixed_batch], evaluation[:len(evaluation) // fixed_batch * fixed_batch]
        if not len(calib) or not len(evaluation):
            raise QcoreError(f"the model only runs batches of exactly {fixed_batch}; give at least {4 * fixed_batch} samples, "
                             "or export it with a dynamic batch dimension (dynamic_shapes={0: torch.export.Dim('batch')})")
    return data.subset(calib), data.subset(evaluation)


def load_workload(model: str, data: str | None = None, *, allow_pickle: bool = False, label_column: str | None = None,
                  max_bytes: int | None = None) -> Workload:
    """A zoo name (``data`` then replaces its calibration/evaluation data) or a model file, with an
    optional data file (or ``"shape:1x3x32x32"``) -> ``Workload``. Every problem is one QcoreError line."""
    from .zoo import ZOO, load

    shape_spec = data is not None and str(data).startswith("shape:")
    if model in ZOO:
        base = load(model)
        if data is None:
            return base
        first = tuple(t[:1] for t in base.calibration.inputs)
        specs = [InputSpec(tuple(t.shape[1:]), frozenset(range(t.dim() - 1)) if not torch.is_floating_point(t) else frozenset(),
                           t.dtype, (int(t.min()), int(t.max())) if not torch.is_floating_point(t) else (0, 1)) for t in first]
        loaded = LoadedModel(base.model, "zoo", specs, task_kind=base.task.kind)
        name = base.name
    else:
        if not Path(model).is_file():
            raise QcoreError(f"{model!r} is neither a zoo model ({', '.join(ZOO)}) nor a file that exists")
        loaded = load_model_file(model, allow_pickle, max_bytes)
        name = Path(model).name
    notes = list(loaded.notes)
    if data is None or shape_spec:
        if shape_spec:
            loaded.inputs = _parse_shape(str(data)[len("shape:"):])
        if loaded.inputs is None:
            raise QcoreError(f"a {loaded.format} model does not record its input shape: give a data file (--data FILE) "
                             "or the shape of one example input (--data shape:1x3x32x32)")
        dataset, source = synthetic_data(loaded.inputs), "synthetic inputs"
        shape = "x".join(map(str, (1,) + loaded.inputs[0].sample_shape))
        notes.append(f"no data file: {N_SYNTHETIC} synthetic samples (seeded standard normal, shaped like the example "
                     f"input {shape}); {FIDELITY_NOTE}")
    else:
        source = Path(data).name
        dataset = _fit(load_data_file(data, label_column, max_bytes), loaded.inputs, source)
    fixed = _batch_size(loaded.model, dataset, loaded.example_batch)
    reference = _run(loaded.model, dataset.subset(slice(0, fixed or min(len(dataset), 8))).inputs)
    labels = dataset.labels
    if reference.dim() == 2 and reference.shape[1] >= 2 and loaded.task_kind in (None, "classification"):
        n_classes = reference.shape[1]
        if labels is not None:
            if torch.is_floating_point(labels):
                raise QcoreError(f"{source}: labels must be whole class indices 0..{n_classes - 1}, got fractional values")
            if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
                raise QcoreError(f"{source}: labels run from {int(labels.min())} to {int(labels.max())} but the model has "
                                 f"{n_classes} outputs (classes 0..{n_classes - 1}); check the label column")
        task = classification_task(n_classes, labels is not None)
        if labels is None and data is not None and not shape_spec:
            notes.append(f"{source} has no labels: {FIDELITY_NOTE}")
    else:
        task = _fidelity_task()
        if labels is not None:
            notes.append(f"labels in {source} are not used: the model's output {tuple(reference.shape[1:])} per sample "
                         "is not class logits; metrics compare with the FP32 outputs")
            dataset = Data(dataset.inputs)
    calibration, evaluation = _split(dataset, fixed)
    if not shape_spec and data is not None:
        notes.append(f"data {source}: {len(dataset)} samples split (seed {SPLIT_SEED}) into {len(calibration)} for "
                     f"calibration and {len(evaluation)} for evaluation")
    if fixed:
        notes.append(f"the program only runs batches of {fixed}: data is used in whole batches "
                     f"({len(calibration)} calibration, {len(evaluation)} evaluation samples)")
    workload_cls = WeightOnlyWorkload if loaded.weight_only else Workload
    return workload_cls(
        name=name, model=loaded.model, calibration=calibration, evaluation=evaluation, task=task,
        description=(f"{name}, a {loaded.format} model, evaluated on {source} ({len(calibration)} calibration / "
                     f"{len(evaluation)} evaluation samples). Headline metric: {task.headline}."),
        source=loaded.format, notes=notes, batch_size=fixed or 128)


@dataclass(eq=False)
class WeightOnlyWorkload(Workload):
    """A workload whose model input hooks cannot reach (TorchScript): only weights can be quantized."""

    def simulate(self, recipe, quantized_weights=None):
        quantized = [n for n in self.layers if (a := recipe.plan(n).activations) is not None and a.format != "fp32"]
        if quantized:
            raise QcoreError(f"recipe {recipe.name!r} quantizes activations (e.g. the input of {quantized[0]!r}), which is "
                             f"unavailable for {self.source} models; use a weight-only recipe (int8-weight-only, "
                             "int4-weight-only, nf4) or export the model with torch.export.save (.pt2) for full support")
        return super().simulate(recipe, quantized_weights)

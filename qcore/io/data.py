"""Data files -> ``Data``; fitting data to a model's inputs; synthetic inputs; the calibration/evaluation split.

Data: ``.npz`` (``x`` [or ``x0``, ``x1``, ... for several inputs] and optional ``y``), ``.pt`` (a tensor,
a ``(x, y)`` tuple or a ``{"x", "y"}`` dict; ``weights_only=True``), ``.csv`` (numeric feature columns;
labels in the column named by ``label_column``). It is split with a seeded permutation into
calibration (25 %, at least 1) and evaluation (the rest). Without data the inputs are synthetic
(seeded standard normal, shaped like the model's example input) and metrics compare with FP32 only.
``data="shape:1x3x32x32"`` gives the example input shape for models that do not record one (TorchScript).
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import QcoreError
from ..workload import Data
from . import limits
from .limits import checked_file, reading, sniff, zip_members
from .models import InputSpec

DATA_EXTENSIONS = (".npz", ".pt", ".pth", ".csv")
CALIBRATION_FRACTION, SPLIT_SEED, N_SYNTHETIC = 0.25, 0, 256


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
    p = checked_file(path, DATA_EXTENSIONS, "data", max_bytes)
    ext = p.suffix.lower()
    hint = "the file is truncated or corrupted, or not in the documented layout"
    if ext == ".npz":
        import numpy as np

        zip_members(p, limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes)
        with reading(p.name, hint + " (arrays x and optional y, saved with numpy.savez)"):
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        keys = ["x"] if "x" in arrays else sorted((k for k in arrays if re.fullmatch(r"x\d+", k)), key=lambda k: int(k[1:]))
        if not keys:
            raise QcoreError(f"{p.name} has arrays {sorted(arrays)} but no 'x'; save it with numpy.savez(path, x=..., y=...)")
        xs, y = [arrays[k] for k in keys], arrays.get("y")
    elif ext == ".csv":
        import pandas as pd

        with reading(p.name, hint + " (a header row, then one numeric row per sample)"):
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
        if sniff(p) not in ("zip", "pickle"):
            raise QcoreError(f"{p.name} is not a PyTorch file; save data with torch.save({{'x': x, 'y': y}}, path)")
        with reading(p.name, hint + " ({'x': tensor, 'y': tensor} saved with torch.save; only tensors are loaded)"):
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


def fit(data: Data, specs: list[InputSpec] | None, source: str) -> Data:
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


def parse_shape(text: str) -> list[InputSpec]:
    dims = [d for d in re.split(r"[x,\s]+", text.strip()) if d]
    if len(dims) < 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise QcoreError(f"input shape {text!r} is not like 1x3x32x32 (batch first, positive integers)")
    return [InputSpec(tuple(int(d) for d in dims[1:]))]



def split(data: Data, fixed_batch: int | None) -> tuple[Data, Data]:
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

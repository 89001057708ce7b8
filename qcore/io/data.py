"""Data files -> ``Data``; fitting data to a model's inputs; synthetic inputs; the calibration/evaluation split.

Data: ``.npz`` (``x`` [or ``x0``, ``x1``, ... for several inputs, in order], or one array named after each
of the model's inputs, matched by name; labels in ``labels``, else ``y``; a 0-d array is the value of a
scalar input, fed to every batch), ``.pt`` (a tensor,
a ``(x, y)`` tuple or a ``{"x", "y"}`` dict; ``weights_only=True``), ``.csv`` (numeric feature columns;
labels in the column named by ``label_column``). It is split with a seeded permutation into
calibration (25 %, at least 1) and evaluation (the rest). Without data the inputs are synthetic
(seeded standard normal, shaped like the model's example input) and metrics compare with FP32 only.
Every bound on a data file (unpacked bytes, values, CSV columns and cells, synthetic bytes) is in ``limits``.
``data="shape:1x3x32x32"`` gives the example input shape for models that do not record one (TorchScript).
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from qcore.errors import QcoreError
from qcore.model.workload import Data
from qcore import limits
from qcore.limits import checked_file, checked_torch_file, human_size, reading, sniff, zip_members
from qcore.io.models import InputSpec

DATA_EXTENSIONS = (".npz", ".pt", ".pth", ".csv")
CALIBRATION_FRACTION, SPLIT_SEED, N_SYNTHETIC = 0.25, 0, 256
_CSV_PIECE_CELLS = 2**22  # CSV rows are parsed in pieces of about this many cells (a text column: ~100 MiB a piece)
_HINT = "the file is truncated or corrupted, or not in the documented layout"


def _as_tensor(a, what: str, scalar: bool = False) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dtype == torch.bool or not (torch.is_floating_point(t) or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                                                torch.int64, torch.uint8)):
        raise QcoreError(f"{what} has dtype {t.dtype}; data must be numbers (float or integer arrays)")
    if t.dim() == 0 and not scalar:
        raise QcoreError(f"{what} is a single number; it needs one row per sample")
    return t


def _check_data_bytes(name: str, arrays: list[tuple[int, int]]) -> None:
    """Refuse data whose values, as (elements, bytes per element) per array, exceed ``MAX_DATA_BYTES`` once
    converted: each element costs max(4, its own size) bytes (float32, or its wider dtype)."""
    values = sum(n for n, _ in arrays)
    nbytes = sum(n * max(4, item) for n, item in arrays)
    if nbytes > limits.MAX_DATA_BYTES:
        raise QcoreError(f"{name} holds {values:,} values ({human_size(nbytes)} as float32), above the data limit of "
                         f"{human_size(limits.MAX_DATA_BYTES)}; use fewer samples (a few hundred calibrate well) or "
                         "raise the limit (env QCORE_MAX_DATA_MB)")


def _npy_header(zf: zipfile.ZipFile, member: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy member's header, checked against the bytes the member holds."""
    fmt = np.lib.format
    with zf.open(member) as f:
        version = fmt.read_magic(f)
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read_header is None:
            raise QcoreError(f"{name}: array {member!r} is in .npy format version {version}; save it with numpy.savez")
        shape, _, dtype = read_header(f)
        header_bytes = f.tell()
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise QcoreError(f"{name} array {member[:-4]!r} has dtype {dtype}; data must be numbers (float or integer arrays)")
    if math.prod(shape) * dtype.itemsize != zf.getinfo(member).file_size - header_bytes:
        raise QcoreError(f"{name}: array {member[:-4]!r} says it has shape {shape} of {dtype} but holds "
                         f"{zf.getinfo(member).file_size - header_bytes:,} bytes; the file is corrupted or crafted")
    return shape, dtype


def _npz_arrays(p: Path, limit: int) -> tuple[list, np.ndarray | None, tuple[str, ...] | None, dict]:
    """(input arrays, labels, names, scalars) of an .npz; each array's header is checked before its data is
    read. ``names`` is None for positional inputs (``x`` or ``x0, x1, ...``), else the arrays' names in file
    order; ``scalars`` are the 0-d arrays by name (values of scalar inputs)."""
    zip_members(p, limit)
    with reading(p.name, _HINT + " (arrays x and optional y, saved with numpy.savez)"), zipfile.ZipFile(p) as zf:
        members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        headers = {k: _npy_header(zf, m, p.name) for k, m in members.items()}
        label = "labels" if "labels" in members else "y" if "y" in members else None
        scalars = [k for k, (shape, _) in headers.items() if shape == () and k != label]
        keys = ["x"] if "x" in members else sorted((k for k in members if re.fullmatch(r"x\d+", k)), key=lambda k: int(k[1:]))
        names = None if keys else tuple(k for k in members if k != label and k not in scalars)
        keys = keys or list(names)
        if not keys:
            raise QcoreError(f"{p.name} has arrays {sorted(members)[:20]} but no 'x'; save it with "
                             "numpy.savez(path, x=..., y=...), or one array per model input named after it")
        wanted = keys + [label] * (label is not None) + scalars
        _check_data_bytes(p.name, [(math.prod(headers[k][0]), headers[k][1].itemsize) for k in wanted])
        arrays = {}
        for k in wanted:
            with zf.open(members[k]) as f:
                a = np.lib.format.read_array(f, allow_pickle=False)
            arrays[k] = a.astype(a.dtype.newbyteorder("="), copy=False)  # torch reads native byte order only
    return [arrays[k] for k in keys], arrays.get(label), names, {k: arrays[k] for k in scalars}


def _pt_tensors(p: Path, limit: int) -> tuple[list, torch.Tensor | None]:
    """Input tensors and labels of a torch.save file, loaded with ``weights_only=True`` after its archive
    (real inflated sizes) and its pickle (at most ``MAX_PICKLE_BYTES``) were checked."""
    if sniff(p) not in ("zip", "pickle"):
        raise QcoreError(f"{p.name} is not a PyTorch file; save data with torch.save({{'x': x, 'y': y}}, path)")
    checked_torch_file(p, limit, "save only tensors: torch.save({'x': x, 'y': y}, path)")
    with reading(p.name, _HINT + " ({'x': tensor, 'y': tensor} saved with torch.save; only tensors are loaded)"):
        obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "x" in obj:
        x, y = obj["x"], obj.get("y")
    elif isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
        x, y = obj[0], obj[1] if len(obj) == 2 else None
    else:
        x, y = obj, None
    xs = list(x) if isinstance(x, (tuple, list)) else [x]
    tensors = xs + ([] if y is None else [y])
    if not xs or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise QcoreError(f"{p.name} holds {type(obj).__name__}; data .pt files hold tensors: a tensor, (x, y) or "
                         "{'x', 'y'}")
    # a tensor can claim far more elements than its storage holds (stride 0): count elements, not storage bytes
    _check_data_bytes(p.name, [(t.numel(), t.element_size()) for t in tensors])
    return xs, y


def _csv_lines(p: Path) -> int:
    """Lines in ``p``, refusing any line longer than ``MAX_CSV_LINE_BYTES``: one pass in 1 MiB pieces
    (about 0.3 s per 200 MiB), before any parser sees the file."""
    lines, start, offset = 0, 0, 0  # start: file offset where the current line begins
    with open(p, "rb") as f:
        while True:
            chunk = f.read(2**20)
            ends = offset + np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
            end_of_file = not chunk
            offset += len(chunk)
            longest = int((np.diff(ends, prepend=start - 1) - 1).max()) if len(ends) else offset - start
            if longest > limits.MAX_CSV_LINE_BYTES:
                raise QcoreError(f"{p.name} has a line longer than {human_size(limits.MAX_CSV_LINE_BYTES)} (at most "
                                 f"{limits.MAX_CSV_COLUMNS:,} columns are read); check that it is a CSV file with one "
                                 "sample per line")
            if len(ends):
                lines, start = lines + len(ends), int(ends[-1]) + 1
            if end_of_file:
                return lines + (offset > start)


def _csv_arrays(p: Path, label_column: str | None) -> tuple[list, np.ndarray | None]:
    """Features (float32) and labels of a CSV whose header and size were checked before parsing; parsed
    by pandas' C engine in pieces of ``_CSV_PIECE_CELLS`` (a text column costs its strings for one piece only).
    Time: about 4-6 s for the largest accepted file (20 M cells) on one busy core."""
    import csv

    hint = _HINT + " (a header row, then one numeric row per sample)"
    rows = _csv_lines(p) - 1
    with reading(p.name, hint), open(p, "rb") as f:
        header = f.readline(limits.MAX_CSV_LINE_BYTES + 1).decode("utf-8-sig").rstrip("\r\n")
        columns = next(csv.reader([header]), [])
    if len(columns) > limits.MAX_CSV_COLUMNS:
        raise QcoreError(f"{p.name} has {len(columns):,} columns, above the limit of {limits.MAX_CSV_COLUMNS:,}; "
                         "save wide data as .npz (numpy.savez(path, x=..., y=...))")
    if rows * len(columns) > limits.MAX_CSV_CELLS:
        raise QcoreError(f"{p.name} has {rows:,} rows x {len(columns):,} columns, above the limit of "
                         f"{limits.MAX_CSV_CELLS:,} values for a CSV file; use fewer rows (a few hundred samples "
                         "calibrate well) or save the data as .npz")
    if label_column is not None and label_column not in columns:
        raise QcoreError(f"{p.name} has no column {label_column!r}; columns are: {', '.join(columns[:20])}")
    if rows <= 0:
        raise QcoreError(f"{p.name} has no feature values")
    import pandas as pd  # after the checks: refusing a file should not cost pandas' import (about 1 s)

    features, labels = [], []
    with reading(p.name, hint), pd.read_csv(p, header=None, names=columns, skiprows=1, index_col=False, engine="c",
                                            quoting=csv.QUOTE_NONE, low_memory=False,
                                            chunksize=max(1, _CSV_PIECE_CELLS // max(1, len(columns)))) as parts:
        for df in parts:
            x = df.drop(columns=[label_column]) if label_column else df
            bad = [c for c, dtype in x.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
            if bad:
                raise QcoreError(f"{p.name}: columns {', '.join(map(str, bad[:5]))} are not numeric; remove them or name "
                                 "the label column with --label-column")
            if label_column and not pd.api.types.is_numeric_dtype(df[label_column]):
                raise QcoreError(f"{p.name}: the label column {label_column!r} is not numeric; labels are class indices "
                                 "0, 1, 2, ...")
            features.append(x.to_numpy(dtype="float32"))
            labels.append(df[label_column].to_numpy() if label_column else None)
    if not features or features[0].shape[1] == 0 or not sum(len(a) for a in features):
        raise QcoreError(f"{p.name} has no feature values")
    return [np.concatenate(features)], np.concatenate(labels) if label_column else None


def load_data_file(path, label_column: str | None = None, max_bytes: int | None = None) -> Data:
    """Samples (and labels, if any) from .npz, .pt/.pth or .csv; inputs keep the file's shape.

    ``max_bytes`` replaces the upload limit (``limits.MAX_UPLOAD_BYTES``); every other bound is in ``limits``.
    """
    p = checked_file(path, DATA_EXTENSIONS, "data", max_bytes)
    limit = limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    ext = p.suffix.lower()
    names, constants = None, {}
    if ext == ".npz":
        xs, y, names, scalars = _npz_arrays(p, limit)
        constants = {k: _as_tensor(v, f"{p.name} input {k!r}", scalar=True) for k, v in scalars.items()}
    elif ext == ".csv":
        xs, y = _csv_arrays(p, label_column)
    else:
        xs, y = _pt_tensors(p, limit)
    if not xs:
        raise QcoreError(f"{p.name} holds only single numbers ({', '.join(constants)}); give at least one input "
                         "with one row per sample")
    inputs = tuple(_as_tensor(x, f"{p.name} input {i if names is None else repr(names[i])}") for i, x in enumerate(xs))
    labels = None  # samples are counted (and checked against the labels) on each input's batch axis: with_batch_axes
    if y is not None:
        labels = _as_tensor(y, f"{p.name} labels")
        labels = labels.reshape(len(labels), -1)
        if labels.shape[1] != 1:
            raise QcoreError(f"{p.name}: labels must be one class index per sample, got shape {tuple(y.shape)}")
        labels = labels[:, 0]
        if torch.is_floating_point(labels) and bool((labels == labels.round()).all()):
            labels = labels.long()
    return Data(inputs, labels, names, constants)


def match_names(data: Data, input_names: tuple[str, ...] | None, source: str) -> Data:
    """``data`` with its named inputs in the model's order (``input_names``); scalars stay in ``constants``.
    Unnamed data (``x``, ``x0, x1, ...``) is positional and returned as it is. One QcoreError line for an
    input the file lacks, or an array that is no input of the model."""
    if data.names is None:
        return data
    if input_names is None:
        raise QcoreError(f"{source} names its arrays ({', '.join(data.names)}) but the model does not name its inputs; "
                         "save them as x0, x1, ... in the model's input order")
    given = dict(zip(data.names, data.inputs))
    missing = [k for k in input_names if k not in given and k not in data.constants]
    if missing:
        raise QcoreError(f"{source} has no {missing[0]!r} array for the model's input of that name (its inputs: "
                         f"{', '.join(input_names)}); save one array per input named after it, or x0, x1, ... in order")
    extra = [k for k in (*given, *data.constants) if k not in input_names]
    if extra:
        raise QcoreError(f"{source}: array {extra[0]!r} is no input of the model (its inputs: {', '.join(input_names)}); "
                         "rename or remove it (labels go in 'labels' or 'y')")
    order = tuple(k for k in input_names if k in given)
    return Data(tuple(given[k] for k in order), data.labels, order, data.constants)


def parse_batch_axes(text: str) -> dict[str, int]:
    """``"state=1, h=1"`` (the CLI's ``--batch-axis``, the upload form) -> ``{"state": 1, "h": 1}``: input name
    (or position 0, 1, ... for a model without input names) = the axis of its batch."""
    out = {}
    for part in (p.strip() for p in text.strip()[:1000].split(",")):
        m = re.fullmatch(r"([^=\s]+)\s*=\s*(\d{1,2})", part)
        if part and m is None:
            raise QcoreError(f"batch axis {part[:60]!r} is not like state=1 (an input name, '=', the axis of its batch)")
        if m:
            out[m[1]] = int(m[2])
    return out


def with_batch_axes(data: Data, given: dict[str, int], input_names: tuple[str, ...] | None,
                    source: str) -> tuple[Data, list[str]]:
    """``data`` with each input's batch axis (``Data.batch_axes``): the one ``given`` by input name (or position),
    else, with N the first input's batch size (along its given axis, else axis 0), axis 0 if it has N entries,
    else the only axis with N entries -- an LSTM state (2, N, 128) beside an input (N, 512) is batched on axis 1.
    Scalar inputs (0-d arrays, ``Data.constants``) have none: one value for every batch. One QcoreError line for
    a name the model lacks, an axis out of range, an input without (or with several) axes of N, or labels not N.
    Returns (data, a note per input not batched on axis 0)."""
    order = data.names or tuple(n for n in input_names or () if n not in data.constants) or \
        tuple(str(i) for i in range(len(data.inputs)))  # positional data: the model's inputs that are not scalars
    for key, axis in given.items():
        if key in data.constants:
            raise QcoreError(f"input {key!r} is a scalar (a 0-d array in {source}): one value for every batch, so it "
                             "has no batch axis; remove it from the batch axes")
        if key not in order:
            raise QcoreError(f"the model has no input {key!r} to give a batch axis (its inputs: {', '.join(order)})")
        rank = data.inputs[order.index(key)].dim()
        if axis >= rank:
            raise QcoreError(f"batch axis {axis} of input {key!r} is out of range: {source} gives it {rank} axes "
                             f"(0..{rank - 1})")
    axes, n = [], None
    for name, t in zip(order, data.inputs):
        shape = tuple(t.shape)
        if name in given:
            axis = given[name]
        elif n is None or shape[0] == n:
            axis = 0
        else:
            matching = [j for j, d in enumerate(shape) if d == n]
            if len(matching) != 1:
                which = "no axis" if not matching else f"axes {matching}"
                raise QcoreError(f"{source}: input {name!r} has shape {shape} with {which} of the {n} samples the first "
                                 f"input has; say which axis counts its samples (--batch-axis {name}=AXIS)")
            axis = matching[0]
        if n is not None and shape[axis] != n:
            raise QcoreError(f"{source}: input {name!r} has {shape[axis]} samples on its batch axis {axis} (shape "
                             f"{shape}) but the first input has {n}; give every input the same number of samples")
        n = shape[axis] if n is None else n
        axes.append(axis)
    if n == 0:
        raise QcoreError(f"{source} has no samples")
    if data.labels is not None and len(data.labels) != n:
        raise QcoreError(f"{source} has {n} samples but {len(data.labels)} labels; give one label per sample")
    notes = [f"input {name!r} of {source} has its samples on axis {axis} ("
             f"{'set by you' if name in given else 'inferred: its one axis as long as the first input'}); batches "
             "and the exported file keep that layout" for name, axis in zip(order, axes) if axis]
    return Data(data.inputs, data.labels, data.names, data.constants, tuple(axes) if any(axes) else ()), notes


def fit(data: Data, specs: list[InputSpec] | None, source: str) -> Data:
    """Data reshaped and cast to the model's inputs (per-sample element counts must match); named data
    must have gone through ``match_names`` first."""
    if specs is not None and len(data.inputs) != len(specs):
        raise QcoreError(f"the model takes {len(specs)} inputs but {source} has {len(data.inputs)}; "
                         "give one array per input (npz: x0, x1, ...; pt: {'x': (x0, x1)})")
    out = []
    for i, x in enumerate(data.inputs):
        which = f"input {i}" if data.names is None else f"input {data.names[i]!r}"
        axis = data.axis(i)
        x = x.movedim(axis, 0)  # batch first while checking and reshaping; moved back below
        spec = specs[i].along(axis) if specs is not None else InputSpec(tuple(x.shape[1:]))
        sample = tuple(x.shape[1:])
        fits = len(sample) == len(spec.sample_shape) and all(
            a == b or j in spec.dynamic for j, (a, b) in enumerate(zip(sample, spec.sample_shape)))
        if not fits:
            if spec.dynamic or math.prod(sample) != math.prod(spec.sample_shape):
                raise QcoreError(f"{source}: {which} has samples of shape {sample} ({math.prod(sample)} values) but the "
                                 f"model expects {spec.sample_shape} ({math.prod(spec.sample_shape)} values); reshape the "
                                 "data, or export the model for that shape")
            x = x.reshape(len(x), *spec.sample_shape)
        if torch.is_floating_point(torch.empty(0, dtype=spec.dtype)):
            x = x.to(spec.dtype)
            if not torch.isfinite(x).all():
                raise QcoreError(f"{source}: {which} contains NaN or Inf; clean the data first")
        else:
            if torch.is_floating_point(x) and not bool((x == x.round()).all()):
                raise QcoreError(f"{source}: {which} must hold whole numbers (e.g. token ids) for this model")
            x = x.to(spec.dtype)
        out.append(x.movedim(0, axis))
    return Data(tuple(out), data.labels, data.names, batch_axes=data.batch_axes)


def synthetic_data(specs: list[InputSpec], n: int = N_SYNTHETIC, seed: int = SPLIT_SEED) -> Data:
    """``n`` seeded samples per input: standard normal floats; integers uniform in ``int_range``.

    Fewer samples (``len(result) < n``) when ``n`` would take more than ``MAX_SYNTHETIC_BYTES`` (counting the
    float32 / int64 draws and their cast to the input dtype); a one-line QcoreError when even
    ``MIN_SYNTHETIC_SAMPLES`` would -- a model can declare inputs of any size.
    """
    drawn = [torch.float32 if s.dtype.is_floating_point else torch.int64 for s in specs]  # what randn/randint make
    per_sample = sum(math.prod(s.sample_shape) * (d.itemsize + (s.dtype.itemsize if s.dtype != d else 0))
                     for s, d in zip(specs, drawn))  # bytes: the draw, plus its cast to the input dtype
    fits = limits.MAX_SYNTHETIC_BYTES // max(1, per_sample)
    if fits < min(n, limits.MIN_SYNTHETIC_SAMPLES):
        shapes = ", ".join("x".join(map(str, (1,) + s.sample_shape)) for s in specs)
        raise QcoreError(f"the model's inputs ({shapes}) take {human_size(per_sample)} per sample, so even "
                         f"{limits.MIN_SYNTHETIC_SAMPLES} synthetic samples exceed the limit of "
                         f"{human_size(limits.MAX_SYNTHETIC_BYTES)}; export the model for a smaller input shape, or "
                         "give a few samples in a data file")
    n = min(n, fits)
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for s in specs:
        if s.dtype.is_floating_point:
            inputs.append(torch.randn((n, *s.sample_shape), generator=g).to(s.dtype))
        else:
            lo, hi = s.int_range
            inputs.append(torch.randint(lo, hi + 1, (n, *s.sample_shape), generator=g).to(s.dtype))
    return Data(tuple(inputs))


def parse_shape(text: str) -> list[InputSpec]:
    dims = [d for d in re.split(r"[x,\s]+", text.strip()[:200]) if d]
    if len(dims) < 2 or len(dims) > 9 or not all(d.isdigit() and len(d) <= 9 and int(d) > 0 for d in dims):
        raise QcoreError(f"input shape {text[:60]!r} is not like 1x3x32x32 (batch first, up to 9 positive integers)")
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

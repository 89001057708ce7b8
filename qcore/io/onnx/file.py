"""An ``.onnx`` file (and the external weight file beside it) -> ``LoadedModel`` via ``convert.convert``.

External data is the one way an ONNX file can make a loader read another file: any tensor -- an
initializer, a sparse initializer, a Constant's ``value`` or any tensor attribute, in the main graph
or in any subgraph (If/Loop/Scan bodies) or local function -- may say "my bytes are in file F at
offset O, length L". ``torch.onnx.export`` writes weights that way to ``model.onnx.data`` beside the
model. An upload is untrusted, so such a reference is followed only to a plain file name (no folder
part) of a regular file (not a link, device or FIFO) in the model's own folder, with the byte range
inside that file and within the upload limit. The bytes are read here and copied into the tensor,
so nothing later (onnx's checker, ``numpy_helper.to_array``, an export) can resolve a location
relative to the working directory.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import NoReturn

from qcore.errors import QcoreError
from qcore.limits import human_size, reading
from qcore.io.models import InputSpec, LoadedModel
from qcore.io.onnx.branches import fold_weight_inputs, inline_constant_ifs
from qcore.io.onnx.convert import DTYPES, convert, embedding_sizes, input_shapes
from qcore.io.onnx.proto import all_tensors
from qcore.io.onnx.quantized import decode_quantized
from qcore.model.onnx_graph import quoted

SINGLE_FILE_HINT = "export a single file with torch.onnx.export(..., external_data=False)"
_PLAIN_NAME = re.compile(r"[^/\\:\x00]+")  # no folder part, no drive, no NUL


def _external_bytes(tensor, where: str, p: Path, budget: int, limit: int) -> bytes:
    """The bytes an external-data tensor points at, after checking the reference (see the module
    docstring); ``budget`` is how many bytes may still be read under the upload limit ``limit``."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")

    def refuse(problem: str) -> NoReturn:
        raise QcoreError(f"{p.name}: {where} keeps its data in a separate file {quoted(location)}, which {problem}; "
                         f"{SINGLE_FILE_HINT}")

    if not _PLAIN_NAME.fullmatch(location) or location in (".", ".."):
        refuse("is not a plain file name beside the model")
    path = p.parent / location
    try:
        info = os.lstat(path)
    except OSError:
        refuse("is not beside it")
    if not stat.S_ISREG(info.st_mode):
        refuse("is not a regular file (a link, device, pipe or folder)")
    if os.path.realpath(path) != os.path.join(os.path.realpath(p.parent), location):
        refuse("resolves outside the model's folder")
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries.get("length", max(info.st_size - offset, 0)))
    except ValueError:
        refuse("is given with an offset or length that is not a whole number")
    if offset < 0 or length < 0 or offset + length > info.st_size:
        refuse(f"has {info.st_size:,} bytes, but the tensor asks for bytes {offset:,} to {offset + length:,}")
    if length > budget:
        raise QcoreError(f"{p.name} with the external data of its tensors (up to {where}) is above the limit of "
                         f"{human_size(limit)}; use a smaller model or raise the limit (env QCORE_MAX_UPLOAD_MB)")
    try:  # O_NOFOLLOW: a link swapped in after the checks above is refused, not followed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        refuse("cannot be opened as a plain file")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            refuse("is not a regular file (a link, device, pipe or folder)")
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        refuse("changed while it was being read")
    return data


def _load_external_data(proto, p: Path, limit: int) -> None:
    """Copy every external-data tensor's bytes into the tensor (``raw_data``), so that afterwards no
    tensor anywhere in ``proto`` refers to a file. At most ``limit`` bytes in all (the model file
    included); any reference that fails a check raises one ``QcoreError`` line."""
    from onnx import TensorProto

    budget = limit - p.stat().st_size
    for tensor, where in all_tensors(proto):
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor.raw_data = _external_bytes(tensor, where, p, budget, limit)
            budget -= len(tensor.raw_data)
            tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]  # entries without the EXTERNAL flag are ignored by onnx: drop them too


def _bind_scalars(proto, constants: dict, p: Path) -> list[str]:
    """Make every rank-0 graph input a constant (an initializer of its name) holding its value from
    ``constants`` (the data file's 0-d arrays): a scalar input (a sample rate, a threshold) is one value for
    the whole run, fed the same to every batch -- so constant folding sees it (an ``If`` on it folds), and an
    export holds it as a constant. Returns the notes saying which values were bound."""
    from onnx import numpy_helper

    inits = {i.name for i in proto.graph.initializer}
    notes = []
    for i in proto.graph.input:
        tt = i.type.tensor_type
        if i.name in inits or not tt.HasField("shape") or len(tt.shape.dim) or tt.elem_type not in DTYPES:
            continue
        if i.name not in constants:
            raise QcoreError(f"{p.name}: input {i.name!r} is a scalar (rank 0), fed one value for every batch; give it "
                             f"in an .npz data file as a 0-d array named after it (numpy.savez(path, {i.name}=np.array(V), "
                             "...) with the other inputs named too)")
        value = constants[i.name].to(DTYPES[tt.elem_type]).numpy()
        proto.graph.initializer.append(numpy_helper.from_array(value, i.name))
        notes.append(f"scalar input {i.name!r} is {value.item()!r} (from the data file) for every batch; an export "
                     "holds it as a constant")
    return notes


_KEEP_VALUES = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")  # ops that move values, not change them


def _output_activations(proto) -> tuple[str | None, ...]:
    """Per graph output, in order: "softmax" if a Softmax makes it; "sigmoid" if a Sigmoid does, also through
    ops that only move its values (``_KEEP_VALUES``), a mean of sigmoids (a probability too) and an ``If`` whose
    branches both end so -- silero-vad's speech probability is Sigmoid -> If(batch 1: Squeeze) -> ReduceMean ->
    Unsqueeze; else None. (A Softmax behind an Identity stays unseen: ocr-cls's class scores are scored as
    classification, as before.)"""
    def activation(name: str, made_by: dict, depth: int = 0) -> str | None:
        node = made_by.get(name)
        if node is None or depth > 32:
            return None
        if node.op_type in ("Sigmoid", "Softmax"):
            return "sigmoid" if node.op_type == "Sigmoid" else "softmax" if depth == 0 else None
        if node.op_type == "ReduceMean":
            return "sigmoid" if activation(node.input[0], made_by, depth + 1) == "sigmoid" else None
        if node.op_type == "If":
            k = list(node.output).index(name)
            ends = {activation(g.output[k].name, {**made_by, **{o: n for n in g.node for o in n.output}}, depth + 1)
                    for g in (a.g for a in node.attribute if a.name in ("then_branch", "else_branch"))}
            return ends.pop() if len(ends) == 1 else None
        return activation(node.input[0], made_by, depth + 1) if node.op_type in _KEEP_VALUES else None

    made_by = {o: n for n in proto.graph.node for o in n.output}
    return tuple(activation(o.name, made_by) for o in proto.graph.output)


def load_onnx_file(p: Path, limit: int, constants: dict | None = None) -> LoadedModel:
    """An ``.onnx`` file of at most ``limit`` bytes (with its external data) -> ``LoadedModel``; ``constants``
    are the values of its scalar inputs by name (see ``_bind_scalars``)."""
    import onnx

    with reading(p.name, "it is not a valid ONNX model (truncated or corrupted?); export it again"):
        proto = onnx.load(str(p), load_external_data=False)
    _load_external_data(proto, p, limit)
    with reading(p.name, "it is not a valid ONNX model (truncated or corrupted?); export it again"):
        onnx.checker.check_model(proto)
    names = tuple(name for name, _, _ in input_shapes(proto))  # refuses absurd declared sizes before anything is built
    notes = _bind_scalars(proto, constants or {}, p)
    notes += inline_constant_ifs(proto)
    decoded = decode_quantized(proto, limit)
    fold_weight_inputs(proto)
    declared = input_shapes(proto)
    model = convert(proto, limit)
    notes += decoded.notes(proto, model.layer_sources)
    model.batch_coupled = decoded.computed_activations > 0  # a sample's output depends on the batch it runs in
    vocab = embedding_sizes(proto)
    specs, batch = [], 1
    for i, (name, dims, dtype) in enumerate(declared):
        if not dims:
            raise QcoreError(f"{p.name}: input {name!r} has no shape; the engine needs inputs with a batch dimension first")
        shape = tuple(d or 1 for d in dims[1:])
        int_range = (0, vocab[name] - 1) if name in vocab else (1, 1)
        specs.append(InputSpec(shape, frozenset(j for j, d in enumerate(dims[1:]) if d is None), dtype, int_range, dims[0]))
        batch = dims[0] if i == 0 and dims[0] else batch
    if len(model.output_names) > 1:
        notes.append(f"the ONNX model has {len(model.output_names)} outputs; the engine scores the first, "
                     f"{model.output_names[0]!r}")
    return LoadedModel(model, "onnx", specs, batch, notes, output_activations=_output_activations(proto),
                       input_names=names)

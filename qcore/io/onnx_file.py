"""An ``.onnx`` file (and the external weight file beside it) -> ``LoadedModel`` via ``onnx_import.convert``."""

from __future__ import annotations

from pathlib import Path


from ..errors import QcoreError
from .limits import human_size, reading
from .models import InputSpec, LoadedModel


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
        raise QcoreError(f"{p.name} and its weight file are {human_size(total)}, above the limit of {human_size(limit)}; "
                         "use a smaller model or raise the limit (env QCORE_MAX_UPLOAD_MB)")
    with reading(p.name, f"its weight file is truncated or corrupted; {hint}"):
        load_external_data_for_model(proto, str(p.parent))


def load_onnx_file(p: Path, limit: int) -> LoadedModel:
    import onnx

    from . import onnx_import

    with reading(p.name, "it is not a valid ONNX model (truncated or corrupted?); export it again"):
        proto = onnx.load(str(p), load_external_data=False)
    _load_external_data(proto, p, limit)
    with reading(p.name, "it is not a valid ONNX model (truncated or corrupted?); export it again"):
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


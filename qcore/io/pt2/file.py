"""A ``.pt2`` file -> ``LoadedModel``: the program loaded (an untrusted one only through ``sanitized_copy``),
its module tree unflattened with restored types, input specs from the graph's placeholders."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.io.models import InputSpec, LoadedModel
from qcore.io.pt2.archive import sanitized_copy
from qcore.io.pt2.modules import restore_module_types
from qcore.limits import reading

MAX_SAMPLE_ELEMENTS = 2**24  # elements of one declared input sample (e.g. 3x2048x2048)


def load(p: Path, allow_pickle: bool) -> tuple[torch.export.ExportedProgram, nn.Module]:
    """(program, module): the loaded program and its unflattened module tree with restored types.
    Untrusted (``allow_pickle=False``): torch only sees ``sanitized_copy(p)``; trusted: ``p`` itself.

    The module's graphs lose their traced fake tensors (symbolic batch sizes cannot be deep-copied);
    the program keeps them (input shapes and dtypes)."""
    with tempfile.TemporaryDirectory(prefix="qcore-pt2-") as folder:
        source = p if allow_pickle else sanitized_copy(p, Path(folder))
        from torch.export.pt2_archive._package import load_pt2  # torch.export.load minus its legacy retry

        programs = load_pt2(str(source)).exported_programs
        if "model" not in programs:
            raise QcoreError(f"{p.name} has no program named 'model'; save it with torch.export.save(ep, path)")
        ep = programs["model"]
    module = torch.export.unflatten(ep)
    module.check_input_constraints = False  # the loader probes batch sizes and checks data shapes itself
    restore_module_types(module)
    for sub in module.modules():
        if isinstance(getattr(sub, "graph", None), torch.fx.Graph):
            for node in sub.graph.nodes:
                node.meta = {k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta}
    return ep, module.eval()


def _hint(d) -> int | None:
    """A dimension's size: itself if static, the traced example size if symbolic (None if unknown)."""
    if isinstance(d, int):
        return d
    hint = d.node.hint if isinstance(d, torch.SymInt) else None
    return int(hint) if isinstance(hint, int) else None


def _int_range(ep: torch.export.ExportedProgram, placeholder: torch.fx.Node) -> tuple[int, int]:
    """Synthetic values for an integer input: valid row indices of the Embedding table it indexes
    (token ids below the vocabulary size), else 0..1 (masks, flags)."""
    for user in placeholder.users:
        if user.target is torch.ops.aten.embedding.default and user.args[1] is placeholder:
            table = user.args[0].meta.get("val")
            if isinstance(table, torch.Tensor) and isinstance(table.shape[0], int) and table.shape[0] > 0:
                return 0, table.shape[0] - 1
    return 0, 1


def load_pt2_file(p: Path, allow_pickle: bool) -> LoadedModel:
    """A ``.pt2`` file -> ``LoadedModel``; input specs from the graph's placeholders (sample inputs are
    never read): per-sample shape with symbolic sizes at their traced example value, dtype, int range."""
    with reading(p.name, "the file is truncated or corrupted, or was saved by an incompatible torch version; "
                          "save it again with torch.export.save"):
        ep, module = load(p, allow_pickle)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = [placeholders[name] for name in ep.graph_signature.user_inputs]
    fakes = [n.meta.get("val") for n in user]
    in_spec = ep.call_spec.in_spec  # (args, kwargs)
    keywords = in_spec is not None and in_spec.num_children == 2 and in_spec.child(1).num_children > 0
    if keywords or not fakes or not all(isinstance(f, torch.Tensor) for f in fakes):
        raise QcoreError(f"{p.name}: the program must take tensors as positional inputs; export it with "
                         "torch.export.export(model, (x,)) (no keyword or non-tensor inputs)")
    specs, batch = [], 1
    for i, (node, fake) in enumerate(zip(user, fakes)):
        dims = [_hint(d) for d in fake.shape]
        if not dims:
            raise QcoreError(f"{p.name}: input {i} is a scalar; the engine needs a batch dimension first")
        shape = tuple(d or 1 for d in dims[1:])
        if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise QcoreError(f"{p.name}: input {i} declares {math.prod(shape):,} elements per sample {shape}, above "
                             f"the limit of {MAX_SAMPLE_ELEMENTS:,}; export the model with a smaller example input")
        dynamic = frozenset(j for j, d in enumerate(fake.shape[1:]) if not isinstance(d, int))
        int_range = (0, 1) if torch.is_floating_point(fake) else _int_range(ep, node)
        first = fake.shape[0] if isinstance(fake.shape[0], int) else None
        specs.append(InputSpec(shape, dynamic, fake.dtype, int_range, first))
        if i == 0 and isinstance(fake.shape[0], int):
            batch = fake.shape[0]
    return LoadedModel(module, "torch.export", specs, batch, output_activations=_output_activations(ep),
                       input_names=tuple(ep.graph_signature.user_inputs))


_ACTIVATIONS = {"aten.sigmoid.default": "sigmoid", "aten.softmax.int": "softmax", "aten._softmax.default": "softmax"}


def _output_activations(ep: torch.export.ExportedProgram) -> tuple[str | None, ...]:
    """Per output of the program, in order: "sigmoid" / "softmax" if that op makes it, else None."""
    output = next(n for n in ep.graph.nodes if n.op == "output")
    outs = output.args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return tuple(_ACTIVATIONS.get(str(o.target)) if isinstance(o, torch.fx.Node) else None for o in outs)

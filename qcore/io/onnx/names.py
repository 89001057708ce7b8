"""Layer names of an imported ONNX graph: the original module paths where the export records them.

In order of preference: the weight's own name when it is one (``fc1.weight`` -> ``fc1``, as
``torch.onnx.export`` names untouched parameters), else the module path in the node's ``namespace``
metadata (the dynamo exporter), else the scopes in the node name (the TorchScript exporter:
``/features/features.0/Conv`` -> ``features.0``), else the sanitised node name (``node_MatMul_95``).
``layer_names`` makes them unique and nestable as submodule paths.
"""

from __future__ import annotations

import re

from torch import nn


def module_path_from_metadata(node) -> str | None:
    """The innermost module path torch.onnx.export recorded, e.g. 'enc.linear1' from
    'namespace' = ': Block/enc: TransformerEncoderLayer/enc.linear1: Linear/linear_2: aten.linear.default'."""
    for p in node.metadata_props:
        if p.key == "namespace":
            parts = [s.split(":")[0].strip() for s in p.value.split("/")]
            modules = [s for s in parts[:-1] if s]  # the last part names the op, not a module
            return modules[-1] if modules else None
    return None


def module_path_from_node_name(name: str) -> str | None:
    """The module path in a TorchScript-exporter node name, whose parts are the module scopes and then the
    op: '/features/features.0/Conv' -> 'features.0' (a Sequential's child repeats the container's name),
    '/bert/encoder/layer.0/attention/self/query/MatMul' -> 'bert.encoder.layer.0.attention.self.query'."""
    if not name.startswith("/"):
        return None
    segments: list[str] = []
    for part in name.split("/")[1:-1]:
        if segments and part.startswith(segments[-1] + "."):
            segments[-1] = part
        elif part:
            segments.append(part)
    return ".".join(segments) or None


_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def layer_names(candidates: list[tuple[str | None, str]]) -> list[str]:
    """Unique, nestable layer paths from (preferred dotted path or None, node name) pairs.

    A path shared by several layers or that is the parent of another layer gets the node name appended
    (``enc.self_attn`` -> ``enc.self_attn.node_MatMul_1``); a missing or invalid one becomes the node name."""
    reserved = set(dir(nn.Module())) | {"constants"}
    wanted = [p if p and _PATH.match(p) and not set(p.split(".")) & reserved else None for p, _ in candidates]
    names, used = [], set()
    for path, (_, node_name) in zip(wanted, candidates):
        node_part = _sanitise(node_name) or f"layer_{len(names)}"
        shared = path is not None and (wanted.count(path) > 1 or any(o and o.startswith(path + ".") for o in wanted))
        name = node_part if path is None else f"{path}.{node_part}" if shared else path
        if name in reserved:
            name = f"layer_{len(names)}"
        base, k = name, 1
        while name in used or any(u.startswith(name + ".") or name.startswith(u + ".") for u in used):
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


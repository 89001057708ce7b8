"""``sanitized_copy``: an untrusted ``.pt2`` archive screened member by member and rewritten with only what
a plain program needs (see the package docstring): bounded JSON, one program whose every node is
checked (``operators``, ``expressions``), weights and constants as raw tensor bytes that fit their records.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from qcore.errors import QcoreError
from qcore.io.pt2 import Refused
from qcore.io.pt2.expressions import check_expr
from qcore.io.pt2.operators import MAX_LITERAL_ELEMENTS, check_node, check_target, product_above

MAX_JSON_BYTES = 64 * 2**20  # model.json of a 6-layer transformer is 0.5 MiB
MAX_JSON_DEPTH = 64  # nesting levels; a plain program has ~10, each no_grad/autocast block adds ~8
_INT64 = 2**63

# torch._export.serde.schema.ScalarType codes of the real-number dtypes (layout 7 is strided).
DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
          7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}
STRIDED = 7


def _json(zf: zipfile.ZipFile, name: str):
    """A JSON member parsed with bounded size, nesting depth and integers."""
    if zf.getinfo(name).file_size > MAX_JSON_BYTES:
        raise Refused(f"has a {name.split('/')[-1]} above {MAX_JSON_BYTES // 2**20} MiB")
    return _parse_json(zf.read(name), name.split("/")[-1])


def _parse_json(raw: bytes | str, what: str):
    raw = raw.encode() if isinstance(raw, str) else raw
    if len(raw) > MAX_JSON_BYTES:
        raise Refused(f"has a {what} above {MAX_JSON_BYTES // 2**20} MiB")
    brackets = np.frombuffer(re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b"", raw), np.uint8)
    depth = np.cumsum(np.isin(brackets, (91, 123)).astype(np.int32) - np.isin(brackets, (93, 125)))
    if depth.size and depth.max() > MAX_JSON_DEPTH:
        raise Refused(f"has a {what} nested more than {MAX_JSON_DEPTH} levels deep")

    def bounded_int(digits: str) -> int:
        if len(digits) > 20 or not -_INT64 <= int(digits) < _INT64:
            raise Refused(f"has an integer in {what} outside int64 ({digits[:30]}...)")
        return int(digits)
    try:
        return json.loads(raw, parse_int=bounded_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise Refused(f"has a {what} that is not valid JSON ({str(e).splitlines()[0][:80]})") from None



def _check_program(program: dict) -> dict:
    """The program (models/model.json) checked node by node, without guard code or metadata
    torch would parse (JSON strings, operator names) beyond the stack trace and module paths."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise Refused("has a program without a graph")
    program["guards_code"] = []  # never run: the loader checks input shapes itself
    program["graph_module"]["metadata"] = {}
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))  # first node first: the refusal names the first offender
            continue
        if not isinstance(item, dict):
            continue
        if "target" in item:  # a graph node (the only schema type with a target)
            check_node(item)
            meta = item.get("metadata")
            item["metadata"] = {k: v for k, v in (meta if isinstance(meta, dict) else {}).items()
                                if k in ("stack_trace", "nn_module_stack") and isinstance(v, str)}
        if "as_operator" in item:
            check_target(item["as_operator"])
        if item.get("as_custom_obj") is not None or item.get("custom_obj_values"):
            raise Refused("contains custom (script) objects")
        if "expr_str" in item:
            check_expr(item["expr_str"])
        for key in ("in_spec", "out_spec"):
            if isinstance(item.get(key), str):
                _parse_json(item[key], key)
        stack.extend(reversed(item.values()))
    return program


def _check_payloads(zf: zipfile.ZipFile, root: str, kind: str) -> tuple[dict, list[str]]:
    """(config, records) of data/{kind}/model_{kind}_config.json: every entry a raw tensor whose
    (sizes, strides, offset) fit its record; ``records`` are the archive members it reads."""
    name = f"{root}data/{kind}/model_{kind}_config.json"
    if name not in zf.namelist():
        raise Refused(f"has no {kind} table (data/{kind}/model_{kind}_config.json)")
    config = _json(zf, name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise Refused(f"has a {kind} table without entries")
    prefix = "weight_" if kind == "weights" else "tensor_"
    sizes_of = {i.filename: i.file_size for i in zf.infolist()}  # inflated bytes, checked by zip_members
    records = set()
    for fqn, meta in entries.items():
        path = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False or not isinstance(path, str) \
                or not re.fullmatch(prefix + r"\d+", path):
            raise Refused(f"stores {fqn!r} as a pickled object")
        t = meta["tensor_meta"] if isinstance(meta.get("tensor_meta"), dict) else {}
        device = t["device"] if isinstance(t.get("device"), dict) else {}
        dims = [t.get("sizes"), t.get("strides"), [t.get("storage_offset")]]
        dims = [[d.get("as_int") if isinstance(d, dict) else None for d in (ds if isinstance(ds, list) else [None])]
                for ds in dims]
        dtype = DTYPES.get(t.get("dtype"))
        if dtype is None or t.get("layout") != STRIDED or device.get("type") != "cpu" or \
                len(dims[0]) != len(dims[1]) or not all(isinstance(v, int) and 0 <= v < _INT64 for d in dims for v in d):
            raise Refused(f"stores {fqn!r} as something other than a plain CPU tensor with fixed sizes")
        (sizes, strides, (offset,)) = dims
        if product_above(sizes, MAX_LITERAL_ELEMENTS):
            raise Refused(f"declares {fqn!r} with more than {MAX_LITERAL_ELEMENTS:,} elements")
        record = f"{root}data/{kind}/{path}"
        nbytes = sizes_of.get(record, -1)
        needed = 0 if 0 in sizes else (offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1) * dtype.itemsize
        if nbytes < needed or nbytes % dtype.itemsize:
            raise Refused(f"stores {fqn!r} in {max(nbytes, 0)} bytes, fewer than its sizes need ({needed})")
        records.add(record)
    return config, sorted(records)


def sanitized_copy(p: Path, folder: Path) -> Path:
    """``folder``/model.pt2: the parts of archive ``p`` a plain program needs, each checked (module
    docstring); QcoreError (one line) if anything in ``p`` would be unpickled, executed or unbounded."""
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            formats = [n for n in names if n.endswith("archive_format") and n.count("/") == 1]
            if len(formats) != 1 or zf.read(formats[0]).strip() != b"pt2":
                raise QcoreError(f"{p.name} is not a torch.export archive (no pt2 archive_format entry); "
                                 "save the program with torch.export.save(ep, 'model.pt2')")
            root = formats[0][:-len("archive_format")]
            rel = [n[len(root):] for n in names if n.startswith(root)]
            if any(r.startswith(("data/aotinductor/", "data/executorch/", "data/mtia"))
                   or r.endswith((".so", ".dll", ".dylib")) for r in rel):
                raise Refused("contains compiled code (AOTInductor)")
            programs = [r for r in rel if r.startswith("models/") and not r.endswith("/")]
            if not programs:
                raise QcoreError(f"{p.name} has no program named 'model'; save it with torch.export.save(ep, path)")
            if programs != ["models/model.json"]:
                raise Refused(f"holds {len(programs)} programs ({', '.join(programs)[:80]}), not one named 'model'")
            if any(r.startswith(("data/weights/", "data/constants/")) and r.endswith((".pt", ".pkl")) for r in rel):
                raise Refused("stores its weights in the legacy pickled format")
            if (root + "archive_version") in names and zf.read(root + "archive_version").strip() != b"0":
                raise Refused("has an archive version this torch does not read")
            program = _check_program(_json(zf, root + "models/model.json"))
            (weights, weight_records), (constants, constant_records) = (_check_payloads(zf, root, k)
                                                                         for k in ("weights", "constants"))
            from torch.export.pt2_archive._package import PT2ArchiveWriter

            out = folder / "model.pt2"
            with PT2ArchiveWriter(str(out)) as writer:
                writer.write_string("models/model.json", json.dumps(program))
                writer.write_string("data/weights/model_weights_config.json", json.dumps(weights))
                writer.write_string("data/constants/model_constants_config.json", json.dumps(constants))
                for record in weight_records + constant_records:
                    writer.write_bytes(record[len(root):], zf.read(record))
                writer.write_bytes("data/sample_inputs/model.pt", b"")  # empty: no example inputs
            return out
    except Refused as e:
        raise QcoreError(f"{p.name} {e}, so it is refused (nothing in an untrusted .pt2 may run); save a plain "
                         "program with torch.export.save(torch.export.export(model, (x,)), path), or, for a file you "
                         "trust, use the CLI with --trust-pickle (QCORE_TRUST_PICKLE=1)") from None

"""Hostile .pt2 and TorchScript uploads, built here from real exported programs: each is refused with one
line before torch deserializes anything, no marker file appears, and refusal is fast. Every payload is
first shown to work (a control that creates its marker), so a test that passes means the loader stopped it."""

import io
import json
import resource
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import nn

from qcore import preset
from qcore.errors import QcoreError
from qcore import limits
from qcore.io.models import load_model_file
from qcore.io.pt2 import Refused
from qcore.io.pt2.archive import sanitized_copy
from qcore.io.pt2.expressions import check_expr
from qcore.io.workload import load_workload


class TwoInputs(nn.Module):
    """Token ids and a float feature per token: torch 2.13 writes guard code for its two batch dims."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, a, b):
        return self.fc(self.emb(a) + b).mean(1)


class Marker:
    """Unpickling this creates ``path`` (what a hostile pickle would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def pickled_marker(path) -> bytes:
    buf = io.BytesIO()
    torch.save(Marker(path), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "two.pt2"
    batch = {0: torch.export.Dim("batch")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(TwoInputs().eval(), (torch.randint(0, 11, (2, 5)), torch.randn(2, 5, 4)),
                                 dynamic_shapes=(batch, batch))
        torch.export.save(ep, path)
    return path


def members(path: Path) -> tuple[str, dict[str, bytes]]:
    """(root folder, {path below the root: bytes}) of an archive."""
    with zipfile.ZipFile(path) as zf:
        root = zf.namelist()[0].split("/")[0] + "/"
        return root, {n[len(root):]: zf.read(n) for n in zf.namelist()}


def rewrite(src: Path, dst: Path, edit) -> Path:
    """``dst``: ``src`` with ``edit(files)`` applied to its members (a dict; model.json as a parsed dict)."""
    root, files = members(src)
    files["models/model.json"] = json.loads(files["models/model.json"])
    edit(files)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(root + name, json.dumps(data) if isinstance(data, dict) else data)
    return dst


def refused(path: Path, match: str, seconds: float = 2.0) -> str:
    start = time.perf_counter()
    with pytest.raises(QcoreError, match=match) as e:
        load_model_file(path)
    assert time.perf_counter() - start < seconds
    message = str(e.value)
    assert "\n" not in message and path.name in message
    return message


def nodes(files) -> list:
    return files["models/model.json"]["graph_module"]["graph"]["nodes"]


# ---- pickles: every place torch.export.load would unpickle --------------------------------------------
def test_the_marker_payload_works(tmp_path):
    torch.load(io.BytesIO(pickled_marker(tmp_path / "control")), weights_only=False)
    assert (tmp_path / "control").exists()


def _pickled_weight(files, marker):
    config = json.loads(files["data/weights/model_weights_config.json"])
    config["config"]["fc.bias"]["use_pickle"] = True
    files["data/weights/model_weights_config.json"] = json.dumps(config)
    files[f"data/weights/{config['config']['fc.bias']['path_name']}"] = pickled_marker(marker)


def _pickled_constant(files, marker):
    files["data/constants/model_constants_config.json"] = json.dumps({"config": {"lifted": {
        "path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}})
    files["data/constants/tensor_0"] = pickled_marker(marker)


def _custom_object(files, marker):
    files["data/constants/model_constants_config.json"] = json.dumps({"config": {"obj": {
        "path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}})
    files["data/constants/opaque_obj_0"] = pickled_marker(marker)


def _legacy_weights(files, marker):
    files["data/weights/model.pt"] = pickled_marker(marker)


def _second_program(files, marker):
    files["models/evil.json"] = json.dumps(files["models/model.json"])
    files["data/sample_inputs/evil.pt"] = pickled_marker(marker)
    files["data/weights/evil_weights_config.json"] = files["data/weights/model_weights_config.json"]
    files["data/constants/evil_constants_config.json"] = files["data/constants/model_constants_config.json"]


@pytest.mark.parametrize("edit, message", [
    (_pickled_weight, "stores 'fc.bias' as a pickled object"),
    (_pickled_constant, "stores 'lifted' as a pickled object"),
    (_custom_object, "stores 'obj' as a pickled object"),
    (_legacy_weights, "stores its weights in the legacy pickled format"),
    (_second_program, r"holds 2 programs \(models/.*evil.json"),
])
def test_pickles_are_refused_and_never_run(two_inputs, tmp_path, edit, message):
    marker = tmp_path / "marker"
    evil = rewrite(two_inputs, tmp_path / "evil.pt2", lambda files: edit(files, marker))
    assert "--trust-pickle" in refused(evil, message)
    assert not marker.exists()


def test_pickled_sample_inputs_are_never_read(two_inputs, tmp_path):
    """Sample inputs are ignored (shapes come from the graph): the program loads and nothing runs."""
    marker = tmp_path / "marker"
    evil = rewrite(two_inputs, tmp_path / "evil.pt2",
                   lambda files: files.update({"data/sample_inputs/model.pt": pickled_marker(marker)}))
    loaded = load_model_file(evil)
    assert [s.sample_shape for s in loaded.inputs] == [(5,), (5, 4)] and not marker.exists()
    _, copied = members(sanitized_copy(evil, tmp_path))
    assert copied["data/sample_inputs/model.pt"] == b"" and not any("evil" in n for n in copied)


# ---- operators: a graph may only call pure tensor operators --------------------------------------------
def _file_writer(files, path: str):
    """Before the graph's first node: t = aten.from_file(path, shared=True, size=4, dtype=uint8); t.fill_(65)."""
    graph = files["models/model.json"]["graph_module"]["graph"]
    meta = {"dtype": 1, "sizes": [{"as_int": 4}], "requires_grad": False, "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}
    graph["tensor_values"].update({"opened": meta, "written": meta})
    stack = {"nn_module_stack": graph["nodes"][1]["metadata"]["nn_module_stack"]}  # the root module's, as for add
    graph["nodes"][:0] = [
        {"target": "torch.ops.aten.from_file.default", "name": "opened", "metadata": stack,
         "inputs": [{"name": "filename", "arg": {"as_string": path}, "kind": 1},
                    {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                    {"name": "size", "arg": {"as_int": 4}, "kind": 1},
                    {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}],
         "outputs": [{"as_tensor": {"name": "opened"}}]},
        {"target": "torch.ops.aten.fill_.Scalar", "name": "written", "metadata": stack,
         "inputs": [{"name": "self", "arg": {"as_tensor": {"name": "opened"}}, "kind": 1},
                    {"name": "value", "arg": {"as_int": 65}, "kind": 1}],
         "outputs": [{"as_tensor": {"name": "written"}}]}]


def test_a_file_writing_graph_is_refused(two_inputs, tmp_path):
    marker = tmp_path / "marker"
    evil = rewrite(two_inputs, tmp_path / "evil.pt2", lambda files: _file_writer(files, str(marker)))
    trusted = load_model_file(evil, allow_pickle=True)  # control: the edited graph really writes the file
    with torch.no_grad():
        trusted.model(torch.randint(0, 11, (2, 5)), torch.randn(2, 5, 4))
    assert marker.read_bytes() == b"AAAA"
    marker.unlink()
    assert "aten.from_file.default" in refused(evil, "calls 'torch.ops.aten.from_file.default'")
    assert not marker.exists()


@pytest.mark.parametrize("target, message", [
    ("torch.ops.aten.add_.Tensor", "which is not on the engine's list"),  # in-place
    ("torch.ops.aten.add.out", r"writes into its argument 'out' \(in-place or out=\)"),
    ("torch.ops.aten.copy_.default", "which is not on the engine's list"),
    ("torch.ops.aten.set_.source_Storage", "which is not on the engine's list"),
    ("torch.ops.aten._copy_from.default", "which is not on the engine's list"),
    ("torch.save", "which is not on the engine's list"),  # torch.export resolves any torch.* callable
    ("builtins.exec", "which is not on the engine's list"),
    ("torch.ops.higher_order.cond", "which is not on the engine's list"),
    ("#custom:op", r"calls '#custom:op'"),
])
def test_operators_off_the_list_are_refused(two_inputs, tmp_path, target, message):
    def edit(files):
        nodes(files)[1]["target"] = target  # the add of embedding and feature
    message = refused(rewrite(two_inputs, tmp_path / "evil.pt2", edit), message)
    assert repr(target) in message


def test_huge_literal_sizes_are_refused(two_inputs, tmp_path):
    def edit(files):
        node = nodes(files)[-1]  # mean over dim [1] -> a repeat of 2**20 x 2**20
        node["target"], node["inputs"] = "torch.ops.aten.repeat.default", [
            {"name": "self", "arg": {"as_tensor": {"name": "linear"}}, "kind": 1},
            {"name": "repeats", "arg": {"as_ints": [2**20, 2**20, 1]}, "kind": 1}]
    refused(rewrite(two_inputs, tmp_path / "evil.pt2", edit), "asks 'torch.ops.aten.repeat.default' for a size")


# ---- symbolic expressions and JSON ---------------------------------------------------------------------
BOMB = "Pow(Integer(9), Pow(Integer(9), Pow(Integer(9), Pow(Integer(9), Integer(9)))))"


def test_a_sympy_bomb_is_refused_in_well_under_a_second(two_inputs, tmp_path):
    def edit(files):
        values = files["models/model.json"]["graph_module"]["graph"]["tensor_values"]
        values["a"]["sizes"][0]["as_expr"]["expr_str"] = BOMB
    evil = rewrite(two_inputs, tmp_path / "evil.pt2", edit)
    assert evil.stat().st_size < 16 * 1024
    refused(evil, "has a symbolic shape expression that is not plain arithmetic", seconds=1.0)


@pytest.mark.parametrize("expr", [
    BOMB, "Integer(10**30)", "Integer(" + "9" * 30 + ")", "LShift(Integer(1), Integer(10000))",
    "Pow(Pow(Pow(Pow(Integer(9999), Integer(16)), Integer(16)), Integer(16)), Integer(16))",
    "Symbol('s0').__class__", "__import__('os').system('true')", "Float('1e400')", "Float('1', precision=10**8)",
    "Symbol('x; import os')", "Add(" * 40 + "Integer(1)" + ")" * 40,
])
def test_only_small_plain_expressions_pass(expr):
    start = time.perf_counter()
    with pytest.raises(Refused):
        check_expr(expr)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("expr", [
    "Symbol('s52', positive=True, integer=True)", "Mul(Integer(-1), Symbol('s0', integer=True))",
    "Add(Mul(Integer(2), Symbol('s0')), Integer(-1))", "FloorDiv(Symbol('s0'), Integer(2))",
    "Pow(Symbol('s0'), Integer(-1))", "Float('0.5', precision=53)", "Rational(1, 2)", "true",
])
def test_what_torch_writes_passes(expr):
    check_expr(expr)


@pytest.mark.parametrize("member, data, message", [
    ("models/model.json", "[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),
    ("data/weights/model_weights_config.json", '{"config": ' * 5000 + "{}" + "}" * 5000, "nested more than"),
    ("models/model.json", '{"graph_module": {"graph": ' + "9" * 5000 + "}}", "integer in model.json outside int64"),
    ("models/model.json", "{not json", "not valid JSON"),
])
def test_bad_json_is_one_line(two_inputs, tmp_path, member, data, message):
    refused(rewrite(two_inputs, tmp_path / "evil.pt2", lambda files: files.update({member: data})), message)


# ---- TorchScript is compiled code ------------------------------------------------------------------------
class WritesOnLoad(nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by torch.jit.load) writes a file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        written = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8).fill_(65)
        self.training = state[1] or bool(written[0] != 65)  # uses the write, so TorchScript keeps it


class WritesOnRun(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x):
        written = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8).fill_(65)
        return x + 0 * written[:1].float()  # uses the write, so TorchScript keeps it


@pytest.mark.parametrize("cls", [WritesOnLoad, WritesOnRun])
def test_torchscript_is_refused_untrusted(tmp_path, cls):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(cls(str(marker))), path)
    if marker.exists():
        marker.unlink()  # __setstate__ payloads only run on load, not on save
    torch.jit.load(str(path))(torch.zeros(1))  # control: plain torch.jit.load runs the payload
    assert marker.read_bytes() == b"AAAA"
    marker.unlink()
    for name in ("evil.pt", "evil.ts"):
        (tmp_path / name).write_bytes(path.read_bytes())
        message = refused(tmp_path / name, "is a TorchScript archive: compiled code that would run")
        assert "torch.export.save" in message and "onnx" in message and "--trust-pickle" in message
        with pytest.raises(QcoreError, match="TorchScript"):
            load_workload(str(tmp_path / name))
    assert not marker.exists()


# ---- what must keep working ------------------------------------------------------------------------------
def test_a_two_input_program_loads_and_evaluates(two_inputs):
    """Guard code (torch 2.13 writes one for two batch dims) is dropped, not refused; integer inputs feeding
    an Embedding get synthetic ids over its table."""
    loaded = load_model_file(two_inputs)
    assert [(s.sample_shape, s.dtype, s.int_range) for s in loaded.inputs] == \
        [((5,), torch.int64, (0, 10)), ((5, 4), torch.float32, (0, 1))]
    w = load_workload(str(two_inputs))
    ids, features = w.calibration.inputs
    assert ids.dtype == torch.int64 and int(ids.max()) == 10 and int(ids.min()) == 0 and features.shape[1:] == (5, 4)
    result = w.evaluate(preset("int8-dynamic", w.layer_shapes)).to_dict()
    assert w.task.headline == "agreement" and result["fp32"]["metrics"]["agreement"] == 1.0
    assert 0.8 < result["quantized"]["metrics"]["agreement"] <= 1.0


# ---- bounded in bytes --------------------------------------------------------------------------------------
def _bomb(src: Path, dst: Path, inflated: int, declared: int | None) -> Path:
    """``src`` with its first weight replaced by ``inflated`` deflated zero bytes; ``declared`` (if set) is
    the size its zip headers claim instead."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        name = next(n for n in zin.namelist() if n.endswith("data/weights/weight_0"))
        for info in zin.infolist():
            if info.filename != name:
                zout.writestr(info, zin.read(info))
        chunk, deflate, crc = bytes(2**20), zlib.compressobj(9, zlib.DEFLATED, -15), 0
        body = []
        for _ in range(inflated // len(chunk)):
            body.append(deflate.compress(chunk))
            crc = zlib.crc32(chunk, crc)
        body = b"".join(body) + deflate.flush()
        info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
        info.compress_type, info.CRC, info.compress_size = zipfile.ZIP_DEFLATED, crc, len(body)
        info.file_size, info.header_offset = declared or inflated, zout.fp.tell()
        zout.fp.write(info.FileHeader() + body)
        zout.start_dir = zout.fp.tell()
        zout.filelist.append(info)
        zout.NameToInfo[name] = info
        zout._didModify = True
    return dst


@pytest.mark.parametrize("declared", [None, 1000], ids=["honest-header", "lying-header"])
def test_deflate_bombs_are_refused_within_bounds(two_inputs, tmp_path, monkeypatch, declared):
    monkeypatch.setattr(limits, "MAX_UPLOAD_BYTES", 2**20)  # a 1 MiB upload limit: a 64 MiB member is a bomb
    bomb = _bomb(two_inputs, tmp_path / "bomb.pt2", 64 * 2**20, declared)
    assert bomb.stat().st_size < 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    refused(bomb, "unpacks to more than", seconds=2.0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 48 * 1024

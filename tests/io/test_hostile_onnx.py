"""Hostile ONNX uploads (built here with onnx.helper, never committed): external data may only point at
a regular file beside the upload, and constant folding, declared input shapes and value-dependent
operators at run time are bounded, so a few KB cannot read a server file or allocate GiBs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcore.errors import QcoreError
from qcore.io.onnx.convert import convert
from qcore.io.onnx.proto import all_tensors
from qcore.io.models import load_model_file
from qcore.io.onnx.file import _load_external_data
from qcore.io.workload import load_workload

SECRET = b"TOP-SECRET-0123!"  # 16 bytes: the size of the tensor each payload asks for
HINT = "export a single file with torch.onnx.export(..., external_data=False)"


def _external(name: str, location: str, offset=None, length=None) -> TensorProto:
    """A uint8 tensor of 16 values whose bytes are in ``location``."""
    t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[16], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    return t


def _model(nodes, inits=(), inputs=None) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _leaky(place: str, location: str, **range_) -> onnx.ModelProto:
    """y = x + float(c), where c's 16 bytes come from ``location``: the tensor sits in a Constant's
    attribute, in an initializer, or in a Constant inside the then-branch of an If in an If."""
    t = _external("leak", location, **range_)
    to_y = [helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "cf"], ["y"])]
    if place == "initializer":
        return _model([helper.make_node("Identity", ["leak"], ["c"]), *to_y], [t])
    constant = helper.make_node("Constant", [], ["c"], value=t, name="leak_node")
    if place == "attribute":
        return _model([constant, *to_y])
    out = [helper.make_tensor_value_info("c", TensorProto.UINT8, [16])]
    inner = helper.make_graph([constant], "inner", [], out)
    empty = helper.make_graph([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros(16, np.uint8)))],
                              "empty", [], out)
    cond = helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.array(True)))
    nested = helper.make_node("If", ["b"], ["c"], then_branch=inner, else_branch=empty, name="inner_if")
    outer = helper.make_graph([nested], "outer", [], out)
    return _model([cond, helper.make_node("If", ["b"], ["c"], then_branch=outer, else_branch=empty, name="outer_if"), *to_y])


WHERE = {"attribute": "attribute 'value' of node 'leak_node'", "initializer": "initializer 'leak'",
         "subgraph": "attribute 'value' of node 'leak_node'"}


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The server's working directory (holding its 'secret' and a copy of it as 'm.onnx.data', the name a
    weight file beside the model would have) and an upload folder, whose model file is returned."""
    cwd, up = tmp_path / "cwd", tmp_path / "up"
    cwd.mkdir()
    up.mkdir()
    for name in ("secret.txt", "m.onnx.data"):
        (cwd / name).write_bytes(SECRET * 4)
    monkeypatch.chdir(cwd)
    return up / "m.onnx"


def _cases(cwd: Path, up: Path) -> dict[str, tuple[str, dict, str]]:
    """name -> (location, offset/length, what the message says), creating what each needs in ``up``."""
    (up / "beside.bin").write_bytes(b"\x01" * 32)
    (up / "to_secret").symlink_to(cwd / "secret.txt")
    (up / "to_zero").symlink_to("/dev/zero")
    os.mkfifo(up / "fifo")
    (up / "folder").mkdir()
    return {
        "relative to the working directory": ("secret.txt", {}, "which is not beside it"),
        "weight-file name found only in the working directory": ("m.onnx.data", {}, "which is not beside it"),
        "absolute path": (str(cwd / "secret.txt"), {}, "is not a plain file name beside the model"),
        "parent folder": ("../cwd/secret.txt", {}, "is not a plain file name beside the model"),
        "dot-dot": ("..", {}, "is not a plain file name beside the model"),
        "backslash": ("..\\cwd\\secret.txt", {}, "is not a plain file name beside the model"),
        "drive": ("C:secret.txt", {}, "is not a plain file name beside the model"),
        "/dev/zero": ("/dev/zero", {}, "is not a plain file name beside the model"),
        "symlink beside the upload to a secret": ("to_secret", {}, "is not a regular file"),
        "symlink beside the upload to /dev/zero": ("to_zero", {}, "is not a regular file"),
        "FIFO beside the upload": ("fifo", {}, "is not a regular file"),
        "folder beside the upload": ("folder", {}, "is not a regular file"),
        "offset past the end": ("beside.bin", {"offset": 40}, "has 32 bytes, but the tensor asks for bytes 40 to 40"),
        "length past the end": ("beside.bin", {"offset": 20, "length": 16}, "has 32 bytes, but the tensor asks for bytes 20 to 36"),
        "offset not a number": ("beside.bin", {"offset": "0x10"}, "offset or length that is not a whole number"),
    }


@pytest.mark.parametrize("place", ["attribute", "subgraph", "initializer"])
def test_external_data_outside_the_upload_is_refused_in_one_line(server, place):
    up, cwd = server.parent, Path.cwd()
    for case, (location, range_, problem) in _cases(cwd, up).items():
        onnx.save(_leaky(place, location, **range_), server)
        with pytest.raises(QcoreError) as e:
            (load_workload if case.startswith("relative") else load_model_file)(str(server))
        message = str(e.value)
        assert "\n" not in message, case
        assert message.startswith(f"m.onnx: {WHERE[place]} keeps its data in a separate file "
                                  f"{location[:80]!r}, which "), (case, message)
        assert problem in message and message.endswith(HINT), (case, message)
        assert SECRET.decode() not in message


def test_external_data_beside_the_upload_loads_and_is_copied_into_the_model(server):
    """The legitimate case: the bytes come from the file beside the model (not the working directory's
    file of the same name), and afterwards no tensor in the proto refers to any file."""
    weights = bytes(range(100, 148))  # 48 bytes; the tensors read 16 of them from offset 8
    (server.parent / "m.onnx.data").write_bytes(weights)
    for place in ("attribute", "subgraph", "initializer"):
        proto = _leaky(place, "m.onnx.data", offset=8, length=16)
        onnx.save(proto, server)
        if place == "subgraph":  # the data loads into the nested If's branch (which the importer inlines)
            _load_external_data(proto, server, 10_000)
            assert all(t.data_location == TensorProto.DEFAULT and not t.external_data
                       for t, _ in all_tensors(proto))
            assert [t.raw_data for t, _ in all_tensors(proto) if t.name == "leak"] == [weights[8:24]]
        model = load_model_file(server).model
        with torch.no_grad():
            y = model(torch.zeros(1, 16))
        assert y.tolist() == [list(map(float, weights[8:24]))]
    with pytest.raises(QcoreError, match=r"^m.onnx with the external data of its tensors \(up to initializer 'leak'\) "
                                         r"is above the limit of [\d,]+ bytes; .*QCORE_MAX_UPLOAD_MB"):
        load_model_file(server, max_bytes=server.stat().st_size + 15)  # one byte short of the 16 it reads
    assert load_model_file(server, max_bytes=server.stat().st_size + 16).format == "onnx"


def test_convert_never_resolves_external_data_itself(server):
    """A proto handed to ``convert`` directly (not through the file loader) cannot read a file either."""
    for place in ("attribute", "initializer"):
        with pytest.raises(QcoreError, match=f"the ONNX model's {WHERE[place]} keeps its data in an external file"):
            convert(_leaky(place, "secret.txt"))


def test_export_is_never_reached_with_a_leaking_upload(server, capsys):
    from test_cli import run

    onnx.save(_leaky("attribute", "secret.txt"), server)
    out = server.parent / "out.onnx"
    code, stdout, err = run(capsys, "export", str(server), "--preset", "int8-dynamic", "--format", "onnx",
                            "--out", str(out))
    assert (code, stdout, err.count("\n")) == (2, "", 1) and "keeps its data in a separate file 'secret.txt'" in err
    assert not out.exists()


# ---- sizes: constant folding, declared shapes, run time -------------------------------------------------
def _int64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _bombs(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say): each file is a few hundred bytes and would allocate GiBs."""
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    ones = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    to_y = helper.make_node("Add", ["x", "big"], ["y"])
    folded = "at import, above the limit of 50.0 MiB for one folded tensor"  # the test runs with a 50 MiB upload limit
    models = {
        "ConstantOfShape": (_model([helper.make_node("ConstantOfShape", ["s"], ["big"], value=ones, name="cos"), to_y],
                                   [_int64("s", [40000, 40000])]), "'ConstantOfShape' (node 'cos') would create a constant of 6.0 GiB (shape (40000, 40000)) " + folded),
        "Tile": (_model([helper.make_node("Tile", ["one", "r"], ["big"], name="tile"), to_y], [one, _int64("r", [1_700_000_000])]),
                 "'Tile' (node 'tile') would create a constant of 6.3 GiB (shape (1700000000,)) " + folded),
        "Expand then Mul": (_model([helper.make_node("Expand", ["one", "s"], ["e"], name="expand"),
                                    helper.make_node("Mul", ["e", "e"], ["big"], name="mul"), to_y],
                                   [one, _int64("s", [40000, 40000])]), "'Expand' (node 'expand') would create a constant of 6.0 GiB (shape (40000, 40000)) " + folded),
        "Range": (_model([helper.make_node("Range", ["a", "b", "c"], ["r"], name="range"),
                          helper.make_node("Cast", ["r"], ["big"], to=TensorProto.FLOAT), to_y],
                         [_int64("a", 0), _int64("b", 2_000_000_000), _int64("c", 1)]), "'Range' (node 'range') would create a constant of 14.9 GiB (shape (2000000000,)) " + folded),
        "Pad": (_model([helper.make_node("Pad", ["one", "p"], ["big"], name="pad"), to_y], [one, _int64("p", [0, 1_600_000_000])]),
                "'Pad' (node 'pad') would create a constant of 6.0 GiB (shape (1600000001,)) " + folded),
        "broadcast Add": (_model([helper.make_node("ConstantOfShape", ["s1"], ["col"], value=ones),
                                  helper.make_node("ConstantOfShape", ["s2"], ["row"], value=ones),
                                  helper.make_node("Add", ["col", "row"], ["big"], name="outer"), to_y],
                                 [_int64("s1", [40000, 1]), _int64("s2", [1, 40000])]),
                          "'Add' (node 'outer') would create a constant of 6.0 GiB (shape (40000, 40000)) " + folded),
        "many small folds": (_model([helper.make_node("ConstantOfShape", ["s"], [f"c{i}"], value=ones, name=f"c{i}")
                                     for i in range(3)] + [helper.make_node("Sum", ["c0", "c1", "c2"], ["big"]), to_y],
                                    [_int64("s", [3000, 4000])]),
                             ("'ConstantOfShape' (node 'c2') would bring the constants folded at import to 137.3 MiB, "
                              "above the limit of 100.0 MiB")),
        "MatMul work": (_model([helper.make_node("ConstantOfShape", ["s"], ["m"], value=ones),
                                helper.make_node("MatMul", ["m", "m"], ["big"], name="mm"), to_y], [_int64("s", [3000, 3000])]),
                        ("'MatMul' (node 'mm') would bring the work of folding constants at import to 27,027,000,002 "
                         "element operations, above the limit of 4,294,967,296")),
        "declared input": (_model([helper.make_node("Relu", ["x"], ["y"])],
                                  inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 100000, 100000])]),
                           ("ONNX input 'x' declares 10,000,000,000 values per sample (shape (1, 100000, 100000)), "
                            "above the limit of 67,108,864")),
        "ConstantOfShape at run time": (_model([helper.make_node("Shape", ["x"], ["sx"]),
                                                helper.make_node("Mul", ["sx", "k"], ["s"]),
                                                helper.make_node("ConstantOfShape", ["s"], ["big"], value=ones, name="run"), to_y],
                                               [_int64("k", [40000, 2500])]),
                                        "'ConstantOfShape' (node 'run') would create a tensor above 2.0 GiB at run time"),
    }
    paths = {}
    for name, (model, message) in models.items():
        path = d / f"{name.replace(' ', '_')}.onnx"
        onnx.save(model, path)
        assert path.stat().st_size < 3000
        paths[name] = (path, message)
    return paths


MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from qcore.errors import QcoreError
    from qcore.io.workload import load_workload

    def hwm_kib():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

    import onnx.checker  # warm up: imports and first allocations are not the payload's
    load_workload("digits-mlp")
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, ((vm + 2 * 2**20) * 1024,) * 2)  # a regression fails, not the machine
    before, out = hwm_kib(), {}
    for path in sys.argv[1:]:
        start = time.perf_counter()
        try:
            load_workload(path)
            error = None
        except QcoreError as e:
            error = str(e)
        except MemoryError as e:
            error = "MemoryError"
        out[path] = {"seconds": time.perf_counter() - start, "error": error}
    print(json.dumps({"results": out, "hwm_growth_mib": (hwm_kib() - before) / 1024}))
""")


def test_size_bombs_are_refused_fast_in_little_memory(tmp_path):
    bombs = _bombs(tmp_path)
    env = {**os.environ, "QCORE_MAX_UPLOAD_MB": "50", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", MEASURE, *(str(p) for p, _ in bombs.values())],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (path, expected) in bombs.items():
        got = report["results"][str(path)]
        assert got["error"] is not None and "\n" not in got["error"], (name, got)
        assert expected in got["error"], (name, got["error"])
        assert got["seconds"] < 2, (name, got)
    assert report["hwm_growth_mib"] < 300, report

"""Hostile CLI invocations: every user-caused failure is exit 2 with exactly one stderr line naming the problem.

Most cases run in-process through ``qcore.cli.main`` (fast); a few run ``python -m qcore`` as a subprocess to
check what only a real process shows (C-level stderr, import-time warnings). The payloads are built in
``tmp_path`` by the tests themselves. Internal bugs must stay tracebacks.
"""

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from qcore import cli
from qcore.errors import QcoreError

ROOT = Path(__file__).resolve().parents[1]
M = "digits-mlp"

# name -> recipe file content (bytes), each written to tmp_path
RECIPE_FILES = {
    "deep_array": b"[" * 100_000 + b"]" * 100_000,
    "deep_object": b'{"weights":' * 50_000 + b"null" + b"}" * 50_000,
    "huge": b'{"name": "' + b"a" * (2 * 2**20) + b'"}',
    "digits_5000": b'{"weights": {"format": "int8", "group_size": ' + b"9" * 5000 + b"}}",
    "int_10e20": b'{"weights": {"format": "int8", "granularity": "per_group", "group_size": 100000000000000000000}}',
    "float_1e999": b'{"weights": {"range": "percentile", "percentile": 1e999}}',
    "nan": b'{"weights": {"range": "percentile", "percentile": NaN}}',
    "infinity": b'{"activations": {"percentile": Infinity}}',
    "group_abc": b'{"weights": {"format": "int8", "granularity": "per_group", "group_size": "abc"}}',
    "bits": b'{"weights": {"format": "int8", "bits": -1}}',
    "weights_list": b'{"weights": [1, 2]}',
    "layers_list": b'{"layers": [["fc1", null]]}',
    "layer_string": b'{"layers": {"fc1": "int4"}}',
    "name_object": b'{"name": {"a": [1, 2, 3]}, "weights": {"format": "int8"}}',
    "unknown_key": b'{"weights": {"format": "int8"}, "extra": 1}',
    "non_utf8": b'{"name": "\xff\xfe", "weights": {"format": "int8"}}',
    "empty": b"",
    "top_level_number": b"5",
    "axis_far": b'{"weights": {"format": "int8", "granularity": "per_channel", "axis": 99}}',
}
RECIPE_MESSAGES = {
    "deep_array": "nested more than 8 levels deep",
    "deep_object": "nested more than 8 levels deep",
    "huge": "larger than 1 MiB",
    "digits_5000": "an integer with 5,000 digits",
    "int_10e20": "an integer with 21 digits",
    "float_1e999": "the number 1e999, which is not finite",
    "nan": "holds NaN, which is not a JSON number",
    "infinity": "holds Infinity, which is not a JSON number",
    "group_abc": "weights.group_size='abc' must be an integer",
    "bits": "unknown key weights.'bits'",
    "weights_list": "weights must be an object",
    "layers_list": "recipe.layers must be an object",
    "layer_string": "layers['fc1'] must be an object",
    "name_object": "recipe.name={'a': [1, 2, 3]} must be a string",
    "unknown_key": "unknown recipe key 'extra'",
    "non_utf8": "not UTF-8 text (byte 10)",
    "empty": "not valid JSON",
    "top_level_number": "a recipe must be a JSON object",
    "axis_far": "weights.axis=99 must be a dimension index in [-8, 8)",
}


def run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, out, err, names):
    assert code == 2, (code, err[:500])
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1 and err.strip(), err[:500]
    assert "Traceback" not in err and err.startswith("error: ")
    assert len(err) <= cli.MAX_ERROR_CHARS + 10
    assert any(n in err for n in ([names] if isinstance(names, str) else names)), err


@pytest.mark.parametrize("name", list(RECIPE_FILES))
def test_hostile_recipe_files(capsys, tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_bytes(RECIPE_FILES[name])
    start = time.perf_counter()
    code, out, err = run(capsys, "evaluate", M, "--recipe", str(path))
    assert time.perf_counter() - start < 5
    assert_one_line(code, out, err, RECIPE_MESSAGES[name])


def test_hostile_recipe_paths(capsys, tmp_path):
    """A directory, a device, a missing file, a too-long name, and a 10 GiB sparse file (only 1 MiB is read)."""
    sparse = tmp_path / "sparse.json"
    with open(sparse, "wb") as f:
        f.truncate(10 * 2**30)
    cases = [(str(tmp_path), "is not a regular file"), ("/dev/zero", "'/dev/zero' is not a regular file"),
             (str(tmp_path / "missing.json"), "nor a recipe file that exists"), ("[" * 100_000, "File name too long"),
             (str(sparse), "larger than 1 MiB")]
    for arg, message in cases:
        start = time.perf_counter()
        code, out, err = run(capsys, "evaluate", M, "--recipe", arg)
        assert time.perf_counter() - start < 2, arg[:40]
        assert_one_line(code, out, err, message)


def _files(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    (tmp_path / "model.txt").write_bytes(b"hello")
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "data.txt").write_bytes(b"1,2\n")
    (tmp_path / "adir.onnx").mkdir()
    (tmp_path / "adir.npz").mkdir()


@pytest.mark.parametrize("argv, names", [
    (["inspect", "{t}/missing.onnx"], "missing.onnx"),
    (["inspect", "{t}/adir.onnx"], "adir.onnx"),
    (["inspect", "{t}/empty.onnx"], "empty.onnx is empty"),
    (["inspect", "{t}/junk.onnx"], "junk.onnx"),
    (["inspect", "{t}/model.txt"], "unsupported model file extension '.txt'"),
    (["inspect", "[" * 5000], "File name too long"),
    (["inspect", M, "--data", "{t}/missing.npz"], "missing.npz"),
    (["inspect", M, "--data", "{t}/adir.npz"], "adir.npz"),
    (["inspect", M, "--data", "{t}/empty.npz"], "empty.npz is empty"),
    (["inspect", M, "--data", "{t}/junk.npz"], "junk.npz"),
    (["inspect", M, "--data", "{t}/data.txt"], "unsupported data file extension '.txt'"),
    (["inspect", M, "--data", "x" * 5000 + ".npz"], "File name too long"),
    (["inspect", M, "--data", "shape:0x0"], "input shape '0x0'"),
    (["evaluate", M, "--data", "shape:", "--preset", "fp16"], "input shape ''"),
    # a synthetic input of 256 x 10^8 floats (~95 GiB): refused by a shape limit or when the allocation fails
    (["inspect", M, "--data", "shape:99999999x99999999"], ["99999999", "ran out of memory while running inspect"]),
    (["evaluate", M, "--data", "shape:1x99999999", "--preset", "fp16"], ["99999999", "ran out of memory"]),
    (["evaluate", M, "--preset", "fp16", "--recipe", "{t}/r.json"], "give exactly one of --preset NAME or --recipe FILE"),
    (["search", M, "--candidates", "int8-static", "--max-size-bytes", "-1"], "max_size_bytes=-1"),
    (["search", M, "--candidates", "int8-static", "--max-size-bytes", "9" * 5000], "invalid int value"),
    (["search", M, "--candidates", "int8-static", "--max-size-fraction", "nan"], "max_size_fraction=nan"),
    (["search", M, "--candidates", ",,,", "--max-size-fraction", "0.5"], "at least one candidate"),
    (["search", M, "--candidates", "int8-static", "--max-size-fraction", "0.5", "--out", "{t}/no/dir/r.json"],
     "does not exist"),
    (["search", M, "--candidates", "int8-static", "--max-size-fraction", "0.5", "--out", "{t}"], "is a directory"),
    (["search", M, "--candidates", "int8-static", "--max-size-fraction", "0.5", "--out", "/proc/version"],
     "cannot be written"),
    (["sensitivity", M, "--candidates", "int99"], "unknown candidate 'int99'"),
    (["export", M, "--preset", "fp16", "--format", "onnx", "--out", "{t}/no/dir/m.onnx"], "does not exist"),
    (["export", M, "--preset", "fp16", "--format", "onnx", "--out", "{t}"], "is a directory"),
    (["export", M, "--preset", "fp16", "--format", "onnx", "--out", ""], "is a directory"),
    (["export", M, "--preset", "fp16", "--format", "safetensors", "--out", "/proc/m.safetensors"], "cannot be written"),
    (["export", M, "--preset", "fp16", "--format", "onnx", "--out", "/dev/null"], "is not a regular file"),
    (["export", M, "--preset", "fp16", "--format", "onnx", "--out", "x" * 5000], "File name too long"),
    (["export", M, "--preset", "fp16", "--format", "pdf", "--out", "{t}/m.pdf"], "invalid choice: 'pdf'"),
    (["bench", M, "--preset", "fp16", "--threads", "100000"], "'100000' is not a whole number from 1 to"),
    (["bench", M, "--preset", "fp16", "--threads", "0"], "'0' is not a whole number from 1 to"),
    (["bench", M, "--preset", "fp16", "--batch-size", "-1"], "'-1' is not a whole number from 1 to 65536"),
    (["bench", M, "--preset", "fp16", "--batch-size", "9" * 5000], "is not a whole number from 1 to 65536"),
    (["formats", "--bogus"], "unrecognized arguments: --bogus"),
    (["models", "extra"], "unrecognized arguments: extra"),
])
def test_hostile_arguments(capsys, tmp_path, argv, names):
    _files(tmp_path)
    (tmp_path / "r.json").write_text("{}")
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    assert_one_line(*run(capsys, *argv), names)
    assert not (tmp_path / "no").exists()


def test_out_of_memory_is_one_line(capsys, monkeypatch):
    """MemoryError (Python, numpy) and torch's allocator RuntimeError raised by a command become one line."""
    def torch_alloc(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 107374182400 bytes. Error code 12 (Cannot allocate memory)")

    def python_alloc(args):
        warnings.warn("a library warning before the failure", UserWarning)
        raise MemoryError()

    monkeypatch.setattr(cli, "cmd_inspect", torch_alloc)
    assert_one_line(*run(capsys, "inspect", M), "ran out of memory while running inspect (it tried to allocate "
                                                "100.0 GiB); try a smaller input or recipe")
    monkeypatch.setattr(cli, "cmd_formats", python_alloc)
    assert_one_line(*run(capsys, "formats"), "ran out of memory while running formats; try a smaller input or recipe")


def test_warnings_wait_for_success(capsys, monkeypatch):
    """Warnings never precede the error line, and on success go to stderr, never into --json stdout."""
    def warn_then(fail):
        def command(args):
            warnings.warn("torch says something", UserWarning)
            warnings.warn("deprecated thing", DeprecationWarning)
            if fail:
                raise QcoreError("the file is bad; fix it")
            return {"ok": 1}, "ok"
        return command

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(cli, "cmd_formats", warn_then(True))
        assert_one_line(*run(capsys, "formats", "--json"), "error: the file is bad; fix it")
        monkeypatch.setattr(cli, "cmd_formats", warn_then(False))
        code, out, err = run(capsys, "formats", "--json")
    assert code == 0 and json.loads(out) == {"ok": 1}
    assert "UserWarning: torch says something" in err and "DeprecationWarning: deprecated thing" in err


def test_a_multiline_error_is_folded_into_one_line(capsys, monkeypatch):
    def command(args):
        raise QcoreError("first line\nsecond line\r\n" + "x" * 5000)

    monkeypatch.setattr(cli, "cmd_formats", command)
    code, out, err = run(capsys, "formats")
    assert_one_line(code, out, err, "error: first line second line xxx")
    assert err.endswith("...\n")


def test_successes_print_clean_json(capsys, tmp_path):
    """An ONNX export (torch.onnx and ORT are noisy) still prints exactly one JSON document on stdout."""
    code, out, err = run(capsys, "export", M, "--preset", "int8-static", "--format", "onnx", "--out",
                         str(tmp_path / "m.onnx"), "--json")
    assert code == 0 and json.loads(out)["file_size_bytes"] == (tmp_path / "m.onnx").stat().st_size > 0
    assert "Traceback" not in err


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), RuntimeError("mat1 and mat2 shapes differ")])
def test_internal_bugs_propagate(capsys, monkeypatch, error):
    """Only user errors and allocation failures are caught; any other exception is a bug and propagates."""
    def command(args):
        warnings.warn("context for the bug", UserWarning)
        raise error

    monkeypatch.setattr(cli, "cmd_formats", command)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(type(error)):
            cli.main(["formats"])
    assert "context for the bug" in capsys.readouterr().err  # the warnings are shown with the traceback


# Runs the cases in one real process (one torch import), marking where each ends, then an internal bug.
_SCRIPT = """
import json, sys
import qcore.cli as c
for argv in json.loads(sys.argv[1]):
    try:
        code = c.main(argv)
    except SystemExit as e:
        code = e.code
    sys.stdout.flush()
    print(f"@@exit {code}@@", file=sys.stderr, flush=True)
    print("@@", flush=True)
c.cmd_formats = lambda args: 1 / 0
c.main(["formats"])
"""


def test_a_real_process_prints_one_line_per_failure_and_a_traceback_for_a_bug(tmp_path):
    """In a real process, so import-time warnings and C-level stderr (torch, onnx, ORT) would show: a deep
    recipe, a 5,000-digit integer, a broken ONNX file, a 95 GiB synthetic input and an absurd thread count
    each give one line; then a bug (1 / 0) gives a traceback and exit code 1."""
    import re

    deep, digits, junk = tmp_path / "deep.json", tmp_path / "digits.json", tmp_path / "junk.onnx"
    deep.write_bytes(RECIPE_FILES["deep_array"])
    digits.write_bytes(RECIPE_FILES["digits_5000"])
    junk.write_bytes(b"\x08\x07" + b"\xff" * 64)
    cases = [
        (["evaluate", M, "--recipe", str(deep), "--json"], ["nested more than 8 levels deep"]),
        (["evaluate", M, "--recipe", str(digits)], ["an integer with 5,000 digits"]),
        (["inspect", str(junk), "--json"], ["junk.onnx"]),
        (["evaluate", M, "--data", "shape:99999999x99999999", "--preset", "int8-static"], ["99999999", "memory"]),
        (["bench", M, "--preset", "fp16", "--threads", "100000"], ["'100000' is not a whole number"]),
    ]
    p = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([a for a, _ in cases])], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    errs = re.split(r"@@exit (\S+)@@\n", p.stderr)  # [err0, code0, err1, code1, ..., traceback]
    outs = p.stdout.split("@@\n")
    assert len(errs) == 2 * len(cases) + 1, p.stderr[-2000:]
    for i, (_, names) in enumerate(cases):
        assert_one_line(int(errs[2 * i + 1]), outs[i], errs[2 * i], names)
    assert p.returncode == 1 and "Traceback" in errs[-1] and "ZeroDivisionError" in errs[-1]


# ---- export / bench: every user-caused failure is one line, a success prints no library chatter ----------
_PT2_SCRIPT = """
import sys, torch
from torch import nn
kind, path = sys.argv[1], sys.argv[2]
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
    def forward(self, x):
        y = self.fc(x)
        if kind == "fails":  # a runtime assertion that no standard-normal input passes
            n = (x > 1e9).sum().item()
            torch._check(n > 0)
            y = y + n
        if kind == "no_onnx":  # an operator the ONNX exporter has no function for
            y = y + torch.linalg.eigvalsh(self.fc.weight @ self.fc.weight.T)
        return y
ep = torch.export.export(M().eval(), (torch.randn(2, 8),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
torch.export.save(ep, path)
"""


def _pt2(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.pt2"
    subprocess.run([sys.executable, "-c", _PT2_SCRIPT, kind, str(path)], check=True, capture_output=True, timeout=120)
    return str(path)


def test_regression_export_and_bench_of_a_failing_pt2_are_one_line(capsys, tmp_path):
    """Regression: export/bench of a .pt2 printed torch warnings before the error line, and a .pt2 the ONNX
    exporter cannot convert, or a TorchScript model (nothing to trace), ended in a traceback."""
    import torch
    from torch import nn

    fails, no_onnx = _pt2(tmp_path, "fails"), _pt2(tmp_path, "no_onnx")
    out = str(tmp_path / "m.onnx")
    for model in (fails,):
        for trust in ([], ["--trust-pickle"]):  # untrusted: refused by the checker; trusted: its forward fails
            assert_one_line(*run(capsys, *trust, "export", model, "--preset", "int8-dynamic", "--format", "onnx",
                                 "--out", out), ["fails.pt2", "the model failed on inputs"])
            assert_one_line(*run(capsys, *trust, "bench", model, "--preset", "int8-dynamic"),
                            ["fails.pt2", "the model failed on inputs"])
    for argv in (["export", no_onnx, "--preset", "int8-dynamic", "--format", "onnx", "--out", out],
                 ["bench", no_onnx, "--preset", "fp32"]):
        assert_one_line(*run(capsys, "--trust-pickle", *argv),
                        "no_onnx.pt2 could not be converted to ONNX (DispatchError: No ONNX function found for "
                        "<OpOverload(op='aten._linalg_eigh'")
    ts = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(8, 4))), str(ts))
    for argv in (["export", str(ts), "--data", "shape:1x8", "--preset", "int8-weight-only", "--format", "onnx",
                  "--out", out], ["bench", str(ts), "--data", "shape:1x8", "--preset", "int8-weight-only"]):
        assert_one_line(*run(capsys, "--trust-pickle", *argv), "m.ts is a TorchScript model, which the ONNX exporter "
                                                               "cannot trace")
    # a bad recipe and a bad output path, for both commands
    assert_one_line(*run(capsys, "bench", no_onnx, "--recipe", '{"weights": {"format": "int9"}}'), "int9")
    assert_one_line(*run(capsys, "export", no_onnx, "--preset", "fp16", "--format", "onnx",
                         "--out", str(tmp_path / "no" / "m.onnx")), "does not exist")


_CHATTY_SCRIPT = """
import copyreg, json, logging, sys, warnings
import qcore.cli as c
def chatty(args):  # what torch does inside torch.onnx.export / torch.export.load
    logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed. Skipping x")
    warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, copyreg.__file__, 105)
    return {}, "ok"
c.cmd_formats = chatty
for argv in json.loads(sys.argv[1]):
    try:
        code = c.main(argv)
    except SystemExit as e:
        code = e.code
    sys.stdout.flush()
    print(f"@@exit {code}@@", file=sys.stderr, flush=True)
    print("@@", flush=True)
"""


def test_a_real_process_exports_and_benches_a_pt2_without_library_chatter(tmp_path):
    """In a real process torch's loggers write straight to stderr ("W1201 ... torchvision is not installed") and
    torch.export's pytree raises FutureWarnings: a success prints nothing on stderr, a failure one line."""
    import re

    good = tmp_path / "good.pt2"
    subprocess.run([sys.executable, "-c", _PT2_SCRIPT, "good", str(good)], check=True, capture_output=True, timeout=120)
    cases = [
        (["export", str(good), "--preset", "int8-dynamic", "--format", "onnx", "--out", str(tmp_path / "g.onnx"),
          "--json"], None),
        (["bench", str(good), "--preset", "int8-dynamic", "--json"], None),
        (["formats"], None),  # torch's log line and pytree FutureWarning, raised inside a command
        (["bench", str(good), "--recipe", str(tmp_path / "none.json")], "none.json"),
    ]
    p = subprocess.run([sys.executable, "-c", _CHATTY_SCRIPT, json.dumps([a for a, _ in cases])], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    errs = re.split(r"@@exit (\S+)@@\n", p.stderr)
    outs = p.stdout.split("@@\n")
    assert len(errs) == 2 * len(cases) + 1, p.stderr[-2000:]
    for i, (_, names) in enumerate(cases):
        if names is None:
            assert (errs[2 * i + 1], errs[2 * i]) == ("0", ""), errs[2 * i][:2000]
        else:
            assert_one_line(int(errs[2 * i + 1]), outs[i], errs[2 * i], names)
    assert json.loads(outs[0])["file_size_bytes"] > 0 and json.loads(outs[1])["recipe"] == "int8-dynamic"

"""A cold CLI pays only for what it uses: under ``--json`` no text table is built (pandas is not imported),
and a run on a digits model imports none of the heavy libraries it does not need."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qcore.cli import main

COMMANDS = [["formats"], ["inspect", "digits-cnn"], ["evaluate", "digits-mlp", "--preset", "int8-static"],
            ["sensitivity", "digits-mlp", "--candidates", "int3"]]
HEAVY = ("pandas", "sklearn", "scipy", "onnx", "onnxruntime", "plotly", "transformers", "streamlit")


def _no_tables(*args, **kwargs):
    raise AssertionError("a text table was built")


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_json_output_builds_no_text_table(argv, capsys, monkeypatch, tmp_path):
    extra = ["--cache-dir", str(tmp_path)] if argv[0] == "sensitivity" else []
    monkeypatch.setattr(pd.DataFrame, "to_string", _no_tables)
    monkeypatch.setattr(pd.DataFrame, "to_markdown", _no_tables)
    assert main(argv + extra + ["--json"]) == 0
    json.loads(capsys.readouterr().out)
    with pytest.raises(AssertionError, match="a text table was built"):  # the text output does build it
        main(argv + extra)


def test_cold_cli_on_digits_imports_no_heavy_library(tmp_path):
    """In a fresh interpreter: evaluate, inspect and sensitivity on digits models with --json, then list
    which heavy libraries ended up in sys.modules (scikit-learn's digits file is read without importing it)."""
    code = ("import contextlib, io, json, sys\n"
            "from qcore.cli import main\n"
            "for argv in %r:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(argv + ['--json']) == 0, argv\n"
            "print(json.dumps([m for m in %r if m in sys.modules]))\n"
            % ([a + (["--cache-dir", str(tmp_path)] if a[0] == "sensitivity" else []) for a in COMMANDS], HEAVY))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_digits_file_read_directly_equals_scikit_learns_loader():
    from sklearn.datasets import load_digits

    from qcore.zoo.digits import digits_table

    d, table = load_digits(), digits_table()
    assert table.shape == (1797, 65)
    assert (table[:, :-1] == d.data).all() and (table[:, -1] == d.target).all()

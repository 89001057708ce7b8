"""Bring-your-own model and data: every format loads to the same numbers as its source, and every bad
file is one QcoreError line (CLI: exit 2) -- including a pickle whose loading would have a side effect."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qcore import preset
from qcore import limits
from qcore.errors import QcoreError
from qcore.io.data import load_data_file
from qcore.io.models import load_model_file
from qcore.io.workload import FIDELITY_NOTE, load_workload
from qcore.model.simulate import find_layers

from test_cli import run


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_mlp, digits_cnn):
    """Each zoo digits model saved as the user would (.pt2 with a dynamic batch, TorchScript, safetensors,
    a .pt state dict) plus the digits data as .npz / .pt / .csv."""
    d = tmp_path_factory.mktemp("uploads")
    example = digits_cnn.calibration.inputs[0][:4]
    batch = {0: torch.export.Dim("batch")}
    for name, w in (("cnn", digits_cnn), ("mlp", digits_mlp)):
        torch.export.save(torch.export.export(w.model, (example,), dynamic_shapes=(batch,)), d / f"{name}.pt2")
        save_file(w.model.state_dict(), d / f"{name}.safetensors")
    torch.jit.save(torch.jit.trace(digits_mlp.model, example), d / "mlp.ts")
    torch.save(digits_cnn.model.state_dict(), d / "cnn_state.pt")
    x = torch.cat([digits_cnn.calibration.inputs[0], digits_cnn.evaluation.inputs[0]])
    y = torch.cat([digits_cnn.calibration.labels, digits_cnn.evaluation.labels])
    np.savez(d / "digits.npz", x=x.numpy(), y=y.numpy())
    torch.save({"x": x, "y": y}, d / "digits.pt")
    columns = ",".join(f"p{i}" for i in range(64))
    rows = "\n".join(",".join(f"{v:.6g}" for v in row) + f",{label}" for row, label in zip(x.reshape(len(x), 64).tolist(), y.tolist()))
    (d / "digits.csv").write_text(f"{columns},digit\n{rows}\n")
    return d


@pytest.fixture(scope="module")
def pt2_int8_static(files):
    """evaluate() of the uploaded digits-cnn program on the uploaded data under int8-static."""
    w = load_workload(str(files / "cnn.pt2"), str(files / "digits.npz"))
    return w.evaluate(preset("int8-static", w.layer_shapes)).to_dict()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


# ---- models: the loaded model computes what the source model computes ---------------------------------
def test_pt2_reproduces_the_cnn_with_module_paths_and_folds_batchnorm(files, digits_cnn):
    loaded = load_model_file(files / "cnn.pt2")
    x = digits_cnn.evaluation.inputs[0][:37]  # a batch size the export never saw (dynamic batch)
    assert torch.allclose(outputs(loaded.model, x), outputs(digits_cnn.model, x), rtol=0, atol=1e-5)
    assert {n: (i.kind, i.weight_shape) for n, i in find_layers(loaded.model).items()} == \
        {n: (i.kind, i.weight_shape) for n, i in digits_cnn.layers.items()}
    assert (loaded.format, loaded.inputs[0].sample_shape) == ("torch.export", (1, 8, 8))
    w = load_workload(str(files / "cnn.pt2"), str(files / "digits.npz"))
    assert w.folded[1] == [("features.0", "features.1"), ("features.3", "features.4"), ("features.7", "features.8")]


def test_uploaded_copies_evaluate_exactly_like_the_zoo_model(files, pt2_int8_static):
    """Same data, same recipe: a .pt2 and a safetensors copy of digits-cnn give the zoo model's numbers."""
    data = str(files / "digits.npz")
    zoo = load_workload("digits-cnn", data)
    recipe = preset("int8-static", zoo.layer_shapes)
    expected = zoo.evaluate(recipe).to_dict()
    assert expected["quantized"]["metrics"]["accuracy"] > 0.95 and expected["quantized"]["size_bytes"] == 31224
    for upload, got in (("cnn.pt2", pt2_int8_static), ("cnn.safetensors", None)):
        got = got or load_workload(str(files / upload), data).evaluate(recipe).to_dict()
        assert got["fp32"] == expected["fp32"], upload
        assert got["quantized"]["size_bytes"] == expected["quantized"]["size_bytes"]
        for key, value in expected["quantized"]["metrics"].items():
            assert got["quantized"]["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (upload, key)


def test_pt2_mlp_and_state_dicts_reproduce_outputs(files, digits_mlp, digits_cnn):
    x = digits_mlp.evaluation.inputs[0][:50]
    pt2 = load_model_file(files / "mlp.pt2")
    assert torch.allclose(outputs(pt2.model, x), outputs(digits_mlp.model, x), rtol=0, atol=1e-5)
    assert list(find_layers(pt2.model)) == ["fc1", "fc2", "fc3"]
    for name, source in (("mlp.safetensors", digits_mlp), ("cnn.safetensors", digits_cnn), ("cnn_state.pt", digits_cnn)):
        loaded = load_model_file(files / name)
        assert torch.equal(outputs(loaded.model, x), outputs(source.model, x)), name
    assert load_model_file(files / "cnn_state.pt").format == "state dict (digits-cnn)"


def test_torchscript_is_weight_only_with_a_note(files, digits_mlp):
    with pytest.raises(QcoreError, match="compiled code"):
        load_model_file(files / "mlp.ts")  # untrusted (the app, the CLI without --trust-pickle): refused
    ts = load_model_file(files / "mlp.ts", allow_pickle=True)
    x = digits_mlp.evaluation.inputs[0][:8]
    assert torch.allclose(outputs(ts.model, x), outputs(digits_mlp.model, x), rtol=0, atol=1e-6)
    assert ts.weight_only and "activation quantization (static or dynamic) is unavailable" in ts.notes[0]
    data = str(files / "digits.npz")
    w = load_workload(str(files / "mlp.ts"), data, allow_pickle=True)
    assert list(w.layers) == ["fc1", "fc2", "fc3"]
    recipe = preset("int4-weight-only", w.layer_shapes)
    zoo = load_workload("digits-mlp", data).evaluate(recipe).to_dict()
    got = w.evaluate(recipe).to_dict()
    assert got["quantized"]["size_bytes"] == zoo["quantized"]["size_bytes"]
    assert got["quantized"]["metrics"]["accuracy"] == pytest.approx(zoo["quantized"]["metrics"]["accuracy"], abs=1e-9)
    with pytest.raises(QcoreError, match="quantizes activations .* unavailable for torchscript models"):
        w.evaluate(preset("int8-static", w.layer_shapes))
    with pytest.raises(QcoreError, match="does not record its input shape"):
        load_workload(str(files / "mlp.ts"), allow_pickle=True)
    shaped = load_workload(str(files / "mlp.ts"), "shape:1x1x8x8", allow_pickle=True)
    assert shaped.calibration.inputs[0].shape[1:] == (1, 8, 8) and any(FIDELITY_NOTE in n for n in shaped.notes)


# ---- data --------------------------------------------------------------------------------------------
def test_data_files_load_the_same_samples_and_labels(files, digits_cnn):
    x = torch.cat([digits_cnn.calibration.inputs[0], digits_cnn.evaluation.inputs[0]])
    y = torch.cat([digits_cnn.calibration.labels, digits_cnn.evaluation.labels])
    npz, pt = load_data_file(files / "digits.npz"), load_data_file(files / "digits.pt")
    csv = load_data_file(files / "digits.csv", label_column="digit")
    assert torch.equal(npz.inputs[0], x) and torch.equal(pt.inputs[0], x) and torch.equal(npz.labels, y)
    assert csv.inputs[0].shape == (560, 64) and torch.allclose(csv.inputs[0], x.reshape(560, 64), atol=1e-6)
    assert torch.equal(csv.labels, y) and torch.equal(pt.labels, y)
    w = load_workload("digits-mlp", str(files / "digits.csv"), label_column="digit")  # (N, 64) reshaped to (N, 1, 8, 8)
    assert (len(w.calibration), len(w.evaluation)) == (140, 420)
    assert "560 samples split (seed 0) into 140 for calibration and 420 for evaluation" in w.notes[-1]
    assert w.task.headline == "accuracy" and w.fp32_metrics["accuracy"] > 0.95


def test_without_data_inputs_are_synthetic_and_metrics_fidelity_only(files, digits_cnn):
    w = load_workload(str(files / "cnn.pt2"))
    assert (len(w.calibration), len(w.evaluation)) == (64, 192)
    assert w.task.headline == "agreement" and w.fp32_metrics["agreement"] == 1.0
    assert any("256 synthetic samples" in n and FIDELITY_NOTE in n for n in w.notes)
    result = w.evaluate(preset("int8-dynamic", w.layer_shapes))
    assert 0.5 < result.quantized.metrics["agreement"] <= 1.0


# ---- bad input: one line, QcoreError, never code execution ----------------------------------------------
class _Marker:
    """Unpickling this object would create a file (any code could run instead)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def test_a_malicious_pickle_is_never_loaded(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save(_Marker(marker), tmp_path / "model.pt")
    (tmp_path / "plain.pth").write_bytes(pickle.dumps(_Marker(marker), protocol=2))
    pickle.loads(pickle.dumps(_Marker(tmp_path / "control")))  # the payload works: unpickling creates its file
    assert (tmp_path / "control").exists()
    for name in ("model.pt", "plain.pth"):
        with pytest.raises(QcoreError, match="pickled Python object .* refused.*torch.export.save") as e:
            load_model_file(tmp_path / name)
        assert "\n" not in str(e.value)
        code, _, err = run(capsys, "evaluate", str(tmp_path / name), "--preset", "int8-dynamic")
        assert code == 2 and "refused" in err and err.count("\n") == 1
    with pytest.raises(QcoreError, match="only tensors are loaded"):
        load_data_file(tmp_path / "model.pt")
    assert not marker.exists()


def test_size_limit(files, monkeypatch):
    size = (files / "mlp.safetensors").stat().st_size
    message = f"mlp.safetensors is {size:,} bytes, above the limit of {size - 1:,} bytes; use a smaller file or raise"
    with pytest.raises(QcoreError, match=message + ".*QCORE_MAX_UPLOAD_MB"):
        load_model_file(files / "mlp.safetensors", max_bytes=size - 1)
    assert load_model_file(files / "mlp.safetensors", max_bytes=size).format == "state dict (digits-mlp)"
    monkeypatch.setattr(limits, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(QcoreError, match="above the limit"):
        load_data_file(files / "digits.npz")
    monkeypatch.setenv("QCORE_MAX_UPLOAD_MB", "0.5")
    assert limits._env_mib("QCORE_MAX_UPLOAD_MB", 200) == 2**19
    for raw, problem in (("lots", "is not a number"), ("-1", "is not a positive size"), ("nan", "is not a positive size")):
        monkeypatch.setenv("QCORE_MAX_UPLOAD_MB", raw)
        with pytest.raises(QcoreError, match=f"QCORE_MAX_UPLOAD_MB='{raw}' {problem}; set it to a size in MiB"):
            limits._env_mib("QCORE_MAX_UPLOAD_MB", 200)


def _bad_files(d: Path, files: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, expected message fragment) for broken model files."""
    pt2 = (files / "mlp.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(pt2[: len(pt2) // 2])
    (d / "random.onnx").write_bytes(bytes(range(256)) * 4)
    (d / "model.txt").write_text("hello")
    (d / "empty.pt2").write_bytes(b"")
    st = (files / "mlp.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(st[:-100])
    (d / "zip.onnx").write_bytes((files / "cnn_state.pt").read_bytes())
    (d / "text.pt").write_text("not a model")
    save_file({"w": torch.zeros(3, 3)}, d / "other.safetensors")
    return {
        "truncated.pt2": "truncated.pt2 could not be read (BadZipFile: File is not a zip file); the file is truncated",
        "random.onnx": "not a valid ONNX model",
        "model.txt": "unsupported model file extension '.txt'",
        "empty.pt2": "is empty",
        "truncated.safetensors": "truncated or corrupted",
        "zip.onnx": "is a PyTorch file, not ONNX",
        "text.pt": "is not a PyTorch file",
        "other.safetensors": "match none of the architectures",
        "missing.pt2": "is neither a zoo model",
    }


def test_bad_model_files_give_one_line_and_exit_2(files, tmp_path, capsys):
    for name, fragment in _bad_files(tmp_path, files).items():
        with pytest.raises(QcoreError) as e:
            load_workload(str(tmp_path / name))
        assert fragment in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        code, out, err = run(capsys, "evaluate", str(tmp_path / name), "--preset", "int8-dynamic")
        assert (code, out) == (2, "") and fragment in err and err.count("\n") == 1, name


def test_bad_data_gives_one_line(files, tmp_path):
    x = np.zeros((20, 63), np.float32)
    cases = {
        "shape.npz": ({"x": x}, "has samples of shape (63,) (63 values) but the model expects (1, 8, 8) (64 values)"),
        "labels.npz": ({"x": np.zeros((20, 64), np.float32), "y": np.full(20, 12)}, "labels run from 12 to 12 but the model has 10"),
        "count.npz": ({"x": np.zeros((20, 64), np.float32), "y": np.zeros(19)}, "has 20 samples but 19 labels"),
        "nox.npz": ({"a": x}, "no 'x'"),
        "nan.npz": ({"x": np.full((20, 64), np.nan, np.float32)}, "contains NaN or Inf"),
    }
    for name, (arrays, fragment) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(QcoreError, match=None) as e:
            load_workload(str(files / "mlp.pt2"), str(tmp_path / name))
        assert fragment in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    with pytest.raises(QcoreError, match="has no column 'label'; columns are: p0, p1"):
        load_workload("digits-mlp", str(files / "digits.csv"), label_column="label")
    (tmp_path / "half.npz").write_bytes((files / "digits.npz").read_bytes()[:500])
    with pytest.raises(QcoreError, match="truncated or corrupted"):
        load_data_file(tmp_path / "half.npz")


def test_cli_evaluates_an_uploaded_program(files, capsys, pt2_int8_static):
    code, out, err = run(capsys, "evaluate", str(files / "cnn.pt2"), "--data", str(files / "digits.npz"),
                         "--preset", "int8-static", "--json")
    assert code == 0, err
    result, expected = json.loads(out), pt2_int8_static
    assert result["quantized"]["size_bytes"] == expected["quantized"]["size_bytes"] == 31224
    assert result["quantized"]["metrics"]["accuracy"] == pytest.approx(expected["quantized"]["metrics"]["accuracy"])
    assert result["fp32"]["metrics"]["accuracy"] == pytest.approx(expected["fp32"]["metrics"]["accuracy"])

"""The CLI's core commands: JSON output equals the Python API; user errors exit 2 with one line."""

import json

import pytest

from qcore import preset
from qcore.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_formats_json(capsys):
    code, out, _ = run(capsys, "formats", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert (rows["int8"]["min"], rows["int8"]["max"], rows["int8"]["levels"]) == (-128, 127, 256)
    assert rows["fp8_e4m3"]["max"] == 448 and rows["fp8_e4m3"]["smallest_step_near_zero"] == 2.0**-9
    assert rows["nf4"]["levels"] == 16 and rows["int2"]["bits"] == 2


def test_evaluate_json_matches_python_api(capsys, digits_mlp):
    code, out, _ = run(capsys, "evaluate", "digits-mlp", "--preset", "int4-weight-only", "--json")
    assert code == 0
    r = json.loads(out)
    expected = digits_mlp.evaluate(preset("int4-weight-only", digits_mlp.layer_shapes)).to_dict()
    assert r["metric"] == "accuracy"
    assert r["quantized"]["metrics"]["accuracy"] == pytest.approx(expected["quantized"]["metrics"]["accuracy"])
    assert r["quantized"]["size_bytes"] == expected["quantized"]["size_bytes"] < r["fp32"]["size_bytes"] == 68904


def test_evaluate_recipe_file_and_table(capsys, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"name": "mine", "weights": {"format": "int8"}, "layers": {"fc3": None}}))
    code, out, _ = run(capsys, "evaluate", "digits-mlp", "--recipe", str(path))
    assert code == 0 and "recipe mine" in out and "quantized" in out and "MiB" in out


def test_inspect_json(capsys):
    code, out, _ = run(capsys, "inspect", "digits-mlp", "--json")
    layers = json.loads(out)["layers"]
    assert [row["name"] for row in layers] == ["fc1", "fc2", "fc3"]
    assert layers[0]["params"] == 64 * 128 + 128 and sum(row["share"] for row in layers) == pytest.approx(1.0)


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "digits-mlp", "--preset", "int9"], "'int9' is neither a preset"),
    (["evaluate", "nope-model", "--preset", "fp16"], "nope-model"),
    (["evaluate", "digits-mlp"], "give exactly one of --preset NAME or --recipe FILE"),
    (["evaluate"], "the following arguments are required: model"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_invalid_recipe_file_names_the_key(capsys, tmp_path):
    """Regression: a group_size typed next to per_channel was stored and did nothing; a recipe file refuses it."""
    path = tmp_path / "bad.json"
    path.write_text('{"weights": {"format": "int8", "granularity": "per_channel", "group_size": 4096}}')
    code, out, err = run(capsys, "evaluate", "digits-mlp", "--recipe", str(path))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err == ("error: weights.group_size=4096 is given with granularity per_channel, where it does nothing; "
                   "remove group_size or set granularity per_group\n")
    path.write_text("{not json")
    code, _, err = run(capsys, "evaluate", "digits-mlp", "--recipe", str(path))
    assert code == 2 and "not valid JSON" in err


def test_regression_inspect_torchscript_without_data_lists_the_layers(capsys, tmp_path):
    """Regression: inspect refused a TorchScript model without a data file, though listing layers and weight
    statistics needs no input. With --trust-pickle it lists them, and notes that evaluation needs data."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    code, out, err = run(capsys, "--trust-pickle", "inspect", str(path), "--json")
    assert code == 0 and err == ""
    r = json.loads(out)
    assert [(row["name"], row["weight_shape"], row["params"]) for row in r["layers"]] == [
        ("0", [4, 8], 36), ("2", [2, 4], 10)]
    w = model[0].weight.detach()
    assert r["layers"][0]["max"] == pytest.approx(float(w.max())) and r["layers"][0]["min"] == pytest.approx(float(w.min()))
    assert r["calibration_samples"] == r["evaluation_samples"] == 0
    assert any("evaluating it needs a data file (--data FILE) or the shape of one example input" in n for n in r["notes"])
    code, out, err = run(capsys, "--trust-pickle", "inspect", str(path))  # the table, with the note
    assert code == 0 and "2 quantizable layers" in out and "note: no data" in out
    code, out, err = run(capsys, "--trust-pickle", "evaluate", str(path), "--preset", "int8-weight-only")
    assert code == 2 and out == "" and "does not record its input shape" in err and err.count("\n") == 1

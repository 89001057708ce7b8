"""Bring your own Hugging Face causal LM: tiny random GPT-2, Llama and Qwen2 folders saved here load offline,
keep their layer names, score perplexity as transformers computes it, quantize (GPT-2's Conv1D as the Linear it
is, per output feature), export to ONNX and safetensors, and every bad folder or zip is one line."""

import json
import math
import shutil
import zipfile

import numpy as np
import pytest
import torch

from qcore import preset
from qcore.errors import QcoreError
from qcore.io.workload import load_workload
from qcore.model.size import weight_bytes
import hf_models

FAMILIES = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    text = root / "text.txt"
    text.write_text(hf_models.TEXT)
    out = {}
    for family in FAMILIES:
        out[family] = hf_models.save(family, root / family)
        (out[family] / "text.txt").unlink()
    return out, text


@pytest.fixture(scope="module")
def workloads(folders):
    paths, text = folders
    return {f: load_workload(str(paths[f]), str(text)) for f in FAMILIES}


def _names(family):
    if family == "gpt2":
        per_layer = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        return ["transformer.wte", "transformer.wpe"] + [f"transformer.h.{i}.{n}" for i in range(2) for n in per_layer] \
            + ["lm_head"]
    per_layer = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    return ["model.embed_tokens"] + [f"model.layers.{i}.{n}" for i in range(2) for n in per_layer] + ["lm_head"]


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_keep_the_checkpoints_names_and_fp32_is_transformers_own(workloads, folders, family):
    from transformers import AutoModelForCausalLM

    w = workloads[family]
    assert list(w.layers) == _names(family)
    assert w.task.headline == "perplexity" and not w.task.higher_is_better
    ids = w.tokenizer.encode("the quick brown fox")
    assert w.tokenizer.decode(ids).replace(" ", "") == "thequickbrownfox" and w.tokenizer.stop_id == 1  # <eos>
    reference = AutoModelForCausalLM.from_pretrained(folders[0][family], local_files_only=True).eval()
    x, y = w.evaluation.inputs[0], w.evaluation.labels
    with torch.no_grad():
        logits = reference(input_ids=x).logits
    assert torch.allclose(w.reference_outputs, logits, atol=1e-5)
    # perplexity = exp(mean cross-entropy over the scored positions), by torch's own cross_entropy
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 100).double(), y.reshape(-1), ignore_index=-100)
    assert math.isclose(w.fp32_metrics["perplexity"], math.exp(float(ce)), rel_tol=1e-9)


def test_gpt2_conv1d_is_quantized_per_output_feature(workloads, folders):
    """The checkpoint stores c_attn as (in 32, out 96); int8 per_channel must give one scale per output feature:
    column j of the stored weight, by hand: s_j = max|W[:, j]| / 127, W'[:, j] = round(W[:, j] / s_j) * s_j."""
    from safetensors.torch import load_file

    w = workloads["gpt2"]
    assert w.layers["transformer.h.0.attn.c_attn"].weight_shape == (96, 32)  # the Linear layout (out, in)
    stored = load_file(str(folders[0]["gpt2"] / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"]
    assert stored.shape == (32, 96)
    scale = stored.abs().amax(dim=0) / 127
    by_hand = torch.round(stored / scale) * scale
    recipe = preset("int8-weight-only", w.layer_shapes)
    sim = w.simulate(recipe).model.get_submodule("transformer.h.0.attn.c_attn")
    assert torch.allclose(sim.weight.t(), by_hand, atol=1e-7)
    # its size: 96 x 32 one-byte codes + 96 float32 scales
    assert weight_bytes((96, 32), recipe.plan("transformer.h.0.attn.c_attn").weights)["total"] == 96 * 32 + 96 * 4
    # the Linear computes what the Conv1D computes
    conv = __import__("transformers").pytorch_utils.Conv1D(96, 32)
    from qcore.model.gpt2_conv1d import as_linear
    x = torch.randn(3, 5, 32)
    assert torch.allclose(as_linear(conv)(x), conv(x), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["int8-dynamic", "int4-weight-only"])
def test_int8_and_int4_simulate_every_layer(workloads, family, name):
    w = workloads[family]
    r = w.evaluate(preset(name, w.layer_shapes))
    q = r.quantized.metrics
    assert 0 < q["kl_divergence"] and 0.5 < q["top1_agreement"] <= 1 and math.isfinite(q["perplexity"])
    assert r.quantized.size_bytes < r.fp32.size_bytes


def test_gpt2_exports_to_onnx_and_runs_like_the_simulation(workloads, tmp_path):
    import onnxruntime as ort

    from qcore.export import export_qdq

    w = workloads["gpt2"]
    recipe = preset("int4-weight-only", w.layer_shapes)
    out = tmp_path / "gpt2.onnx"
    export_qdq(w, recipe, str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = w.evaluation.inputs[0][:4]
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = w.simulate(recipe).model(x).numpy()
    assert "MatMulNBits" in {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_gpt2_safetensors_round_trip_is_exact(workloads, tmp_path):
    from qcore.export import export
    from qcore.export.safetensors import load_safetensors

    w = workloads["gpt2"]
    recipe = preset("int8-dynamic", w.layer_shapes)
    export(w, recipe, "safetensors", str(tmp_path / "m.safetensors"))
    _, model = load_safetensors(str(tmp_path / "m.safetensors"), w)
    x = w.evaluation.inputs[0][:2]
    with torch.no_grad():
        assert torch.equal(model(x), w.simulate(recipe).model(x))


# ---- bad input: one line each -----------------------------------------------------------------------
def _broken(folders, tmp_path, change):
    folder = shutil.copytree(folders[0]["llama"], tmp_path / "m")
    change(folder)
    return folder


def _one_line(call, *words):
    with pytest.raises(QcoreError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


@pytest.mark.parametrize("change,words", [
    (lambda f: (f / "config.json").unlink(), ["no config.json"]),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "model_type": "mamba"})), ["'mamba'", "gpt2", "llama", "qwen2"]),
    (lambda f: [(f / n).unlink() for n in ("tokenizer.json",)], ["no tokenizer"]),
    (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), ["pytorch_model.bin", "pickled"]),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "hidden_size": 100_000})), ["does not match the weights"]),
])
def test_bad_folders_are_refused_in_one_line(folders, tmp_path, change, words):
    folder = _broken(folders, tmp_path, change)
    _one_line(lambda: load_workload(str(folder), str(folders[1])), *words)


def _zip(tmp_path, members, name="m.zip"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def _special(name, mode=0o120777):
    """A member whose Unix mode says it is a symbolic link (default) or, e.g. 0o020666, a character device."""
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize("members,words", [
    ([("../evil.json", b"{}")], ["'..'"]),
    ([("/etc/evil.json", b"{}")], ["absolute"]),
    ([(_special("config.json"), b"/etc/passwd")], ["symbolic link"]),
    ([(_special("tokenizer.json", 0o020666), b"")], ["a device"]),
    ([("model/weights.bin", b"x")], ["pickled"]),
    ([("run.sh", b"x")], ["not a file a checkpoint holds"]),
    ([("model.safetensors", b"\0" * (4 * 2**20))], ["zip bomb"]),
])
def test_bad_zips_are_refused_in_one_line(tmp_path, members, words):
    _one_line(lambda: load_workload(str(_zip(tmp_path, members))), *words)


def test_a_zip_of_the_folder_loads_and_one_past_the_limit_is_refused(folders, workloads, tmp_path):
    from qcore.io.hf import load_hf_workload

    folder = folders[0]["gpt2"]
    archive = _zip(tmp_path, [(f"gpt2/{p.name}", p.read_bytes()) for p in folder.iterdir()])
    w = load_workload(str(archive), str(folders[1]))
    assert list(w.layers) == list(workloads["gpt2"].layers)
    assert torch.equal(w.reference_outputs, workloads["gpt2"].reference_outputs)
    size = archive.stat().st_size
    _one_line(lambda: load_hf_workload(archive, folders[1], max_bytes=size - 1), "above the limit")
    zeros = _zip(tmp_path, [("gpt2/config.json", b" " * 2**20)], "zeros.zip")  # 1 MiB of blanks in a few KiB
    _one_line(lambda: load_hf_workload(zeros, folders[1], max_bytes=2**20 // 3), "unpacks to more than")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_int8_changes_the_model_less_than_int4(workloads, family):
    """Weights in float, only the cache quantized: GPT-2's fused c_attn and Llama's k_proj/v_proj are hooked."""
    from qcore import Recipe
    from qcore.recipe.kv_cache import KVCacheSpec

    w = workloads[family]
    assert len(w.kv_cache_slices) == 4  # 2 layers x (keys, values)
    kl = {f: w.evaluate(Recipe("kv", kv_cache=KVCacheSpec(f))).quantized.metrics["kl_divergence"] for f in ("int8", "int4")}
    assert 0 < kl["int8"] < kl["int4"]


def test_cli_inspects_a_folder_and_evaluates_its_zip(folders, tmp_path, capsys):
    from qcore.cli import main

    folder = folders[0]["qwen2"]
    assert main(["inspect", str(folder), "--json"]) == 0  # no --data: the held-out help topics tiny-lm is scored on
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["layers"]] == _names("qwen2") and "help topics" in out["notes"][0]
    archive = _zip(tmp_path, [(p.name, p.read_bytes()) for p in folder.iterdir()], "qwen2.zip")
    assert main(["evaluate", str(archive), "--preset", "int8-dynamic", "--data", str(folders[1]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "perplexity" and result["quantized"]["size_bytes"] < result["fp32"]["size_bytes"]
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

"""The Trade-offs page measures latency with the runtime chosen on it and labels each number with the
runtime and the precision it executed in. ``bench`` is replaced by a recorder (its own tests run it for
real): the oracle is what the page was asked to do, read back from the calls and the table."""

from types import SimpleNamespace

import torch

from qcore.export import bench as bench_module
from test_app_decide import open_page


def test_tradeoffs_measures_with_the_chosen_runtime_and_says_its_precision(digits_mlp, monkeypatch):
    calls = []

    def fake_bench(w, recipe, batch_size, threads, runtime, precision):
        calls.append((recipe.name, batch_size, runtime, precision))
        label = "OpenVINO CPU, float ops in f32 (INFERENCE_PRECISION_HINT)"
        out = {"quantized": {"latency_ms": {"median": 1.25 + len(calls)}}, "layers": [], "threads": threads,
               "runtime": {"name": runtime, "precision": "f32", "label": label}}
        return SimpleNamespace(to_dict=lambda: out)

    monkeypatch.setattr(bench_module, "bench", fake_bench)
    at = open_page("tradeoffs")
    radio = next(r for r in at.radio if r.label == "Measure with")
    assert list(radio.options) == ["ONNX Runtime", "OpenVINO, true FP32", "OpenVINO, its default precision (bf16 on AMX)"]
    radio.set_value("OpenVINO, true FP32").run()
    next(b for b in at.button if b.label == "Measure latency on this machine (OpenVINO, true FP32)").click().run()
    assert not at.exception, at.exception
    assert calls and all(c[1:] == (1, "openvino", "f32") for c in calls)
    table = at.dataframe[0].value.set_index("recipe")
    threads = torch.get_num_threads()  # an in-process job alone keeps the app's torch threads
    assert (table["latency source"] == f"measured in OpenVINO CPU, float ops in f32 (INFERENCE_PRECISION_HINT), "
                                       f"{threads} thread(s)").all()
    assert sorted(table["latency (ms)"]) == [1.25 + k for k in range(1, len(calls) + 1)]


def test_export_page_profiles_the_file_in_onnx_runtime(digits_mlp):
    at = open_page("export", preset="int8-static")
    radio = next(r for r in at.radio if r.label == "Profile with")
    assert list(radio.options) == ["ONNX Runtime", "OpenVINO (its default precision)"]
    next(b for b in at.button if b.label == "Profile the ONNX file").click().run()
    assert not at.exception, at.exception
    caption = next(c.value for c in at.caption if "profiler" in c.value)
    assert "Measured on this machine" in caption and "enable_profiling" in caption


def test_export_page_runs_the_file_in_openvino_when_asked(digits_mlp):
    at = open_page("export", preset="int8-static")
    next(r for r in at.radio if r.label == "Run the ONNX file in").set_value("OpenVINO, true FP32").run()
    next(b for b in at.button if b.label == "Prepare onnx").click().run()
    assert not at.exception, at.exception
    caption = next(c.value for c in at.caption if "file on disk" in c.value)
    assert "measured by running this file in OpenVINO" in caption and "float ops in f32" in caption


def test_export_page_shows_what_the_simulation_notes(digits_cnn):
    """int4-int8compute on digits-cnn: its three convolutions compute in float (int8 compute is for Linear layers
    with power-of-two groups), which the evaluation's notes say; the page lists them, and a recipe without such
    notes shows no expander."""
    at = open_page("export", model="digits-cnn", preset="int4-int8compute")
    box = next(e for e in at.expander if e.label.startswith("What the simulation notes"))
    assert box.label.endswith("(3)")
    from qcore.recipe import preset
    from ui.text import plain

    notes = digits_cnn.evaluate(preset("int4-int8compute", digits_cnn.layer_shapes)).to_dict()["notes"]
    assert [n.split(":")[0] for n in notes] == ["features.0", "features.3", "features.7"]
    assert box.markdown[0].value == "\n".join(f"- {plain(n)}" for n in notes)
    plain_at = open_page("export", model="digits-cnn", preset="int8-static")
    assert not [e for e in plain_at.expander if e.label.startswith("What the simulation notes")]

"""``benchmarks.runtimes`` keeps working on tiny settings: its rows hold real measured numbers whose VALUES are
checked against independent computations (the FP32 metric of the workload itself, the export's own ONNX
Runtime metric, file sizes on disk). Speeds are not asserted (they are what the benchmark reports)."""

import pytest

pytest.importorskip("openvino")

from benchmarks import runtimes  # noqa: E402
from qcore import zoo  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return runtimes.measure(["--quick"])


def test_runtimes_quick_rows_are_measured_on_both_runtimes(result):
    w = zoo.load("digits-mlp")
    rows = {(r["runtime"], r["method"]): r for r in result["rows"]}
    assert {r["runtime"] for r in result["rows"]} == {"onnxruntime", "openvino", "torch"}
    fp32 = w.fp32_metrics["accuracy"]
    for key in (("onnxruntime", "FP32"), ("openvino", "FP32, INFERENCE_PRECISION_HINT=f32")):
        assert rows[key]["accuracy"] == pytest.approx(fp32, abs=1 / len(w.evaluation))
        assert rows[key]["precision"] == "f32" and rows[key]["size / FP32"] == 1.0
    assert rows[("openvino", "FP32, default hint")]["precision"] in ("f32", "bf16", "f16")
    ours = rows[("onnxruntime", "qcore int8-static")]
    assert ours["size / FP32"] < 0.4  # int8 codes: about a quarter of FP32 plus graph and biases
    # the same file in the other runtime scores within one evaluation sample
    assert abs(rows[("openvino", "qcore int8-static, default hint")]["accuracy"] - ours["accuracy"]) <= 1 / len(w.evaluation)
    for r in result["rows"]:
        assert 0 < r["batch 1 best ms"] <= r["batch 1 median ms"] and 0 < r["batch B best ms"] <= r["batch B median ms"]
    kernels = [n for n in result["notes"] if n.startswith("OpenVINO kernels of qcore int8-static:")]
    assert len(kernels) == 1 and "FullyConnected (Linear): " in kernels[0]  # what OpenVINO compiled, per int8 file
    assert "avx2" in result["features"] or result["notes"]  # the CPU's flags, or what it lacks, are stated


def test_runtimes_main_prints_the_table_with_the_cpu(result, monkeypatch):
    monkeypatch.setattr(runtimes, "measure", lambda argv=None: result)
    text = runtimes.main(["--quick"])
    assert result["cpu"] in text and "ESTIMATE" in text and "| openvino" in text

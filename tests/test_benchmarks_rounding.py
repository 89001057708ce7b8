"""benchmarks/ptq_rounding keeps working: its quick run returns real measured rows side by side, checked by value
(FP32 is the workload's own, every method is scored against it, GPTQ is not worse than nearest, ONNX Runtime's
RTN on the same grid scores as qcore's nearest). Speed is what the benchmark reports, not asserted here."""

import pytest

from benchmarks import ptq_rounding
from qcore import zoo


def test_quick_rounding_benchmark_rows(monkeypatch):
    result = ptq_rounding.measure(["--quick"])
    assert result["flags"] is not None and result["cpu"]
    rows = {r["method"]: r for r in result["int4"]["rows"]}
    fp32 = zoo.load("digits-mlp").fp32_metrics["accuracy"]
    assert rows["FP32"]["metric"] == fp32
    nearest, gptq = rows["qcore nearest (int4-weight-only)"], rows["qcore GPTQ (int4-gptq)"]
    assert 0.9 < nearest["metric"] <= fp32 + 1e-9 and gptq["metric"] >= nearest["metric"] - 1 / 360
    rtn = rows["ONNX Runtime MatMulNBits RTN"]
    assert rtn["metric"] == pytest.approx(nearest["metric"], abs=2 / 360)  # the same int4 g32 affine grid
    assert rows["ONNX Runtime MatMulNBits GPTQ"]["metric"] is not None
    for peer in ("NNCF compress_weights (data-free), embeddings float",
                 "NNCF compress_weights AWQ + scale estimation, embeddings float"):
        assert rows[peer]["metric"] == pytest.approx(nearest["metric"], abs=3 / 360)  # int4 g32 asym, same model
    assert rows["qcore GPTQ damp 0.01 (int4-gptq before)"]["metric"] >= nearest["metric"] - 1 / 360
    assert all(r["seconds"] is not None and r["seconds"] >= 0 for r in rows.values())
    int3 = {r["method"]: r for r in result["int3"]["rows"]}
    assert int3["FP32"]["metric"] == zoo.load("digits-cnn").fp32_metrics["accuracy"]
    assert 0.5 < int3["qcore nearest (int3 per-channel)"]["metric"] <= int3["FP32"]["metric"] + 1e-9
    assert int3["qcore AdaRound (int3-adaround)"]["metric"] > 0.5
    text = ptq_rounding.table(result["int4"])
    assert text.count("\n") == len(rows) + 1 and "| qcore GPTQ (int4-gptq) |" in text

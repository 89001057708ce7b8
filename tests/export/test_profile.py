"""Per-op profiles from the runtimes' own profilers. Oracles: ONNX Runtime's raw profile JSON aggregated by hand
(pandas groupby) in the test, the op types of ONNX Runtime's optimized graph, and plain sums for the figure."""

import json
import os

import onnx
import onnxruntime as ort
import pandas as pd
import pytest

from qcore.export import export_qdq
from qcore.export.profile import group_ops, openvino_profile, ort_profile
from qcore.export.sessions import feed
from qcore.figures.profile import time_by_op
from qcore.recipe import preset


@pytest.fixture(scope="module")
def int8_file(digits_cnn, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("profile") / "m.onnx")
    export_qdq(digits_cnn, preset("int8-static", digits_cnn.layer_shapes), path)
    return path, feed(digits_cnn, digits_cnn.evaluation.subset(slice(0, 8)))


def test_grouping_equals_a_hand_aggregation_of_onnx_runtimes_raw_profile(int8_file, tmp_path):
    path, x = int8_file
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.profile_file_prefix, opts.intra_op_num_threads = True, str(tmp_path / "p"), 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, x)
    with open(sess.end_profiling()) as f:
        raw = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    df = pd.DataFrame({"op": [e["args"]["op_name"] for e in raw], "us": [e["dur"] for e in raw]})
    expect = df.groupby("op")["us"].agg(["sum", "count"])
    rows = group_ops([(e["args"]["op_name"], "p", float(e["dur"])) for e in raw], runs=3)
    assert {r["op"] for r in rows} == set(expect.index)
    for r in rows:
        assert r["ms"] == pytest.approx(expect.loc[r["op"], "sum"] / 3 / 1e3)
        assert r["nodes"] == expect.loc[r["op"], "count"] // 3
        assert r["share"] == pytest.approx(expect.loc[r["op"], "sum"] / df["us"].sum())
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)


def test_ort_profile_names_the_int8_kernels_of_the_optimized_graph(int8_file, tmp_path):
    path, x = int8_file
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    rows = ort_profile(path, x, threads=1, runs=3)
    assert {r["op"] for r in rows} <= ops and "QLinearConv" in ops
    assert {r["precision"] for r in rows if r["op"] == "QLinearConv"} == {"int8"}
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    fig = time_by_op(rows, "t")
    assert sum(sum(bar.x) for bar in fig.data) == pytest.approx(sum(r["ms"] for r in rows))


def test_openvino_profile_says_which_ops_ran_in_int8(int8_file):
    pytest.importorskip("openvino")
    path, x = int8_file
    rows = openvino_profile(path, x, threads=1, runs=2, precision="f32")
    assert rows and sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert any(r["precision"] == "int8" for r in rows)  # the QDQ convolutions / FC run in int8 kernels
    assert all(r["ms"] >= 0 and r["nodes"] >= 1 for r in rows)

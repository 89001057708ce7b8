"""Per-user integrity: no session changes what another sees.

- Shared cached models are never mutated: two threads doing different sessions' work on ONE shared
  workload get the numbers each gets alone (calibration, int8-static accuracy).
- The sweep cache is keyed by content: two ONNX files with the same name and weights but a different
  operator get different fingerprints, and each sweep's rows are its own.
- Cache files of the wrong shape are misses, never tracebacks.
"""

from __future__ import annotations

import dataclasses

import json
import sys
import threading

import pytest
import torch

from qcore.analysis import explain, sweep_cache
from qcore import zoo
from qcore.recipe import preset

ROUNDS = 4


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _calibration_summary(w) -> dict[str, tuple[float, float, float, int]]:
    return {n: (s.min, s.max, float(s.hist.sum()), s.numel) for n, s in w.calibration_stats().items()}


@pytest.fixture(scope="module")
def serial():
    """What one session alone computes on a fresh digits-cnn workload."""
    w = zoo.load("digits-cnn")
    recipe = preset("int8-static", w.layer_shapes)
    return _calibration_summary(w), w.evaluate(recipe).quantized.metrics["accuracy"]


def test_serial_reference_values(serial):
    stats, accuracy = serial
    assert accuracy == pytest.approx(0.9917, abs=5e-5)  # 357 of 360 test images
    assert stats["features.3"][1] == pytest.approx(3.71, abs=0.01)  # max of the second conv's input


def test_concurrent_sessions_see_their_own_numbers(serial):
    """Thread A calibrates and evaluates int8-static on a fresh workload while thread B, another
    session on the same object, copies, simulates (int4 weights) and explains it over and over. A
    hook left on the shared model would be copied into B's models and feed A's statistics."""
    stats_alone, accuracy_alone = serial
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so the copies land inside the calibration
    try:
        for _ in range(ROUNDS):
            w = zoo.load("digits-cnn")
            _ = w.folded, w.layers
            stop, errors, copies = threading.Event(), [], [0]
            int4 = preset("int4-weight-only", w.layer_shapes)

            def session_b():
                try:
                    while not stop.is_set():
                        w.run(w.simulate(int4).model, w.calibration)
                        explain.batch_ranges(w, 50)
                        copies[0] += 1
                except Exception as e:  # reported below
                    errors.append(e)

            b = threading.Thread(target=session_b)
            b.start()
            try:
                accuracy = w.evaluate(preset("int8-static", w.layer_shapes)).quantized.metrics["accuracy"]
                stats = _calibration_summary(w)
                while copies[0] < 3:  # B keeps running models it copied meanwhile
                    stop.wait(0.01)
            finally:
                stop.set()
                b.join()
            assert not errors
            assert _hooks(w.folded[0]) == 0 and _hooks(w.model) == 0
            assert stats == stats_alone
            assert _calibration_summary(w) == stats_alone  # unchanged after B ran its copies
            assert accuracy == accuracy_alone
    finally:
        sys.setswitchinterval(old)


# ---- the sweep cache ---------------------------------------------------------------------------
def _two_gemm_onnx(path, activation: str) -> None:
    """x (N, 8) -> Gemm (8 -> 16) -> ``activation`` -> Gemm (16 -> 4): the same seeded weights for
    every activation, written as ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(16, 8, generator=g), torch.randn(4, 16, generator=g)
    inits = [numpy_helper.from_array(t.numpy(), name) for t, name in ((w1, "w1"), (w2, "w2"))]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"),
             helper.make_node(activation, ["h"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "two_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _rows(result) -> list[tuple]:
    return [(r.layer, r.candidate, r.metric, r.sqnr_db, r.layer_sqnr_db) for r in result.rows]


def test_same_name_and_weights_different_operator_is_not_served_another_users_rows(tmp_path):
    from qcore.io.workload import load_workload
    from qcore.analysis.sensitivity import sweep
    from qcore.analysis.sweep_cache import clear_memory_cache

    workloads = {}
    for act in ("Relu", "Sigmoid"):
        (tmp_path / act).mkdir()
        _two_gemm_onnx(tmp_path / act / "model.onnx", act)
        workloads[act] = load_workload(str(tmp_path / act / "model.onnx"))
    relu, sigmoid = workloads["Relu"], workloads["Sigmoid"]
    assert relu.name == sigmoid.name and relu.layer_shapes == sigmoid.layer_shapes
    assert sweep_cache.fingerprint(relu) != sweep_cache.fingerprint(sigmoid)
    # the same bytes scored by another headline metric (or direction) are other results
    other = [dataclasses.replace(relu, task=dataclasses.replace(relu.task, **change))
             for change in ({"headline": "sqnr_db"}, {"higher_is_better": not relu.task.higher_is_better})]
    assert len({sweep_cache.fingerprint(x) for x in (relu, *other)}) == 3

    clear_memory_cache()
    shared = tmp_path / "shared-cache"
    first = sweep(relu, ["int3"], "weights", "only", cache_dir=shared)  # user 1 fills the cache
    second = sweep(sigmoid, ["int3"], "weights", "only", cache_dir=shared)  # user 2, same server
    clear_memory_cache()
    alone = sweep(sigmoid, ["int3"], "weights", "only", cache_dir=tmp_path / "own-cache")
    assert _rows(second) == _rows(alone)
    assert _rows(second) != _rows(first)  # the operators differ, so the numbers do


@pytest.fixture(scope="module")
def int4_rows(digits_mlp, tmp_path_factory):
    """The int4 weights-only sweep of digits-mlp, computed with an empty cache."""
    from qcore.analysis.sensitivity import sweep
    from qcore.analysis.sweep_cache import clear_memory_cache

    clear_memory_cache()
    return _rows(sweep(digits_mlp, ["int4"], "weights", "only", cache_dir=tmp_path_factory.mktemp("clean")))


@pytest.mark.parametrize("content", ["{}", "[]", '{"rows": 5}', '{"model": "digits-mlp", "rows": [', "null",
                                     '"text"', "1" * 5000, "[" * 100_000],
                         ids=["{}", "[]", "rows=5", "truncated", "null", "string", "huge int", "deep nesting"])
def test_wrong_shape_cache_files_are_misses(tmp_path, digits_mlp, int4_rows, content):
    from qcore.analysis.sensitivity import sweep
    from qcore.analysis.sweep_cache import cache_key, cache_path, clear_memory_cache

    expected = int4_rows
    path = cache_path(tmp_path, cache_key(digits_mlp, ["int4"], "weights", "only"))
    path.parent.mkdir(parents=True)
    path.write_text(content)
    clear_memory_cache()
    assert _rows(sweep(digits_mlp, ["int4"], "weights", "only", cache_dir=tmp_path)) == expected
    assert json.loads(path.read_text())["rows"]  # the bad file was replaced by the result


def test_cache_entry_that_is_not_a_regular_file_is_a_miss(tmp_path, digits_mlp):
    """A cache path that is a symlink to /dev/zero is not read (it would never end), and the
    result written over it is a regular file."""
    from qcore.analysis.sensitivity import sweep
    from qcore.analysis.sweep_cache import cache_key, cache_path, clear_memory_cache

    clear_memory_cache()
    path = cache_path(tmp_path, cache_key(digits_mlp, ["int4"], "weights", "only"))
    path.parent.mkdir(parents=True)
    path.symlink_to("/dev/zero")
    assert len(sweep(digits_mlp, ["int4"], "weights", "only", cache_dir=tmp_path).rows) == 3
    assert path.is_file() and not path.is_symlink()


def test_cache_entry_for_other_layers_is_a_miss(tmp_path, digits_mlp, int4_rows):
    """A well-formed entry whose rows name other layers (or too few, or hold a string for a number)
    is not served."""
    from qcore.analysis.sensitivity import sweep
    from qcore.analysis.sweep_cache import cache_key, cache_path, clear_memory_cache

    clear_memory_cache()
    good = sweep(digits_mlp, ["int4"], "weights", "only", cache_dir=tmp_path).to_dict()
    assert [(r["layer"], r["candidate"], r["metric"], r["sqnr_db"], r["layer_sqnr_db"]) for r in good["rows"]] == int4_rows
    path = cache_path(tmp_path, cache_key(digits_mlp, ["int4"], "weights", "only"))
    for bad in ({**good, "rows": good["rows"][:-1]},
                {**good, "rows": [{**r, "layer": "evil." + r["layer"]} for r in good["rows"]]},
                {**good, "rows": [{**r, "metric": "0.5"} for r in good["rows"]]}):
        path.write_text(json.dumps(bad))
        clear_memory_cache()
        assert _rows(sweep(digits_mlp, ["int4"], "weights", "only", cache_dir=tmp_path)) == int4_rows


def test_content_hash_follows_the_bytes(tmp_path):
    """Loading the same files twice gives the same identity (so a server's cache is shared by
    identical uploads); one changed data value, or no data file, gives another."""
    import numpy as np

    from qcore.io.workload import load_workload

    _two_gemm_onnx(tmp_path / "model.onnx", "Relu")
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x)
    x[7, 3] += 1.0
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "a.npz", x=x)  # same name, one value different

    def identity(data):
        return load_workload(str(tmp_path / "model.onnx"), data).content_hash

    first = identity(str(tmp_path / "a.npz"))
    assert len(first) == 64 and int(first, 16) >= 0
    assert identity(str(tmp_path / "a.npz")) == first
    others = {identity(str(tmp_path / "b" / "a.npz")), identity(None), identity("shape:1x8")}
    assert len(others) == 3 and first not in others
    assert zoo.load("digits-mlp").content_hash == zoo.load("digits-mlp").content_hash != zoo.load("digits-cnn").content_hash

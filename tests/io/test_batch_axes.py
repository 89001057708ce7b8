"""Inputs batched on another axis than 0 (an LSTM state (2, batch, H)) and scalar inputs, end to end.

The tiny model is written with ``onnx.helper`` like silero-vad: inputs ``audio`` (batch, 4), ``state`` (2, batch, 3)
and ``mode``, a rank-0 int64 whose ``If(mode == 1)`` picks one of two Linear layers; declared dims carry no
names. Oracles: a numpy computation of the graph by hand, and ONNX Runtime on the source file fed the same
arrays (``mode`` included); the exported file is compared with the simulation at batch 1 and 8.
"""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcore.errors import QcoreError
from qcore.io.data import parse_batch_axes, with_batch_axes
from qcore.io.workload import load_workload
from qcore.model.workload import Data

RNG = np.random.default_rng(0)
W_IN, W_THEN, W_ELSE = (RNG.standard_normal(s).astype(np.float32) for s in ((4, 3), (3, 2), (3, 2)))
N = 24


def _model(path):
    """y = (audio @ W_IN + state[0] + state[1]) @ (W_THEN if mode == 1 else W_ELSE); outputs y and the new state."""
    def branch(name, w):
        return helper.make_graph([helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"], name=f"{name}_fc")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
                                 [numpy_helper.from_array(w, f"{name}_w")])

    nodes = [
        helper.make_node("MatMul", ["audio", "w_in"], ["a"], name="fc_in"),
        helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
        helper.make_node("Add", ["a", "s"], ["h"]),
        helper.make_node("Equal", ["mode", "one"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", W_THEN), else_branch=branch("else", W_ELSE)),
        helper.make_node("Relu", ["state"], ["state_out"]),
    ]
    graph = helper.make_graph(
        nodes, "vad_like",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [None, 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 3]),
         helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, None, 3])],
        [numpy_helper.from_array(W_IN, "w_in"), numpy_helper.from_array(np.array([0], np.int64), "axis0"),
         numpy_helper.from_array(np.array(1, np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vad_like")
    x, state = RNG.standard_normal((N, 4)).astype(np.float32), RNG.standard_normal((2, N, 3)).astype(np.float32)
    np.savez(d / "data.npz", audio=x, state=state, mode=np.array(1, np.int64))
    return _model(d / "model.onnx"), d / "data.npz", x, state


@pytest.fixture(scope="module")
def workload(files):
    return load_workload(str(files[0]), str(files[1]))


def test_state_is_batched_on_axis_1_and_the_scalar_is_bound(workload, files):
    _, _, x, state = files
    w = workload
    assert w.calibration.batch_axes == (0, 1)
    assert [tuple(t.shape[a] for t, a in zip(d.inputs, (0, 1))) for d in (w.calibration, w.evaluation)] == \
        [(len(w.calibration),) * 2, (len(w.evaluation),) * 2]
    assert len(w.calibration) + len(w.evaluation) == N
    assert any("'state'" in n and "axis 1" in n for n in w.notes) and any("'mode' is 1" in n for n in w.notes)
    # the evaluation samples are the same rows of x and columns of state: recompute by hand
    ev_x, ev_state = (t.numpy() for t in w.evaluation.inputs)
    rows = [int(np.flatnonzero((x == r).all(1))[0]) for r in ev_x]
    np.testing.assert_array_equal(ev_state, state[:, rows])
    by_hand = (ev_x @ W_IN + ev_state.sum(0)) @ W_THEN
    np.testing.assert_allclose(w.reference_outputs.numpy(), by_hand, rtol=1e-5, atol=1e-5)
    source = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(source.run(None, {"audio": ev_x, "state": ev_state, "mode": np.array(1)})[0],
                               w.reference_outputs.numpy(), rtol=1e-5, atol=1e-5)
    assert set(w.layers) == {"fc_in", "then_fc"}  # the If folded: the taken branch's layer is a layer


@pytest.mark.parametrize("recipe", ["int8-static", "int8-dynamic"])
def test_the_export_runs_at_batch_1_and_8_as_simulated(workload, tmp_path, recipe):
    from qcore.export import export
    from qcore.export.sessions import feed, run_onnx, session
    from qcore.recipe import preset

    w = workload
    r = preset(recipe, w.layer_shapes)
    export(w, r, "onnx", str(tmp_path / "m.onnx"))
    sess = session(str(tmp_path / "m.onnx"), 1)
    declared = {i.name: i.shape for i in sess.get_inputs()}
    assert len(declared) == 2 and declared["input_1"][0] == 2 and declared["input_1"][2] == 3  # (2, batch, 3)
    model = w.simulate(r).model
    for batch in (slice(0, 8), slice(3, 4)):  # dynamic ranges are per batch: each batch against its simulation
        sim = w.run(model, w.evaluation.subset(batch))
        got = sess.run(None, feed(w, w.evaluation.subset(batch)))[0]
        assert got.shape == tuple(sim.shape)
        np.testing.assert_allclose(got, sim.numpy(), rtol=1e-4, atol=1e-4 * float(sim.abs().max()))
    whole = run_onnx(sess, w, w.evaluation)  # batches of workload.batch_size along each input's axis
    np.testing.assert_allclose(whole.numpy(), w.run(w.simulate(r).model, w.evaluation).numpy(), rtol=1e-4, atol=1e-4)


def test_a_given_axis_and_its_errors(files):
    model, data, _, _ = files
    w = load_workload(str(model), str(data), batch_axes={"state": 1})
    assert w.calibration.batch_axes == (0, 1) and any("set by you" in n for n in w.notes)
    for axes, message in [({"state": 3}, "batch axis 3 of input 'state' is out of range: data.npz gives it 3 axes"),
                          ({"hidden": 1}, "the model has no input 'hidden' to give a batch axis (its inputs: audio, state"),
                          ({"state": 0}, "data.npz: input 'state' has 2 samples on its batch axis 0"),
                          ({"mode": 0}, "input 'mode' is a scalar"),
                          ({"audio": 1}, "data.npz: input 'state' has shape (2, 24, 3) with no axis of the 4 samples")]:
        with pytest.raises(QcoreError, match="^" + re.escape(message)) as e:
            load_workload(str(model), str(data), batch_axes=axes)
        assert "\n" not in str(e.value)
    with pytest.raises(QcoreError, match="^batch axes apply to a data file's inputs"):
        load_workload(str(model), None, batch_axes={"state": 1})


def test_positional_arrays_are_batched_on_their_own_axes_too(files, tmp_path):
    model, _, x, state = files
    np.savez(tmp_path / "pos.npz", x0=x, x1=state, mode=np.array(1, np.int64))
    w = load_workload(str(model), str(tmp_path / "pos.npz"))
    assert w.calibration.batch_axes == (0, 1) and len(w.calibration) + len(w.evaluation) == N


def test_an_input_without_one_batch_axis_is_named(tmp_path):
    np.savez(tmp_path / "d.npz", audio=np.zeros((6, 4), np.float32), state=np.zeros((2, 5, 3), np.float32),
             mode=np.array(1, np.int64))
    with pytest.raises(QcoreError, match=r"input 'state' has shape \(2, 5, 3\) with no axis of the 6 samples .*"
                                         r"--batch-axis state=AXIS"):
        load_workload(str(_model(tmp_path / "m.onnx")), str(tmp_path / "d.npz"))


def test_parse_batch_axes():
    assert parse_batch_axes(" state=1, h = 2 ,") == {"state": 1, "h": 2}
    assert parse_batch_axes("") == {}
    with pytest.raises(QcoreError, match="^batch axis 'state:1' is not like state=1"):
        parse_batch_axes("state:1")


def test_cli_flag_and_one_line_error(files, capsys):
    from qcore.cli import main

    model, data, _, _ = files
    assert main(["evaluate", str(model), "--data", str(data), "--preset", "int8-dynamic", "--batch-axis", "state=1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any("set by you" in n for n in out["notes"])
    code = main(["evaluate", str(model), "--data", str(data), "--preset", "int8-dynamic", "--batch-axis", "state=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "out of range" in err and len(err.splitlines()) == 1


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 3), st.lists(st.integers(1, 4), min_size=3, max_size=3), st.integers(5, 9))
def test_the_batch_axis_is_found_and_sliced_on(axis, other, n):
    """Any position of the batch axis among sizes that differ from N: inferred, and a subset / batch takes the
    same entries as numpy's ``take`` along that axis."""
    shape = other[:axis] + [n] + other[axis:]
    state = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    d, notes = with_batch_axes(Data((x, state), names=("x", "state")), {}, ("x", "state"), "d.npz")
    assert len(notes) == (axis != 0)
    assert d.axis(1) == axis and len(d) == n
    index = torch.tensor([n - 1, 0, 2])
    np.testing.assert_array_equal(d.subset(index).inputs[1].numpy(), np.take(state.numpy(), index.numpy(), axis=axis))
    batches = d.batches(2)
    assert [b[1].shape[axis] for b in batches] == [2] * (n // 2) + [1] * (n % 2)
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches], axis=axis), state.numpy())


def test_the_upload_sandbox_gets_the_batch_axes(files):
    """The app vets an upload in a child process (``vet_upload``): it loads with the user's batch axes too."""
    from qcore.io.sandbox import vet_upload

    model, data, _, _ = files
    with pytest.raises(QcoreError, match="batch axis 5 of input 'state' is out of range"):
        vet_upload(model, data, batch_axes={"state": 5})


# ---- .pt2 programs batched on another axis, and Hugging Face folders -----------------------------------
class _StateNet(torch.nn.Module):
    """fc_out(relu(fc_in(audio) + state.sum(0))): audio (batch, 4), state (2, batch, 3) -> (batch, 2)."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_out = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)

    def forward(self, audio, state):
        return self.fc_out(torch.relu(self.fc_in(audio) + state.sum(0)))


class _SeqFirst(torch.nn.Module):
    """fc(frames.mean(0)): frames (time 5, batch, 4), batch on axis 1 -> (batch, 3)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, frames):
        return self.fc(frames.mean(0))


def _pt2(tmp_path, net, arrays: dict, axes: dict):
    """``net`` saved by torch.export with each input's batch axis dynamic, and a named .npz of ``arrays``."""
    torch.manual_seed(0)
    b = torch.export.Dim("batch")
    example = tuple(torch.from_numpy(np.ascontiguousarray(np.take(a, [0, 1], axis=axes[k]))) for k, a in arrays.items())
    program = torch.export.export(net.eval(), example, dynamic_shapes=tuple({axes[k]: b} for k in arrays))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "d.npz", **arrays)
    return str(tmp_path / "m.pt2"), str(tmp_path / "d.npz")


@pytest.mark.parametrize("case", ["state on axis 1 (inferred)", "sequence first (given)"])
@pytest.mark.parametrize("recipe", ["fp32", "int8-static", "int8-dynamic"])
def test_a_pt2_program_batched_on_another_axis_exports_and_runs_at_batch_1_and_8(tmp_path, case, recipe):
    """The file is traced with each input's own batch axis dynamic (it was traced on axis 0: a state (2, batch, 3)
    came out as (2, 6, 3) fixed and the export failed). Oracles: the eager module for FP32 (batches cut by numpy
    along each input's axis), the simulation for the quantized files."""
    from qcore.export import export
    from qcore.export.sessions import feed, session
    from qcore.recipe import preset

    torch.manual_seed(0)
    if case.startswith("state"):
        net, axes, given = _StateNet(), {"audio": 0, "state": 1}, {}
        arrays = {"audio": RNG.standard_normal((N, 4)).astype(np.float32),
                  "state": RNG.standard_normal((2, N, 3)).astype(np.float32)}
    else:
        net, axes = _SeqFirst(), {"frames": 1}
        given = axes
        arrays = {"frames": RNG.standard_normal((5, N, 4)).astype(np.float32)}
    w = load_workload(*_pt2(tmp_path, net, arrays, axes), batch_axes=given)
    assert w.calibration.batch_axes == tuple(axes.values())
    r = preset(recipe, w.layer_shapes)
    export(w, r, "onnx", str(tmp_path / "m.onnx"))
    sess = session(str(tmp_path / "m.onnx"), 1)
    for i, (k, a) in zip(sess.get_inputs(), arrays.items()):
        assert i.shape[axes[k]] == "batch" and [d for j, d in enumerate(i.shape) if j != axes[k]] == \
            [d for j, d in enumerate(a.shape) if j != axes[k]]
    model = w.simulate(r).model
    for batch in (slice(0, 1), slice(2, 10)):
        sub = w.evaluation.subset(batch)
        got = sess.run(None, feed(w, sub))[0]
        if recipe == "fp32":
            with torch.no_grad():
                expected = net(*(torch.from_numpy(t.numpy()) for t in sub.inputs)).numpy()
        else:
            expected = w.run(model, sub).numpy()
        assert got.shape == expected.shape == (len(sub), expected.shape[1])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * (1 + float(np.abs(expected).max())))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import hf_models

    root = tmp_path_factory.mktemp("hf")
    (root / "text.txt").write_text(hf_models.TEXT)
    folder = hf_models.save("gpt2", root / "gpt2")
    (folder / "text.txt").unlink(missing_ok=True)
    return folder, root / "text.txt"


def test_a_hugging_face_folder_refuses_batch_axes_in_one_line(hf_folder, capsys):
    """Its text is cut into windows of token ids, samples on axis 0: a batch axis given for it was ignored."""
    from qcore.cli import main

    folder, text = hf_folder
    with pytest.raises(QcoreError, match="^batch axes apply to a data file's arrays; a Hugging Face model's text"):
        load_workload(str(folder), str(text), batch_axes={"input_ids": 1})
    code = main(["evaluate", str(folder), "--data", str(text), "--preset", "int8-dynamic", "--batch-axis",
                 "input_ids=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Hugging Face" in err and len(err.splitlines()) == 1


def test_a_hugging_face_export_runs_at_batch_1_and_8_as_the_float_model(hf_folder, tmp_path):
    """FP32 file at batch 1 and 8 against transformers' own model loaded from the folder (the oracle)."""
    from transformers import AutoModelForCausalLM

    from qcore.export import export
    from qcore.export.sessions import session
    from qcore.recipe import preset

    folder, text = hf_folder
    w = load_workload(str(folder), str(text))
    export(w, preset("fp32"), "onnx", str(tmp_path / "lm.onnx"))
    sess = session(str(tmp_path / "lm.onnx"), 1)
    reference = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = w.evaluation.inputs[0]
    for b in (1, 8):
        x = ids[torch.arange(b) % len(ids)]
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = reference(x).logits.numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

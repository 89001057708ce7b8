"""OpenVINO runs the same exported file as ONNX Runtime, says which precision it computed in, and ``bench``
times either runtime interleaved.

Oracles: ONNX Runtime running the same file (a second, independent runtime) for outputs; the compiled
model's own ``INFERENCE_PRECISION_HINT`` property (read straight from OpenVINO) for the precision; a call
log for the interleaving.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import openvino as ov  # noqa: E402

from qcore.errors import QcoreError  # noqa: E402
from qcore.export import bench as bench_module  # noqa: E402
from qcore.export import export_qdq  # noqa: E402
from qcore.export.bench import bench  # noqa: E402
from qcore.export.openvino import openvino_session, save_ir  # noqa: E402
from qcore.export.profile import openvino_kernels  # noqa: E402
from qcore.export.sessions import feed, session  # noqa: E402
from qcore.recipe import preset  # noqa: E402


@pytest.mark.parametrize("name", ["int8-static", "int8-dynamic", "int4-weight-only"])
def test_openvino_runs_the_exported_file_as_onnx_runtime_does(digits_cnn, tmp_path, name):
    """True FP32 in OpenVINO: outputs within ``tol`` of the largest logit of ONNX Runtime's, and the same top-1
    class on >= 98 % of samples. Weight-only files compute in float in both (1e-4); int8 files run each
    runtime's own fused int8 kernels, which requantize their int32 sums differently (1 %)."""
    path = str(tmp_path / "m.onnx")
    export_qdq(digits_cnn, preset(name, digits_cnn.layer_shapes), path)
    x = feed(digits_cnn, digits_cnn.evaluation.subset(slice(0, 64)))
    ref = session(path, 1).run(None, x)[0]
    ov_sess = openvino_session(path, 1, "f32")
    assert ov_sess.precision == "f32"
    out = ov_sess.run(None, x)[0]
    assert out.shape == ref.shape
    tol = 1e-4 if name == "int4-weight-only" else 1e-2
    assert np.abs(out - ref).max() <= tol * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_openvino_reports_the_precision_it_executes_in(digits_mlp, tmp_path):
    path = str(tmp_path / "m.onnx")
    export_qdq(digits_mlp, preset("fp32"), path)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": 1})
    plugin_default = compiled.get_property("INFERENCE_PRECISION_HINT")  # bf16 on AMX / AVX-512 BF16, else f32
    expect = {ov.Type.f32: "f32", ov.Type.bf16: "bf16", ov.Type.f16: "f16"}[plugin_default]
    assert openvino_session(path, 1).precision == expect
    assert openvino_session(path, 1, "f32").precision == "f32"
    with pytest.raises(QcoreError, match="precision"):
        openvino_session(path, 1, "int3")


def test_openvino_ir_computes_what_the_onnx_file_does(digits_mlp, tmp_path):
    path = str(tmp_path / "m.onnx")
    export_qdq(digits_mlp, preset("int8-static", digits_mlp.layer_shapes), path)
    xml = save_ir(path, str(tmp_path / "m.xml"))
    x = feed(digits_mlp, digits_mlp.evaluation.subset(slice(0, 16)))
    np.testing.assert_allclose(openvino_session(xml, 1, "f32").run(None, x)[0],
                               openvino_session(path, 1, "f32").run(None, x)[0], rtol=1e-6, atol=1e-6)


def test_bench_on_openvino_interleaves_and_labels_the_precision(digits_mlp, monkeypatch):
    calls = []
    real = bench_module.session

    class Logged:
        def __init__(self, path, *args):
            self.sess, self.key = real(path, *args), "fp32" if path.endswith("fp32.onnx") else "quantized"
            self.precision = self.sess.precision

        def run(self, names, inputs):
            calls.append(self.key)
            return self.sess.run(names, inputs)

        def get_inputs(self):
            return self.sess.get_inputs()

    monkeypatch.setattr(bench_module, "session", Logged)
    r = bench(digits_mlp, preset("int8-static", digits_mlp.layer_shapes), batch_size=4, threads=1, budget_s=0.0,
              runtime="openvino", precision="f32")
    rounds = 3 + r.speedup["rounds"]
    timed = calls[:2 * rounds]
    assert timed == ["fp32", "quantized"] * rounds  # ABAB..., never AA or BB
    assert r.runtime["name"] == "openvino" and r.runtime["precision"] == "f32" and "f32" in r.backend
    for side in (r.fp32, r.quantized):
        assert side.latency_ms["best"] <= side.latency_ms["median"]
        assert set(side.metrics) == {"onnxruntime", "simulated", "openvino"}
    assert abs(r.quantized.metrics["openvino"] - r.quantized.metrics["onnxruntime"]) <= 2 / len(digits_mlp.evaluation)
    with pytest.raises(QcoreError, match="runtime"):
        bench(digits_mlp, preset("fp16"), runtime="tensorrt")


class TinyBertLayer(torch.nn.Module):
    """One post-LN BERT encoder layer (2 heads): q/k/v, softmax attention, output dense + residual + LayerNorm,
    GELU FFN + residual + LayerNorm; the embedding is the mean over tokens."""

    def __init__(self, d=32, ff=64):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.up, self.down = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)

    def forward(self, x):  # x (B, T, d)
        b, t, d = x.shape
        heads = lambda y: y.view(b, t, 2, d // 2).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // 2) ** 0.5, -1) @ v
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.down(torch.nn.functional.gelu(self.up(x)))).mean(1)


def test_openvino_runs_every_linear_of_an_int8_static_bert_layer_in_int8_and_computes_the_simulation(tmp_path):
    """The QDQ pattern the export writes (int8 codes + DequantizeLinear on weights, QuantizeLinear/DequantizeLinear
    with the calibrated scale and zero-point on each Linear's input) is what OpenVINO's low-precision
    transformations fuse: every one of the 6 Linears compiles to an int8 FullyConnected (read from OpenVINO's
    runtime graph), and the output equals the simulation within the tolerance ONNX Runtime's int8 kernels meet
    on the same file (1 % of the largest output; oracle: the PyTorch simulation)."""
    from qcore.model.task import output_task
    from qcore.model.workload import Data, Workload

    torch.manual_seed(0)
    x = torch.randn(32, 6, 32) * 2 + 0.5
    w = Workload("t", TinyBertLayer().eval(), Data((x,)), Data((x,)), output_task("embedding", (32,), False, "test"))
    recipe = preset("int8-static", w.layer_shapes)
    path = str(tmp_path / "m.onnx")
    export_qdq(w, recipe, path)
    fcs = [r for r in openvino_kernels(path, {"input_0": x.numpy()}, precision="f32") if r["op"] == "FullyConnected"]
    assert len(fcs) == 6 and all(r["precision"] == "int8" for r in fcs), fcs
    with torch.no_grad():
        ref = w.simulate(recipe).model(x).numpy()
    tol = 1e-2 * np.abs(ref).max()
    assert np.abs(session(path, 1).run(None, {"input_0": x.numpy()})[0] - ref).max() <= tol  # ONNX Runtime meets it
    out = openvino_session(path, 1, "f32").run(None, {"input_0": x.numpy()})[0]
    assert np.abs(out - ref).max() <= tol

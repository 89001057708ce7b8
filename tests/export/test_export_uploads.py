"""Uploads export as the simulation: an ``.onnx`` upload is written by rewriting its own graph, a ``.pt2``
upload through the dynamo exporter; either file, run in ONNX Runtime at batch 1 and 8, computes the
simulated model (``workload.simulate(recipe).model``). An imported ONNX model keeps every parameter
of its source model.

Oracles: the simulated model (PyTorch) for outputs; the source ``nn.Module`` (``sum(p.numel())``) for
parameter counts; ``os.path.getsize`` for sizes.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_export_qdq import MIN_SQNR_DB, recipes, sqnr_db
from torch import nn

from qcore.export import export_qdq
from qcore.io.workload import load_workload
from qcore.recipe import PRESETS, preset
from qcore.analysis.summary import layer_table

WORST: dict[str, float] = {}


# ---- the source models ------------------------------------------------------------------------------
class ChannelNorm(nn.Module):
    """LayerNorm over the channels of (N, C, H, W)."""

    def __init__(self, c: int):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SeparableCNN(nn.Module):
    """Depthwise-separable CNN: stem conv, depthwise 3x3 (groups = C) [+ BatchNorm, not in a Sequential,
    so the simulation does not fold it], pointwise 1x1, LayerNorm over channels, GELU, Linear head,
    LayerNorm over the last dim."""

    def __init__(self, bn: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.pw = nn.Conv2d(16, 32, 1)
        self.norm = ChannelNorm(32)
        self.head = nn.Linear(32, 10)
        self.out_norm = nn.LayerNorm(10)

    def forward(self, x):
        x = nn.functional.gelu(self.bn(self.dw(nn.functional.gelu(self.stem(x)))))
        x = nn.functional.gelu(self.norm(self.pw(x)))
        return self.out_norm(self.head(x.mean((2, 3))))


class TinyBlock(nn.Module):
    """Embedding + LayerNorm + a residual MLP (Linear, GELU, Linear) + LayerNorm, mean-pooled."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 64)
        self.down = nn.Linear(64, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, ids):
        h = self.ln1(self.emb(ids))
        h = self.ln2(h + self.down(nn.functional.gelu(self.up(h))))
        return h.mean(1)


def _trained_like(model: nn.Module) -> nn.Module:
    """Random norms and BatchNorm statistics (a fresh BatchNorm is the identity; LayerNorm 1 and 0)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _to_onnx(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = ({0: "batch"} if x.is_floating_point() else {0: "batch", 1: "seq"},)
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=dims, external_data=False)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("uploads")


@functools.cache
def _upload(folder, kind: str):
    """The BatchNorm CNN as an uploaded workload: ``.onnx`` (torch.onnx.export dynamo) or ``.pt2``."""
    torch.manual_seed(0)
    model, x = _trained_like(SeparableCNN(bn=True)), torch.randn(2, 3, 8, 8)
    if kind == "onnx":
        return load_workload(_to_onnx(model, x, folder / "cnn.onnx"))
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      str(folder / "cnn.pt2"))
    return load_workload(str(folder / "cnn.pt2"))


def check_matches(workload, recipe, path: str) -> float:
    """Export; assert the file's size and that ONNX Runtime (without and with its graph optimizations)
    matches the simulation at batch 1 and 8; the worst SQNR (dB)."""
    result = export_qdq(workload, recipe, path)
    assert result.size_bytes == os.path.getsize(path)
    assert not result.notes or all("container" in n or "SmoothQuant adds" in n for n in result.notes), result.notes
    sim = workload.simulate(recipe).model
    x = workload.evaluation.inputs[0]
    batches = [x[:1], x[1:2], x[:8], x[8:16]]
    with torch.no_grad():
        refs = [sim(b) for b in batches]
    worst = float("inf")
    for level, min_db in MIN_SQNR_DB.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level, opts.log_severity_level, opts.intra_op_num_threads = level, 3, 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        for b, ref in zip(batches, refs):
            out = torch.from_numpy(sess.run(None, {"input_0": b.numpy()})[0])
            assert out.shape == ref.shape == (len(b), 10)
            db = sqnr_db(out, ref)
            assert db >= min_db, f"{recipe.to_json()} at {level}, batch {len(b)}: {db:.1f} dB"
            worst = min(worst, db)
    return worst


# ---- (a) random recipes on both upload formats -------------------------------------------------------
@pytest.mark.parametrize("kind", ["onnx", "pt2"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_recipes_on_uploads_export_and_match_the_simulation(folder, kind, data):
    w = _upload(folder, kind)
    recipe = data.draw(recipes(w))
    db = check_matches(w, recipe, str(folder / f"{kind}-drawn.onnx"))
    WORST[kind] = min(WORST.get(kind, float("inf")), db)
    print(f"\nworst SQNR vs simulation so far (dB): {WORST}")


def test_uploaded_onnx_graph_is_rewritten_not_reexported(folder):
    """The file is the upload's own graph: its LayerNormalization / Gelu nodes and BatchNorm-folded
    depthwise weight (folded by the upload's exporter) are there, the source weights are gone."""
    w = _upload(folder, "onnx")
    path = str(folder / "rewritten.onnx")
    export_qdq(w, preset("int8-weight-only", w.layer_shapes), path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("LayerNormalization") == 2 and ops.count("Gelu") == 3 and "BatchNormalization" not in ops
    fp32 = onnx.load(export_qdq(w, preset("fp32"), str(folder / "fp32.onnx")).path)
    source = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "cnn.onnx")).graph.initializer}
    kept = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    assert source.keys() == kept.keys()  # same weights, same names: nothing added, nothing dropped
    for name, a in source.items():
        np.testing.assert_array_equal(kept[name], a.T if name == "head.weight" else a)  # Gemm -> MatMul(W^T)


# ---- (b) every parameter of the source model counts ---------------------------------------------------
@pytest.mark.parametrize("make, x", [(lambda: SeparableCNN(bn=False), torch.randn(2, 3, 8, 8)),
                                     (TinyBlock, torch.randint(0, 50, (2, 7)))], ids=["cnn", "transformer-block"])
def test_onnx_import_counts_layernorm_parameters(tmp_path, make, x):
    """Regression: LayerNorm's scale and bias were buffers of OnnxModule.constants, so the imported CNN
    counted 52,986 instead of 55,034 parameters and every layer's share was too large."""
    torch.manual_seed(0)
    source = _trained_like(make())
    expected = sum(p.numel() for p in source.parameters())
    w = load_workload(_to_onnx(source, x, tmp_path / "m.onnx"))
    assert sum(p.numel() for p in w.model.parameters()) == expected
    norms = sum(p.numel() for m in source.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    assert norms > 0 and sum(b.numel() for b in w.model.buffers() if b.is_floating_point()) == 0
    rows = {r["name"]: r for r in layer_table(w)}
    for name, module in source.named_modules():
        if name in rows:
            own = sum(p.numel() for p in module.parameters())
            assert rows[name]["params"] == own and rows[name]["share"] == pytest.approx(own / expected)


# ---- (c) the defects, one test each -------------------------------------------------------------------
def test_uploaded_onnx_cnn_exports_under_every_preset(folder):
    """Regression: an uploaded .onnx model could not be exported back to ONNX under any recipe
    (SymbolicValueError, then "not supported yet")."""
    w = _upload(folder, "onnx")
    for name in PRESETS:
        assert check_matches(w, preset(name, w.layer_shapes), str(folder / f"preset-{name}.onnx")) >= 30


def test_int4_weight_only_on_pt2_with_depthwise_convs(folder):
    """Regression: int4-weight-only on a .pt2 upload with a depthwise conv failed
    ("QOperator is not supported channel_wised_quantize"). The depthwise conv's BatchNorm, which the
    simulation keeps, stays a BatchNormalization node (the exporter's optimizer would fuse it)."""
    w = _upload(folder, "pt2")
    result_db = check_matches(w, preset("int4-weight-only", w.layer_shapes), str(folder / "pt2-int4.onnx"))
    assert result_db >= 30
    ops = [n.op_type for n in onnx.load(str(folder / "pt2-int4.onnx")).graph.node]
    assert "BatchNormalization" in ops


def test_fixed_batch_reshape_reads_the_batch_of_each_run(tmp_path):
    """Regression (issue 14): a graph whose Reshape writes batch 2 exported a file that failed at any other
    batch size. The Reshape now reads the batch of the run; the file matches the simulation at 1 and 8."""
    w1 = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc"),
             helper.make_node("Reshape", ["h", "shape"], ["y"], name="fixed")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.array([2, 6]), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fixed.onnx")
    w = load_workload(str(tmp_path / "fixed.onnx"))
    recipe = preset("int8-weight-only", w.layer_shapes)
    result = export_qdq(w, recipe, str(tmp_path / "out.onnx"))
    assert result.opset == 21 and len(result.notes) == 1 and "runs any batch size" in result.notes[0]
    sim = w.simulate(recipe).model
    for b in (1, 8):
        x = w.evaluation.inputs[0][:b]
        out = ort.InferenceSession(result.path).run(None, {"input_0": x.numpy()})[0]
        with torch.no_grad():  # the imported model runs pairs: the reference row by row, each duplicated
            ref = torch.cat([sim(x[i:i + 1].repeat(2, 1))[:1] for i in range(b)])
        assert out.shape == (b, 6) and sqnr_db(torch.from_numpy(out), ref) > 60

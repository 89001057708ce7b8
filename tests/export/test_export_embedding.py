"""Embeddings looked up on their codes, and a quantized input that feeds only the layer it quantizes.

Oracles: the simulated model (``workload.simulate(recipe).model``, PyTorch) for outputs; the ONNX file's own
initializers (``numpy_helper``) and a hand count of the table's bytes (codes at their container width,
float32 scales) for sizes; which node reads which value, read from the file.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qcore.export import export_qdq
from qcore.model.workload import Data, Workload
from qcore.model.task import output_task
from qcore.recipe import Recipe, preset


def _workload(model: nn.Module, x: torch.Tensor, out_dim: int) -> Workload:
    return Workload("t", model.eval(), Data((x,)), Data((x,)), output_task("embedding", (out_dim,), False, "test"))


def _run(path: str, x: torch.Tensor, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level, opts.log_severity_level = level, 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]


class Bag(nn.Module):
    def __init__(self, vocab=300, d=64):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, 8)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@functools.cache
def _bag() -> tuple[Workload, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (16, 5))
    return _workload(Bag(), ids, 8), ids  # one workload: its float graph is exported once


WEIGHTS = [({"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False}, "GatherBlockQuantized", 4),
           ({"format": "int3", "granularity": "per_channel", "axis": 0, "symmetric": False}, "GatherBlockQuantized", 4),
           ({"format": "int8", "granularity": "per_channel", "axis": 0, "symmetric": False}, "Gather", 8),
           ({"format": "int8", "granularity": "per_group", "group_size": 16}, "Gather", 8)]


@pytest.mark.parametrize("weights,op,container_bits", WEIGHTS)
def test_embedding_is_looked_up_on_its_codes_and_matches_the_simulation(tmp_path, weights, op, container_bits):
    w, ids = _bag()
    recipe = Recipe.from_dict({"name": "emb", "weights": weights})
    path = str(tmp_path / "m.onnx")
    result = export_qdq(w, recipe, path)
    proto = onnx.load(path)
    table = next(n for n in proto.graph.node if n.op_type == op and n.input[0].startswith("codes"))
    codes = next(i for i in proto.graph.initializer if i.name == table.input[0])
    assert tuple(codes.dims) == (300, 64)  # the table itself is stored as codes ...
    assert len(codes.raw_data) == 300 * 64 * container_bits // 8  # ... at the container width, packed
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == codes.name for n in proto.graph.node)
    row = next(r for r in result.layers if r["layer"] == "emb")
    assert row["executes"] == "quantized Gather"
    with torch.no_grad():
        ref = w.simulate(recipe).model(ids).numpy()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_allclose(_run(path, ids, level), ref, rtol=1e-5, atol=1e-6)


def test_int4_minilm_sized_table_file_is_within_10_percent_of_the_theoretical_size(tmp_path):
    """A table large enough that the graph's own bytes do not matter: (V=4096, D=128) int4 per group of 32,
    asymmetric: 4 bits per code + one float32 scale and one 4-bit zero-point per 32 codes (hand count)."""
    torch.manual_seed(1)
    model = Bag(4096, 128)
    ids = torch.randint(0, 4096, (8, 6))
    w = _workload(model, ids, 8)
    recipe = Recipe.from_dict({"name": "int4", "weights": {"format": "int4", "granularity": "per_group",
                                                           "group_size": 32, "symmetric": False}})
    result = export_qdq(w, recipe, str(tmp_path / "m.onnx"))
    table = 4096 * 128 // 2 + 4096 * 4 * 4 + 4096 * 4 // 2  # codes + scales + zero-points, bytes
    head = 128 * 8 // 2 + 128 // 32 * 8 * 4 + 128 // 32 * 8 // 2 + 8 * 4  # the Linear and its float bias
    assert abs(result.size_bytes / (table + head) - 1) <= 0.10
    assert abs(result.size_bytes / w.size(recipe)["size_bytes"] - 1) <= 0.10
    assert result.size_bytes <= 0.21 * 4096 * 128 * 4


class NormResidual(nn.Module):
    """LayerNorm -> two Linears (query / key style) and the residual Add, as in a BERT layer."""

    def __init__(self, d=16):
        super().__init__()
        self.ln, self.q, self.k, self.head = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)

    def forward(self, x):
        h = self.ln(x)
        return self.head(h + self.q(h) * torch.sigmoid(self.k(h)))


def test_a_quantized_input_feeds_only_the_layer_the_simulation_quantizes(tmp_path):
    """int8-static: the residual Add reads the float LayerNorm output (as the simulation adds it), every
    Linear its own QuantizeLinear/DequantizeLinear pair; the file equals the simulation to float precision."""
    torch.manual_seed(2)
    x = torch.randn(64, 16) * 3 + 1
    w = _workload(NormResidual(), x, 4)
    recipe = preset("int8-static")
    path = str(tmp_path / "m.onnx")
    export_qdq(w, recipe, path)
    proto = onnx.load(path)
    made_by = {o: n for n in proto.graph.node for o in n.output}
    norm = next(n for n in proto.graph.node if n.op_type == "LayerNormalization").output[0]
    readers = [n for n in proto.graph.node if norm in n.input]
    assert sorted(n.op_type for n in readers) == ["Add", "QuantizeLinear", "QuantizeLinear"]
    residual = next(n for n in readers if n.op_type == "Add")
    assert all(made_by[i].op_type != "DequantizeLinear" for i in residual.input if i in made_by)
    with torch.no_grad():
        ref = w.simulate(recipe).model(x).numpy()
    np.testing.assert_allclose(_run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(path, x), ref, rtol=1e-4, atol=1e-4)

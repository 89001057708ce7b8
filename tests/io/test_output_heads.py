"""Several output heads: a raw (N, C) first output beside a head that ends in Sigmoid / Softmax is
scored as regression values (a detector's box offsets beside its face probability, as MTCNN ONet), in
both loaders (.pt2 and ONNX); without such a head, or with labels, it stays class logits."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qcore.io.workload import infer_output_kind, load_workload


class Heads(nn.Module):
    """(box offsets (N, 4), second head (N, 2)); the second ends in ``last`` (softmax, sigmoid or nothing)."""

    def __init__(self, last):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.box, self.cls, self.last = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 2), last

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.box(h), self.last(self.cls(h))


def _pt2(tmp_path, last, labels=False):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch")
    path = tmp_path / "heads.pt2"
    torch.export.save(torch.export.export(Heads(last).eval(), (x[:2],), dynamic_shapes=({0: batch},)), str(path))
    arrays = {"x": x.numpy()} | ({"y": np.arange(40) % 4} if labels else {})
    np.savez(tmp_path / "heads.npz", **arrays)
    return load_workload(str(path), str(tmp_path / "heads.npz"))


@pytest.mark.parametrize("last", [lambda t: torch.softmax(t, 1), torch.sigmoid], ids=["softmax", "sigmoid"])
def test_pt2_box_head_beside_a_probability_head_is_regression(tmp_path, last):
    w = _pt2(tmp_path, last)
    assert (w.task.kind, w.task.headline) == ("regression", "sqnr_db")
    assert "output 2 of the model ends in a" in w.task.why
    assert any("output scored as regression" in n and "output 2" in n for n in w.notes)  # what the page shows


def test_pt2_without_a_probability_head_or_with_labels_stays_class_logits(tmp_path):
    assert _pt2(tmp_path, nn.Identity()).task.kind == "classification"
    assert _pt2(tmp_path, lambda t: torch.softmax(t, 1), labels=True).task.kind == "classification"


def test_onnx_box_head_beside_a_softmax_head_is_regression(tmp_path):
    rng = np.random.default_rng(0)
    w_box, w_cls = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_box"], ["boxes"]), helper.make_node("MatMul", ["x", "w_cls"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["prob"], axis=1)], "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w_box, "w_box"), numpy_helper.from_array(w_cls, "w_cls")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "heads.onnx"))
    np.savez(tmp_path / "heads.npz", x=rng.standard_normal((40, 6)).astype(np.float32))
    w = load_workload(str(tmp_path / "heads.onnx"), str(tmp_path / "heads.npz"))
    assert (w.task.kind, w.task.headline) == ("regression", "sqnr_db")


def test_the_rule_only_replaces_class_logits_by_shape():
    """Probabilities, unit-length embeddings and maps keep their kinds beside a probability head."""
    assert infer_output_kind((4,), None, False, other_activations=(None, "softmax"))[0] == "regression"
    assert infer_output_kind((4,), None, False, other_activations=(None, None))[0] == "classification"
    assert infer_output_kind((2,), "softmax", False, other_activations=("sigmoid",))[0] == "probabilities"
    assert infer_output_kind((4, 5, 5), None, False, other_activations=("softmax",))[0] == "embedding"
    assert infer_output_kind((64,), None, False, unit_rows=True, other_activations=("softmax",))[0] == "embedding"

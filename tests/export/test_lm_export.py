"""A TinyLM-architecture model exported to ONNX (int8 and int4 MatMulNBits) runs in ONNX Runtime with the
simulation's logits, at any batch and sequence length; ``bench`` reports its prefill and decode speed."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qcore.export.bench import NEW_TOKENS, bench
from qcore.export.report import export
from qcore.recipe import preset
from test_generate import toy_workload


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def w():
    """One workload for the module: its FP32 ONNX graph (torch.onnx's dynamo export, the slow part) is made once."""
    return toy_workload()


@pytest.mark.parametrize("name, linear_op", [("int8-dynamic", "MatMulNBits"), ("int4-weight-only", "MatMulNBits")])
def test_export_matches_the_simulation_at_any_batch_and_length(tmp_path, w, name, linear_op):
    recipe = preset(name, w.layer_shapes)
    r = export(w, recipe, "onnx", str(tmp_path / "lm.onnx"))
    assert {l["executes"] for l in r.layers if l["kind"] == "Linear"} == {linear_op}
    assert r.metrics["onnxruntime"]["perplexity"] == pytest.approx(r.metrics["simulated"]["perplexity"], rel=1e-4)
    sess = ort.InferenceSession(r.path, providers=["CPUExecutionProvider"])
    sim = w.simulate(recipe).model
    for batch, length in ((1, 5), (3, 32)):
        ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(length))
        got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
        with torch.no_grad():
            want = sim(ids).numpy()
        assert got.shape == (batch, length, 64)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_bench_times_prefill_and_decode_and_says_there_is_no_kv_cache(w):
    lm = bench(w, preset("int4-weight-only", w.layer_shapes), batch_size=2, threads=1, budget_s=0.05).language_model
    assert lm["batch_size"] == 1 and lm["prompt_tokens"] == 16 and lm["new_tokens"] == NEW_TOKENS
    assert all(lm["prefill_ms"][k]["median"] > 0 and lm["decode_tokens_per_s"][k] > 0 for k in ("fp32", "quantized"))
    assert "no KV cache" in lm["decode"] and "re-runs the whole prefix" in lm["decode"]

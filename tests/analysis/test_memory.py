"""The memory calculator against the rules of thumb it must reproduce and against hand computations."""

import pytest

from qcore.analysis.memory import REFERENCE_MODELS, LMShape, kv_cache_bytes, memory_table, weight_memory
from qcore.errors import QcoreError


@pytest.mark.parametrize("fmt,gb", [("fp32", 4.0), ("fp16", 2.0), ("int8", 1.0), ("int4", 0.5)])
def test_a_nominal_1b_model_takes_4_2_1_half_gb(fmt, gb):
    assert weight_memory(10**9, fmt)["total"] == gb * 10**9  # codes only, decimal GB, as the rule of thumb


def test_llama2_70b_is_about_140_gb_at_fp16_and_35_gb_at_int4():
    shape = REFERENCE_MODELS["70B"]
    # by hand from its config: 2 x 32000 x 8192 embeddings/head + 80 x (2 x 8192^2 + 2 x 8192 x 1024
    # + 3 x 8192 x 28672 + 2 x 8192) + 8192
    by_hand = 2 * 32000 * 8192 + 80 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 8192
    assert shape.param_count == by_hand == 68_976_648_192
    rows = {r["format"]: r for r in memory_table(shape)}
    assert 135 < rows["fp16"]["weight_gb"] < 140.5 and 34 < rows["int4"]["weight_gb"] < 35.5
    assert REFERENCE_MODELS["7B"].param_count == 6_738_415_616  # Llama-2-7B's published count
    # TinyLlama-1.1B by hand from its config: vocab 32000, hidden 2048, 22 layers, 4 KV heads x 64, MLP 5632, untied head
    assert REFERENCE_MODELS["1B"].param_count == (2 * 32000 * 2048 + 2048 + 22 * (
        2 * 2048**2 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048)) == 1_100_048_384


def test_group_scales_add_4_bytes_per_group():
    # 1e9 int4 weights in groups of 32: 0.5e9 code bytes + 31.25e6 float32 scales x 4 bytes = 0.625 GB
    assert weight_memory(10**9, "int4", group_size=32) == {"codes": 500_000_000, "scales": 125_000_000,
                                                           "zero_points": 0, "total": 625_000_000}
    # affine: a 4-bit zero-point per group as well (31.25e6 x 0.5 bytes)
    assert weight_memory(10**9, "int4", 32, symmetric=False)["zero_points"] == 15_625_000
    assert weight_memory(10**9, "fp16", group_size=32)["scales"] == 0  # a plain cast stores no scale


def test_kv_cache_formula_by_hand():
    # Llama-2-7B, fp16, 4096 tokens, batch 1: 2 x 32 layers x 32 heads x 128 x 4096 x 2 bytes = 2 GiB exactly
    assert kv_cache_bytes(32, 32, 128, 4096, 1, "fp16") == 2 * 2**30
    # 70B with 8 KV heads, batch 4, int8 per token: values 2*80*8*128*4096*4 at 1 byte + 2*80*8*4096*4 scales x 4 B
    assert kv_cache_bytes(80, 8, 128, 4096, 4, "int8", "per_token") == 2684354560 + 83886080
    assert kv_cache_bytes(2, 4, 8, 16, 1, "int4", "per_head") == 2 * 2 * 4 * 8 * 16 // 2 + 2 * 2 * 4 * 4
    rows = memory_table(LMShape("toy", 2, 32, 4, 4, 8, 64, 100), formats=("int8",), context=16)
    assert rows[0]["kv_cache_bytes"] == 2 * 2 * 4 * 8 * 16 * 2 and "16 tokens" in rows[0]["includes"]


def test_bad_values_are_one_line():
    for call in (lambda: weight_memory(10, "int9"), lambda: kv_cache_bytes(0, 1, 1, 1),
                 lambda: kv_cache_bytes(1, 1, 1, 1, 1, "int8", "per_row")):
        with pytest.raises(QcoreError) as e:
            call()
        assert "\n" not in str(e.value)


def test_the_figure_stacks_weights_and_cache_per_model():
    from qcore.figures.memory import memory_bars

    rows = memory_table(REFERENCE_MODELS["1B"], ("fp16", "int4")) + memory_table(REFERENCE_MODELS["70B"], ("fp16", "int4"))
    fig = memory_bars(rows)
    weights = [t for t in fig.data if t.name == "weights"]
    assert len(weights) == 2 and list(weights[1].x) == ["fp16", "int4"]
    assert weights[1].y[0] == rows[2]["weight_gb"] and fig.layout.barmode == "stack"


def test_cli_memory_reproduces_the_rules_of_thumb(capsys):
    import json

    from qcore.cli import main

    assert main(["memory", "--params", "1e9", "--format", "fp32,fp16,int8,int4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["weight_gb"] for r in rows] == [4.0, 2.0, 1.0, 0.5]
    assert main(["memory", "--model", "70B", "--format", "int4"]) == 0
    assert "Llama-2-70B" in capsys.readouterr().out
    assert main(["memory", "--format", "int9"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

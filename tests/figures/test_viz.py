"""qcore.figures.viz: each figure carries exactly the numbers it is given (counts, ranges, levels, sizes)."""

import numpy as np
import pytest
import torch

from qcore.analysis import explain
from qcore.figures import viz
from qcore.numerics.formats import FORMATS
from qcore.numerics.spec import TensorSpec


def shapes_named(fig, name):
    return [s for s in fig.layout.shapes if s.name == name]


def trace(fig, name):
    (t,) = [t for t in fig.data if t.name == name]
    return t


def test_human_bytes():
    assert viz.human_bytes(0) == "0 B" and viz.human_bytes(1023) == "1023 B"
    assert viz.human_bytes(1536) == "1.50 KiB"
    assert viz.human_bytes(5 * 2**20) == "5.00 MiB" and viz.human_bytes(3 * 2**40) == "3072.00 GiB"


def test_distribution_histogram_ranges_and_levels():
    x = explain.sample_distribution("normal with outliers", n=5_000)
    spec = TensorSpec(format="int4", symmetric=True, range="minmax")
    counts, edges = explain.histogram(x, 80)
    ranges = explain.method_ranges(x, spec)
    g = explain.grid(x, spec)
    fig = viz.distribution(counts, edges, ranges, g["levels"], title="t")
    outline = trace(fig, "values")  # bin i: the segment x[2i]..x[2i+1] at its count, one path for all bins
    assert outline.type == "scatter" and outline.fill == "tozeroy" and len(outline.x) == 2 * 80
    assert np.array_equal(outline.y[::2], outline.y[1::2]) and outline.y[::2].sum() == x.numel() == 5_000
    assert np.allclose(outline.x[::2], edges[:-1].numpy()) and np.allclose(outline.x[1::2], edges[1:].numpy())
    assert np.allclose(outline.y[::2], np.histogram(x.numpy(), 80)[0])  # numpy's own histogram of the same values
    for method, (lo, hi) in ranges.items():
        lines = shapes_named(fig, method)
        assert sorted(s.x0 for s in lines) == pytest.approx(sorted([lo, hi]))
        assert all(s.x0 == s.x1 for s in lines)
        assert sum(bool(s.showlegend) for s in lines) == 1
    levels = trace(fig, "representable values")  # a tick per value (up to y 1 and back), all one path
    assert np.allclose(levels.x[1::3], ((FORMATS["int4"].values()) * g["scale"]).numpy())
    assert np.array_equal(levels.x[::3], levels.x[1::3]) and np.array_equal(levels.x[2::3], levels.x[1::3])
    assert list(levels.y) == [0, 1, 0] * 16 and not np.isnan(levels.x).any()  # no gap: a gap starts a new path
    assert fig.layout.yaxis.type == "linear"
    assert viz.distribution(counts, edges, log_y=True).layout.yaxis.type == "log"


def test_distribution_thins_out_very_many_levels():
    levels = torch.linspace(-1, 1, 3000)
    fig = viz.distribution(torch.ones(10), torch.linspace(-1, 1, 11), levels=levels)
    (strip,) = [t for t in fig.data if t.name.startswith("representable values")]
    assert "every 3th of 3,000" in strip.name and len(strip.x) == 3 * 1000
    assert np.allclose(strip.x[1::3], levels[::3].numpy()) and len(strip.x) // 3 <= viz.MAX_DRAWN_LEVELS


def test_bit_layout_bars_span_the_bits():
    layouts = {"fp32": explain.bit_layout(FORMATS["fp32"]), "fp8_e4m3": explain.bit_layout(FORMATS["fp8_e4m3"])}
    fig = viz.bit_layout(layouts)
    for name, total in (("fp32", 32), ("fp8_e4m3", 8)):
        bars = [t for t in fig.data if t.y[0] == name]
        assert [t.name for t in bars] == ["sign", "exponent", "mantissa"]
        assert bars[-1].base + bars[-1].x[0] == total
        assert [t.x[0] for t in bars] == [b for _, b in layouts[name]]
    assert sum(bool(t.showlegend) for t in fig.data) == 3  # one legend entry per field


def test_sqnr_vs_bits_plots_the_sweep():
    rows = explain.bitwidth_sweep(explain.sample_distribution("laplace", n=4_000), bits=(2, 4, 8))
    fig = viz.sqnr_vs_bits(rows)
    sqnr = [t for t in fig.data if t.xaxis == "x"]
    mse = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in sqnr] == ["minmax", "mse"]
    for t, m in zip(sqnr, mse):
        rs = [r for r in rows if r["range"] == t.name]
        assert list(t.x) == [2, 4, 8] and list(t.y) == pytest.approx([r["sqnr_db"] for r in rs])
        assert list(m.y) == pytest.approx([r["mse"] for r in rs])
    assert fig.layout.yaxis2.type == "log"


def test_clipping_tradeoff_curves_and_method_markers():
    r = explain.clipping_tradeoff(explain.sample_distribution("normal", n=3_000), TensorSpec(format="int3"), points=20)
    fig = viz.clipping_tradeoff(r)
    for key in ("rounding", "clipping", "total"):
        t = trace(fig, f"{key} error")
        assert list(t.x) == r["threshold"] and list(t.y) == r[key]
    for method, m in r["methods"].items():
        t = trace(fig, method)
        assert list(t.x) == [m["threshold"]] and list(t.y) == [m["total"]]


def test_error_histogram_marks_half_a_step():
    counts, edges = explain.histogram(torch.linspace(-0.05, 0.05, 101), 11)
    fig = viz.error_histogram(counts, edges, step=0.1)
    assert trace(fig, "values").y[::2].sum() == 101
    assert sorted(s.x0 for s in shapes_named(fig, "± step / 2")) == pytest.approx([-0.05, 0.05])
    assert not viz.error_histogram(counts, edges).layout.shapes


def test_channel_ranges_band_spans_each_channel_min_max():
    w = torch.tensor([[0.1, -0.2], [3.0, -1.0], [0.5, 0.4]])  # max |w| 0.2, 3.0, 0.5: channels in the order 1, 2, 0
    c = explain.channel_ranges(w)
    fig = viz.channel_ranges(c)
    low, band = trace(fig, "channel min"), trace(fig, "channel range")
    assert band.fill == "tonexty" and list(fig.data).index(low) < list(fig.data).index(band)  # filled down to the min
    assert list(low.x) == list(band.x) == [-0.5, 0.5, 0.5, 1.5, 1.5, 2.5]  # channel r of the order spans r +- 0.5
    assert list(low.y) == pytest.approx([-1.0, -1.0, 0.4, 0.4, -0.2, -0.2])
    assert list(band.y) == pytest.approx([3.0, 3.0, 0.5, 0.5, 0.1, 0.1])
    assert np.allclose(band.customdata[::2], [[1, -1.0, 3.0], [2, 0.4, 0.5], [0, -0.2, 0.1]])  # channel, min, max
    assert sorted(s.y0 for s in shapes_named(fig, "per-tensor range")) == [-1.0, 3.0]
    assert sorted(s.y0 for s in shapes_named(viz.channel_ranges(c, (-4.0, 4.0)), "per-tensor range")) == [-4.0, 4.0]


def test_layer_sqnr_marks_the_worst_layer():
    rows = [{"name": "a", "sqnr_db": 20.0}, {"name": "b", "sqnr_db": 8.5}, {"name": "c", "sqnr_db": 30.0}]
    bars = viz.layer_sqnr(rows).data[0]
    assert list(bars.x) == ["a", "b", "c"] and list(bars.y) == [20.0, 8.5, 30.0]
    assert [c == viz.WORST_COLOR for c in bars.marker.color] == [False, True, False]


def test_preset_sizes_bars_in_the_right_unit():
    rows = [{"preset": "fp32", "size_bytes": 3 * 2**20, "fraction_of_fp32": 1.0},
            {"preset": "int8", "size_bytes": 3 * 2**18, "fraction_of_fp32": 0.25}]
    fig = viz.preset_sizes(rows)
    bars = fig.data[0]
    assert list(bars.x) == [3.0, 0.75] and list(bars.customdata) == [3 * 2**20, 3 * 2**18]
    assert list(bars.y) == ["fp32", "int8"] and bars.orientation == "h"
    assert fig.layout.xaxis.title.text == "size (MiB)"
    assert list(bars.text) == ["3.00 MiB (100%)", "768.00 KiB (25%)"]
    small = viz.preset_sizes([{"preset": "fp32", "size_bytes": 4096, "fraction_of_fp32": 1.0}])
    assert list(small.data[0].x) == [4.0] and small.layout.xaxis.title.text == "size (KiB)"


def test_outlier_channels_and_static_vs_dynamic():
    result = {"channel": torch.tensor([2, 0, 1]), "absmax": torch.tensor([9.0, 1.0, 0.5]), "median": 1.0, "ratio": 9.0}
    fig = viz.outlier_channels(result)
    assert list(fig.data[0].y) == [9.0, 1.0, 0.5] and list(fig.data[0].customdata) == [2, 0, 1]
    assert shapes_named(fig, "median channel")[0].y0 == 1.0 and "9.0×" in fig.layout.title.text

    fig = viz.static_vs_dynamic([(-1.0, 2.0), (-0.5, 1.0)], {"minmax": (-1.0, 2.0), "percentile": (-0.8, 1.5)})
    bars = fig.data[0]
    assert list(bars.base) == [-1.0, -0.5] and list(bars.base + bars.y) == [2.0, 1.0] and list(bars.x) == [1, 2]
    assert sorted(s.y0 for s in shapes_named(fig, "static: percentile")) == [-0.8, 1.5]


def test_the_qat_curve_labels_its_loss_axis_loss_not_the_metric():
    from qcore.figures.qat import training_curve

    fig = training_curve([{"epoch": 0, "metric": 0.9, "train_loss": None, "calibration_loss": 0.3},
                          {"epoch": 1, "metric": 0.95, "train_loss": 0.2, "calibration_loss": 0.25}], "accuracy", 0.9)
    assert fig.layout.yaxis.title.text == "accuracy" and fig.layout.yaxis2.title.text == "loss"
    assert [t.yaxis or "y" for t in fig.data] == ["y", "y2", "y2"]  # the losses are drawn against the loss axis

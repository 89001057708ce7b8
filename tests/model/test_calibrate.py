"""Calibration statistics equal what the inputs really were, over all batches."""

import pytest
import torch
from torch import nn

from qcore import QcoreError, TensorSpec
from qcore.model.calibrate import EMA_CONSTANT, HIST_BINS, calibrate


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    batches = [(torch.randn(8, 6) * (i + 1),) for i in range(3)]
    stats = calibrate(model, {"0": model[0], "2": model[2]}, batches)
    return model, batches, stats


def test_running_minmax_histogram_and_channel_absmax_are_exact():
    model, batches, stats = _setup()
    xs = torch.cat([b[0] for b in batches])
    s = stats["0"]
    assert s.min == pytest.approx(float(xs.min())) and s.max == pytest.approx(float(xs.max()))
    assert s.numel == xs.numel() and float(s.hist.sum()) == xs.numel() and len(s.hist) == HIST_BINS
    torch.testing.assert_close(s.channel_absmax, xs.abs().amax(0))
    assert s.batch_ranges == [pytest.approx((float(b[0].min()), float(b[0].max()))) for b in batches]
    # second layer sees ReLU outputs: min >= 0
    assert stats["2"].min >= 0.0


def test_moving_average_follows_torch_ao_update_rule():
    _, batches, stats = _setup()
    lo = float(batches[0][0].min())
    for b in batches[1:]:
        lo = lo + EMA_CONSTANT * (float(b[0].min()) - lo)
    assert stats["0"].ema_min == pytest.approx(lo)


def test_static_ranges_per_method_are_ordered_and_inside_minmax():
    _, _, stats = _setup()
    s = stats["0"]
    mm = s.static_range(TensorSpec().fmt, TensorSpec(symmetric=False))
    assert mm == (pytest.approx(s.min), pytest.approx(s.max))
    for method in ("percentile", "mse", "entropy"):
        spec = TensorSpec(range=method, percentile=99.0, symmetric=True)
        lo, hi = s.static_range(spec.fmt, spec)
        assert lo == -hi and 0 < hi <= max(abs(s.min), abs(s.max)) + 1e-6


def test_no_batches_and_nan_inputs_are_clear_errors():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(QcoreError, match="no calibration data"):
        calibrate(model, {"0": model[0]}, [])
    with pytest.raises(QcoreError, match="contains NaN/Inf"):
        calibrate(model, {"0": model[0]}, [(torch.tensor([[float("nan"), 0.0]]),)])


def test_a_copy_taken_during_calibration_does_not_feed_the_statistics():
    """Another session copying the (shared) model while it is being calibrated -- here from the
    progress callback, between batches -- and running its copy on other data changes nothing: the
    hooks are on calibrate's own copy, and the caller's model is left as it was (no hooks, its mode)."""
    import copy

    model, batches, alone = _setup()
    model.train()

    def other_session(fraction):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin(torch.full((4, 6), 1000.0))

    stats = calibrate(model, {"0": model[0], "2": model[2]}, batches, progress=other_session)
    assert stats["0"].max == alone["0"].max < 1000  # the old code (hooks on the caller's model) gave 1000
    assert stats["0"].numel == alone["0"].numel and torch.equal(stats["0"].hist, alone["0"].hist)
    assert model.training and all(not m._forward_pre_hooks for m in model.modules())


def test_run_with_hooks_runs_a_private_copy_and_leaves_the_model_alone():
    """The hooks see what the layers see (checked against the layers applied by hand) and the progress after each
    batch; the caller's model keeps no hook, its mode and its weights."""
    from qcore.model.hooks import run_with_hooks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(4, 6),), (torch.randn(2, 6),)]
    seen_in, seen_out, fractions = [], [], []

    def pre(module, args):
        seen_in.append(args[0].clone())
        module.weight.data.zero_()  # changes the copy only

    run_with_hooks(model, batches, pre={"2": pre}, post={"0": lambda m, a, out: seen_out.append(out.clone())},
                   progress=fractions.append)
    with torch.no_grad():
        for (x,), inp, out in zip(batches, seen_in, seen_out):
            assert torch.equal(out, x @ before["0.weight"].T + before["0.bias"])
            assert torch.allclose(inp, torch.relu(out))
    assert fractions == [0.5, 1.0] and model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

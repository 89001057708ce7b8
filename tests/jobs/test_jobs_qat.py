"""QAT as a background job: checked at submission, run in a worker, its fine-tuned weights carried back whole.

The oracle is ``qcore.training.finetune`` called directly with the same settings (a run is deterministic on the
CPU for a given thread count): the job's metrics, history and every fine-tuned tensor must equal it.
"""

import pytest
import torch

from job_kinds import wait
from qcore.errors import QcoreError
from qcore.jobs.job import spec_for
from qcore.jobs.local import InProcessJobs
from qcore.recipe import preset
from qcore.training import QATConfig, finetune, transport

pytestmark = pytest.mark.usefixtures("one_torch_thread")
INT3 = {"weights": {"format": "int3", "granularity": "per_channel", "symmetric": True}}


def _recipe(w):
    from qcore.recipe.links import build_recipe
    return build_recipe(w, "int8-weight-only", {n: INT3 for n in ("fc1", "fc2", "fc3")})


def test_a_qat_job_returns_exactly_what_finetune_returns(digits_mlp):
    recipe = _recipe(digits_mlp)
    inputs = {"recipe": recipe.to_dict(), "epochs": 2, "lr": 1e-3, "learn_scales": False}
    jobs = InProcessJobs()
    key = jobs.submit(spec_for("qat", "zoo:digits-mlp", digits_mlp, inputs), "A", digits_mlp)
    status = wait(jobs, key, lambda s: s.finished, timeout_s=120)
    assert status.state == "done", status.message
    got = transport.from_json(digits_mlp, status.result)

    direct = finetune(digits_mlp, recipe, QATConfig(epochs=2, lr=1e-3))
    assert got.qat_metrics == direct.qat_metrics and got.ptq_metrics == direct.ptq_metrics
    assert [h.metric for h in got.history] == [h.metric for h in direct.history] and got.best_epoch == direct.best_epoch
    mine, theirs = got.workload.model.state_dict(), direct.workload.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the rebuilt workload reproduces the reported QAT metric (the page's Trade-offs point and exports read it)
    assert got.workload.evaluate(recipe).quantized.metrics["accuracy"] == direct.qat_metrics["accuracy"]


def test_weights_from_another_model_are_refused_when_rebuilt(digits_mlp, digits_cnn):
    recipe = _recipe(digits_mlp)
    data = transport.to_json(finetune(digits_mlp, recipe, QATConfig(epochs=1)), digits_mlp)
    with pytest.raises(QcoreError, match="fine-tuned from 'digits-mlp'"):
        transport.from_json(digits_cnn, data)


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 0}, "epochs must be a whole number from 1 to 1000"),
    ({"epochs": 2.5}, "epochs must be a whole number"),
    ({"lr": 2.0}, "learning rate must be a number in"),
    ({"lr": -1e-3}, "learning rate must be a number in"),
    ({"loss": "hinge"}, "unknown QAT loss 'hinge'"),
    ({"learn_scales": "yes"}, "learn_scales true or false"),
])
def test_bad_settings_fail_at_submission_in_one_line(digits_mlp, bad, message):
    inputs = {"recipe": _recipe(digits_mlp).to_dict(), "epochs": 1, "lr": 1e-3, **bad}
    with pytest.raises(QcoreError, match=message) as e:
        spec_for("qat", "zoo:digits-mlp", digits_mlp, inputs)
    assert "\n" not in str(e.value)


def test_a_nan_learning_rate_is_refused_before_json_too():
    with pytest.raises(QcoreError, match="learning rate must be a number in"):
        transport.config_from({"lr": float("nan")})


def test_a_recipe_qat_cannot_train_fails_at_submission(digits_mlp):
    with pytest.raises(QcoreError, match="keeps every layer in float"):
        spec_for("qat", "zoo:digits-mlp", digits_mlp, {"recipe": preset("fp32", digits_mlp.layer_shapes).to_dict()})
    lsq_on_affine = preset("int8-static", digits_mlp.layer_shapes).to_dict()
    with pytest.raises(QcoreError, match="learned scales"):
        spec_for("qat", "zoo:digits-mlp", digits_mlp, {"recipe": {**lsq_on_affine, "weights": {
            **lsq_on_affine.get("weights", {}), "format": "int8", "symmetric": False}}, "learn_scales": True})


def test_a_cancelled_qat_job_keeps_nothing(digits_mlp):
    inputs = {"recipe": _recipe(digits_mlp).to_dict(), "epochs": 200, "lr": 1e-3}
    jobs = InProcessJobs()
    key = jobs.submit(spec_for("qat", "zoo:digits-mlp", digits_mlp, inputs), "A", digits_mlp)
    wait(jobs, key, lambda s: s.state == "running" and s.fraction > 0, timeout_s=60)
    jobs.cancel(key, "A")
    status = wait(jobs, key, lambda s: s.finished, timeout_s=60)
    assert status.state == "cancelled" and status.result is None

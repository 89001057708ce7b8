"""The job kinds beyond the sweep and the search: QAT, a remedy trial (a PTQ algorithm on one layer) and a latency
measurement -- each checked at submission (one line), run by the in-process backend, its result equal to the engine
function called directly (the oracle): ``finetune`` (deterministic on the CPU for a given thread count: metrics,
history and every fine-tuned tensor), ``try_remedy``, and ``bench`` with the threads the job was given.
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


# ---- a PTQ algorithm on one layer ("Try a remedy") ------------------------------------------------------
def test_a_remedy_job_returns_what_try_remedy_returns(digits_cnn):
    from qcore.analysis.remedies import try_remedy

    recipe = preset("int8-static", digits_cnn.layer_shapes)
    inputs = {"recipe": recipe.to_dict(), "layer": "features.3", "name": "gptq"}
    jobs = InProcessJobs()
    key = jobs.submit(spec_for("remedy", "zoo:digits-cnn", digits_cnn, inputs), "A", digits_cnn)
    status = wait(jobs, key, lambda s: s.finished, timeout_s=120)
    assert status.state == "done", status.message
    direct = try_remedy(digits_cnn, recipe, "features.3", "gptq")
    assert status.result == {**direct, "recipe": direct["recipe"].to_dict()}
    assert status.result["recipe"]["layers"]["features.3"]["weights"]["rounding"] == "gptq"


@pytest.mark.parametrize("change, message", [
    ({"name": "magic"}, "unknown remedy 'magic'"),
    ({"layer": "features.99"}, "has no quantizable layer 'features.99'"),
    ({"name": "cle", "layer": "features.0"}, "features.0"),  # CLE on the conv reading the image: no pair
])
def test_a_remedy_that_cannot_run_fails_at_submission(digits_cnn, change, message):
    inputs = {"recipe": preset("int8-static", digits_cnn.layer_shapes).to_dict(), "layer": "features.3", "name": "gptq",
              **change}
    with pytest.raises(QcoreError, match=message) as e:
        spec_for("remedy", "zoo:digits-cnn", digits_cnn, inputs)
    assert "\n" not in str(e.value)


# ---- latency measurement --------------------------------------------------------------------------------
def test_a_bench_job_measures_with_the_threads_it_was_given(digits_mlp):
    inputs = {"recipe": preset("int8-dynamic", digits_mlp.layer_shapes).to_dict(), "runtime": "onnxruntime",
              "precision": "default", "batch_size": 1}
    jobs = InProcessJobs()
    key = jobs.submit(spec_for("bench", "zoo:digits-mlp", digits_mlp, inputs), "A", digits_mlp)
    status = wait(jobs, key, lambda s: s.finished, timeout_s=120)
    assert status.state == "done", status.message
    r = status.result
    assert r["threads"] == torch.get_num_threads() == 1 and r["batch_size"] == 1 and r["recipe"] == "int8-dynamic"
    assert r["quantized"]["latency_ms"]["median"] > 0 and r["cpu"]["features"] is not None


@pytest.mark.parametrize("change, message", [
    ({"runtime": "tensorrt"}, "cannot time with runtime 'tensorrt'"),
    ({"runtime": "onnxruntime", "precision": "bf16"}, "at precision 'bf16'"),
    ({"batch_size": 0}, "batch size must be a whole number from 1 to 256"),
])
def test_a_bench_that_cannot_run_fails_at_submission(digits_mlp, change, message):
    inputs = {"recipe": preset("int8-dynamic", digits_mlp.layer_shapes).to_dict(), **change}
    with pytest.raises(QcoreError, match=message):
        spec_for("bench", "zoo:digits-mlp", digits_mlp, inputs)


# ---- the Activations / Weights pages' transform previews ------------------------------------------------
def test_a_cle_preview_job_returns_what_cle_preview_returns(digits_cnn):
    from qcore.analysis.transform_remedies import cle_preview

    recipe = preset("int8-static", digits_cnn.layer_shapes)
    inputs = {"recipe": recipe.to_dict(), "layer": "features.3", "name": "cle"}
    jobs = InProcessJobs()
    key = jobs.submit(spec_for("preview", "zoo:digits-cnn", digits_cnn, inputs), "A", digits_cnn)
    status = wait(jobs, key, lambda s: s.finished, timeout_s=120)
    assert status.state == "done", status.message
    direct = cle_preview(digits_cnn, recipe, "features.3")
    assert status.result == {**direct, "recipe": direct["recipe"].to_dict()}
    assert status.result["recipe"]["transforms"] == [{"cle": {"layers": ["features.3"]}}]


@pytest.mark.parametrize("change, message", [
    ({"name": "awq"}, "unknown transform preview 'awq'"),
    ({"layer": "features.0"}, "cle cannot apply to layer 'features.0'"),
])
def test_a_preview_that_cannot_run_fails_at_submission(digits_cnn, change, message):
    inputs = {"recipe": preset("int8-static", digits_cnn.layer_shapes).to_dict(), "layer": "features.3", "name": "cle",
              **change}
    with pytest.raises(QcoreError, match=message):
        spec_for("preview", "zoo:digits-cnn", digits_cnn, inputs)

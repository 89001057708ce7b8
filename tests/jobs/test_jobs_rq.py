"""The RQ backend against a real redis-server and real worker processes on loopback.

The module starts ``redis-server`` on a free port and two workers (``python -m qcore.jobs.worker`` importing the
test kind ``count`` first); skipped only when the redis-server binary is absent (``.ci/run`` installs it).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job_kinds import runs, wait
from qcore.errors import QcoreError
from qcore.jobs.backend import connect
from qcore.jobs.job import Limits, spec_for
from qcore.jobs import rq_backend
from qcore.jobs.rq_backend import RedisJobs

LEASE_S = 5.0
from test_jobs_local import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server; .ci/run does)")


def start_worker(url: str) -> subprocess.Popen:
    code = "import job_kinds; from qcore.jobs.worker import main; main()"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'jobs'}"}
    return subprocess.Popen([sys.executable, "-c", code, "--redis", url, "--threads", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                             stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    workers = [start_worker(url), start_worker(url)]
    jobs = None
    for _ in range(100):
        jobs, note = connect(url, Limits(per_session=2, total=3))
        if note is None:
            jobs.lease_s = LEASE_S  # a killed worker is noticed after 5 s (the default 15 s tolerates starved workers)
            break
        time.sleep(0.05)
    assert isinstance(jobs, RedisJobs)
    end = time.monotonic() + 30
    while "on 2 worker" not in jobs.describe() and time.monotonic() < end:
        time.sleep(0.1)
    yield jobs, url, workers
    for p in workers + [redis]:
        p.kill()
        p.wait()


def count(tmp_path, steps: int, step_s: float = 0.01, name: str = "log"):
    return spec_for("count", None, None, {"steps": steps, "step_s": step_s, "log": str(tmp_path / name)})


def test_coalescing_progress_and_result_through_redis(server, tmp_path, monkeypatch):
    jobs, url, _ = server
    # the default lease: a worker starved for over 4 s on a loaded machine lost the module's 5 s lease once, and
    # the job was re-queued and ran twice -- death detection is the business of the tests below, not this one
    monkeypatch.setattr(jobs, "lease_s", rq_backend.LEASE_S)
    other_replica, _ = connect(url)  # a second app replica: its own connection, the same Redis
    key = jobs.submit(count(tmp_path, 40, 0.05), "A")
    assert other_replica.submit(count(tmp_path, 40, 0.05), "B") == key
    mid = wait(other_replica, key, lambda s: 0 < s.fraction < 1)
    assert mid.state == "running" and mid.message.startswith("step ")
    done = wait(jobs, key, lambda s: s.finished)
    assert done.state == "done" and done.result == {"sum": 40 * 39 // 2}
    assert other_replica.status(key).result == done.result and runs(tmp_path / "log") == 1


def test_a_qat_job_on_a_worker_carries_its_fine_tuned_weights_back(server, digits_mlp, one_torch_thread):
    """Through Redis and a worker process (1 torch thread, as this test): the result rebuilds into the same model
    ``finetune`` gives here."""
    import torch

    from qcore.recipe import preset
    from qcore.training import QATConfig, finetune, transport

    jobs, _, _ = server
    recipe = preset("int4-weight-only", digits_mlp.layer_shapes)
    key = jobs.submit(spec_for("qat", "zoo:digits-mlp", digits_mlp, {"recipe": recipe.to_dict(), "epochs": 1}), "Q")
    status = wait(jobs, key, lambda s: s.finished, timeout_s=120)
    assert status.state == "done", status.message
    got, direct = transport.from_json(digits_mlp, status.result), finetune(digits_mlp, recipe, QATConfig(epochs=1))
    assert got.qat_metrics == direct.qat_metrics
    mine, theirs = got.workload.model.state_dict(), direct.workload.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_cancel_caps_and_time_limit(server, tmp_path):
    jobs, url, _ = server
    key = jobs.submit(count(tmp_path, 1000, 0.01, "1"), "A")
    wait(jobs, key, lambda s: s.state == "running")
    with pytest.raises(QcoreError, match="only the session that started"):
        jobs.cancel(key, "B")
    jobs.submit(count(tmp_path, 1000, 0.01, "2"), "A")
    with pytest.raises(QcoreError, match="at most 2 per session"):
        jobs.submit(count(tmp_path, 1000, 0.01, "3"), "A")
    third = jobs.submit(count(tmp_path, 1000, 0.01, "4"), "B")  # queued: both workers are busy
    with pytest.raises(QcoreError, match=r"3 jobs queued or running \(at most 3\)"):
        jobs.submit(count(tmp_path, 1000, 0.01, "5"), "C")
    jobs.cancel(third, "B")
    assert jobs.status(third).state == "cancelled"
    jobs.cancel(key, "A")
    s = wait(jobs, key, lambda s: s.finished, timeout_s=5)
    assert s.state == "cancelled" and s.result is None
    jobs.cancel(jobs.submit(count(tmp_path, 1000, 0.01, "2"), "A"), "A")  # joins the running one, cancels it

    limited, _ = connect(url, Limits(time_limit_s=0.5))
    key = limited.submit(count(tmp_path, 1000, 0.01, "6"), "D")
    s = wait(limited, key, lambda s: s.finished, timeout_s=15)
    assert s.state == "failed" and "time limit of 0.5 s" in s.message and s.result is None


def test_a_worker_killed_mid_job_leaves_no_result_and_the_job_is_requeued(server, tmp_path, monkeypatch):
    jobs, url, workers = server
    wait_idle = time.monotonic() + 10
    while jobs.r.scard("qcore:active") and time.monotonic() < wait_idle:  # the cancelled jobs of the last test end
        time.sleep(0.05)
    key = jobs.submit(count(tmp_path, 100, 0.02), "A")
    running = wait(jobs, key, lambda s: s.state == "running" and s.fraction > 0.05)
    pid = int(jobs.r.hget(f"qcore:job:{key}", "pid"))
    os.kill(pid, signal.SIGKILL)
    assert running.attempt == 1 and jobs.r.get(f"qcore:result:{key}") is None
    requeued = wait(jobs, key, lambda s: s.attempt == 2, timeout_s=LEASE_S + 5)
    assert "re-queued (attempt 2 of 2)" in requeued.message or requeued.state == "running"
    done = wait(jobs, key, lambda s: s.finished, timeout_s=20)
    assert done.state == "done", done.message  # a survivor starved of CPU past the lease would fail it here
    assert done.result == {"sum": 100 * 99 // 2} and runs(tmp_path / "log") == 2
    survivor = int(jobs.r.hget(f"qcore:job:{key}", "pid"))
    assert survivor != pid and survivor in {w.pid for w in workers}

    monkeypatch.setattr(rq_backend, "MAX_ATTEMPTS", 1)  # read where status() runs: this app process
    key = jobs.submit(count(tmp_path, 150, 0.02, "again"), "A")  # killed on its last attempt: failed, in one line
    wait(jobs, key, lambda s: s.state == "running" and s.fraction > 0.05)
    os.kill(int(jobs.r.hget(f"qcore:job:{key}", "pid")), signal.SIGKILL)
    failed = wait(jobs, key, lambda s: s.finished, timeout_s=LEASE_S + 5)
    assert failed.state == "failed" and "stopped (killed or out of memory) on attempt 1 of 1" in failed.message
    assert "\n" not in failed.message and jobs.r.get(f"qcore:result:{key}") is None


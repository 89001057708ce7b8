"""The in-process backend: coalescing, progress, cancel, time limit, caps, bad input at submission, fallback."""

import socket
import time

import pytest

from job_kinds import runs, wait
from qcore.errors import QcoreError
from qcore.jobs.backend import connect
from qcore.jobs.job import Limits, spec_for
from qcore.jobs.local import InProcessJobs


def count(tmp_path, steps: int, step_s: float = 0.01, name: str = "log"):
    return spec_for("count", None, None, {"steps": steps, "step_s": step_s, "log": str(tmp_path / name)})


def test_identical_requests_from_two_sessions_run_once_and_both_see_the_result(tmp_path):
    jobs = InProcessJobs(Limits(workers=2))
    spec = count(tmp_path, 20)
    a, b = jobs.submit(spec, "A"), jobs.submit(count(tmp_path, 20), "B")  # a second, equal spec
    assert a == b
    done = wait(jobs, a, lambda s: s.finished)
    assert done.state == "done" and done.result == {"sum": 20 * 19 // 2}
    assert jobs.submit(spec, "C") == a  # done: joins the result, no new run
    assert runs(tmp_path / "log") == 1 and jobs.runs == 1
    other = jobs.submit(count(tmp_path, 21), "B")
    assert other != a and wait(jobs, other, lambda s: s.finished).result == {"sum": 21 * 20 // 2}
    assert runs(tmp_path / "log") == 2


def test_progress_reports_a_fraction_and_a_line(tmp_path):
    jobs = InProcessJobs()
    key = jobs.submit(count(tmp_path, 40, 0.02), "A")
    mid = wait(jobs, key, lambda s: 0 < s.fraction < 1)
    k = int(mid.message.split()[1])
    assert mid.message == f"step {k} of 40" and mid.state == "running"
    assert wait(jobs, key, lambda s: s.finished).fraction == 1.0


def test_only_the_starting_session_cancels_and_nothing_is_kept(tmp_path):
    jobs = InProcessJobs()
    key = jobs.submit(count(tmp_path, 500, 0.01), "A")
    wait(jobs, key, lambda s: s.fraction > 0)
    with pytest.raises(QcoreError, match="only the session that started"):
        jobs.cancel(key, "B")
    jobs.cancel(key, "A")
    s = wait(jobs, key, lambda s: s.finished, timeout_s=5)
    assert s.state == "cancelled" and s.result is None and s.fraction < 0.5
    again = jobs.submit(count(tmp_path, 500, 0.01), "B")  # a cancelled job runs again when asked again
    assert again == key and jobs.status(key).state in ("queued", "running")
    jobs.cancel(key, "B")


def test_time_limit_stops_the_job_with_one_line(tmp_path):
    jobs = InProcessJobs(Limits(time_limit_s=0.3))
    key = jobs.submit(count(tmp_path, 1000, 0.01), "A")
    start = time.monotonic()
    s = wait(jobs, key, lambda s: s.finished, timeout_s=5)
    assert s.state == "failed" and "time limit of 0.3 s" in s.message and "\n" not in s.message
    assert s.result is None and time.monotonic() - start < 2


def test_caps_per_session_and_in_total(tmp_path):
    jobs = InProcessJobs(Limits(workers=1, per_session=1, total=2))
    first = jobs.submit(count(tmp_path, 300, 0.01, "1"), "A")
    with pytest.raises(QcoreError, match="at most 1 per session") as e:
        jobs.submit(count(tmp_path, 300, 0.01, "2"), "A")
    assert "\n" not in str(e.value)
    second = jobs.submit(count(tmp_path, 300, 0.01, "2"), "B")  # queued behind the first (1 worker)
    assert jobs.status(second).state == "queued"
    with pytest.raises(QcoreError, match=r"2 jobs queued or running \(at most 2\)"):
        jobs.submit(count(tmp_path, 300, 0.01, "3"), "C")
    assert jobs.submit(count(tmp_path, 300, 0.01, "1"), "C") == first  # joining a running job is not a new one
    jobs.cancel(second, "B")
    assert jobs.status(second).state == "cancelled"  # cancelled while queued: it never runs
    jobs.cancel(first, "A")
    wait(jobs, first, lambda s: s.finished)
    assert runs(tmp_path / "2") == 0


def test_invalid_inputs_fail_at_submission(tmp_path, digits_mlp):
    with pytest.raises(QcoreError, match="steps must be"):
        spec_for("count", None, None, {"steps": 0, "log": "x"})
    with pytest.raises(QcoreError, match="unknown job kind"):
        spec_for("nope", None, None, {})
    with pytest.raises(QcoreError, match="unknown mode"):
        spec_for("sweep", "zoo:digits-mlp", digits_mlp, {"candidates": ["int8-static"], "mode": "sideways"})
    with pytest.raises(QcoreError, match="exactly one numeric goal"):
        spec_for("search", "zoo:digits-mlp", digits_mlp, {"candidates": ["int8-static"]})


def test_a_sweep_job_returns_what_the_engine_returns(digits_mlp, tmp_path, monkeypatch):
    from qcore.analysis import sensitivity, sweep_cache

    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path))
    jobs = InProcessJobs()
    inputs = {"candidates": ["int4-weight-only"], "mode": "weights", "view": "only"}
    key = jobs.submit(spec_for("sweep", "zoo:digits-mlp", digits_mlp, inputs), "A", digits_mlp)
    got = wait(jobs, key, lambda s: s.finished, timeout_s=60)
    assert got.state == "done", got.message
    sweep_cache.clear_memory_cache()
    direct = sensitivity.sweep(digits_mlp, ["int4-weight-only"], "weights", "only", cache_dir=tmp_path / "other")
    assert got.result["rows"] == direct.to_dict()["rows"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0", "redis://10.255.255.1:6379/0"])
def test_unreachable_redis_falls_back_in_one_line_or_refuses_in_bounded_time(url):
    url = url.format(port=free_port())  # nothing listens there / an address that answers nothing
    start = time.monotonic()
    jobs, note = connect(url, fallback="in-process")
    assert isinstance(jobs, InProcessJobs)
    assert note.startswith(f"Redis at {url} is unreachable") and note.endswith("in this app process instead.")
    assert "\n" not in note
    with pytest.raises(QcoreError, match="unset \\$QCORE_REDIS_URL"):
        connect(url, fallback="refuse")
    assert time.monotonic() - start < 3  # two connection attempts of at most 0.5 s each, with slack

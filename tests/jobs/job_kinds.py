"""A job kind for the job tests, registered on import (the RQ tests' workers import it too).

``count``: appends this process's pid to ``inputs["log"]`` when it starts (so a test counts real runs), then
takes ``steps`` steps of ``step_s`` seconds, reporting ``"step i of n"`` after each; returns
``{"sum": 0 + 1 + ... + (n - 1)}``, which a test checks against n (n - 1) / 2.
"""

import os
import time

from qcore.errors import QcoreError
from qcore.jobs.job import KINDS


def _check(workload, inputs: dict) -> None:
    if not isinstance(inputs.get("steps"), int) or inputs["steps"] < 1:
        raise QcoreError(f"steps must be a whole number of at least 1, not {inputs.get('steps')!r}")


def _run(workload, inputs: dict, progress, should_stop) -> dict:
    with open(inputs["log"], "a") as f:
        f.write(f"{os.getpid()}\n")
    total = 0
    for i in range(inputs["steps"]):
        time.sleep(inputs.get("step_s", 0.01))
        total += i
        progress((i + 1) / inputs["steps"], f"step {i + 1} of {inputs['steps']}")
    return {"sum": total}


KINDS["count"] = (_check, _run)


def runs(log) -> int:
    return len(open(log).read().split()) if os.path.exists(log) else 0


def wait(jobs, key: str, until, timeout_s: float = 20.0):
    """Poll ``jobs.status(key)`` until ``until(status)``; the status (fails the test after ``timeout_s``)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        s = jobs.status(key)
        if s is not None and until(s):
            return s
        time.sleep(0.02)
    raise AssertionError(f"job {key} did not get there in {timeout_s} s: {jobs.status(key)}")

"""The embedded backend: jobs run in a bounded thread pool inside this process (the default: no service needed).

Records and results live in this process's memory (one dict under a lock), shared by every session of the
app. A result is stored whole before the state turns ``done``, so a reader never sees a partial one. Cancel
and the time limit take effect at the job's next progress step (a Python thread cannot be killed); finished
records are evicted ``Limits.ttl_s`` seconds after they finished. torch threads: a job running alone keeps
torch's thread count; while several run, each gets one (``torch.set_num_threads`` is per process).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from qcore.errors import QcoreError
from qcore.jobs.job import ACTIVE, KINDS, JobSpec, Limits, Status, deadline_check, load_workload, reporter

log = logging.getLogger(__name__)


class InProcessJobs:
    name = "in-process"

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="qcore-job")
        self._lock = threading.Lock()
        self._jobs: dict[str, dict] = {}  # key -> record (state, fraction, message, owner, result, ...)
        self._running = 0
        self._threads = torch.get_num_threads()
        self.runs = 0  # jobs actually started (coalesced submissions do not count)

    def describe(self) -> str:
        return (f"in this app process, {self.limits.workers} at a time (torch uses {self._threads} thread(s) for a job "
                "running alone, 1 per job while several run)")

    def submit(self, spec: JobSpec, session: str, workload=None) -> str:
        """Queue ``spec`` for ``session`` (or join the identical job already queued, running or done); its key.
        Raises ``QcoreError`` when the session or the server has too many jobs queued."""
        key = spec.key
        with self._lock:
            self._evict()
            rec = self._jobs.get(key)
            if rec and (rec["state"] in ACTIVE or rec["state"] == "done"):
                return key
            active = [r for r in self._jobs.values() if r["state"] in ACTIVE]
            check_caps(self.limits, len(active), sum(r["owner"] == session for r in active))
            self._jobs[key] = {"kind": spec.kind, "state": "queued", "fraction": 0.0, "message": "waiting to start",
                               "owner": session, "result": None, "cancel": False, "finished_at": None}
        self._pool.submit(self._run, key, spec, {spec.workload["content_hash"]: workload} if workload else None)
        return key

    def status(self, key: str) -> Status | None:
        with self._lock:
            self._evict()
            rec = self._jobs.get(key)
            if rec is None:
                return None
            return Status(key, rec["kind"], rec["state"], rec["fraction"], rec["message"], rec["owner"],
                          copy.deepcopy(rec["result"]))  # a reader's changes stay its own

    def cancel(self, key: str, session: str) -> None:
        with self._lock:
            rec = self._jobs.get(key)
            if rec is None or rec["state"] not in ACTIVE:
                return
            if rec["owner"] != session:
                raise QcoreError("only the session that started this job can cancel it")
            rec["cancel"] = True
            if rec["state"] == "queued":
                self._finish(rec, "cancelled", "cancelled before it started")

    # ---- inside the pool ----------------------------------------------------------------------
    def _run(self, key: str, spec: JobSpec, local: dict | None) -> None:
        rec = self._jobs[key]
        with self._lock:
            if rec["state"] != "queued":
                return  # cancelled while queued
            rec.update(state="running", message="started")
            self._running += 1
            self.runs += 1
            torch.set_num_threads(1 if self._running > 1 else self._threads)
        started = time.monotonic()

        def stopped() -> str | None:
            return "cancelled" if rec["cancel"] else deadline_check(started, self.limits)

        def report(fraction: float, message: str) -> None:
            rec["fraction"], rec["message"] = fraction, message

        progress, should_stop = reporter(report, stopped)
        try:
            result = KINDS[spec.kind][1](load_workload(spec.workload, local), spec.inputs, progress, should_stop)
            with self._lock:
                rec["result"] = result  # whole, before the state says done
                self._finish(rec, "done", "done")
        except QcoreError as e:  # a cancel / time limit (raised at a progress step) or the user's input
            why = stopped()
            with self._lock:
                self._finish(rec, "cancelled" if why == "cancelled" else "failed", why or str(e))
        except BaseException as e:
            with self._lock:
                self._finish(rec, "failed", f"the job crashed ({type(e).__name__}: {e}); this is a bug, please report it")
            log.exception("job %s crashed", key)
            raise
        finally:
            with self._lock:
                self._running -= 1
                if self._running <= 1:
                    torch.set_num_threads(self._threads)

    def _finish(self, rec: dict, state: str, message: str) -> None:
        rec.update(state=state, message=message, finished_at=time.monotonic())
        if state == "done":
            rec["fraction"] = 1.0

    def _evict(self) -> None:
        now = time.monotonic()
        for key in [k for k, r in self._jobs.items() if r["finished_at"] and now - r["finished_at"] > self.limits.ttl_s]:
            del self._jobs[key]


def check_caps(limits: Limits, active: int, mine: int) -> None:
    """One-line ``QcoreError`` when ``active`` jobs fill the server or ``mine`` fill this session's share."""
    if mine >= limits.per_session:
        raise QcoreError(f"you already have {mine} job(s) queued or running (at most {limits.per_session} per session); "
                         "wait for one to finish or cancel it")
    if active >= limits.total:
        raise QcoreError(f"the server already has {active} jobs queued or running (at most {limits.total}); "
                         "try again in a minute")

"""Server mode: jobs queued with RQ on Redis; records, progress and results in the same Redis.

Keys (``qcore:`` prefix): ``job:<key>`` a hash (state, fraction, message, owner, kind, spec, attempt);
``result:<key>`` the result's JSON, written with the record's ``done`` in one MULTI/EXEC transaction, so
a reader sees either no result or the whole one; ``cancel:<key>`` a flag the job reads at its progress
steps; ``lease:<key>`` renewed every second by the process running the job and gone ``lease_s`` after
that process dies (long enough that a worker starved of CPU on a busy machine is not taken for dead);
``active`` and ``owner:<session>`` the sets the caps count; ``runs`` counts jobs a worker started. Finished records and
results expire after ``Limits.ttl_s``.

A worker that dies mid-job (SIGKILL, out of memory) stops renewing the lease; the next ``status`` call
from any replica sees the lease gone and re-queues the job once (``MAX_ATTEMPTS``), then reports it
failed in one line. Every Redis call has short socket timeouts (``backend.connect``), so nothing hangs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import redis
from rq import Queue, Worker, get_current_job

from qcore.errors import QcoreError
from qcore.jobs.job import ACTIVE, KINDS, JobSpec, Limits, Status, deadline_check, load_workload, reporter
from qcore.jobs.local import check_caps

QUEUE = "qcore"
LEASE_S = 15.0  # default life of a running job's lease without renewal, in seconds (renewed every second)
MAX_ATTEMPTS = 2  # runs of one job when its worker dies: once re-queued, then failed
PROGRESS_EVERY_S = 0.25  # progress written to Redis at most this often


def _k(*parts: str) -> str:
    return "qcore:" + ":".join(parts)


def _unreachable(e: Exception) -> QcoreError:
    return QcoreError(f"the job server (Redis) did not answer ({type(e).__name__}); reload the page in a minute")


class RedisJobs:
    name = "rq"

    def __init__(self, connection: redis.Redis, limits: Limits | None = None, lease_s: float = LEASE_S):
        self.r = connection
        self.limits = limits or Limits()
        self.lease_s = lease_s
        self.queue = Queue(QUEUE, connection=connection)

    def describe(self) -> str:
        try:
            n = Worker.count(queue=self.queue)
        except redis.RedisError as e:
            raise _unreachable(e) from None
        return f"on {n} worker process(es) pulling from Redis (torch threads pinned per worker)"

    def submit(self, spec: JobSpec, session: str, workload=None) -> str:
        if spec.workload and not (spec.workload.get("source") or "").startswith("zoo:"):
            raise QcoreError("uploaded models cannot be sent to the job workers; their jobs run in the app process")
        key = spec.key
        try:
            rec = self.r.hgetall(_k("job", key))
            state = rec.get(b"state", b"").decode()
            if state in ACTIVE or (state == "done" and self.r.exists(_k("result", key))):
                return key
            if not self.r.set(_k("submit", key), session, nx=True, ex=5):
                return key  # another replica is submitting the same job right now
            active = [k for k in self.r.smembers(_k("active"))
                      if (self.r.hget(_k("job", k.decode()), "state") or b"").decode() in ACTIVE]
            mine = [k for k in self.r.smembers(_k("owner", session)) if k in active]
            check_caps(self.limits, len(active), len(mine))
            self._enqueue(key, spec.to_json(), session, spec.kind, attempt=1)
        except redis.RedisError as e:
            raise _unreachable(e) from None
        return key

    def _enqueue(self, key: str, spec_json: str, session: str, kind: str, attempt: int, message: str = "waiting for a worker") -> None:
        p = self.r.pipeline()
        p.delete(_k("result", key), _k("cancel", key), _k("lease", key), _k("job", key))
        p.hset(_k("job", key), mapping={"state": "queued", "fraction": 0.0, "message": message, "owner": session,
                                        "kind": kind, "spec": spec_json, "attempt": attempt,
                                        "limit_s": self.limits.time_limit_s, "ttl_s": self.limits.ttl_s,
                                        "lease_s": self.lease_s})
        p.expire(_k("job", key), int(self.limits.ttl_s))
        p.sadd(_k("active"), key)
        p.sadd(_k("owner", session), key)
        p.expire(_k("owner", session), int(self.limits.ttl_s))
        p.execute()
        self.queue.enqueue("qcore.jobs.rq_backend.execute", key, job_id=f"{key}-{attempt}",
                           job_timeout=int(self.limits.time_limit_s) + 30, result_ttl=0, failure_ttl=int(self.limits.ttl_s))

    def status(self, key: str) -> Status | None:
        try:
            rec = {k.decode(): v.decode() for k, v in self.r.hgetall(_k("job", key)).items()}
            if not rec:
                return None
            if rec["state"] == "running" and not self.r.exists(_k("lease", key)):
                rec = self._worker_died(key, rec)
            result = None
            if rec["state"] == "done":
                text = self.r.get(_k("result", key))
                if text is None:
                    return None  # expired: a new submission runs it again
                result = json.loads(text)
            return Status(key, rec["kind"], rec["state"], float(rec["fraction"]), rec["message"], rec["owner"], result,
                          int(rec["attempt"]))
        except redis.RedisError as e:
            raise _unreachable(e) from None

    def _worker_died(self, key: str, rec: dict) -> dict:
        attempt = int(rec["attempt"])
        if not self.r.set(_k("requeue", key, str(attempt)), 1, nx=True, ex=int(self.limits.ttl_s)):
            time.sleep(0.05)  # another replica is handling it
        elif attempt < MAX_ATTEMPTS:
            self._enqueue(key, rec["spec"], rec["owner"], rec["kind"], attempt + 1,
                          message=f"the worker running it stopped; re-queued (attempt {attempt + 1} of {MAX_ATTEMPTS})")
        else:
            _finish(self.r, key, "failed", f"the worker running this job stopped (killed or out of memory) on attempt "
                                           f"{attempt} of {MAX_ATTEMPTS}; nothing was kept: try a smaller request or ask the host")
        return {k.decode(): v.decode() for k, v in self.r.hgetall(_k("job", key)).items()}

    def cancel(self, key: str, session: str) -> None:
        try:
            rec = self.r.hgetall(_k("job", key))
            if not rec or rec[b"state"].decode() not in ACTIVE:
                return
            if rec[b"owner"].decode() != session:
                raise QcoreError("only the session that started this job can cancel it")
            self.r.set(_k("cancel", key), 1, ex=int(self.limits.ttl_s))
            if rec[b"state"] == b"queued":
                _finish(self.r, key, "cancelled", "cancelled before it started")
        except redis.RedisError as e:
            raise _unreachable(e) from None


def _finish(r: redis.Redis, key: str, state: str, message: str, result: dict | None = None) -> None:
    ttl = int(float(r.hget(_k("job", key), "ttl_s") or 7200))
    p = r.pipeline(transaction=True)  # MULTI/EXEC: the result and "done" appear together
    if result is not None:
        p.set(_k("result", key), json.dumps(result), ex=ttl)
    p.hset(_k("job", key), mapping={"state": state, "message": message, **({"fraction": 1.0} if result is not None else {})})
    p.expire(_k("job", key), ttl)
    p.srem(_k("active"), key)
    p.delete(_k("lease", key))
    p.execute()


# ---- in the worker ---------------------------------------------------------------------------------
def execute(key: str) -> None:
    """Run job ``key`` (called by an RQ worker): the record says what; the result goes to ``result:<key>``."""
    r = get_current_job().connection
    rec = {k.decode(): v.decode() for k, v in r.hgetall(_k("job", key)).items()}
    if rec.get("state") != "queued" or r.exists(_k("cancel", key)):
        return  # cancelled (or taken over) before a worker got to it
    spec = JobSpec.from_json(rec["spec"])
    limits = Limits(time_limit_s=float(rec["limit_s"]), ttl_s=float(rec["ttl_s"]))
    lease_ms = int(float(rec["lease_s"]) * 1000)
    r.set(_k("lease", key), os.getpid(), px=lease_ms)
    r.incr(_k("runs"))
    r.hset(_k("job", key), mapping={"state": "running", "message": "started", "pid": os.getpid(),
                                    "host": socket.gethostname()})
    done = threading.Event()

    def renew() -> None:
        while not done.wait(1.0):
            r.set(_k("lease", key), os.getpid(), px=lease_ms)
    threading.Thread(target=renew, daemon=True).start()
    started, last = time.monotonic(), {"report": 0.0, "check": 0.0, "cancelled": False}

    def stopped() -> str | None:
        if time.monotonic() - last["check"] >= PROGRESS_EVERY_S:
            last["check"], last["cancelled"] = time.monotonic(), bool(r.exists(_k("cancel", key)))
        return "cancelled" if last["cancelled"] else deadline_check(started, limits)

    def report(fraction: float, message: str) -> None:
        if time.monotonic() - last["report"] >= PROGRESS_EVERY_S:
            last["report"] = time.monotonic()
            r.hset(_k("job", key), mapping={"fraction": fraction, "message": message})

    progress, should_stop = reporter(report, stopped)
    try:
        result = KINDS[spec.kind][1](load_workload(spec.workload), spec.inputs, progress, should_stop)
        _finish(r, key, "done", "done", result)
    except QcoreError as e:
        why = stopped()
        _finish(r, key, "cancelled" if why == "cancelled" else "failed", why or str(e))
    except Exception as e:  # RQ's own time limit (JobTimeoutException) or a bug: the record says so, RQ logs it
        _finish(r, key, "failed", f"the job stopped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        raise
    finally:
        done.set()

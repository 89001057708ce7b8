"""Which backend runs the jobs: RQ on Redis when ``$QCORE_REDIS_URL`` is set and answers, else in-process.

``connect()`` returns ``(backend, note)``; ``note`` is the one line to show when server mode was asked for
but Redis did not answer (the app then runs jobs in-process), else ``None``. With
``$QCORE_REDIS_FALLBACK=refuse`` an unreachable Redis raises ``QcoreError`` instead. Connecting waits at
most ``CONNECT_TIMEOUT_S``; every later Redis call at most ``SOCKET_TIMEOUT_S``.
"""

from __future__ import annotations

import os

from qcore.errors import QcoreError
from qcore.jobs.job import Limits
from qcore.jobs.local import InProcessJobs

CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 3.0


def connect(url: str | None = None, limits: Limits | None = None, fallback: str | None = None):
    limits = limits or Limits.from_env()
    url = url if url is not None else os.environ.get("QCORE_REDIS_URL", "")
    fallback = fallback or os.environ.get("QCORE_REDIS_FALLBACK", "in-process")
    if fallback not in ("in-process", "refuse"):
        raise QcoreError(f"$QCORE_REDIS_FALLBACK={fallback!r}: use in-process or refuse")
    if not url:
        return InProcessJobs(limits), None
    import redis

    from qcore.jobs.rq_backend import RedisJobs

    try:
        connection = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S)
        connection.ping()
    except (redis.RedisError, ValueError) as e:
        reason = f"Redis at {url} is unreachable ({type(e).__name__})"
        if fallback == "refuse":
            raise QcoreError(f"{reason}; start it (deploy/class-server.sh start) or unset $QCORE_REDIS_URL") from None
        return InProcessJobs(limits), f"{reason}: jobs run in this app process instead."
    return RedisJobs(connection, limits), None

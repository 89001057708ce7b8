"""One job worker: ``python -m qcore.jobs.worker --redis redis://host:port/0 --threads 1``.

An RQ ``SimpleWorker`` (the job runs in this process, not a fork, so a zoo model loaded once and the sweep
cache stay warm for the next job) on the ``qcore`` queue, with torch pinned to ``--threads`` intra-op
threads (and 1 inter-op thread). Workers on other machines differ only in ``--redis``.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qcore.jobs.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=os.environ.get("QCORE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this worker (default 1)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    import redis
    import torch
    from rq import Queue, SimpleWorker

    from qcore.jobs.rq_backend import QUEUE

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    connection = redis.Redis.from_url(args.redis, socket_connect_timeout=2, health_check_interval=30)
    SimpleWorker([Queue(QUEUE, connection=connection)], connection=connection, name=args.name).work(logging_level="WARNING")


if __name__ == "__main__":
    main()

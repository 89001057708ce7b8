"""Heavy work as background jobs: sensitivity sweeps, searches and evaluations run outside the page's script.

- ``job``        what a job is: a named kind (an importable function) + JSON inputs, its content key, the
                 one-line errors, ``Status`` and ``Limits`` (caps, time limit, TTL);
- ``local``      the embedded backend: a small bounded thread pool in this process (``streamlit run app.py``
                 needs no service);
- ``rq_backend`` server mode: Redis holds the queue (RQ), the job records and the results, so every app
                 replica and every worker, on this machine or others, sees the same jobs;
- ``backend``    ``connect()``: which of the two to use (``$QCORE_REDIS_URL``), falling back in one line;
- ``worker``     ``python -m qcore.jobs.worker``: one RQ worker process with pinned torch threads.

Identical requests coalesce: the job key is a hash of the kind, the workload's ``content_hash``, the
inputs and ``code_version``, and a second submission of a key that is queued, running or done joins it.
"""

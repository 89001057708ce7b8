"""Heavy work from a page as a background job (``qcore.jobs``): submit, show progress, cancel, show the result.

``result(kind, key, w, inputs, what)`` returns the job's result when it is done. Until then it draws a
progress bar in an ``st.fragment`` that polls every ``POLL_S`` seconds (the rest of the page and the
other pages stay usable) with a Cancel button, and stops the page's script there. A small model
(``state.small``) waits for its job inline for up to ``INLINE_WAIT_S``, so its page shows results at once,
as before. The job's key is kept in session state and in the URL (``?job=``); identical requests from
any session share the job, so a reload with the same settings finds it again.

The backend is ``qcore.jobs.backend.connect()`` once per app process: RQ workers when
``$QCORE_REDIS_URL`` answers, else in-process (and an uploaded model's jobs always run in-process: the
workers cannot see its file).
"""

from __future__ import annotations

import time
import uuid

import streamlit as st

from qcore.errors import QcoreError
from qcore.jobs.backend import connect
from qcore.jobs.job import spec_for
from qcore.jobs.local import InProcessJobs
from ui import keys
from ui.text import plain

POLL_S = 1.0
INLINE_WAIT_S = 60.0


@st.cache_resource(show_spinner=False)
def _backends():
    """``(jobs, note, in_process)``: the configured backend, the one line saying Redis did not answer (or
    None), and the in-process backend uploads use (the same object when jobs run in-process)."""
    jobs, note = connect()
    return jobs, note, jobs if isinstance(jobs, InProcessJobs) else InProcessJobs(jobs.limits)


def backend_for(key: str):
    jobs, note, local = _backends()
    if note:
        st.caption(plain(note))
    return local if key.startswith("upload:") else jobs


def evict_old_upload() -> dict | None:
    """The session's upload (``keys.UPLOAD``), or None once it is older than the session TTL (``Limits.ttl_s``,
    ``$QCORE_SESSION_TTL_S``): then it is dropped (its jobs' results expire with the same TTL) and the sidebar
    says so in one line."""
    uploaded = st.session_state.get(keys.UPLOAD)
    ttl_s = _backends()[0].limits.ttl_s
    if uploaded and time.time() - uploaded.get("loaded_at", time.time()) > ttl_s:
        st.session_state[keys.UPLOAD] = None
        st.session_state[keys.UPLOAD_ERROR] = (f"{uploaded['label']} was removed {ttl_s / 60:.0f} min after it was "
                                               "loaded (this server's session TTL); upload it again to go on.")
        return None
    return uploaded


def threads_caption(jobs) -> str:
    return (f"Jobs run {jobs.describe()}. Timings measured while jobs run share the CPU with them and read "
            "slower than on an idle machine.")


def session_id() -> str:
    """This browser session's id: who may cancel the jobs it started."""
    return st.session_state.setdefault(keys.JOB_SESSION, uuid.uuid4().hex)


def asked(kind: str, key: str, w, inputs: dict) -> bool:
    """Whether a job of these inputs is known (queued, running or finished) to the backend: a page that starts a
    large job on a click shows it, without the click, on every later run (the fragment's, a reload's)."""
    try:
        return backend_for(key).status(spec_for(kind, key, w, inputs).key) is not None
    except QcoreError:
        return False


def result(kind: str, key: str, w, inputs: dict, what: str, small: bool = True, start: bool = True,
           stop: bool = True) -> dict | None:
    """The result of job ``kind`` on workload ``w`` (its key ``key``) with ``inputs``; ``what`` names it in the
    page ("sweep"). Submits the job when ``start`` and none is known; without ``start`` only a job this session
    (or the page it reloaded, ``?job=``) asked for is shown. While the job is queued or running (its
    progress drawn), after it failed (an error box) or when none was started: ``st.stop()``, or with
    ``stop=False`` ``None`` (the rest of the page is drawn)."""
    jobs = backend_for(key)
    try:
        spec = spec_for(kind, key, w, inputs)
        if not start and spec.key not in (st.session_state.get(keys.JOBS, {}).get(kind), st.query_params.get(keys.JOB_PARAM)):
            return None  # not asked for by this session (nor by the page it reloaded): another's result stays theirs
        status = jobs.status(spec.key)
        if status is None or (status.finished and status.state != "done" and st.button(  # not after a cancel
                f"Run the {what} again", key=f"job_again:{kind}", icon=":material/replay:")):
            jobs.submit(spec, session_id(), w)
            status = jobs.status(spec.key)
    except QcoreError as e:
        st.error(plain(str(e)), icon=":material/error:")
        return st.stop() if stop else None
    st.session_state.setdefault(keys.JOBS, {})[kind] = spec.key
    end = time.monotonic() + (INLINE_WAIT_S if small else 0.0)
    while status is not None and not status.finished and time.monotonic() < end:
        time.sleep(0.05)
        status = jobs.status(spec.key)
    if status is not None and status.state == "done":
        if st.query_params.get(keys.JOB_PARAM) == spec.key:
            del st.query_params[keys.JOB_PARAM]
        return status.result
    if status is not None and status.finished:
        box = st.info if status.state == "cancelled" else st.error
        box(plain(f"The {what} was {'cancelled' if status.state == 'cancelled' else 'not finished'}: {status.message}"),
            icon=":material/info:")
        return st.stop() if stop else None
    st.query_params[keys.JOB_PARAM] = spec.key
    _progress(jobs, spec.key, what)
    return st.stop() if stop else None


@st.fragment(run_every=POLL_S)
def _progress(jobs, job_key: str, what: str) -> None:
    try:
        status = jobs.status(job_key)
    except QcoreError as e:
        st.error(plain(str(e)), icon=":material/error:")
        return
    if status is None or status.finished:
        st.rerun()  # the whole page: it shows the result (or why there is none)
    where = "waiting" if status.state == "queued" else "running"
    st.progress(status.fraction, text=plain(f"The {what} is {where} as a background job: {status.message}"))
    st.caption(plain(threads_caption(jobs) + " You can use other pages meanwhile; the result appears here."))
    if status.owner == session_id() and st.button(f"Cancel the {what}", key=f"job_cancel:{job_key}",
                                                   icon=":material/stop_circle:"):
        jobs.cancel(job_key, session_id())
        st.rerun()

"""The Sensitivity page runs its sweep as a background job: progress first, the result once the job is done."""

import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from qcore import zoo
from qcore.analysis import sensitivity, sweep_cache
from ui import jobs as ui_jobs, keys, state
from ui.text import plain

APP = str(Path(__file__).resolve().parents[2] / "app.py")


@pytest.fixture(autouse=True)
def zoo_fixture(digits_mlp, monkeypatch):
    """The app's zoo loader returns the session fixture (no second load of digits-mlp)."""
    real = zoo.load
    monkeypatch.setattr(zoo, "load", lambda name: digits_mlp if name == "digits-mlp" else real(name))
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


def test_a_large_models_sweep_runs_as_a_job_and_its_result_shows(digits_mlp, tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(state, "SMALL_MODEL_WEIGHTS", 0)  # digits-mlp counts as large: the sweep waits for a click
    sweep_cache.clear_memory_cache()
    ui_jobs._backends.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/sensitivity.py").run()
    next(b for b in at.button if b.label.startswith("Run the sweep")).click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception or at.error]
    assert not any(b.label.startswith("Run the sweep") for b in at.button)  # gone once the sweep is under way
    job = at.session_state[keys.JOBS]["sweep"]
    assert at.query_params[keys.JOB_PARAM] == [job] or at.query_params[keys.JOB_PARAM] == job
    shown = " ".join(c.value for c in at.caption)
    assert plain("Jobs run in this app process") in shown and plain("1 per job while several run") in shown
    backend = ui_jobs._backends()[0]
    end = time.monotonic() + 60
    while not backend.status(job).finished and time.monotonic() < end:
        time.sleep(0.1)
    at.run()
    assert not at.exception and not at.error
    expected = sensitivity.sweep(digits_mlp, state.DEFAULT_CANDIDATES, "both", "only", cache_dir=tmp_path / "b").to_dict()
    widest = max(state.DEFAULT_CANDIDATES, key=lambda c: max(r["metric_drop"] for r in expected["rows"] if r["candidate"] == c)
                 - min(r["metric_drop"] for r in expected["rows"] if r["candidate"] == c))
    top = min((r for r in expected["rows"] if r["candidate"] == widest), key=lambda r: r["rank"])
    values = {m.label: m.value for m in at.metric}
    assert values["Its top-1 accuracy drop" if "Its top-1 accuracy drop" in values else next(
        k for k in values if k.startswith("Its "))] == f"{top['metric_drop']:+.4f}"
    assert keys.JOB_PARAM not in at.query_params and backend.runs == 1

    again = AppTest.from_file(APP, default_timeout=120)  # a reload: a new session with the same settings
    again.run()
    again.switch_page("pages/sensitivity.py").run()
    assert {m.label: m.value for m in again.metric} == values and backend.runs == 1
    ui_jobs._backends.clear()
    st.cache_resource.clear()


def test_an_upload_older_than_the_session_ttl_is_evicted_in_one_line(digits_mlp, monkeypatch):
    monkeypatch.setenv("QCORE_SESSION_TTL_S", "60")
    ui_jobs._backends.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state[keys.SOURCE] = keys.UPLOAD_SOURCE
    at.session_state[keys.UPLOAD] = {"key": f"upload:{digits_mlp.content_hash}", "workload": digits_mlp,
                                     "label": "mine.onnx", "loaded_at": time.time() - 61}
    at.run()
    assert at.session_state[keys.UPLOAD] is None
    shown = [e.value for e in at.sidebar.error]
    assert any(plain("mine.onnx was removed 1 min after it was loaded") in s for s in shown), shown
    ui_jobs._backends.clear()

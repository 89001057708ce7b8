"""Instant in class: what a classroom of sessions opening one lesson costs the server.

    python -m benchmarks.lessons [--quick] [--sessions 30] [--lesson 7]

Drives ``app.py`` with Streamlit's ``AppTest`` (every ``AppTest`` is a new session of the same server process, as
thirty students' browsers are), with every cache emptied first (``st.cache_data``, ``st.cache_resource``, qcore's
sweep cache in memory and a fresh ``QCORE_CACHE_DIR`` on disk). Each session opens the lesson's page
(``/lessons?lesson=N``); the table gives the first session's seconds (it computes the lesson's facts: for lesson 7
the sensitivity sweep), the median and slowest of the others (served from the shared cache) and how many
sensitivity sweeps ran in all (counted at ``sensitivity._compute``). Sessions run one after another; concurrent
sessions wait for the first one's computation (Streamlit's cache and the sweep cache hold a lock per key).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app.py"


def measure(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 sessions")
    ap.add_argument("--sessions", type=int, default=30)
    ap.add_argument("--lesson", type=int, default=7)
    args = ap.parse_args(argv)
    sessions = 3 if args.quick else args.sessions

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from benchmarks.interactivity import quiet_streamlit
    from qcore.analysis import sensitivity, sweep_cache

    quiet_streamlit()
    calls = []
    real = sensitivity._compute
    sensitivity._compute = lambda *a, **k: calls.append(1) or real(*a, **k)
    old_dir = os.environ.get("QCORE_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["QCORE_CACHE_DIR"] = tmp
            sweep_cache.clear_memory_cache()
            st.cache_data.clear()
            st.cache_resource.clear()
            seconds = []
            for _ in range(sessions):
                at = AppTest.from_file(str(APP), default_timeout=600)
                at.query_params["lesson"] = str(args.lesson)
                start = time.perf_counter()
                at.run()
                at.switch_page("pages/lessons.py").run()
                seconds.append(time.perf_counter() - start)
                if at.exception or at.error:
                    raise RuntimeError(f"lesson {args.lesson} showed an error")
    finally:
        sensitivity._compute = real
        if old_dir is None:
            os.environ.pop("QCORE_CACHE_DIR", None)
        else:
            os.environ["QCORE_CACHE_DIR"] = old_dir
    others = seconds[1:] or seconds
    return [{"lesson": args.lesson, "sessions": sessions, "first_s": seconds[0],
             "others_median_s": statistics.median(others), "others_max_s": max(others), "sweeps": len(calls)}]


def main(argv=None) -> str:
    rows = measure(argv)
    lines = ["| lesson | sessions | first session (s) | other sessions, median (s) | slowest other (s) | sweeps run |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['lesson']} | {r['sessions']} | {r['first_s']:.2f} | {r['others_median_s']:.2f} | "
              f"{r['others_max_s']:.2f} | {r['sweeps']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()

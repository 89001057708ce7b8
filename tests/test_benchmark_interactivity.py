"""``benchmarks.interactivity.cpu_seconds``: the CPU time of the app server and of everything else this process
started, told apart. Oracle: two child processes that each spin for a known CPU time (``time.process_time``), say
so, then wait on their input."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.interactivity import cpu_seconds

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\nprint('spun', flush=True)\ninput()"


def test_cpu_seconds_splits_the_server_from_the_other_children():
    server, other = (subprocess.Popen([sys.executable, "-c", SPIN.format(s=s)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) for s in (0.6, 0.3))
    try:
        assert server.stdout.readline() == other.stdout.readline() == "spun\n"
        server_s, other_s = cpu_seconds(server.pid)
        assert 0.55 <= server_s < 1.2  # the spin (less up to a clock tick of accounting) plus the interpreter's start
        assert 0.25 <= other_s < 0.9
    finally:
        for p in (server, other):
            p.communicate("\n", timeout=30)


def test_cpu_seconds_leaves_the_other_servers_out_of_the_browser():
    """With two app servers side by side (``--compare``), the other one's CPU counts for neither."""
    server, other_server, browser = (subprocess.Popen([sys.executable, "-c", SPIN.format(s=s)], stdin=subprocess.PIPE,
                                                      stdout=subprocess.PIPE, text=True) for s in (0.5, 1.5, 0.5))
    try:
        assert server.stdout.readline() == other_server.stdout.readline() == browser.stdout.readline() == "spun\n"
        server_s, browser_s = cpu_seconds(server.pid, (other_server.pid,))
        assert 0.45 <= server_s < 1.2  # the spin (less a clock tick) plus the interpreter's start
        assert 0.45 <= browser_s < 1.2  # without the other server's 1.5 s
        assert cpu_seconds(server.pid)[1] >= browser_s + 1.4  # counted as the browser's when not named
    finally:
        for p in (server, other_server, browser):
            p.communicate("\n", timeout=30)

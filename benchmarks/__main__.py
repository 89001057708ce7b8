"""Run every benchmark and collect their tables: ``python -m benchmarks [--quick] [--write-readme]``.

Each benchmark module has ``main(argv)`` printing markdown; this runner captures it, prefixes the
machine it ran on, prints everything, and with ``--write-readme`` replaces the README's section
between the ``<!-- benchmarks:start -->`` / ``<!-- benchmarks:end -->`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import platform
import sys
import time
from pathlib import Path

BENCHMARKS = ["quality", "sensitivity", "runtime", "interactivity", "memory"]
README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models and few repeats (what the tests run)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--write-readme", action="store_true", help="replace the README's benchmark section")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHMARKS
    if unknown := sorted(set(names) - set(BENCHMARKS)):
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.write_readme and not (README.is_file() and START in README.read_text() and END in README.read_text()):
        print(f"{README} has no {START} ... {END} section: add the two markers where the results belong",
              file=sys.stderr)
        return 2  # checked before running anything: the full run takes minutes
    parts = [f"Measured on: {machine()}{' (quick mode)' if args.quick else ''}.\n"]
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        buf = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            module.main(["--quick"] if args.quick else [])
        took = time.perf_counter() - start
        parts.append(f"### {name}\n\n{buf.getvalue().strip()}\n\n_(benchmark took {took:.0f} s)_\n")
        print(parts[-1], flush=True)
    if args.write_readme:
        text = README.read_text()
        head, rest = text.split(START, 1)
        README.write_text(head + START + "\n" + "\n".join(parts) + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

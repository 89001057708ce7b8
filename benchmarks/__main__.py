"""Run every benchmark and collect their tables: ``python -m benchmarks [--quick] [--write-readme]``.

Each benchmark module has ``main(argv)`` printing markdown; this runner captures it, prefixes the
machine it ran on, prints everything, and with ``--write-readme`` writes each result into the README's section
between the ``<!-- benchmarks:start -->`` / ``<!-- benchmarks:end -->`` markers (results of
benchmarks not run this time stay).
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

BENCHMARKS = ["quality", "sensitivity", "runtime", "interactivity", "memory", "qat", "real_models"]
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


def write_readme(parts: dict[str, str]) -> None:
    """Put each ``### name`` part into the README's benchmark section, keeping the parts of benchmarks
    not run this time (so one benchmark can be re-run alone); parts appear in ``BENCHMARKS`` order."""
    text = README.read_text()
    head, rest = text.split(START, 1)
    section, tail = rest.split(END, 1)
    kept = {}
    for chunk in ("\n" + section).split("\n### ")[1:]:  # text before the first part is dropped
        name = chunk.split("\n", 1)[0].strip()
        if name in BENCHMARKS:
            kept[name] = "### " + chunk.strip() + "\n"
    kept.update(parts)
    body = "\n".join(kept[n] for n in BENCHMARKS if n in kept)
    README.write_text(head + START + "\n" + body + "\n" + END + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models and few repeats (what the tests run)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--write-readme", action="store_true", help="write the results into the README's benchmark section")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHMARKS
    if unknown := sorted(set(names) - set(BENCHMARKS)):
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.write_readme and not (README.is_file() and START in README.read_text() and END in README.read_text()):
        print(f"{README} has no {START} ... {END} section: add the two markers where the results belong",
              file=sys.stderr)
        return 2  # checked before running anything: the full run takes minutes
    parts = {}
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        buf = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            module.main(["--quick"] if args.quick else [])
        took = time.perf_counter() - start
        parts[name] = (f"### {name}\n\n_Measured on {machine()}{' (quick mode)' if args.quick else ''}; "
                       f"the benchmark took {took:.0f} s._\n\n{buf.getvalue().strip()}\n")
        print(parts[name], flush=True)
    if args.write_readme:
        write_readme(parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Load an untrusted upload once in a throw-away process, so the worst file kills that process, not the server.

The loaders have their own explicit limits (bytes, shapes, folding); this is the outer wall for what they
miss. ``vet_upload`` runs ``load_workload`` (which already runs the model once in FP32) and finds the
layers in a child ``python -m qcore.io.sandbox`` with an address-space limit (``RLIMIT_AS``), a CPU-time
limit (``RLIMIT_CPU``), a file-size limit (``RLIMIT_FSIZE``, 64 MiB), one thread, no stdin, stderr into a
temporary file, the upload's folder as working directory, and a wall-clock timeout. The child prints one JSON line; the parent turns a refusal into one ``QcoreError`` line. Only
after the child succeeded does the app load the file in its own process. Waiting on the child releases
the GIL, so the server keeps answering other visitors meanwhile.

Limits (each can be changed by an environment variable for a trusted deployment):
- memory: ``UPLOAD_MEMORY_BASE_BYTES`` (3 GiB: importing torch and running a small model needs about
  1.2 GiB of address space) plus ``UPLOAD_MEMORY_PER_FILE_BYTE`` (4) times the size of the files, in
  bytes; env ``QCORE_UPLOAD_MEMORY_MB`` sets the base in MiB.
- time: ``UPLOAD_TIMEOUT_S`` (60 s of wall clock, and as many seconds of CPU); env ``QCORE_UPLOAD_TIMEOUT_S``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from qcore.errors import QcoreError
from qcore.limits import env_number

log = logging.getLogger(__name__)


UPLOAD_MEMORY_BASE_BYTES = int(env_number("QCORE_UPLOAD_MEMORY_MB", 3072, "a size in MiB") * 2**20)
UPLOAD_MEMORY_PER_FILE_BYTE = 4  # address space allowed per byte of the uploaded files, on top of the base
UPLOAD_TIMEOUT_S = env_number("QCORE_UPLOAD_TIMEOUT_S", 60, "a time in seconds")
_MEMORY_SIGNS = re.compile(r"MemoryError|can't allocate memory|Cannot allocate memory|bad_alloc|out of memory|"
                           r"failed to map segment",
                           re.IGNORECASE)
_FILE_BYTES = 64 * 2**20  # RLIMIT_FSIZE of the child: the most it may write to any file (its stderr included)
_STDERR_TAIL_BYTES = 64 * 2**10  # how much of the end of the child's stderr is kept for the server log
_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the qcore package, for the child's sys.path


def memory_limit_bytes(*paths) -> int:
    """The child's address-space limit in bytes for these files (None entries are skipped)."""
    size = sum(Path(p).stat().st_size for p in paths if p is not None)
    return UPLOAD_MEMORY_BASE_BYTES + UPLOAD_MEMORY_PER_FILE_BYTE * size


def vet_upload(model_path, data_path=None, label_column: str | None = None, *, timeout_s: float | None = None,
               memory_bytes: int | None = None, batch_axes: dict[str, int] | None = None) -> None:
    """Load ``model_path`` (+ ``data_path``) in a child process under the limits above; return if it loaded,
    else raise ``QcoreError`` with one line: the loader's own message, or that the upload needed more than
    ``memory_bytes`` of memory or longer than ``timeout_s`` seconds."""
    timeout_s = UPLOAD_TIMEOUT_S if timeout_s is None else timeout_s
    memory_bytes = memory_limit_bytes(model_path, data_path) if memory_bytes is None else memory_bytes
    name = Path(model_path).name
    cmd = [sys.executable, "-m", "qcore.io.sandbox", str(Path(model_path).resolve()),
           "--memory-bytes", str(memory_bytes), "--cpu-s", str(max(1, round(timeout_s)))]
    if data_path is not None:
        cmd += ["--data", str(Path(data_path).resolve())]
    if label_column:
        cmd += ["--label-column", label_column]
    if batch_axes:
        cmd += ["--batch-axes", ",".join(f"{k}={v}" for k, v in batch_axes.items())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile() as err_file:  # a file, not a pipe: the child may write more than we want to hold
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err_file,
                                 cwd=Path(model_path).resolve().parent, env=env, start_new_session=True)
        try:
            out, _ = child.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            timed_out = True
        err_file.seek(max(0, err_file.seek(0, os.SEEK_END) - _STDERR_TAIL_BYTES))
        err_text = err_file.read().decode(errors="replace")
    result = _last_json_line(out.decode(errors="replace"))
    too_slow = f"{name} was refused: loading it took longer than {timeout_s:g} s (limit QCORE_UPLOAD_TIMEOUT_S)"
    limit = f"{memory_bytes / 2**30:.1f} GiB" if memory_bytes >= 2**30 else f"{memory_bytes / 2**20:.0f} MiB"
    too_big = f"{name} was refused: loading it needed more than {limit} of memory (limit QCORE_UPLOAD_MEMORY_MB)"
    if timed_out or child.returncode == -signal.SIGXCPU:
        raise QcoreError(too_slow)
    if result is not None and result.get("ok"):
        return
    if result is not None and not _MEMORY_SIGNS.search(result.get("error", "")):
        raise QcoreError(result["error"])
    if result is not None or _MEMORY_SIGNS.search(err_text) or child.returncode == -signal.SIGKILL:
        raise QcoreError(too_big)  # SIGKILL we did not send: the kernel's out-of-memory killer
    log.warning("vetting %s failed (exit %s); child stderr:\n%s", name, child.returncode, err_text)
    last = err_text.strip().splitlines()[-1][:200] if err_text.strip() else f"exit status {child.returncode}"
    raise QcoreError(f"{name} was refused: the loader failed on it ({last}); check that it is a model file "
                     "this app supports")


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and ("ok" in value):
            return value
    return None


def _child(argv: list[str]) -> None:
    """``python -m qcore.io.sandbox MODEL [--data DATA] [--label-column C] --memory-bytes N --cpu-s S``:
    set the limits, load, print ``{"ok": true}`` or ``{"ok": false, "error": "<one line>"}`` on stdout."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qcore.io.sandbox")
    parser.add_argument("model")
    parser.add_argument("--data")
    parser.add_argument("--label-column")
    parser.add_argument("--batch-axes", default="")
    parser.add_argument("--memory-bytes", type=int, required=True)
    parser.add_argument("--cpu-s", type=int, required=True)
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_bytes, args.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (args.cpu_s, args.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_BYTES, _FILE_BYTES))
    result = os.fdopen(os.dup(1), "w")  # the JSON line goes here; anything the loaders print goes to stderr
    os.dup2(2, 1)
    import torch

    from qcore.io.workload import load_workload

    torch.set_num_threads(1)
    try:
        from qcore.io.data import parse_batch_axes

        workload = load_workload(args.model, args.data, label_column=args.label_column,
                                 batch_axes=parse_batch_axes(args.batch_axes))
        _ = workload.layers
        answer = {"ok": True}
    except QcoreError as e:
        answer = {"ok": False, "error": str(e)}
    except MemoryError:
        answer = {"ok": False, "error": "MemoryError"}
    except RuntimeError as e:
        if not _MEMORY_SIGNS.search(str(e)):
            raise
        answer = {"ok": False, "error": "MemoryError"}
    result.write(json.dumps(answer) + "\n")
    result.flush()


if __name__ == "__main__":
    _child(sys.argv[1:])

"""The sensitivity sweep's cache: results kept in memory (an LRU shared by every session of one
process) and on disk (shared by every process), keyed by what they depend on.

A key is a hash of the workload's ``fingerprint`` (name, architecture, weights, data, metric), the
sweep's settings and ``code_version`` (every qcore source file and the torch version), so a result
is never served after any of them changed. Values are JSON text. Disk files live at
``<cache_dir>/sensitivity/<key>.json`` (cache_dir: argument, else ``$QCORE_CACHE_DIR``, else
``~/.cache/qcore``) and are written atomically; an unreadable file counts as absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import QcoreError
from .workload import Workload

MEMORY_CACHE_SIZE = 128  # sweep results (one per candidate and settings) kept in memory

_MEMORY: OrderedDict[str, str] = OrderedDict()
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_FINGERPRINTS: "weakref.WeakKeyDictionary[Workload, str]" = weakref.WeakKeyDictionary()


def clear_memory_cache() -> None:
    with _LOCKS_GUARD:
        _MEMORY.clear()


def lock_for(key: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def code_version() -> str:
    """Hash of every qcore source file and the torch version: results change when either does."""
    if not hasattr(code_version, "value"):
        h = hashlib.blake2b(torch.__version__.encode(), digest_size=16)
        root = Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
        code_version.value = h.hexdigest()
    return code_version.value


def fingerprint(workload: Workload) -> str:
    """Hash of what a workload's results depend on: name, architecture, weights, data, metric."""
    if workload in _FINGERPRINTS:
        return _FINGERPRINTS[workload]
    h = hashlib.blake2b(digest_size=16)

    def add(t: torch.Tensor | None):
        if t is None:
            h.update(b"none")
            return
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    task = workload.task
    h.update(repr((workload.name, task.kind, task.headline, task.higher_is_better, workload.batch_size)).encode())
    h.update(repr(workload.model).encode())
    for m in workload.model.modules():
        h.update(str(getattr(m, "code", "")).encode() if hasattr(m, "graph") else b"")
    for name, t in sorted(workload.model.state_dict().items()):
        h.update(name.encode())
        add(t)
    for data in (workload.calibration, workload.evaluation):
        for t in data.inputs:
            add(t)
        add(data.labels)
    _FINGERPRINTS[workload] = h.hexdigest()
    return _FINGERPRINTS[workload]


def cache_key(workload: Workload, candidates: list[str], mode: str, view: str) -> str:
    parts = [fingerprint(workload), list(candidates), mode, view, code_version()]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


def cache_path(cache_dir: str | os.PathLike | None, key: str) -> Path:
    """``<cache_dir>/sensitivity/<key>.json``; cache_dir defaults to $QCORE_CACHE_DIR or ~/.cache/qcore."""
    root = Path(cache_dir or os.environ.get("QCORE_CACHE_DIR") or Path.home() / ".cache" / "qcore")
    return root / "sensitivity" / f"{key}.json"


def read_disk(cache_dir, key: str) -> str | None:
    path = cache_path(cache_dir, key)
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
        return text
    except (OSError, ValueError):
        return None  # absent or unreadable: compute again (and overwrite)


def write_disk(cache_dir, key: str, text: str) -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``."""
    path = cache_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise QcoreError(f"cannot write the sweep cache at {path.parent} ({e.strerror}); "
                         "set QCORE_CACHE_DIR or --cache-dir to a writable directory") from None


def cached(cache_dir, key: str) -> str | None:
    """A result from memory, else from disk, else None."""
    with _LOCKS_GUARD:
        text = _MEMORY.get(key)
    return text or read_disk(cache_dir, key)


def remember(texts: dict[str, str]) -> None:
    """Put ``{key: text}`` into the memory cache, dropping the least recently used beyond its size."""
    with _LOCKS_GUARD:
        for key, text in texts.items():
            _MEMORY[key] = text
            _MEMORY.move_to_end(key)
        while len(_MEMORY) > MEMORY_CACHE_SIZE:
            _MEMORY.popitem(last=False)

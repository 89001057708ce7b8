"""The sensitivity sweep's cache: results kept in memory (an LRU shared by every session of one
process) and on disk (shared by every process), keyed by what they depend on.

A key is a hash of the workload's ``fingerprint`` (its ``content_hash`` -- the bytes it was made
from -- and how its outputs are scored), the sweep's settings as canonical JSON and ``code_version``
(every qcore source file and the torch version), so a result is never served for other bytes,
other settings or other code. Nothing of the in-memory model enters a key: two models that print
alike are still different files. Values are JSON text. Disk files live at
``<cache_dir>/sensitivity/<key>.json`` (cache_dir: argument, else ``$QCORE_CACHE_DIR``, else
``~/.cache/qcore``) and are written atomically. Reading is distrustful: an entry that is absent,
unreadable, not JSON, or fails the caller's ``valid`` check counts as absent (computed again, and
the file replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from qcore.errors import QcoreError
from qcore.model.workload import Workload

MEMORY_CACHE_SIZE = 128  # sweep results (one per candidate and settings) kept in memory
MAX_ENTRY_BYTES = 64 * 2**20  # a larger disk entry is not read (minilm-l6's are ~20 KB)

_MEMORY: OrderedDict[str, str] = OrderedDict()
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


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


def _digest(parts) -> str:
    """BLAKE2b-128 hex digest of ``parts`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def fingerprint(workload: Workload) -> str:
    """Hash of what a workload's results depend on: the bytes it was made from (``content_hash``)
    and how its outputs are scored (task kind, headline metric, direction) in batches of what size."""
    task = workload.task
    return _digest(["workload", workload.content_hash, task.kind, task.headline, task.higher_is_better,
                    workload.batch_size])


def cache_key(workload: Workload, candidates: list[str], mode: str, view: str) -> str:
    """Key of one sweep result: fingerprint, settings (candidates, mode, view) and ``code_version``.
    A candidate name stands for its recipe: presets and layer specs are qcore source, in code_version."""
    return _digest(["sweep", fingerprint(workload), {"candidates": list(candidates), "mode": mode, "view": view},
                    code_version()])


def cache_path(cache_dir: str | os.PathLike | None, key: str) -> Path:
    """``<cache_dir>/sensitivity/<key>.json``; cache_dir defaults to $QCORE_CACHE_DIR or ~/.cache/qcore."""
    root = Path(cache_dir or os.environ.get("QCORE_CACHE_DIR") or Path.home() / ".cache" / "qcore")
    return root / "sensitivity" / f"{key}.json"


def read_disk(cache_dir, key: str) -> str | None:
    """The text of the disk entry ``key``, or None if absent, unreadable, not a regular file or
    larger than ``MAX_ENTRY_BYTES``."""
    try:
        with cache_path(cache_dir, key).open("rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ENTRY_BYTES:
                return None
            return f.read(MAX_ENTRY_BYTES + 1).decode("utf-8")
    except (OSError, ValueError):
        return None


def parsed(text: str | None, valid: Callable[[object], bool]) -> dict | None:
    """``text`` as JSON if it parses and ``valid`` accepts it, else None (a miss)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, huge integers, deep nesting
        return None
    return value if valid(value) else None


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


def cached(cache_dir, key: str, valid: Callable[[object], bool]) -> tuple[str, dict] | None:
    """``(text, value)`` of a valid entry from memory, else from disk, else None."""
    with _LOCKS_GUARD:
        text = _MEMORY.get(key)
    value = parsed(text, valid)
    if value is None:
        text = read_disk(cache_dir, key)
        value = parsed(text, valid)
    return None if value is None else (text, value)


def remember(texts: dict[str, str]) -> None:
    """Put ``{key: text}`` into the memory cache, dropping the least recently used beyond its size."""
    with _LOCKS_GUARD:
        for key, text in texts.items():
            _MEMORY[key] = text
            _MEMORY.move_to_end(key)
        while len(_MEMORY) > MEMORY_CACHE_SIZE:
            _MEMORY.popitem(last=False)

"""Every bound on untrusted input, and the checks that enforce them.

Uploaded files are untrusted (see the README's threat model). Each limit below is in bytes, counts or
seconds as its name says; each can be raised by an environment variable for a trusted deployment.
A file that breaks one raises ``QcoreError`` with one line saying what is wrong and what to do.
"""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import QcoreError


def _max_upload_bytes() -> int:
    raw = os.environ.get("QCORE_MAX_UPLOAD_MB", "200")
    try:
        mb = float(raw)
    except ValueError:
        raise QcoreError(f"QCORE_MAX_UPLOAD_MB={raw!r} is not a number; set it to a size in MiB such as 200") from None
    return int(mb * 2**20)


MAX_UPLOAD_BYTES = _max_upload_bytes()  # the engine's own size limit for model and data files (default 200 MiB)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@contextmanager
def reading(what: str, hint: str):
    """Turn any failure while parsing an untrusted file into one QcoreError line."""
    try:
        yield
    except QcoreError:
        raise
    except Exception as e:
        raise QcoreError(f"{what} could not be read ({first_line(e)}); {hint}") from None


def human_size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes:,} bytes"


def checked_file(path, kinds: tuple[str, ...], what: str, max_bytes: int | None) -> Path:
    p = Path(path)
    if not p.is_file():
        raise QcoreError(f"{what} file {str(path)!r} does not exist")
    limit = MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    size = p.stat().st_size
    if size > limit:
        raise QcoreError(f"{p.name} is {human_size(size)}, above the limit of {human_size(limit)}; "
                         "use a smaller file or raise the limit (env QCORE_MAX_UPLOAD_MB)")
    if size == 0:
        raise QcoreError(f"{p.name} is empty")
    if p.suffix.lower() not in kinds:
        raise QcoreError(f"{p.name}: unsupported {what} file extension {p.suffix or '(none)'!r}; "
                         f"supported: {', '.join(kinds)}")
    return p


def sniff(p: Path) -> str:
    """What the first bytes say: 'zip', 'pickle', 'safetensors' or 'other'."""
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < p.stat().st_size:
        return "safetensors"
    return "other"


def zip_members(p: Path, limit: int) -> list[str]:
    with reading(p.name, "the file is truncated or corrupted; save it again"):
        with zipfile.ZipFile(p) as zf:
            if sum(i.file_size for i in zf.infolist()) > 4 * limit:
                raise QcoreError(f"{p.name} unpacks to more than 4x the upload limit; refusing to read it")
            return zf.namelist()


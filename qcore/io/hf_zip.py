"""A checkpoint folder uploaded as a ``.zip``, unpacked safely into a private folder.

Refused, each in one line naming the member: more than ``MAX_MEMBERS`` members; absolute names or ``..``
(and, through ``limits.zip_members``, duplicate names, encryption, compression other than stored/deflate,
members whose real inflated size differs from their header); symbolic links, devices, pipes or anything
but regular files and folders (the Unix mode in the member's external attributes); file types a checkpoint
does not hold (``ALLOWED_SUFFIXES``; pickled weights get their own message); a member that inflates more
than ``MAX_RATIO`` times its compressed size (a zip bomb: checkpoints' weights barely compress); and more
than ``ZIP_INFLATE_RATIO`` x the upload limit in total -- checked on the declared sizes first and again on
the bytes written while extracting. The archive itself is at most the upload limit.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from qcore import limits
from qcore.errors import QcoreError
from qcore.limits import human_size

MAX_MEMBERS = 256
MAX_RATIO = 200  # inflated / compressed bytes of one member (random float weights: ~1.1; JSON text: ~5)
ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".md", ".jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CHUNK = 2**20


def _kind(info: zipfile.ZipInfo) -> str | None:
    """None for a regular file or a folder, else what the member is ("a symbolic link", "a device", ...)."""
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind in (0, stat.S_IFREG, stat.S_IFDIR):
        return None
    return {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
            stat.S_IFIFO: "a pipe", stat.S_IFSOCK: "a socket"}.get(kind, "not a regular file")


def check(p: Path, max_bytes: int | None = None) -> list[zipfile.ZipInfo]:
    """The members of ``p`` to extract (regular files), after every check above."""
    limit = limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    p = limits.checked_file(p, (".zip",), "model", limit)
    if limits.sniff(p) != "zip":
        raise QcoreError(f"{p.name} is not a zip archive; zip the checkpoint folder (zip -r model.zip folder)")
    names = limits.zip_members(p, limit)  # '..', absolute names, duplicates, methods, real vs declared sizes
    if len(names) > MAX_MEMBERS:
        raise QcoreError(f"{p.name} has {len(names):,} members, more than the {MAX_MEMBERS} a checkpoint folder needs")
    with zipfile.ZipFile(p) as zf:
        infos = zf.infolist()
    files = []
    for info in infos:
        shown = repr(info.filename[:80])
        if (what := _kind(info)) is not None:
            raise QcoreError(f"{p.name}: member {shown} is {what}; only regular files and folders are unpacked")
        if info.is_dir():
            continue
        suffix = PurePosixPath(info.filename).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise QcoreError(f"{p.name}: member {shown} is pickled weights, which would run code when loaded; save the "
                             "model with save_pretrained(folder, safe_serialization=True) and zip that")
        if suffix not in ALLOWED_SUFFIXES:
            raise QcoreError(f"{p.name}: member {shown} is not a file a checkpoint holds; allowed: "
                             f"{', '.join(ALLOWED_SUFFIXES)}")
        if info.file_size > _CHUNK and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise QcoreError(f"{p.name}: member {shown} inflates {info.file_size / max(info.compress_size, 1):,.0f}x "
                             f"(above {MAX_RATIO}x: a zip bomb); refusing to unpack it")
        files.append(info)
    return files


def unpack(p: Path, dest: Path, max_bytes: int | None = None) -> Path:
    """Unpack checked zip ``p`` into the empty private folder ``dest``; return the folder holding config.json
    (``dest`` itself, or the one folder the archive wraps it in)."""
    limit = limits.MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    bound, written = limits.ZIP_INFLATE_RATIO * limit, 0
    files = check(p, limit)
    root = dest.resolve()
    with zipfile.ZipFile(p) as zf:
        for info in files:
            target = (root / info.filename).resolve()
            if root not in target.parents:  # zip_members refused '..' and absolute names; this is the second wall
                raise QcoreError(f"{p.name}: member {info.filename[:80]!r} would land outside the folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            member_bytes = 0
            with zf.open(info) as src, open(target, "xb") as out:
                while chunk := src.read(_CHUNK):
                    member_bytes += len(chunk)
                    written += len(chunk)
                    if member_bytes > info.file_size or written > bound:
                        raise QcoreError(f"{p.name} unpacks to more than {human_size(bound)} (or a member to more than "
                                         "its header says); refusing to unpack it")
                    out.write(chunk)
    configs = sorted((c for c in root.rglob("config.json") if c.is_file()), key=lambda c: len(c.parts))
    if not configs:
        raise QcoreError(f"{p.name} has no config.json; zip the folder save_pretrained() wrote")
    if len(configs) > 1 and len(configs[1].parts) == len(configs[0].parts):
        raise QcoreError(f"{p.name} holds several checkpoints (config.json in more than one folder); zip one")
    return configs[0].parent

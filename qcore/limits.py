"""Every bound on untrusted input, and the checks that enforce them.

Uploaded files are untrusted (see the README's threat model): a small file must not become a large
allocation. Each bound below is in the unit its name says; a file that breaks one raises ``QcoreError``
with one line saying what is wrong and what to do, before the large allocation happens.

| bound                     | default | env                   | limits                                                    |
|---------------------------|---------|-----------------------|-----------------------------------------------------------|
| `MAX_UPLOAD_BYTES`        | 200 MiB | `QCORE_MAX_UPLOAD_MB` | a model or data file's size on disk                       |
| `ZIP_INFLATE_RATIO`       | 2       | (x the upload limit)  | real unpacked bytes of a whole `.npz`/`.pt`/`.pt2` archive |
| `MAX_ZIP_MEMBERS`         | 10,000  |                       | members of a zip archive                                  |
| `MAX_ZIP_DIRECTORY_BYTES` | 10 MiB  |                       | a zip's central directory (parsed to list its members)    |
| `MAX_PICKLE_BYTES`        | 4 MiB   |                       | a `.pt` data file's pickle (legacy non-zip file: all of it) |
| `MAX_DATA_BYTES`          | 1 GiB   | `QCORE_MAX_DATA_MB`   | a data file's values, 4 bytes each (8 if float64/int64)   |
| `MAX_CSV_COLUMNS`         | 10,000  |                       | columns of a CSV file (from its header line)              |
| `MAX_CSV_CELLS`           | 20 M    |                       | rows x columns of a CSV file                              |
| `MAX_CSV_LINE_BYTES`      | 1 MiB   |                       | any one line of a CSV file                                |
| `MAX_SYNTHETIC_BYTES`     | 256 MiB |                       | synthetic inputs (fewer than 256 samples if needed)       |
| `MIN_SYNTHETIC_SAMPLES`   | 16      |                       | synthetic samples below which the model is refused        |

Why these numbers: inflated archives may be 2x the upload so a compressed ``.npz`` of a few hundred MiB
still loads; the bound is on the archive's total, because memory is what is bounded and a separate
per-member bound would only refuse single-array files. 1 GiB of data values is about 250 M float32
values (e.g. 1,000 images of 3x224x224 are 0.6 GiB); CSV parsing costs far more per value than binary
files, hence its own smaller bound (20 M cells: a few seconds of parsing, 80 MiB as float32).
"""

from __future__ import annotations

import math
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from qcore.errors import QcoreError


def env_number(name: str, default: float, unit: str) -> float:
    """A positive, finite number from the environment variable ``name`` (``default`` when unset); ``unit``
    names what it measures in the error, e.g. "a size in MiB"."""
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise QcoreError(f"{name}={raw!r} is not a number; set it to {unit} such as {default}") from None
    if not (math.isfinite(value) and value > 0):
        what = unit.split(" in ")[0].removeprefix("a ")  # "a size in MiB" -> "size"
        raise QcoreError(f"{name}={raw!r} is not a positive {what}; set it to {unit} such as {default}")
    return value


def _env_mib(name: str, default_mib: float) -> int:
    """``name`` (a size in MiB) from the environment, in bytes."""
    return int(env_number(name, default_mib, "a size in MiB") * 2**20)


MAX_UPLOAD_BYTES = _env_mib("QCORE_MAX_UPLOAD_MB", 200)
ZIP_INFLATE_RATIO = 2
MAX_ZIP_MEMBERS = 10_000
MAX_ZIP_DIRECTORY_BYTES = 10 * 2**20
MAX_PICKLE_BYTES = 4 * 2**20
MAX_DATA_BYTES = _env_mib("QCORE_MAX_DATA_MB", 1024)
MAX_CSV_COLUMNS = 10_000
MAX_CSV_CELLS = 20_000_000
MAX_CSV_LINE_BYTES = 2**20
MAX_SYNTHETIC_BYTES = 256 * 2**20
MIN_SYNTHETIC_SAMPLES = 16
_CHUNK_BYTES = 2**20  # read and inflate in pieces of this size


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
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.1f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes:,} bytes"


def checked_file(path, kinds: tuple[str, ...], what: str, max_bytes: int | None) -> Path:
    p = Path(path)
    try:
        exists = p.is_file()
    except OSError as e:  # e.g. a file name longer than the file system allows
        raise QcoreError(f"{what} file {str(path)[:80]!r}... cannot be opened ({e.strerror})") from None
    if not exists:
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


def _member_count(f, p: Path) -> int:
    """An upper bound on the members ``zipfile`` will parse, from the central directory's raw bytes
    (each entry starts with the signature ``PK\\x01\\x02``), before zipfile builds an object per entry."""
    end = zipfile._EndRecData(f)  # the end-of-central-directory record; zipfile's own reader, stable since 2.x
    if end is None:
        raise zipfile.BadZipFile("File is not a zip file")
    directory_bytes, location = end[zipfile._ECD_SIZE], end[zipfile._ECD_LOCATION]
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise QcoreError(f"{p.name} has a zip directory of {human_size(directory_bytes)}, above the limit of "
                         f"{human_size(MAX_ZIP_DIRECTORY_BYTES)}; refusing to read it")
    start = max(0, location - directory_bytes - 76)  # 76: the zip64 end records that may sit in between
    f.seek(start)
    return f.read(location - start).count(b"PK\x01\x02")


def _inflated_bytes(f, info: zipfile.ZipInfo) -> int:
    """Bytes the member's deflate stream really inflates to, ignoring what its headers say; counting stops
    once it passes the header's ``file_size``. Memory: one chunk of ``_CHUNK_BYTES`` in and one out."""
    f.seek(info.header_offset)
    local = f.read(30)  # the local file header: signature, ..., name length at 26, extra length at 28
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for member {info.filename[:80]!r}")
    f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
    import zlib

    inflater, left, total = zlib.decompressobj(-15), info.compress_size, 0
    while left > 0 and not inflater.eof and total <= info.file_size:
        data = f.read(min(_CHUNK_BYTES, left))
        if not data:
            break
        left -= len(data)
        while data and total <= info.file_size:
            total += len(inflater.decompress(data, _CHUNK_BYTES))
            data = inflater.unconsumed_tail
    return total


def zip_members(p: Path, limit: int) -> list[str]:
    """The member names of zip archive ``p`` after checking it is safe to read, without trusting its headers.

    ``limit`` is the upload limit in bytes; all members together may unpack to ``ZIP_INFLATE_RATIO * limit``
    bytes. The headers' sizes must stay within that bound (checked first, reading nothing), and every
    deflated member is inflated here in chunks, counting its real bytes and stopping as soon as they pass
    what its header says -- so a reader that allocates what the headers say (torch, numpy) can neither be
    made to allocate more nor be handed more than it allocated. Also refused: more than ``MAX_ZIP_MEMBERS``
    members, absolute or ``..`` names, duplicate names, members outside the file, encryption, and
    compression other than stored or deflate (``zipfile`` inflates bzip2 and lzma without a bound).
    Nested archives are plain bytes to every loader (none opens them), so they need no rule here.
    Time: about 1 s per 400 MiB of deflated members on one core; stored members are not read.
    """
    bound = ZIP_INFLATE_RATIO * limit
    with reading(p.name, "the file is truncated or corrupted; save it again"), open(p, "rb") as f:
        if _member_count(f, p) > MAX_ZIP_MEMBERS:
            raise QcoreError(f"{p.name} has more than {MAX_ZIP_MEMBERS:,} members; refusing to read it")
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
        size, seen, declared = p.stat().st_size, set(), 0
        for info in infos:
            name, shown = info.filename, repr(info.filename[:80])
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and parts[0].endswith(":")):
                raise QcoreError(f"{p.name} has a member named {shown} (an absolute path or '..'); refusing to read it")
            if name in seen:
                raise QcoreError(f"{p.name} has two members named {shown}; the file is corrupted or crafted")
            seen.add(name)
            if info.flag_bits & 0x1:
                raise QcoreError(f"{p.name}: member {shown} is encrypted; save the file without a password")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise QcoreError(f"{p.name}: member {shown} uses compression method {info.compress_type} (only stored "
                                 "and deflate are read); save it again with numpy.savez or torch.save")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise QcoreError(f"{p.name}: member {shown} has {info.compress_size:,} bytes in the file but its header "
                                 f"says {info.file_size:,}; the file is corrupted or crafted")
            if info.header_offset + info.compress_size > size:
                raise QcoreError(f"{p.name}: member {shown} runs past the end of the file; the file is truncated or "
                                 "corrupted")
            declared += info.file_size
            if declared > bound:  # what the headers admit to is already too much: refuse before inflating anything
                raise QcoreError(f"{p.name} unpacks to more than {human_size(bound)} (member {shown}; the limit is "
                                 f"{ZIP_INFLATE_RATIO}x the upload limit); refusing to read it")
        for info in infos:
            if info.compress_type == zipfile.ZIP_DEFLATED and (real := _inflated_bytes(f, info)) != info.file_size:
                found = f"more than the {info.file_size:,}" if real > info.file_size else f"{real:,} of the {info.file_size:,}"
                raise QcoreError(f"{p.name}: member {info.filename[:80]!r} unpacks to {found} bytes its header says; "
                                 "the file is corrupted or crafted")
        return [i.filename for i in infos]


def checked_torch_file(p: Path, limit: int, hint: str) -> list[str]:
    """Members of a ``torch.save`` file (zip: real inflated sizes checked, every ``*.pkl`` member at most
    ``MAX_PICKLE_BYTES``; legacy non-zip pickle: the whole file at most ``MAX_PICKLE_BYTES``), checked before
    ``torch.load(weights_only=True)`` sees it. A pickle of repeated memo references can grow into gigabytes of
    Python objects, so its size is bounded even though ``weights_only`` runs no code. ``hint`` ends the error."""
    if sniff(p) == "pickle":
        size = p.stat().st_size
        if size > MAX_PICKLE_BYTES:
            raise QcoreError(f"{p.name} is a {human_size(size)} file in the legacy (non-zip) torch.save format, which is "
                             f"read only up to {human_size(MAX_PICKLE_BYTES)}; save it again with torch.save from "
                             "PyTorch 1.6 or later")
        return []
    names = zip_members(p, limit)
    with reading(p.name, "the file is truncated or corrupted; save it again"), zipfile.ZipFile(p) as zf:
        pickles = [(i.filename, i.file_size) for i in zf.infolist() if i.filename.endswith(".pkl")]
    for member, size in pickles:
        if size > MAX_PICKLE_BYTES:
            raise QcoreError(f"{p.name}: its pickle {member[:80]!r} is {human_size(size)}, above the limit of "
                             f"{human_size(MAX_PICKLE_BYTES)}; {hint}")
    return names

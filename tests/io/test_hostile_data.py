"""Hostile data files and declared shapes: each is refused with one QcoreError line naming the problem, within
2 s and under 300 MiB of peak memory growth, before anything large is allocated.

Every payload is built here in tmp_path (none is committed). The loaders run in one fresh subprocess that
measures each case: wall time, and peak RSS growth from ``/proc/self/status`` (VmHWM, reset per case by
writing 5 to ``/proc/self/clear_refs``). Zip archives are written by hand so their headers say what the
test chooses; deflate bombs are built in milliseconds by repeating one full-flushed compressed MiB.
"""

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qcore.errors import QcoreError
from qcore.io.data import load_data_file, synthetic_data
from qcore.limits import zip_members
from qcore.io.models import InputSpec

MiB = 2**20
BOMB_MIB = 512  # above the default bound on unpacked bytes (2 x the 200 MiB upload limit)
MAX_SECONDS, MAX_GROWTH_MIB = 2.0, 300


def _deflated(prefix: bytes, zero_mib: int) -> bytes:
    """A raw deflate stream of ``prefix`` then ``zero_mib`` MiB of zeros. Full-flushed blocks are byte-aligned
    and need no history, so one compressed MiB of zeros can be repeated (about 1 KB per MiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    return head + block * zero_mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def _zip(path: Path, members, flags: int = 0, entries: int | None = None) -> Path:
    """Write a zip by hand. ``members``: (name, bytes in the file, method, unpacked size the headers declare);
    ``entries`` overrides the member count in the end record."""
    out, central = bytearray(), bytearray()
    for name, data, method, size in members:
        n = name.encode()
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
        fields = (flags, method, 0, 0, crc, len(data), size, len(n))
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, *fields, 0, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, *fields, 0) + n + data
    count = len(members) if entries is None else entries
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def _npy_header(dtype: str, shape: tuple) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue()


def _torch_members(obj) -> list:
    """The members of ``torch.save(obj)``, as _zip takes them (all stored, as torch writes them)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as zf:
        return [(i.filename, zf.read(i), zipfile.ZIP_STORED, i.file_size) for i in zf.infolist()]


def _with_storage(members: list, data: bytes, declared: int) -> list:
    """``members`` with tensor storage 0 replaced by a deflated ``data`` whose headers declare ``declared``."""
    return [(n, data, zipfile.ZIP_DEFLATED, declared) if n.endswith("/data/0") else (n, d, m, s) for n, d, m, s in members]


def _corpus(d: Path) -> dict:
    """name -> (what to load, fragment the one-line error must contain)."""
    header = _npy_header("<f4", (BOMB_MIB * MiB // 4,))
    bomb = _deflated(header, BOMB_MIB)
    inner = _zip(d / "inner.zip", [("x.npy", bomb, zipfile.ZIP_DEFLATED, len(header) + BOMB_MIB * MiB)]).read_bytes()
    ok_npy = _npy_header("<f4", (4, 2)) + bytes(32)
    ok_x = ("x.npy", ok_npy, zipfile.ZIP_STORED, len(ok_npy))
    tiny = _torch_members({"x": torch.zeros(8)})
    cells = "\n".join([",".join(f"c{i}" for i in range(64))] + ["0," * 63 + "0"] * 400_000) + "\n"
    cases = {
        "npz bomb, truthful headers": (
            _zip(d / "bomb.npz", [("x.npy", bomb, zipfile.ZIP_DEFLATED, len(header) + BOMB_MIB * MiB)]),
            "bomb.npz unpacks to more than 400.0 MiB (member 'x.npy'"),
        "npz bomb, headers say 1 MiB": (
            _zip(d / "liar.npz", [("x.npy", bomb, zipfile.ZIP_DEFLATED, MiB)]),
            "liar.npz: member 'x.npy' unpacks to more than the 1,048,576 bytes its header says"),
        "npz of int8, 1.2 GiB as float32": (
            _zip(d / "int8.npz", [("x.npy", _deflated(_npy_header("|i1", (300 * MiB,)), 300), zipfile.ZIP_DEFLATED,
                                   len(_npy_header("|i1", (300 * MiB,))) + 300 * MiB)]),
            "int8.npz holds 314,572,800 values (1.2 GiB as float32), above the data limit of 1.0 GiB"),
        "npy header claims 10^10 values": (
            _zip(d / "shape.npz", [("x.npy", _npy_header("<f4", (10**10,)) + bytes(64), zipfile.ZIP_STORED,
                                    len(_npy_header("<f4", (10**10,))) + 64)]),
            "shape.npz: array 'x' says it has shape (10000000000,) of float32 but holds 64 bytes"),
        "npz holding a zip bomb as x.npy": (
            _zip(d / "nested.npz", [("x.npy", inner, zipfile.ZIP_STORED, len(inner))]),
            "nested.npz could not be read (ValueError: the magic string is not correct"),
        "npz with 10,001 members": (
            _zip(d / "many.npz", [ok_x] + [(f"m{i}", b"", zipfile.ZIP_STORED, 0) for i in range(10_000)]),
            "many.npz has more than 10,000 members; refusing to read it"),
        "npz whose end record hides 20,000 members": (
            _zip(d / "hidden.npz", [ok_x] + [(f"m{i}", b"", zipfile.ZIP_STORED, 0) for i in range(20_000)], entries=1),
            "hidden.npz has more than 10,000 members; refusing to read it"),
        "npz member named ../": (
            _zip(d / "dotdot.npz", [ok_x, ("../../x1.npy",) + ok_x[1:]]),
            "dotdot.npz has a member named '../../x1.npy' (an absolute path or '..'); refusing to read it"),
        "npz member with an absolute name": (
            _zip(d / "abs.npz", [ok_x, ("/etc/x1.npy",) + ok_x[1:]]),
            "abs.npz has a member named '/etc/x1.npy' (an absolute path or '..')"),
        "npz with two x.npy": (_zip(d / "twice.npz", [ok_x, ok_x]), "twice.npz has two members named 'x.npy'"),
        "npz encrypted": (_zip(d / "secret.npz", [ok_x], flags=1), "secret.npz: member 'x.npy' is encrypted"),
        "npz compressed with bzip2": (
            _zip(d / "bz.npz", [ok_x[:2] + (zipfile.ZIP_BZIP2, ok_x[3])]),
            "bz.npz: member 'x.npy' uses compression method 12 (only stored and deflate are read)"),
        "pt storage bomb, truthful headers": (
            _zip(d / "bomb.pt", _with_storage(tiny, _deflated(b"", BOMB_MIB), BOMB_MIB * MiB)),
            "bomb.pt unpacks to more than 400.0 MiB (member"),
        "pt storage bomb, headers say 32 bytes": (
            _zip(d / "liar.pt", _with_storage(tiny, _deflated(b"", BOMB_MIB), 32)),
            "unpacks to more than the 32 bytes its header says"),
        "pt tensor of 2^30 values on a 4-byte storage": (
            d / "stride0.pt", "stride0.pt holds 1,073,741,824 values (4.0 GiB as float32), above the data limit"),
        "pt with a 5 MiB pickle": (
            _zip(d / "pickle.pt", _torch_members({"x": torch.zeros(8), "pad": b"\0" * 5 * MiB})),
            "pickle.pt: its pickle 'archive/data.pkl' is 5.0 MiB, above the limit of 4.0 MiB; save only tensors"),
        "legacy pt above 4 MiB": (d / "legacy.pt", "legacy.pt is a 5.0 MiB file in the legacy (non-zip) torch.save format"),
        "csv with 100,000 columns": (d / "wide.csv", "wide.csv has 100,000 columns, above the limit of 10,000"),
        "csv with a 40 MB line": (d / "line.csv", "line.csv has a line longer than 1.0 MiB"),
        "csv with 25.6 M cells": (d / "cells.csv", "cells.csv has 400,000 rows x 64 columns, above the limit of 20,000,000"),
        "synthetic inputs of 10^9 floats": (
            ((10**9,), "float32"), "the model's inputs (1x1000000000) take 3.7 GiB per sample, so even 16 synthetic"),
        "synthetic inputs of 10^9 int64": (((10**5, 10**4), "int64"), "(1x100000x10000) take 7.5 GiB per sample"),
    }
    torch.save({"x": torch.zeros(1).expand(2**30)}, d / "stride0.pt")  # torch.save keeps the view: 4 bytes of storage
    torch.save({"x": torch.zeros(5 * MiB // 4)}, d / "legacy.pt", _use_new_zipfile_serialization=False)
    (d / "wide.csv").write_text(",".join(f"c{i}" for i in range(100_000)) + "\n" + "0," * 99_999 + "0\n")
    (d / "line.csv").write_text("a,b\n1,2\n" + "1," * 20_000_000 + "\n3,4\n")
    (d / "cells.csv").write_text(cells)
    return cases


_SCRIPT = r"""
import json, re, sys, time
import torch
from qcore.errors import QcoreError
from qcore.io.data import load_data_file, synthetic_data
from qcore.io.models import InputSpec

def kib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))

for name, what in json.loads(sys.stdin.read()):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before, start = kib("VmRSS"), time.perf_counter()
    try:
        if isinstance(what, list):
            synthetic_data([InputSpec(tuple(what[0]), dtype=getattr(torch, what[1]))])
        else:
            load_data_file(what)
        error = None
    except QcoreError as e:
        error = str(e)
    print(json.dumps({"name": name, "error": error, "seconds": time.perf_counter() - start,
                      "growth_mib": (kib("VmHWM") - before) / 1024}), flush=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def measured(corpus):
    """Each case loaded once in a fresh subprocess: name -> {error, seconds, growth_mib}."""
    cases = [(name, what if isinstance(what, tuple) else str(what)) for name, (what, _) in corpus.items()]
    run = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(cases), capture_output=True, text=True,
                         check=False, timeout=300, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}


CASES = ["npz bomb, truthful headers", "npz bomb, headers say 1 MiB", "npz of int8, 1.2 GiB as float32",
         "npy header claims 10^10 values", "npz holding a zip bomb as x.npy", "npz with 10,001 members",
         "npz whose end record hides 20,000 members", "npz member named ../", "npz member with an absolute name",
         "npz with two x.npy", "npz encrypted", "npz compressed with bzip2", "pt storage bomb, truthful headers",
         "pt storage bomb, headers say 32 bytes", "pt tensor of 2^30 values on a 4-byte storage", "pt with a 5 MiB pickle",
         "legacy pt above 4 MiB", "csv with 100,000 columns", "csv with a 40 MB line", "csv with 25.6 M cells",
         "synthetic inputs of 10^9 floats", "synthetic inputs of 10^9 int64"]


@pytest.mark.parametrize("name", CASES)
def test_hostile_input_is_refused_in_one_line_fast_and_small(name, corpus, measured):
    fragment, got = corpus[name][1], measured[name]
    assert got["error"] is not None, f"{name}: loaded without an error"
    assert fragment in got["error"] and "\n" not in got["error"], (name, got["error"])
    assert got["seconds"] < MAX_SECONDS, (name, got)
    assert got["growth_mib"] < MAX_GROWTH_MIB, (name, got)


def test_the_corpus_is_the_whole_list(corpus):
    assert sorted(corpus) == sorted(CASES)


def test_the_payloads_are_real(corpus):
    """What the loaders refuse really is large: the bomb's stream inflates to 512 MiB past its 1 MiB header,
    and torch loads the stride-0 file as a tensor of 2^30 values on 4 bytes of storage."""
    path = corpus["npz bomb, headers say 1 MiB"][0]
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x.npy")
    raw = path.read_bytes()[info.header_offset + 30 + len(b"x.npy"):][:info.compress_size]
    inflater, total = zlib.decompressobj(-15), 0
    while raw:
        total += len(inflater.decompress(raw, 64 * MiB))
        raw = inflater.unconsumed_tail
    assert info.file_size == MiB and total > BOMB_MIB * MiB
    x = torch.load(corpus["pt tensor of 2^30 values on a 4-byte storage"][0], weights_only=True)["x"]
    assert x.numel() == 2**30 and x.untyped_storage().nbytes() == 4


def test_synthetic_data_shrinks_to_the_byte_limit(corpus):
    """3x1024x1024 float32 is 12 MiB a sample: 256 MiB holds 21 of them (256 / 12 = 21.3), not 256."""
    data = synthetic_data([InputSpec((3, 1024, 1024))])
    assert len(data) == 21 and data.inputs[0].shape == (21, 3, 1024, 1024)
    assert len(synthetic_data([InputSpec((1, 8, 8))])) == 256
    with pytest.raises(QcoreError, match=r"take 48.0 MiB per sample, so even 16 synthetic samples exceed the limit"):
        synthetic_data([InputSpec((3, 2048, 2048))])


def test_legit_files_of_every_layout_still_load(tmp_path):
    """Compressed and big-endian npz, several inputs, a small legacy .pt, and a CSV with a BOM, quoted
    header names and CRLF line ends load to the values that were saved."""
    x, y = np.arange(24, dtype=np.float64).reshape(6, 4) / 7, np.arange(6) % 3
    np.savez_compressed(tmp_path / "c.npz", x0=x, x1=x.astype(">f4"), y=y)
    data = load_data_file(tmp_path / "c.npz")
    assert [t.dtype for t in data.inputs] == [torch.float64, torch.float32]
    assert np.array_equal(data.inputs[0].numpy(), x) and np.array_equal(data.inputs[1].numpy(), x.astype("<f4"))
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    torch.save((torch.ones(5, 2), torch.arange(5)), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    old = load_data_file(tmp_path / "old.pt")
    assert old.inputs[0].tolist() == [[1.0, 1.0]] * 5 and old.labels.tolist() == [0, 1, 2, 3, 4]
    (tmp_path / "r.csv").write_bytes(b'\xef\xbb\xbf"a 1",b,label\r\n0.5,-2,1\r\n1e-3,4,0\r\n')
    csv = load_data_file(tmp_path / "r.csv", label_column="label")
    assert csv.inputs[0].tolist() == [[0.5, -2.0], [np.float32(1e-3), 4.0]] and csv.labels.tolist() == [1, 0]
    (tmp_path / "text.csv").write_text("a,b\n" + "1,2\n" * 3 + "3,x\n")
    with pytest.raises(QcoreError, match="text.csv: columns b are not numeric"):
        load_data_file(tmp_path / "text.csv")


def test_zip_members_checks_what_the_archive_really_holds(tmp_path):
    """The stored-size rule and the count of inflated bytes read the archive, not its headers."""
    header = _npy_header("<f4", (4,))
    ok = _zip(tmp_path / "ok.npz", [("x.npy", _deflated(header, 1), zipfile.ZIP_DEFLATED, len(header) + MiB)])
    assert zip_members(ok, 200 * MiB) == ["x.npy"]
    short = _zip(tmp_path / "short.npz", [("x.npy", _deflated(header, 1), zipfile.ZIP_DEFLATED, len(header) + 2 * MiB)])
    with pytest.raises(QcoreError, match=f"member 'x.npy' unpacks to {len(header) + MiB:,} of the "
                                         f"{len(header) + 2 * MiB:,} bytes its header says; the file is corrupted"):
        zip_members(short, 200 * MiB)
    stored = _zip(tmp_path / "stored.npz", [("x.npy", header, zipfile.ZIP_STORED, 10 * MiB)])
    with pytest.raises(QcoreError, match=f"member 'x.npy' has {len(header)} bytes in the file but its header says "
                                         "10,485,760"):
        zip_members(stored, 200 * MiB)
    with pytest.raises(QcoreError, match=r"ok.npz unpacks to more than 1.0 MiB \(member 'x.npy'; the limit is 2x"):
        zip_members(ok, MiB // 2)

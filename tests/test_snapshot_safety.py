"""Snapshots a VMM can trust with untrusted files and a hostile file system: restoring costs
memory in proportion to the data restored, sparse memfd regions stay sparse, slot ids are
found whenever the layout fits, temporary files are private, bound to their file, durable and
cleaned up, and every refusal is one SnapshotError line."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import stat
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import memslot
from memslot.cli.main import main
from memslot.guest import GuestMemory, SnapshotError, read_info
from memslot.guest import snapshot as fmt

PAGE = 4096
MiB = 1 << 20


def resident_pages(address: int, size: int) -> int:
    """Pages of ``[address, address + size)`` in memory (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * (size // PAGE))()
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))


# --- writing files by hand ---------------------------------------------------------------------


def _file(layout: dict[str, object], chunks: list[tuple[int, bytes]], *, sid: bytes = b"S" * 16,
          version: int = fmt.FORMAT_VERSION, created: int = 1) -> bytes:
    head = fmt._HEADER.pack(fmt.MAGIC, version, fmt.KIND_FULL, PAGE, sid, bytes(16), 0, created)
    seed = zlib.crc32(sid) if version >= 2 else 0
    out = [head + struct.pack("<I", zlib.crc32(head))]
    data = zero = 0

    def chunk(kind: int, payload: bytes) -> bytes:
        h = fmt._CHUNK.pack(kind, 0, len(payload), zlib.crc32(payload, seed))
        return h + struct.pack("<I", zlib.crc32(h, seed)) + payload

    out.append(chunk(fmt.CHUNK_LAYOUT, json.dumps(layout).encode()))
    for kind, payload in chunks:
        count = fmt._PAGES.unpack_from(payload)[4]
        data, zero = (data + count, zero) if kind == fmt.CHUNK_DATA else (data, zero + count)
        out.append(chunk(kind, payload))
    out.append(chunk(fmt.CHUNK_END, fmt._END.pack(len(chunks) + 1, data, zero)))
    return b"".join(out)


def _region(size: int, slot: int = 0, uid: int = 0, gpa: int = 0) -> dict[str, object]:
    return {"uid": uid, "slot": slot, "gpa": gpa, "size": size, "flags": 0, "label": "",
            "backing": "anon", "complete": True, "hva": 0, "align": None, "path": None}


def _zero_chunks(npages: int) -> list[tuple[int, bytes]]:
    out = []
    for first in range(0, npages, fmt.WINDOW_PAGES):
        span = min(fmt.WINDOW_PAGES, npages - first)
        bitmap = b"\xff" * (span // 8)
        out.append((fmt.CHUNK_ZERO, fmt._PAGES.pack(0, 0, first, span, span) + bitmap))
    return out


# --- memory in proportion to the data ------------------------------------------------------------


def test_zero_chunks_cost_no_memory(tmp_path: Path) -> None:
    size = 256 * MiB
    path = tmp_path / "zeros"
    path.write_bytes(_file({"next_uid": 1, "regions": [_region(size)]},
                           _zero_chunks(size // PAGE)))
    assert path.stat().st_size < 300_000
    with memslot.ModelVM() as vm, GuestMemory.restore(path, vm) as gm:
        region = gm.regions()[0]
        assert resident_pages(region.hva, size) <= 16
        assert gm.read(5 * MiB, 8) == bytes(8)


def test_a_chain_restores_in_proportion_to_its_data(tmp_path: Path) -> None:
    size = 256 * MiB
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        ram = gm.add_region(0, size)  # not logged: every incremental carries it complete
        gm.write(3 * PAGE, b"three")
        gm.write(100 * MiB, b"far")
        gm.snapshot(tmp_path / "full")
        gm.write(3 * PAGE, bytes(5))  # back to zero
        gm.write(7 * PAGE, b"seven")
        gm.snapshot(tmp_path / "inc", incremental=True)
        expected = {g: gm.read(g, 8) for g in (3 * PAGE, 7 * PAGE, 100 * MiB)}
        assert resident_pages(ram.hva, size) <= 64
    with memslot.ModelVM() as vm, GuestMemory.restore([tmp_path / "full", tmp_path / "inc"],
                                                      vm) as again:
        region = again.regions()[0]
        assert resident_pages(region.hva, size) <= 16
        assert {g: again.read(g, 8) for g in expected} == expected


def test_full_snapshot_of_a_sparse_memfd_reads_only_its_data(tmp_path: Path) -> None:
    size = 512 * MiB
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        bar = gm.add_region(0, size, backing="memfd")
        gm.write(300 * MiB + 8, b"used")
        assert bar.fd is not None
        info = gm.snapshot(tmp_path / "full")
        assert info.data_pages == 1
        allocated = os.fstat(bar.fd).st_blocks * 512
        assert allocated <= 64 * PAGE, allocated
        assert resident_pages(bar.hva, size) <= 64
    with memslot.ModelVM() as vm, GuestMemory.restore(tmp_path / "full", vm) as again:
        assert again.read(300 * MiB + 8, 4) == b"used"


# --- slot ids ---------------------------------------------------------------------------------


def test_restore_finds_ids_whenever_the_layout_fits(tmp_path: Path) -> None:
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        for i in range(3):
            gm.add_region(i * MiB, PAGE, label=f"r{i}")
            gm.write(i * MiB, bytes([i + 1]))
        gm.snapshot(tmp_path / "s")
    with memslot.ModelVM() as vm:
        vm.set_user_memory_region(1, 0, 64 * MiB, PAGE, 0x7F0000000000)  # takes id 1
        with GuestMemory.restore(tmp_path / "s", vm) as gm:
            ids = {r.label: r.slot for r in gm.regions()}
            assert ids["r0"] == 0 and ids["r2"] == 2 and ids["r1"] not in (0, 1, 2)
            assert [gm.read(i * MiB, 1) for i in range(3)] == [b"\x01", b"\x02", b"\x03"]


# --- temporary files --------------------------------------------------------------------------


def test_temporary_files_do_not_follow_planted_symlinks(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "snap"
    monkeypatch.setattr(fmt.secrets, "token_hex", lambda n: "0" * (2 * n))
    for name in (f".snap.{os.getpid()}.tmp", f".snap.{'0' * 16}.tmp"):  # old and new names
        (tmp_path / name).symlink_to(victim)
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        gm.add_region(0, PAGE)
        with pytest.raises(SnapshotError, match="cannot write the snapshot"):
            gm.snapshot(target)
    assert victim.read_bytes() == b"precious" and not target.exists()
    monkeypatch.undo()
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        gm.add_region(0, PAGE)
        gm.snapshot(target)  # an unpredictable name
    assert victim.read_bytes() == b"precious"
    created = [p for p in tmp_path.iterdir() if p.name.startswith(".snap.")]
    assert sorted(p.name for p in created) == sorted(
        [f".snap.{os.getpid()}.tmp", f".snap.{'0' * 16}.tmp"])
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & 0o077 == 0


def _chunks(data: bytes) -> list[tuple[int, int, int]]:
    out, pos = [], fmt.HEADER_SIZE
    while pos < len(data):
        kind, _, length, _ = fmt._CHUNK.unpack_from(data, pos)
        out.append((kind, pos, fmt.CHUNK_HEADER_SIZE + length))
        pos += fmt.CHUNK_HEADER_SIZE + length
    return out


def test_chunks_are_bound_to_their_file(tmp_path: Path) -> None:
    """Two guests with the same layout: a file mixing one's header and layout with the
    other's DATA chunks (what two writers sharing a temporary file produced) is refused."""
    files = []
    for n in range(2):
        with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
            gm.add_region(0, 4 * PAGE)
            gm.write(PAGE, bytes([n + 1]) * 100)
            gm.snapshot(tmp_path / f"g{n}")
            files.append((tmp_path / f"g{n}").read_bytes())
    a, b = files
    a_chunks, b_chunks = _chunks(a), _chunks(b)
    assert [k for k, _, _ in a_chunks] == [fmt.CHUNK_LAYOUT, fmt.CHUNK_DATA, fmt.CHUNK_END]
    layout_end = a_chunks[0][1] + a_chunks[0][2]
    _, off, length = b_chunks[1]
    mixed = a[:layout_end] + b[off : off + length] + a[a_chunks[2][1] :]
    bad = tmp_path / "mixed"
    bad.write_bytes(mixed)
    with pytest.raises(SnapshotError, match="another file"):
        read_info(bad)


def test_the_rename_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        gm.add_region(0, PAGE)
        gm.snapshot(tmp_path / "s")
    assert synced == [False, True]  # the file, then its directory after the rename


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "snap"
    stale = tmp_path / ".snap.1111111111111111.tmp"
    stale.write_bytes(b"x" * 10000)  # a writer killed mid-way
    live = tmp_path / ".snap.2222222222222222.tmp"
    live.write_bytes(b"y")
    fresh = tmp_path / ".snap.3333333333333333.tmp"  # created this instant, not yet locked
    fresh.write_bytes(b"z")
    other = tmp_path / ".other.4444444444444444.tmp"
    other.write_bytes(b"w")
    old = time.time() - 3600
    for p in (stale, live, other):
        os.utime(p, (old, old))
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer at work
        with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
            gm.add_region(0, PAGE)
            gm.snapshot(target)
        assert not stale.exists()
        assert live.exists() and fresh.exists() and other.exists()
    finally:
        os.close(fd)


# --- refusals: one SnapshotError line ------------------------------------------------------------


@pytest.mark.parametrize("layout_bytes, match", [
    (b'{"regions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'{"next_uid": 1' + b"0" * 5000 + b', "regions": []}', "digits"),
    (b'{"regions": [], "x": [' + b"{}," * 2_000_000 + b"{}]}", "values"),
])
def test_hostile_layouts_are_one_line_refusals(tmp_path: Path, layout_bytes: bytes,
                                               match: str) -> None:
    sid = b"L" * 16
    head = fmt._HEADER.pack(fmt.MAGIC, 2, 0, PAGE, sid, bytes(16), 0, 1)
    seed = zlib.crc32(sid)

    def chunk(kind: int, payload: bytes) -> bytes:
        h = fmt._CHUNK.pack(kind, 0, len(payload), zlib.crc32(payload, seed))
        return h + struct.pack("<I", zlib.crc32(h, seed)) + payload

    path = tmp_path / "hostile"
    path.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + chunk(1, layout_bytes)
                     + chunk(15, fmt._END.pack(1, 0, 0)))
    with pytest.raises(SnapshotError, match=match) as info:
        read_info(path)
    assert type(info.value) is SnapshotError and "\n" not in str(info.value)


def test_snapshot_info_never_prints_a_traceback(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "nested": b'{"regions": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "digits": b'{"next_uid": ' + b"9" * 5000 + b', "regions": []}',
    }
    for name, layout in cases.items():
        sid = b"I" * 16
        head = fmt._HEADER.pack(fmt.MAGIC, 2, 0, PAGE, sid, bytes(16), 0, 1)
        seed = zlib.crc32(sid)
        h = fmt._CHUNK.pack(1, 0, len(layout), zlib.crc32(layout, seed))
        end = fmt._END.pack(1, 0, 0)
        e = fmt._CHUNK.pack(15, 0, len(end), zlib.crc32(end, seed))
        (tmp_path / name).write_bytes(
            head + struct.pack("<I", zlib.crc32(head)) + h + struct.pack("<I", zlib.crc32(h, seed))
            + layout + e + struct.pack("<I", zlib.crc32(e, seed)) + end)
    # A valid file whose creation time is past what a calendar can print.
    far = tmp_path / "far-future"
    far.write_bytes(_file({"next_uid": 1, "regions": [_region(PAGE)]}, [],
                          created=(1 << 64) - 1))
    for path in [*(tmp_path / n for n in cases), far, tmp_path / "absent", tmp_path]:
        code = main(["snapshot-info", str(path)])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, (path, captured.err)
        if path == far:
            assert code == 0 and "created" in captured.out
        else:
            assert code == 2 and len(captured.err.strip().splitlines()) == 1, captured.err


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_file_system_refusals_are_snapshot_errors(tmp_path: Path, err: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def refuse(fd: int, data: bytes) -> int:
        if os.fstat(fd).st_size > 100:  # after the header: mid-file
            raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        gm.add_region(0, 16 * PAGE, log_dirty=True)
        gm.write(0, b"x" * 5 * PAGE)
        monkeypatch.setattr(os, "write", refuse)
        with pytest.raises(SnapshotError, match=os.strerror(err)) as info:
            gm.snapshot(tmp_path / "s")
        monkeypatch.undo()
        assert "\n" not in str(info.value)
        assert list(tmp_path.iterdir()) == []  # no temporary file left
        full = gm.snapshot(tmp_path / "s")
        assert full.data_pages == 5


def test_a_read_only_directory_is_a_snapshot_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def read_only(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only)
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        gm.add_region(0, PAGE)
        with pytest.raises(SnapshotError, match="Read-only file system"):
            gm.snapshot(tmp_path / "s")

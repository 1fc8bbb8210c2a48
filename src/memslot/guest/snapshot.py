"""Guest-memory snapshots: format, writer, reader, restore and the summary ``snapshot-info``
prints. The format (version 2) is described in docs/snapshot-format.md:

    header (64 bytes)  magic "MSLTSNAP", version, kind, page size, id, parent id, sequence,
                       creation time, CRC-32 of the header
    chunks             24-byte chunk header (type, flags, length, payload CRC-32, header
                       CRC-32; both CRCs seeded with the file's id, so a chunk belongs to one
                       file) + payload: one LAYOUT (JSON), DATA / ZERO chunks (a window of at
                       most 32768 pages of one region: a bitmap of the pages carried, then
                       their bytes for DATA), and END (counts) last.

Every length is checked against the limits the layout allows before anything is allocated,
every chunk against its CRC, and a file must end exactly after END; every refusal is one
:class:`SnapshotError`. A restore reads and checks every file of the chain before it creates
anything, costs host memory in proportion to the data it restores (fresh memory is zero and
is not touched for ZERO chunks or holes), and removes what it created on any error.

Snapshots see a :class:`~memslot.guest.GuestMemory` only through
:class:`~memslot.guest.memory.SnapshotAccess`.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import itertools
import json
import mmap
import os
import re
import secrets
import stat
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from ..constants import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    PAGE_SIZE,
)
from ..errors import KvmError, MemslotError
from .address import GPA_LIMIT, LayoutError
from .dirty import bitmap_pages, nwords, pages_to_runs, pages_to_words, popcount

if TYPE_CHECKING:
    from .index import Placed
    from .memory import SnapshotAccess

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "RegionRecord",
    "SnapshotError",
    "SnapshotInfo",
    "read_info",
    "verify_chain",
]

MAGIC: Final = b"MSLTSNAP"
FORMAT_VERSION: Final = 2
#: Versions this reader knows (1: chunk CRCs not bound to the file).
READ_VERSIONS: Final = (1, 2)
KIND_FULL: Final = 0
KIND_INCREMENTAL: Final = 1
KIND_NAMES: Final = {KIND_FULL: "full", KIND_INCREMENTAL: "incremental"}

CHUNK_LAYOUT: Final = 1
CHUNK_DATA: Final = 2
CHUNK_ZERO: Final = 3
CHUNK_END: Final = 15
CHUNK_NAMES: Final = {CHUNK_LAYOUT: "LAYOUT", CHUNK_DATA: "DATA", CHUNK_ZERO: "ZERO",
                      CHUNK_END: "END"}

_HEADER: Final = struct.Struct("<8sHHI16s16sIQ")  # 60 bytes, then u32 CRC-32
HEADER_SIZE: Final = _HEADER.size + 4
_CHUNK: Final = struct.Struct("<IIQI")  # type, flags, length, payload crc; then u32 header crc
CHUNK_HEADER_SIZE: Final = _CHUNK.size + 4
_PAGES: Final = struct.Struct("<IIQII")  # region index, reserved, first page, span, count
_END: Final = struct.Struct("<QQQ")  # chunks before END, data pages, zero pages

#: Pages a DATA/ZERO chunk's bitmap spans; page bytes a DATA chunk carries, at most.
WINDOW_PAGES: Final = 32768
MAX_CHUNK_BYTES: Final = 8 << 20
#: Page sizes a snapshot may have (4 KiB x86/arm64/riscv/s390 .. 64 KiB ppc64, arm64 64K).
MIN_PAGE_SIZE: Final = 4096
MAX_PAGE_SIZE: Final = 1 << 16
#: The LAYOUT chunk: bytes, nesting, values (containers and separators) and digits at most.
MAX_LAYOUT_BYTES: Final = 16 << 20
MAX_LAYOUT_DEPTH: Final = 3
MAX_LAYOUT_VALUES: Final = (KVM_MEM_SLOTS_NUM + 2) * 16
MAX_DIGITS: Final = 20
MAX_LABEL: Final = 1024
MAX_PATH: Final = 4096
#: A temporary file of a killed writer is removed after this many seconds.
STALE_TEMP_SECONDS: Final = 10.0

_VALID_FLAGS: Final = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_LONG_NUMBER: Final = re.compile(rb"[0-9]{%d,}" % (MAX_DIGITS + 1))


def max_chunk_pages(page_size: int) -> int:
    """Pages one DATA chunk carries at most (2048 at 4 KiB, 128 at 64 KiB)."""
    return max(1, MAX_CHUNK_BYTES // page_size)


class SnapshotError(MemslotError, ValueError):
    """A snapshot that cannot be written, read or restored: truncated, corrupted, from another
    version, not a chain, or a file system that refused it. Always one line."""


def _crc_seed(version: int, snapshot_id: bytes) -> int:
    """The seed of every chunk CRC: the file's random id (version 2 on)."""
    return zlib.crc32(snapshot_id) if version >= 2 else 0


# --- records -------------------------------------------------------------------------------


@dataclass
class RegionRecord:
    """One region as a snapshot's layout records it, with what the file carries for it."""

    uid: int
    slot: int
    gpa: int
    size: int
    flags: int
    label: str
    backing: str
    complete: bool
    hva: int = 0
    align: int | None = None
    path: str | None = None
    data_pages: int = 0
    zero_pages: int = 0
    runs: int = 0
    page_size: int = PAGE_SIZE
    _last_page: int = field(default=-2, repr=False)

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def layout_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid, "slot": self.slot, "gpa": self.gpa, "size": self.size,
            "flags": self.flags, "label": self.label, "backing": self.backing,
            "complete": self.complete, "hva": self.hva, "align": self.align, "path": self.path,
        }

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_last_page")
        return out


@dataclass
class SnapshotInfo:
    """A snapshot file's header, layout and per-region statistics."""

    path: str
    version: int
    kind: str
    snapshot_id: bytes
    parent_id: bytes
    sequence: int
    created_ns: int
    page_size: int
    regions: list[RegionRecord]
    next_uid: int = 0
    chunks: int = 0
    file_size: int = 0

    @property
    def data_pages(self) -> int:
        return sum(r.data_pages for r in self.regions)

    @property
    def zero_pages(self) -> int:
        return sum(r.zero_pages for r in self.regions)

    @property
    def guest_pages(self) -> int:
        return sum(r.npages for r in self.regions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "version": self.version, "kind": self.kind,
            "snapshot_id": self.snapshot_id.hex(), "parent_id": self.parent_id.hex(),
            "sequence": self.sequence, "created_ns": self.created_ns,
            "page_size": self.page_size, "chunks": self.chunks, "file_size": self.file_size,
            "guest_pages": self.guest_pages, "data_pages": self.data_pages,
            "zero_pages": self.zero_pages, "regions": [r.as_dict() for r in self.regions],
        }


# --- writing -------------------------------------------------------------------------------


class _ChunkWriter:
    def __init__(self, fd: int, seed: int, page_size: int) -> None:
        self.fd = fd
        self.seed = seed
        self.page_size = page_size
        self.chunks = 0
        self.data_pages = 0
        self.zero_pages = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = os.write(self.fd, view)
            view = view[written:]

    def chunk(self, kind: int, *parts: bytes | memoryview) -> None:
        length = 0
        crc = self.seed
        for part in parts:
            length += memoryview(part).nbytes
            crc = zlib.crc32(part, crc)
        head = _CHUNK.pack(kind, 0, length, crc)
        self.write(head + struct.pack("<I", zlib.crc32(head, self.seed)))
        for part in parts:
            self.write(part)
        self.chunks += 1

    def pages(self, kind: int, index: int, first: int, span: int, rel: npt.NDArray[np.int64],
              data: npt.NDArray[np.uint8] | None) -> None:
        bitmap = pages_to_words(rel, span).tobytes()
        head = _PAGES.pack(index, 0, first, span, rel.size)
        if data is None:
            self.chunk(kind, head, bitmap)
            self.zero_pages += rel.size
        else:
            self.chunk(kind, head, bitmap, np.ascontiguousarray(data).data)
            self.data_pages += rel.size


def _region_pages(placed: Placed, page_size: int) -> npt.NDArray[np.uint8]:
    """The region's memory as a ``(npages, page_size)`` array (zero copy)."""
    flat = np.frombuffer(placed.buf, dtype=np.uint8)
    return flat.reshape(-1, page_size)


def data_extents(fd: int, size: int, page_size: int) -> list[tuple[int, int]]:
    """``[first_page, end_page)`` ranges of a file that may hold data (``SEEK_DATA`` /
    ``SEEK_HOLE``): the holes of a sparse memfd are never read, so never materialised."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == _errno.ENXIO:  # only a hole is left
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start // page_size, -(-end // page_size)))
            pos = end
    except OSError as exc:
        if exc.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP):
            raise
        return [(0, size // page_size)]  # no SEEK_DATA on this file system: read it all
    return out


_HOST_PAGE: Final = mmap.PAGESIZE
_PM_PRESENT_OR_SWAPPED: Final = np.uint64(3 << 62)


class _PageMap:
    """Which pages of anonymous memory were ever touched (``/proc/self/pagemap``: present or
    swapped). Untouched anonymous memory is zero: a snapshot need not read it, and reading it
    would map it."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def touched(self, address: int, first: int, span: int,
                page_size: int) -> list[tuple[int, int]] | None:
        """``[first_page, end_page)`` runs of guest pages ``[first, first + span)`` of the
        mapping at ``address`` with a touched host page; ``None`` when unknown."""
        if self.fd is None:
            return None
        per = page_size // _HOST_PAGE
        start = (address + first * page_size) // _HOST_PAGE
        try:
            raw = os.pread(self.fd, span * per * 8, start * 8)
        except OSError:
            return None
        if len(raw) != span * per * 8:
            return None
        entries = np.frombuffer(raw, dtype="<u8").reshape(span, per)
        touched = (entries & _PM_PRESENT_OR_SWAPPED).any(axis=1)
        pages = np.flatnonzero(touched).astype(np.int64) + first
        firsts, lengths = pages_to_runs(pages)
        return [(int(f), int(f + n)) for f, n in zip(firsts.tolist(), lengths.tolist(),
                                                        strict=True)]


def _nonzero_pages(mem: npt.NDArray[np.uint8], base: int, span: int,
                   extents: list[tuple[int, int]] | None) -> npt.NDArray[np.int64]:
    """Pages of ``[base, base + span)`` (relative to ``base``) that are not all zero, reading
    only the ``extents`` (``None``: all of them)."""
    if extents is None:
        window = mem[base : base + span].view(np.uint64)
        return np.flatnonzero(window.any(axis=1)).astype(np.int64)
    parts = []
    for lo, hi in extents:
        lo, hi = max(lo, base), min(hi, base + span)
        if lo < hi:
            found = np.flatnonzero(mem[lo:hi].view(np.uint64).any(axis=1))
            parts.append(found.astype(np.int64) + (lo - base))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _write_region(w: _ChunkWriter, index: int, placed: Placed,
                  pages: npt.NDArray[np.int64] | None, pagemap: _PageMap) -> None:
    """DATA chunks for the non-zero pages among ``pages`` (all pages when ``None``) and, for
    an incremental list, ZERO chunks for the zero ones. A whole region is read only where it
    may hold data: a memfd's or shared file's data extents, anonymous memory's touched pages."""
    page_size = w.page_size
    mem = _region_pages(placed, page_size)
    npages = mem.shape[0]
    per_chunk = max_chunk_pages(page_size)
    extents: list[tuple[int, int]] | None = None
    mapping = placed.region.mapping
    anonymous = mapping.fd is None
    if pages is None and not anonymous and not mapping.private:
        extents = data_extents(mapping.fd, placed.size, page_size)  # type: ignore[arg-type]
    for base in range(0, npages, WINDOW_PAGES):
        span = min(WINDOW_PAGES, npages - base)
        zero_rel: npt.NDArray[np.int64] | None = None
        if pages is None:
            window = extents
            if anonymous:
                window = pagemap.touched(mapping.address, base, span, page_size)
            if window is not None and not any(lo < base + span and hi > base
                                              for lo, hi in window):
                continue
            rel = _nonzero_pages(mem, base, span, window)
        else:
            lo, hi = np.searchsorted(pages, [base, base + span])
            if lo == hi:
                continue
            sel = pages[lo:hi] - base
            nonzero = mem[base + sel].view(np.uint64).any(axis=1)
            rel, zero_rel = sel[nonzero], sel[~nonzero]
        for start in range(0, rel.size, per_chunk):
            batch = rel[start : start + per_chunk]
            w.pages(CHUNK_DATA, index, base, span, batch, mem[base + batch])
        if zero_rel is not None and zero_rel.size:
            w.pages(CHUNK_ZERO, index, base, span, zero_rel, None)


def _record(placed: Placed, complete: bool, page_size: int) -> RegionRecord:
    r = placed.region
    m = r.mapping
    return RegionRecord(
        uid=r.uid, slot=r.slot, gpa=placed.start, size=placed.size, flags=placed.flags,
        label=r.label, backing=r.backing, complete=complete, hva=r.hva, align=m.align,
        path=m.path, page_size=page_size,
    )


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def remove_stale_temp_files(target: Path, *, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Remove temporary files that writers of ``target`` left when they were killed: a
    writer holds an exclusive ``flock`` on its file until it renames it, so a file nobody
    locks (and older than ``older_than`` seconds, past the instant between create and lock)
    is stale. Returns how many were removed."""
    directory = target.parent
    prefix = _temp_prefix(target)
    removed = 0
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return 0
    now = time.time()
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < older_than:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer
            current = os.lstat(path)
            if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
                removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _fs_error(target: Path, exc: OSError) -> SnapshotError:
    reason = exc.strerror or str(exc)
    return SnapshotError(f"{target}: cannot write the snapshot: {reason}")


def write_snapshot(access: SnapshotAccess, path: str | os.PathLike[str], *,
                   incremental: bool) -> SnapshotInfo:
    """``GuestMemory.snapshot``: harvest every region's snapshot bits, write the file under a
    new temporary name (``O_EXCL | O_NOFOLLOW``, random, locked while written), ``fsync`` it,
    rename it over ``path`` and ``fsync`` the directory; on failure the harvested bits are
    given back and the temporary file removed."""
    target = Path(path)
    page_size = access.page_size
    chain = access.chain
    with access.locked() as layout:
        if incremental and chain.id is None:
            raise SnapshotError("no earlier snapshot to be incremental to: take a full "
                                "snapshot (or restore a chain) first")
        remove_stale_temp_files(target)
        harvested: list[tuple[Placed, npt.NDArray[np.uint64]]] = []
        tmp = target.with_name(f"{_temp_prefix(target)}{secrets.token_hex(8)}.tmp")
        fd = -1
        try:
            for p in layout:
                harvested.append((p, access.harvest(p)))
            complete = [not incremental or access.untracked(p) for p in layout]
            records = [_record(p, c, page_size) for p, c in zip(layout, complete, strict=True)]
            snap_id = uuid.uuid4().bytes
            parent = chain.id if incremental and chain.id is not None else bytes(16)
            sequence = chain.seq + 1 if incremental else 0
            kind = KIND_INCREMENTAL if incremental else KIND_FULL
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                head = _HEADER.pack(MAGIC, FORMAT_VERSION, kind, page_size, snap_id, parent,
                                    sequence, time.time_ns())
                w = _ChunkWriter(fd, _crc_seed(FORMAT_VERSION, snap_id), page_size)
                w.write(head + struct.pack("<I", zlib.crc32(head)))
                layout_json = {"next_uid": access.next_uid,
                               "regions": [rec.layout_dict() for rec in records]}
                w.chunk(CHUNK_LAYOUT, json.dumps(layout_json, sort_keys=True).encode())
                pagemap = _PageMap()
                try:
                    for index, ((placed, words), full) in enumerate(
                        zip(harvested, complete, strict=True)
                    ):
                        _write_region(w, index, placed, None if full else bitmap_pages(words),
                                      pagemap)
                finally:
                    pagemap.close()
                w.chunk(CHUNK_END, _END.pack(w.chunks, w.data_pages, w.zero_pages))
                os.fsync(fd)
                os.replace(tmp, target)
                _fsync_directory(target.parent)
            except OSError as exc:
                raise _fs_error(target, exc) from exc
        except BaseException:
            for p, words in harvested:
                access.give_back(p, words)
            with contextlib.suppress(OSError):
                if fd >= 0:
                    tmp.unlink()
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        access.set_chain(snap_id, sequence)
        for p in layout:
            access.tracked_from_now(p)
    return read_info(target)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    except OSError as exc:  # pragma: no cover - some file systems cannot sync a directory
        if exc.errno not in (_errno.EINVAL, _errno.EBADF):
            raise
    finally:
        os.close(dfd)


# --- reading -------------------------------------------------------------------------------


class _Reader:
    """Sequential, bounded reading of one snapshot file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()
            self.size = os.fstat(self.f.fileno()).st_size
        except OSError as exc:
            raise SnapshotError(f"{self.path}: cannot open: {exc.strerror}") from None
        self.pos = 0
        self.seed = 0
        self.page_size = PAGE_SIZE

    def close(self) -> None:
        self.f.close()

    def fail(self, message: str) -> SnapshotError:
        return SnapshotError(f"{self.path}: {message}")

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file "
                            f"has {self.size - self.pos} left")
        try:
            data = self.f.read(n)
        except OSError as exc:
            raise self.fail(f"cannot read {what}: {exc.strerror}") from None
        if len(data) != n:
            raise self.fail(f"truncated while reading {what} (file changed?)")
        self.pos += n
        return data

    def header(self) -> tuple[int, int, bytes, bytes, int, int, int]:
        raw = self.read(HEADER_SIZE, "the header")
        if raw[:8] != MAGIC:
            raise self.fail("not a memslot snapshot (bad magic)")
        (crc,) = struct.unpack_from("<I", raw, _HEADER.size)
        if zlib.crc32(raw[: _HEADER.size]) != crc:
            raise self.fail("header checksum mismatch (corrupted)")
        _, version, kind, page_size, sid, parent, seq, created = _HEADER.unpack_from(raw)
        if version not in READ_VERSIONS:
            raise self.fail(f"format version {version}; this memslot reads versions "
                            f"{', '.join(map(str, READ_VERSIONS))}")
        if kind not in KIND_NAMES:
            raise self.fail(f"unknown snapshot kind {kind}")
        if (not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1)
                or (version == 1 and page_size != PAGE_SIZE)):
            raise self.fail(f"page size {page_size} is not one this format allows")
        if kind == KIND_FULL and (seq != 0 or parent != bytes(16)):
            raise self.fail("a full snapshot with a parent")
        self.seed = _crc_seed(version, sid)
        self.page_size = page_size
        return version, kind, sid, parent, seq, created, page_size

    def chunks(self) -> Iterator[tuple[int, int, bytes]]:
        """``(type, offset, payload)`` for every chunk, END last; checks bounds and CRCs."""
        pages_limit = (_PAGES.size + WINDOW_PAGES // 8
                       + max_chunk_pages(self.page_size) * self.page_size)
        while True:
            offset = self.pos
            raw = self.read(CHUNK_HEADER_SIZE, "a chunk header")
            kind, flags, length, crc = _CHUNK.unpack_from(raw)
            (hcrc,) = struct.unpack_from("<I", raw, _CHUNK.size)
            if zlib.crc32(raw[: _CHUNK.size], self.seed) != hcrc:
                raise self.fail(f"chunk header at offset {offset}: checksum mismatch "
                                "(corrupted, or from another file)")
            if kind not in CHUNK_NAMES or flags:
                raise self.fail(f"chunk at offset {offset}: unknown type {kind} / flags {flags}")
            limit = {CHUNK_LAYOUT: MAX_LAYOUT_BYTES, CHUNK_END: _END.size}.get(kind, pages_limit)
            if length > limit:
                raise self.fail(f"{CHUNK_NAMES[kind]} chunk at offset {offset} claims {length} "
                                f"bytes, more than the format allows ({limit})")
            payload = self.read(length, f"the {CHUNK_NAMES[kind]} chunk at offset {offset}")
            if zlib.crc32(payload, self.seed) != crc:
                raise self.fail(f"{CHUNK_NAMES[kind]} chunk at offset {offset}: checksum "
                                "mismatch (corrupted, or from another file)")
            if kind == CHUNK_END and self.pos != self.size:
                raise self.fail(f"{self.size - self.pos} bytes after the END chunk")
            yield kind, offset, payload
            if kind == CHUNK_END:
                return


def _int(d: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SnapshotError(f"{where}: {key}={value!r} is not an integer in [{lo}, {hi}]")
    return value


def _check_layout_shape(payload: bytes, where: str) -> None:
    """Bound what parsing the layout can cost before parsing it: nesting depth, number of
    values, digits of a number (the strings' contents are left out of the count)."""
    bare = _STRING.sub(b'""', payload)
    if _LONG_NUMBER.search(bare):
        raise SnapshotError(f"{where}: a number with more than {MAX_DIGITS} digits")
    arr = np.frombuffer(bare, dtype=np.uint8)
    opens = (arr == ord("{")) | (arr == ord("["))
    closes = (arr == ord("}")) | (arr == ord("]"))
    if opens.any():
        depth = int(np.cumsum(opens.astype(np.int64) - closes.astype(np.int64)).max())
        if depth > MAX_LAYOUT_DEPTH:
            raise SnapshotError(f"{where}: layout nested {depth} deep (at most "
                                f"{MAX_LAYOUT_DEPTH})")
    values = int(opens.sum()) + int(np.count_nonzero(arr == ord(",")))
    if values > MAX_LAYOUT_VALUES:
        raise SnapshotError(f"{where}: layout has {values} values (at most {MAX_LAYOUT_VALUES})")


def _parse_layout(payload: bytes, where: str,
                  page_size: int) -> tuple[list[RegionRecord], int]:
    _check_layout_shape(payload, where)
    try:
        layout = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SnapshotError(f"{where}: layout is not valid JSON ({reason})") from None
    if not isinstance(layout, dict) or not isinstance(layout.get("regions"), list):
        raise SnapshotError(f"{where}: layout has no region list")
    items = layout["regions"]
    if len(items) > KVM_MEM_SLOTS_NUM:
        raise SnapshotError(f"{where}: {len(items)} regions, more than {KVM_MEM_SLOTS_NUM}")
    out: list[RegionRecord] = []
    for i, item in enumerate(items):
        w = f"{where}: region {i}"
        if not isinstance(item, dict):
            raise SnapshotError(f"{w} is not an object")
        size = _int(item, "size", page_size, KVM_MEM_MAX_NR_PAGES * page_size, w)
        gpa = _int(item, "gpa", 0, GPA_LIMIT - size, w)
        if size % page_size or gpa % page_size:
            raise SnapshotError(f"{w}: gpa/size not aligned to the page size {page_size}")
        flags = _int(item, "flags", 0, _VALID_FLAGS, w)
        align = item.get("align")
        if align is not None:
            align = _int(item, "align", PAGE_SIZE, 1 << 62, w)
            if align & (align - 1):
                raise SnapshotError(f"{w}: align {align} is not a power of two")
        label, backing, path = item.get("label"), item.get("backing"), item.get("path")
        if not isinstance(label, str) or len(label) > MAX_LABEL:
            raise SnapshotError(f"{w}: bad label")
        if backing not in ("anon", "memfd", "file"):
            raise SnapshotError(f"{w}: bad backing {str(backing)[:40]!r}")
        if path is not None and (not isinstance(path, str) or len(path) > MAX_PATH):
            raise SnapshotError(f"{w}: bad path")
        if not isinstance(item.get("complete"), bool):
            raise SnapshotError(f"{w}: 'complete' is not a boolean")
        out.append(RegionRecord(
            uid=_int(item, "uid", 0, GPA_LIMIT - 1, w),
            slot=_int(item, "slot", 0, KVM_MEM_SLOTS_NUM - 1, w),
            gpa=gpa, size=size, flags=flags, label=label, backing=backing,
            complete=item["complete"], hva=_int(item, "hva", 0, GPA_LIMIT - 1, w),
            align=align, path=path, page_size=page_size,
        ))
    ordered = sorted(out, key=lambda r: r.gpa)
    for a, b in itertools.pairwise(ordered):
        if a.gpa + a.size > b.gpa:
            raise SnapshotError(f"{where}: regions uid {a.uid} and {b.uid} overlap")
    if len({r.uid for r in out}) != len(out) or len({r.slot for r in out}) != len(out):
        raise SnapshotError(f"{where}: duplicate region uid or slot")
    next_uid = layout.get("next_uid", 0)
    if (not isinstance(next_uid, int) or isinstance(next_uid, bool) or next_uid >= GPA_LIMIT
            or next_uid < max((r.uid + 1 for r in out), default=0)):
        raise SnapshotError(f"{where}: bad next_uid")
    return out, next_uid


def _parse_pages(payload: bytes, kind: int, regions: list[RegionRecord], where: str,
                 page_size: int) -> tuple[RegionRecord, int, npt.NDArray[np.int64], int]:
    """Check a DATA/ZERO payload against the layout: ``(region, first, rel pages, offset of
    the page bytes)``."""
    if len(payload) < _PAGES.size:
        raise SnapshotError(f"{where}: payload too short")
    index, reserved, first, span, count = _PAGES.unpack_from(payload)
    if index >= len(regions) or reserved:
        raise SnapshotError(f"{where}: region index {index} not in the layout")
    region = regions[index]
    if not 0 < span <= WINDOW_PAGES or first + span > region.npages:
        raise SnapshotError(f"{where}: pages [{first}, +{span}) outside region uid "
                            f"{region.uid} ({region.npages} pages)")
    nbytes = nwords(span) * 8
    per_page = page_size if kind == CHUNK_DATA else 0
    limit = max_chunk_pages(page_size)
    if kind == CHUNK_DATA and count > limit:
        raise SnapshotError(f"{where}: {count} pages in one chunk (at most {limit})")
    if len(payload) != _PAGES.size + nbytes + count * per_page:
        raise SnapshotError(f"{where}: payload length {len(payload)} does not match "
                            f"{count} pages")
    words = np.frombuffer(payload, dtype="<u8", count=nwords(span), offset=_PAGES.size)
    if popcount(words) != count:
        raise SnapshotError(f"{where}: bitmap has {popcount(words)} pages, header says {count}")
    rel = bitmap_pages(words)
    if rel.size and rel[-1] >= span:
        raise SnapshotError(f"{where}: bitmap bits past the chunk's span")
    return region, first, rel, _PAGES.size + nbytes


def _count_runs(record: RegionRecord, pages: npt.NDArray[np.int64]) -> None:
    firsts, _ = pages_to_runs(pages)
    runs = firsts.size
    if runs and int(firsts[0]) == record._last_page + 1:
        runs -= 1
    record.runs += runs
    if pages.size:
        record._last_page = int(pages[-1])


Apply = Callable[[int, RegionRecord, npt.NDArray[np.int64], bytes, int], None]


def _scan(reader: _Reader, apply: Apply | None = None) -> SnapshotInfo:
    version, kind, sid, parent, seq, created, page_size = reader.header()
    regions: list[RegionRecord] | None = None
    next_uid = 0
    totals = [0, 0]
    for chunks, (ckind, offset, payload) in enumerate(reader.chunks()):
        where = f"{reader.path}: {CHUNK_NAMES[ckind]} chunk at offset {offset}"
        if ckind == CHUNK_LAYOUT:
            if regions is not None:
                raise SnapshotError(f"{where}: a second layout")
            regions, next_uid = _parse_layout(payload, where, page_size)
        elif regions is None:
            raise SnapshotError(f"{where}: comes before the layout")
        elif ckind == CHUNK_END:
            expect = _END.unpack(payload)
            if expect != (chunks, totals[0], totals[1]):
                raise SnapshotError(f"{where}: END counts {expect} do not match the file "
                                    f"({chunks}, {totals[0]}, {totals[1]})")
            info = SnapshotInfo(reader.path, version, KIND_NAMES[kind], sid, parent, seq,
                                created, page_size, regions, next_uid, chunks, reader.size)
            return info
        else:
            record, first, rel, data_at = _parse_pages(payload, ckind, regions, where,
                                                       page_size)
            if ckind == CHUNK_DATA:
                record.data_pages += rel.size
                totals[0] += rel.size
            else:
                record.zero_pages += rel.size
                totals[1] += rel.size
            _count_runs(record, first + rel)
            if apply is not None:
                apply(ckind, record, first + rel, payload, data_at)
    raise SnapshotError(f"{reader.path}: no END chunk")  # pragma: no cover - chunks() raises


def read_info(path: str | os.PathLike[str]) -> SnapshotInfo:
    """Read and verify a whole snapshot file (every checksum and bound): its header, layout
    and per-region statistics. Raises :class:`SnapshotError`."""
    reader = _Reader(path)
    try:
        return _scan(reader)
    finally:
        reader.close()


def verify_chain(infos: list[SnapshotInfo]) -> None:
    """Check that ``infos`` is a full snapshot followed by its incremental ones, in order,
    and that every region of the last layout has its complete base in the chain."""
    if not infos:
        raise SnapshotError("no snapshot given")
    if infos[0].kind != "full":
        raise SnapshotError(f"{infos[0].path}: a chain starts with a full snapshot, this one "
                            f"is incremental (sequence {infos[0].sequence})")
    sizes: dict[int, int] = {}
    for prev, cur in itertools.pairwise(infos):
        if cur.kind != "incremental":
            raise SnapshotError(f"{cur.path}: a full snapshot inside a chain")
        if cur.parent_id != prev.snapshot_id or cur.sequence != prev.sequence + 1:
            raise SnapshotError(
                f"{cur.path}: its parent is {cur.parent_id.hex()} (sequence "
                f"{cur.sequence - 1}), not {prev.path} ({prev.snapshot_id.hex()}, sequence "
                f"{prev.sequence}): wrong order or a file from another chain"
            )
        if cur.page_size != prev.page_size:
            raise SnapshotError(f"{cur.path}: page size {cur.page_size}, the chain's is "
                                f"{prev.page_size}")
    present: dict[int, int] = {}
    for i, info in enumerate(infos):
        for r in info.regions:
            if sizes.setdefault(r.uid, r.size) != r.size:
                raise SnapshotError(f"{info.path}: region uid {r.uid} changed size")
            if r.uid not in present:
                if not r.complete:
                    raise SnapshotError(f"{info.path}: region uid {r.uid} first appears "
                                        "without its complete contents (missing base)")
                present[r.uid] = i
            elif present[r.uid] != i - 1:
                raise SnapshotError(f"{info.path}: region uid {r.uid} reappears")
            else:
                present[r.uid] = i


# --- restoring -----------------------------------------------------------------------------


class _Written:
    """Per region, the pages a restore has written so far (only those can be non-zero:
    fresh memory is zero), kept sparse per window so that its cost follows the data."""

    def __init__(self) -> None:
        self.windows: dict[int, dict[int, npt.NDArray[np.bool_]]] = {}

    def mark(self, uid: int, pages: npt.NDArray[np.int64]) -> None:
        per_region = self.windows.setdefault(uid, {})
        for w in np.unique(pages // WINDOW_PAGES).tolist():
            sel = pages[(pages // WINDOW_PAGES) == w] % WINDOW_PAGES
            per_region.setdefault(w, np.zeros(WINDOW_PAGES, dtype=bool))[sel] = True

    def take(self, uid: int, pages: npt.NDArray[np.int64] | None) -> npt.NDArray[np.int64]:
        """Of ``pages`` (all when ``None``), those written so far; they are forgotten."""
        per_region = self.windows.get(uid)
        if not per_region:
            return np.empty(0, dtype=np.int64)
        if pages is None:
            out = [np.flatnonzero(bits).astype(np.int64) + w * WINDOW_PAGES
                   for w, bits in sorted(per_region.items())]
            per_region.clear()
            return np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        keep = []
        for w in np.unique(pages // WINDOW_PAGES).tolist():
            bits = per_region.get(w)
            if bits is None:
                continue
            sel = pages[(pages // WINDOW_PAGES) == w]
            hit = sel[bits[sel % WINDOW_PAGES]]
            bits[hit % WINDOW_PAGES] = False
            keep.append(hit)
        return np.concatenate(keep) if keep else np.empty(0, dtype=np.int64)


def restore_snapshot(access: SnapshotAccess, paths: list[str | os.PathLike[str]]) -> None:
    """``GuestMemory.restore`` into the empty GuestMemory behind ``access``: verify the
    whole chain, build the last layout (recorded slot ids where they are free, the lowest
    free ids for the others), apply the files in order. The caller closes it on failure."""
    infos = [read_info(p) for p in paths]
    verify_chain(infos)
    final = infos[-1]
    if final.page_size != access.page_size:
        raise SnapshotError(f"{final.path}: page size {final.page_size}, the VM's is "
                            f"{access.page_size}")
    try:
        slots = access.plan_slots([rec.slot for rec in final.regions])
    except LayoutError as exc:
        raise SnapshotError(f"{final.path}: cannot rebuild the layout: {exc}") from None
    by_uid: dict[int, Placed] = {}
    for rec, slot in zip(final.regions, slots, strict=True):
        backing = rec.backing if rec.backing in ("anon", "memfd") else "anon"
        try:
            by_uid[rec.uid] = access.add(rec.gpa, rec.size, flags=rec.flags, backing=backing,
                                         align=rec.align, label=rec.label, slot=slot,
                                         uid=rec.uid)
        except LayoutError as exc:
            raise SnapshotError(f"{final.path}: cannot rebuild region uid {rec.uid}: "
                                f"{exc}") from None
        except KvmError:
            raise
        except OSError as exc:  # no memory for the mapping, a file system refusing a memfd
            raise SnapshotError(f"{final.path}: cannot map region uid {rec.uid}: "
                                f"{exc.strerror or exc}") from None
    access.next_uid = final.next_uid
    written = _Written()
    page_size = access.page_size
    for info in infos:
        for rec in info.regions:
            target = by_uid.get(rec.uid)
            if rec.complete and target is not None:
                stale = written.take(rec.uid, None)  # a new base: only written pages matter
                if stale.size:
                    _region_pages(target, page_size)[stale] = 0
        _apply_file(info, by_uid, written, page_size)
    access.set_chain(final.snapshot_id, final.sequence)
    for placed in by_uid.values():
        access.tracked_from_now(placed)


def _apply_file(info: SnapshotInfo, by_uid: dict[int, Placed], written: _Written,
                page_size: int) -> None:
    def apply(kind: int, record: RegionRecord, pages: npt.NDArray[np.int64], payload: bytes,
              data_at: int) -> None:
        target = by_uid.get(record.uid)
        if target is None:
            return
        mem = _region_pages(target, page_size)
        if kind == CHUNK_DATA:
            data = np.frombuffer(payload, dtype=np.uint8, offset=data_at)
            mem[pages] = data.reshape(pages.size, page_size)
            written.mark(record.uid, pages)
        else:  # zero only what this restore wrote: the rest is still fresh, zero memory
            stale = written.take(record.uid, pages)
            if stale.size:
                mem[stale] = 0

    reader = _Reader(info.path)
    try:
        again = _scan(reader, apply)
    finally:
        reader.close()
    if again.snapshot_id != info.snapshot_id:
        raise SnapshotError(f"{info.path}: the file changed during the restore")

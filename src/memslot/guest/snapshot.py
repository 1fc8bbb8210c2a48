"""Guest-memory snapshots: format, writer, reader, restore and the summary ``snapshot-info``
prints. The format (version 1) is described in docs/snapshot-format.md:

    header (64 bytes)  magic "MSLTSNAP", version, kind, page size, id, parent id, sequence,
                       creation time, CRC-32 of the header
    chunks             24-byte chunk header (type, flags, length, payload CRC-32, header
                       CRC-32) + payload: one LAYOUT (JSON), DATA / ZERO chunks (a window of
                       at most 32768 pages of one region: a bitmap of the pages carried, then
                       their bytes for DATA), and END (counts) last.

Every length is checked against the limits the layout allows before anything is allocated,
every chunk against its CRC, and a file must end exactly after END. A restore reads and checks
every file of the chain before it creates anything, and removes what it created on any error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from ..backends.base import VM
from ..constants import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    PAGE_SIZE,
)
from ..errors import MemslotError
from .address import GPA_LIMIT, GuestRegion, LayoutError
from .dirty import (
    CONSUMER_SNAPSHOT,
    bitmap_pages,
    nwords,
    pages_to_runs,
    pages_to_words,
    popcount,
)

if TYPE_CHECKING:
    from .memory import GuestMemory

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
FORMAT_VERSION: Final = 1
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

#: Pages a DATA/ZERO chunk's bitmap spans, and pages a DATA chunk carries, at most.
WINDOW_PAGES: Final = 32768
MAX_CHUNK_PAGES: Final = 2048
MAX_LAYOUT_BYTES: Final = 64 << 20
MAX_LABEL: Final = 1024
_MAX_PAGES_PAYLOAD: Final = _PAGES.size + WINDOW_PAGES // 8 + MAX_CHUNK_PAGES * PAGE_SIZE

_VALID_FLAGS: Final = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


class SnapshotError(MemslotError, ValueError):
    """A snapshot that cannot be written, read or restored: truncated, corrupted, from another
    version, or not a chain."""


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
    _last_page: int = field(default=-2, repr=False)

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

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
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.chunks = 0
        self.data_pages = 0
        self.zero_pages = 0

    def chunk(self, kind: int, *parts: bytes | memoryview) -> None:
        length = 0
        crc = 0
        for part in parts:
            length += memoryview(part).nbytes
            crc = zlib.crc32(part, crc)
        head = _CHUNK.pack(kind, 0, length, crc)
        self.f.write(head + struct.pack("<I", zlib.crc32(head)))
        for part in parts:
            self.f.write(part)
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


def _region_pages(region: GuestRegion) -> npt.NDArray[np.uint8]:
    """The region's memory as a ``(npages, PAGE_SIZE)`` array (zero copy)."""
    flat = np.frombuffer(region.mapping.buffer, dtype=np.uint8)
    return flat.reshape(region.npages, PAGE_SIZE)


def _write_region(w: _ChunkWriter, index: int, region: GuestRegion,
                  pages: npt.NDArray[np.int64] | None) -> None:
    """DATA chunks for the non-zero pages among ``pages`` (all pages when ``None``) and, for
    an incremental list, ZERO chunks for the zero ones."""
    mem = _region_pages(region)
    npages = region.npages
    for base in range(0, npages, WINDOW_PAGES):
        span = min(WINDOW_PAGES, npages - base)
        if pages is None:
            window = mem[base : base + span].view(np.uint64)
            rel = np.flatnonzero(window.any(axis=1)).astype(np.int64)
            zero_rel: npt.NDArray[np.int64] | None = None
        else:
            lo, hi = np.searchsorted(pages, [base, base + span])
            if lo == hi:
                continue
            sel = pages[lo:hi] - base
            nonzero = mem[base + sel].view(np.uint64).any(axis=1)
            rel, zero_rel = sel[nonzero], sel[~nonzero]
        for start in range(0, rel.size, MAX_CHUNK_PAGES):
            batch = rel[start : start + MAX_CHUNK_PAGES]
            w.pages(CHUNK_DATA, index, base, span, batch, mem[base + batch])
        if zero_rel is not None and zero_rel.size:
            w.pages(CHUNK_ZERO, index, base, span, zero_rel, None)


def _record(region: GuestRegion, complete: bool) -> RegionRecord:
    m = region.mapping
    return RegionRecord(
        uid=region.uid, slot=region.slot, gpa=region._gpa, size=region.size,
        flags=region.flags, label=region.label, backing=region.backing, complete=complete,
        hva=region.hva, align=m.align, path=m.path,
    )


def write_snapshot(gm: GuestMemory, path: str | os.PathLike[str], *,
                   incremental: bool) -> SnapshotInfo:
    """``GuestMemory.snapshot``: harvest every region's snapshot bits, write the file under a
    temporary name and rename it; on failure the harvested bits are given back."""
    target = Path(path)
    with gm._lock:
        gm._check_open()
        if incremental and gm._snap_id is None:
            raise SnapshotError("no earlier snapshot to be incremental to: take a full "
                                "snapshot (or restore a chain) first")
        gm._add_consumer(CONSUMER_SNAPSHOT)
        regions = gm.regions()
        harvested: list[tuple[GuestRegion, npt.NDArray[np.uint64]]] = []
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            for r in regions:
                harvested.append((r, gm._harvest(r, CONSUMER_SNAPSHOT).words))
            complete = [
                not incremental or r._untracked or not (r.log_dirty or r.readonly)
                for r in regions
            ]
            records = [_record(r, c) for r, c in zip(regions, complete, strict=True)]
            snap_id = uuid.uuid4().bytes
            parent = gm._snap_id if incremental and gm._snap_id is not None else bytes(16)
            sequence = gm._snap_seq + 1 if incremental else 0
            kind = KIND_INCREMENTAL if incremental else KIND_FULL
            created = time.time_ns()
            with open(tmp, "wb") as f:
                head = _HEADER.pack(MAGIC, FORMAT_VERSION, kind, PAGE_SIZE, snap_id, parent,
                                    sequence, created)
                f.write(head + struct.pack("<I", zlib.crc32(head)))
                w = _ChunkWriter(f)
                layout = {"next_uid": gm._next_uid,
                          "regions": [rec.layout_dict() for rec in records]}
                w.chunk(CHUNK_LAYOUT, json.dumps(layout, sort_keys=True).encode())
                for index, ((region, words), full) in enumerate(
                    zip(harvested, complete, strict=True)
                ):
                    _write_region(w, index, region, None if full else bitmap_pages(words))
                w.chunk(CHUNK_END, _END.pack(w.chunks, w.data_pages, w.zero_pages))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            for r, words in harvested:
                with r._dirty.lock:
                    r._dirty.give_back(CONSUMER_SNAPSHOT, words)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        gm._snap_id = snap_id
        gm._snap_seq = sequence
        for r in regions:
            if r.log_dirty or r.readonly:
                r._untracked = False
    return read_info(target)


# --- reading -------------------------------------------------------------------------------


class _Reader:
    """Sequential, bounded reading of one snapshot file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise SnapshotError(f"{self.path}: cannot open: {exc.strerror}") from None
        self.size = os.fstat(self.f.fileno()).st_size
        self.pos = 0

    def close(self) -> None:
        self.f.close()

    def fail(self, message: str) -> SnapshotError:
        return SnapshotError(f"{self.path}: {message}")

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file "
                            f"has {self.size - self.pos} left")
        data = self.f.read(n)
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
        if version != FORMAT_VERSION:
            raise self.fail(f"format version {version}; this memslot reads version "
                            f"{FORMAT_VERSION}")
        if kind not in KIND_NAMES:
            raise self.fail(f"unknown snapshot kind {kind}")
        if page_size != PAGE_SIZE:
            raise self.fail(f"page size {page_size}, expected {PAGE_SIZE}")
        if kind == KIND_FULL and (seq != 0 or parent != bytes(16)):
            raise self.fail("a full snapshot with a parent")
        return version, kind, sid, parent, seq, created, page_size

    def chunks(self) -> Iterator[tuple[int, int, bytes]]:
        """``(type, offset, payload)`` for every chunk, END last; checks bounds and CRCs."""
        while True:
            offset = self.pos
            raw = self.read(CHUNK_HEADER_SIZE, "a chunk header")
            kind, flags, length, crc = _CHUNK.unpack_from(raw)
            (hcrc,) = struct.unpack_from("<I", raw, _CHUNK.size)
            if zlib.crc32(raw[: _CHUNK.size]) != hcrc:
                raise self.fail(f"chunk header at offset {offset}: checksum mismatch (corrupted)")
            if kind not in CHUNK_NAMES or flags:
                raise self.fail(f"chunk at offset {offset}: unknown type {kind} / flags {flags}")
            limit = {CHUNK_LAYOUT: MAX_LAYOUT_BYTES, CHUNK_END: _END.size}.get(
                kind, _MAX_PAGES_PAYLOAD)
            if length > limit:
                raise self.fail(f"{CHUNK_NAMES[kind]} chunk at offset {offset} claims {length} "
                                f"bytes, more than the format allows ({limit})")
            payload = self.read(length, f"the {CHUNK_NAMES[kind]} chunk at offset {offset}")
            if zlib.crc32(payload) != crc:
                raise self.fail(f"{CHUNK_NAMES[kind]} chunk at offset {offset}: checksum "
                                "mismatch (corrupted)")
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


def _parse_layout(payload: bytes, where: str) -> tuple[list[RegionRecord], int]:
    try:
        layout = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{where}: layout is not valid JSON ({exc})") from None
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
        size = _int(item, "size", PAGE_SIZE, KVM_MEM_MAX_NR_PAGES * PAGE_SIZE, w)
        gpa = _int(item, "gpa", 0, GPA_LIMIT - size, w)
        if size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise SnapshotError(f"{w}: gpa/size not page aligned")
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
            raise SnapshotError(f"{w}: bad backing {backing!r}")
        if path is not None and not isinstance(path, str):
            raise SnapshotError(f"{w}: bad path")
        if not isinstance(item.get("complete"), bool):
            raise SnapshotError(f"{w}: 'complete' is not a boolean")
        out.append(RegionRecord(
            uid=_int(item, "uid", 0, GPA_LIMIT - 1, w),
            slot=_int(item, "slot", 0, KVM_MEM_SLOTS_NUM - 1, w),
            gpa=gpa, size=size, flags=flags, label=label, backing=backing,
            complete=item["complete"], hva=_int(item, "hva", 0, GPA_LIMIT - 1, w),
            align=align, path=path,
        ))
    ordered = sorted(out, key=lambda r: r.gpa)
    for a, b in itertools.pairwise(ordered):
        if a.gpa + a.size > b.gpa:
            raise SnapshotError(f"{where}: regions uid {a.uid} and {b.uid} overlap")
    if len({r.uid for r in out}) != len(out) or len({r.slot for r in out}) != len(out):
        raise SnapshotError(f"{where}: duplicate region uid or slot")
    next_uid = layout.get("next_uid", 0)
    if not isinstance(next_uid, int) or next_uid < max((r.uid + 1 for r in out), default=0):
        raise SnapshotError(f"{where}: bad next_uid")
    return out, next_uid


def _parse_pages(payload: bytes, kind: int, regions: list[RegionRecord],
                 where: str) -> tuple[RegionRecord, int, npt.NDArray[np.int64], int]:
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
    per_page = PAGE_SIZE if kind == CHUNK_DATA else 0
    if kind == CHUNK_DATA and count > MAX_CHUNK_PAGES:
        raise SnapshotError(f"{where}: {count} pages in one chunk (at most {MAX_CHUNK_PAGES})")
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


def _scan(reader: _Reader, apply: Any = None) -> SnapshotInfo:
    version, kind, sid, parent, seq, created, page_size = reader.header()
    regions: list[RegionRecord] | None = None
    next_uid = 0
    totals = [0, 0]
    for chunks, (ckind, offset, payload) in enumerate(reader.chunks()):
        where = f"{reader.path}: {CHUNK_NAMES[ckind]} chunk at offset {offset}"
        if ckind == CHUNK_LAYOUT:
            if regions is not None:
                raise SnapshotError(f"{where}: a second layout")
            regions, next_uid = _parse_layout(payload, where)
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
            record, first, rel, data_at = _parse_pages(payload, ckind, regions, where)
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


def restore_snapshot(cls: type[GuestMemory], paths: list[str | os.PathLike[str]], vm: VM, *,
                     manual_protect: bool) -> GuestMemory:
    """``GuestMemory.restore``: verify the whole chain, build the last layout on ``vm``, apply
    the files in order; on any failure close what was built and raise."""
    infos = [read_info(p) for p in paths]
    verify_chain(infos)
    final = infos[-1]
    gm = cls(vm, manual_protect=manual_protect)
    try:
        for rec in sorted(final.regions, key=lambda r: r.slot):
            backing = rec.backing if rec.backing in ("anon", "memfd") else "anon"
            usable = rec.slot < gm.nr_slots and rec.slot not in gm._foreign
            wanted = rec.slot if usable else None
            try:
                gm._add(rec.gpa, rec.size, readonly=bool(rec.flags & KVM_MEM_READONLY),
                        log_dirty=bool(rec.flags & KVM_MEM_LOG_DIRTY_PAGES), backing=backing,
                        align=rec.align, label=rec.label, slot=wanted, uid=rec.uid)
            except LayoutError as exc:
                raise SnapshotError(f"{final.path}: cannot rebuild region uid {rec.uid}: "
                                    f"{exc}") from exc
        gm._next_uid = max(gm._next_uid, final.next_uid)
        by_uid = {r.uid: r for r in gm.regions()}
        written: set[int] = set()
        for info in infos:
            for rec in info.regions:
                target = by_uid.get(rec.uid)
                if rec.complete and target is not None and rec.uid in written:
                    _region_pages(target)[:] = 0
            _apply_file(info, by_uid, written)
        gm._add_consumer(CONSUMER_SNAPSHOT)
        gm._snap_id = final.snapshot_id
        gm._snap_seq = final.sequence
        for r in gm.regions():
            r._untracked = not (r.log_dirty or r.readonly)
    except BaseException:
        gm.close()
        raise
    return gm


def _apply_file(info: SnapshotInfo, by_uid: dict[int, GuestRegion], written: set[int]) -> None:
    def apply(kind: int, record: RegionRecord, pages: npt.NDArray[np.int64], payload: bytes,
              data_at: int) -> None:
        target = by_uid.get(record.uid)
        if target is None:
            return
        mem = _region_pages(target)
        if kind == CHUNK_DATA:
            data = np.frombuffer(payload, dtype=np.uint8, offset=data_at)
            mem[pages] = data.reshape(pages.size, PAGE_SIZE)
        else:
            mem[pages] = 0
        written.add(record.uid)

    reader = _Reader(info.path)
    try:
        again = _scan(reader, apply)
    finally:
        reader.close()
    if again.snapshot_id != info.snapshot_id:
        raise SnapshotError(f"{info.path}: the file changed during the restore")

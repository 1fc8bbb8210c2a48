"""Dirty-page tracking per region: the kernel's log (``KVM_GET_DIRTY_LOG``, or GET + CLEAR
with manual protect) combined with a host-side bitmap of the writes made through
:class:`~memslot.guest.GuestMemory` (device emulation writes the kernel never sees).

Bitmaps are little-endian ``uint64`` words, bit ``i`` = page ``i`` of the region, the layout
KVM uses. Each region has a lock: a host write copies its data *then* sets its bits under the
lock, and a harvest swaps the host bitmap and fetches the kernel log under the same lock, so a
write is either wholly in a harvest (data and bit) or wholly in the next one: nothing written
between harvest and reset is lost.

Several consumers read the same log without stealing from each other (the caller of
``dirty_pages`` and the incremental snapshots): a harvest folds the fresh bits into every
consumer's pending bitmap and hands one consumer its own.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from ..constants import PAGE_SHIFT

__all__ = [
    "CONSUMER_SNAPSHOT",
    "CONSUMER_USER",
    "DirtyBitmap",
    "DirtySet",
    "DirtyTracker",
    "bitmap_pages",
    "pages_to_runs",
    "popcount",
]

Words = npt.NDArray[np.uint64]
Pages = npt.NDArray[np.int64]

CONSUMER_USER: Final = "user"
CONSUMER_SNAPSHOT: Final = "snapshot"

_ONE: Final = np.uint64(1)
_ALL: Final = np.uint64((1 << 64) - 1)


def nwords(npages: int) -> int:
    return (npages + 63) >> 6


_CHUNK_WORDS: Final = 1 << 16


def _set_bits(words: Words) -> Pages:
    """Set-bit indexes of a chunk of words, ascending: one lowest-set-bit extraction per
    pass, over the words that still have bits (so the cost follows the dirty pages)."""
    nz = np.flatnonzero(words)
    if nz.size == 0:
        return np.empty(0, dtype=np.int64)
    v = words[nz]
    counts = np.bitwise_count(v).astype(np.int64)
    ends = np.cumsum(counts)
    out = np.empty(int(ends[-1]), dtype=np.int64)
    pos = ends - counts  # where each word's first bit goes; later bits follow in order
    base = nz.astype(np.int64) << 6
    while True:
        lowest = v & (~v + _ONE)
        _, exponent = np.frexp(lowest.astype(np.float64))  # exact: a power of two
        out[pos] = base + (exponent - 1)
        v &= v - _ONE
        keep = np.flatnonzero(v)
        if keep.size == 0:
            return out
        if keep.size < v.size:
            v, pos, base = v[keep], pos[keep], base[keep]
        pos += 1


def _set_bits_unpack(words: Words) -> Pages:  # numpy < 2.0 (no bitwise_count)
    nz = np.flatnonzero(words)
    if nz.size == 0:
        return np.empty(0, dtype=np.int64)
    sub = words[nz].view(np.uint8)
    nzb = np.flatnonzero(sub)
    bits = np.unpackbits(sub[nzb], bitorder="little")
    idx = np.flatnonzero(bits)
    byte = nzb[idx >> 3]
    pages: Pages = (nz[byte >> 3] << 6) + ((byte & 7) << 3) + (idx & 7)
    return pages


def bitmap_pages(words: Words) -> Pages:
    """Indexes of the set bits of a word bitmap, ascending, at a cost that follows the set
    bits (chunks of words keep the temporaries in cache)."""
    extract = _set_bits if hasattr(np, "bitwise_count") else _set_bits_unpack
    if words.size <= _CHUNK_WORDS:
        return extract(words)
    parts = [extract(words[s : s + _CHUNK_WORDS]) + (s << 6)
             for s in range(0, words.size, _CHUNK_WORDS)]
    return np.concatenate(parts)


def popcount(words: Words) -> int:
    """Number of set bits."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(words).sum(dtype=np.int64))
    return int(np.unpackbits(words.view(np.uint8)).sum(dtype=np.int64))  # numpy < 2.0


def pages_to_runs(pages: Pages) -> tuple[Pages, Pages]:
    """Sorted page indexes -> ``(first_pages, lengths)`` of the maximal runs."""
    if pages.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy()
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return pages[starts].astype(np.int64), (ends - starts).astype(np.int64)


def pages_to_words(pages: npt.NDArray[np.integer], npages: int) -> Words:
    """The word bitmap with ``pages`` set."""
    words = np.zeros(nwords(npages), dtype=np.uint64)
    p = np.asarray(pages, dtype=np.int64)
    np.bitwise_or.at(words, p >> 6, np.left_shift(_ONE, (p & 63).astype(np.uint64)))
    return words


def set_range(words: Words, first: int, count: int) -> None:
    """Set bits ``[first, first + count)``."""
    if count <= 0:
        return
    last = first + count - 1
    w0, w1 = first >> 6, last >> 6
    lo = np.uint64(_ALL << np.uint64(first & 63))
    hi = np.uint64(_ALL >> np.uint64(63 - (last & 63)))
    if w0 == w1:
        words[w0] |= lo & hi
    else:
        words[w0] |= lo
        if w1 > w0 + 1:
            words[w0 + 1 : w1] = _ALL
        words[w1] |= hi


def zeroed_words(nwords_: int) -> tuple[bytearray | mmap.mmap, Words]:
    """A zeroed bitmap of ``nwords_`` words, as a byte buffer (fast single-bit updates from
    Python) and a word array over it. Large ones are anonymous mappings: their untouched
    pages cost no memory."""
    size = max(nwords_, 1) * 8
    store: bytearray | mmap.mmap = (
        mmap.mmap(-1, size) if size > _MMAP_BITMAP else bytearray(size))
    return store, np.frombuffer(store, dtype="<u8", count=nwords_)


_MMAP_BITMAP: Final = 1 << 16


class DirtyTracker:
    """The host bitmap and the consumers' pending bitmaps of one region of ``npages`` pages of
    ``1 << shift`` bytes. ``host`` is a byte buffer, bit ``i`` of byte ``j`` = page
    ``8 j + i`` (the little-endian word layout of KVM's log)."""

    __slots__ = ("host", "hot", "lock", "npages", "nwords", "pending", "shift")

    def __init__(self, npages: int, consumers: tuple[str, ...] = (CONSUMER_USER,),
                 shift: int = PAGE_SHIFT) -> None:
        self.npages = npages
        self.nwords = nwords(npages)
        self.shift = shift
        #: Serialises host writes with harvests; hold it to write and mark atomically.
        self.lock = threading.Lock()
        self.host: bytearray | mmap.mmap = zeroed_words(self.nwords)[0]
        #: The page of the latest one-page mark, -1 after a harvest: a write to it need not
        #: mark again (its bit is pending in ``host``).
        self.hot = -1
        self.pending: dict[str, Words | None] = dict.fromkeys(consumers)

    # -- host writes (caller holds ``lock``) -------------------------------------------------
    def mark_range(self, first_page: int, count: int) -> None:
        """Mark pages ``[first_page, first_page + count)`` written by the host."""
        host = self.host
        if count == 1:
            self.hot = first_page
        if count <= 16:
            for page in range(first_page, first_page + count):
                host[page >> 3] |= 1 << (page & 7)
        else:
            set_range(np.frombuffer(host, dtype="<u8", count=self.nwords), first_page, count)

    def mark_pages(self, pages: npt.NDArray[np.integer]) -> None:
        """Mark an array of page indexes written by the host."""
        if len(pages):
            p = np.asarray(pages, dtype=np.int64)
            words = np.frombuffer(self.host, dtype="<u8", count=self.nwords)
            np.bitwise_or.at(words, p >> 6, np.left_shift(_ONE, (p & 63).astype(np.uint64)))

    # -- harvesting (caller holds ``lock``) --------------------------------------------------
    def add_consumer(self, name: str) -> None:
        """Start collecting for ``name`` (it sees what is harvested from now on)."""
        self.pending.setdefault(name, None)

    def collect(self, kernel: Words | None) -> None:
        """Fold the host bitmap and ``kernel`` (the kernel's log, already reset in the kernel)
        into every consumer's pending bitmap and reset the host bitmap."""
        fresh: Words | None = None
        host = np.frombuffer(self.host, dtype="<u8", count=self.nwords)
        if host.any():
            fresh = host
            self.host = zeroed_words(self.nwords)[0]
            self.hot = -1
        if kernel is not None and kernel.size:
            if kernel.size != self.nwords:
                raise ValueError(f"kernel log has {kernel.size} words, expected {self.nwords}")
            if fresh is None:
                if not kernel.any():
                    return
                fresh = np.array(kernel, dtype=np.uint64)  # own, writable copy
            else:
                np.bitwise_or(fresh, kernel, out=fresh)
        if fresh is None:
            return
        names = list(self.pending)
        for i, name in enumerate(names):
            current = self.pending[name]
            if current is None:
                self.pending[name] = fresh if i == len(names) - 1 else fresh.copy()
            else:
                np.bitwise_or(current, fresh, out=current)

    def take(self, name: str) -> Words:
        """Hand ``name`` its pending bitmap and reset it (zeros when nothing is pending)."""
        words = self.pending.get(name)
        self.pending[name] = None
        if words is None:
            return zeroed_words(self.nwords)[1]
        return words

    def give_back(self, name: str, words: Words) -> None:
        """Return bits taken by ``name`` (a snapshot that failed to write)."""
        current = self.pending.get(name)
        if current is None:
            self.pending[name] = words
        else:
            np.bitwise_or(current, words, out=current)


@dataclass(frozen=True)
class DirtyBitmap:
    """What one harvest found in one region: ``words`` (bit ``i`` = page ``i``), with the gpa
    the region had at harvest time."""

    gpa: int
    npages: int
    words: Words
    slot: int = -1
    label: str = ""
    page_shift: int = PAGE_SHIFT

    def page_indexes(self) -> Pages:
        """Dirty page indexes within the region, ascending."""
        return bitmap_pages(self.words)

    def pages(self) -> npt.NDArray[np.uint64]:
        """Dirty page gpas, ascending."""
        return (self.page_indexes() << self.page_shift).astype(np.uint64) + np.uint64(self.gpa)

    def ranges(self) -> list[tuple[int, int]]:
        """Dirty ``(gpa, length)`` runs."""
        firsts, lengths = pages_to_runs(self.page_indexes())
        return [
            (self.gpa + (int(f) << self.page_shift), int(n) << self.page_shift)
            for f, n in zip(firsts.tolist(), lengths.tolist(), strict=True)
        ]

    def count(self) -> int:
        """Number of dirty pages."""
        return popcount(self.words)

    def __iter__(self) -> Iterator[int]:
        return iter(int(p) for p in self.pages())

    @property
    def nbytes(self) -> int:
        """Dirty bytes (pages x page size)."""
        return self.count() << self.page_shift


class DirtySet:
    """The result of one harvest: a :class:`DirtyBitmap` per region, in gpa order."""

    def __init__(self, bitmaps: Iterable[DirtyBitmap] = ()) -> None:
        self.bitmaps = list(bitmaps)

    def __iter__(self) -> Iterator[DirtyBitmap]:
        return iter(self.bitmaps)

    def __len__(self) -> int:
        return len(self.bitmaps)

    def __getitem__(self, index: int) -> DirtyBitmap:
        return self.bitmaps[index]

    def pages(self) -> npt.NDArray[np.uint64]:
        """Every dirty page's gpa, ascending."""
        parts = [b.pages() for b in self.bitmaps]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)

    def ranges(self) -> list[tuple[int, int]]:
        """Dirty ``(gpa, length)`` runs (runs of adjacent regions are not merged)."""
        return [run for b in self.bitmaps for run in b.ranges()]

    def count(self) -> int:
        """Number of dirty pages."""
        return sum(b.count() for b in self.bitmaps)

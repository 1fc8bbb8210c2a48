"""The layout of a :class:`~memslot.guest.GuestMemory` as immutable values: a :class:`Placed`
per region (where it sits, its flags, its memory and dirty tracker), kept in gpa order by a
:class:`LayoutIndex` of blocks, and the vectorized :class:`Lookup` that ``translate_many``
uses.

A layout change builds a new index (copying one block and the short list of blocks:
O(sqrt n)) and publishes it with one assignment. An access reads the published index once and
uses only what that index holds, so it sees the layout before or after a concurrent change,
never a mix: a region's gpa is never read from the mutable :class:`GuestRegion`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from ..constants import KVM_MEM_READONLY
from .address import LayoutError

if TYPE_CHECKING:
    from .address import GuestRegion
    from .dirty import DirtyTracker

__all__ = ["LayoutIndex", "Lookup", "Placed"]

_U64 = np.uint64
_U64_MAX: Final = np.uint64((1 << 64) - 1)
#: Lookup: block table of at most this many entries; at most this many region starts per
#: block (else a binary search).
_TABLE_MAX: Final = 1 << 18
_MAX_ADVANCE: Final = 8
#: Regions per block of the layout index (split at twice that).
BLOCK: Final = 256


class Placed:
    """One region as one layout has it: ``[start, end)``, its flags, a view of its memory and
    its dirty tracker. Immutable: a move or a flag change publishes a new ``Placed``."""

    __slots__ = ("buf", "end", "flags", "hva", "region", "size", "start", "tracker")

    def __init__(self, region: GuestRegion, start: int, flags: int, buf: memoryview,
                 tracker: DirtyTracker) -> None:
        self.region = region
        self.start = start
        self.size = len(buf)
        self.end = start + self.size
        self.flags = flags
        self.hva = region.hva
        self.buf = buf
        self.tracker = tracker

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    def __repr__(self) -> str:
        return f"<Placed [{self.start:#x}, {self.end:#x}) {self.region!r}>"


class Lookup:
    """Vectorized gpa -> hva for one layout. Arrays are indexed by region + 1 (entry 0 is an
    empty dummy region, "below every region"). A block table gives, per ``2**shift`` bytes
    from the first region's start, the regions starting at or before the block; a few
    vectorized "advance if the next region starts at or before gpa" steps finish the job, so
    the cost per gpa is a handful of cached gathers instead of a binary search."""

    def __init__(self, placed: list[Placed], page_shift: int, bad: int, ro_bad: int) -> None:
        n = len(placed)
        size = n + 2 + _MAX_ADVANCE  # empty sentinels past the end: gpa 2**64-1 may step there
        self.bad, self.ro_bad = _U64(bad), _U64(ro_bad)
        self.starts = np.full(size, _U64_MAX, dtype=_U64)
        self.starts[0] = 0
        self.starts[1 : n + 1] = [p.start for p in placed]
        self.sizes = np.zeros(size, dtype=_U64)
        self.sizes[1 : n + 1] = [p.end - p.start for p in placed]
        self.hvas = np.zeros(size, dtype=_U64)
        self.hvas[1 : n + 1] = [p.hva for p in placed]
        self.readonly = np.zeros(size, dtype=bool)
        self.readonly[1 : n + 1] = [p.readonly for p in placed]
        self.n = n
        self.table: npt.NDArray[np.intp] | None = None
        self.base = int(self.starts[1]) if n else 0
        self.shift = page_shift
        self.steps = 0
        if n:
            span = int(self.starts[n]) - self.base
            while (span >> self.shift) + 1 > _TABLE_MAX:
                self.shift += 1
            nblocks = (span >> self.shift) + 1
            blocks = (np.arange(nblocks, dtype=_U64) << _U64(self.shift)) + _U64(self.base)
            table = np.searchsorted(self.starts[1 : n + 1], blocks, side="right").astype(np.intp)
            steps = int(np.diff(np.append(table, n)).max())
            if steps <= _MAX_ADVANCE:
                self.table, self.steps = table, steps

    def index(self, g: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Per gpa, 1 + the index of the last region starting at or before it (0: none)."""
        if self.table is None:
            found: npt.NDArray[np.intp] = np.searchsorted(
                self.starts[1 : self.n + 1], g, side="right")
            return found
        block = g - _U64(self.base)  # below base wraps to a huge block: clipped, then bad
        block >>= _U64(self.shift)
        np.minimum(block, _U64(self.table.size - 1), out=block)
        idx = self.table[block.astype(np.intp)]
        for _ in range(self.steps):
            idx += self.starts[idx + 1] <= g
        return idx

    def translate(self, g: npt.NDArray[np.uint64], write: bool) -> npt.NDArray[np.uint64]:
        idx = self.index(g)
        off = g - self.starts[idx]
        bad = off >= self.sizes[idx]  # the dummy has size 0; gpas below wrap to huge offsets
        out = self.hvas[idx] + off
        if write:
            out[self.readonly[idx] & ~bad] = self.ro_bad
        out[bad] = self.bad
        return out


class LayoutIndex:
    """An immutable layout: :class:`Placed` regions in gpa order, kept as blocks so an update
    copies one block and the short list of blocks, never the whole layout, while readers go
    on using the index they hold. ``last`` is a hint (the region of the latest slow lookup),
    any region of this index is a valid value for it."""

    __slots__ = ("_blocks", "_firsts", "_keys", "_len", "_lookup", "last", "page_shift")

    def __init__(
        self,
        page_shift: int,
        blocks: tuple[tuple[Placed, ...], ...] = (),
        keys: tuple[tuple[int, ...], ...] | None = None,
    ) -> None:
        self.page_shift = page_shift
        self._blocks = blocks
        self._keys = keys if keys is not None else tuple(
            tuple(p.start for p in b) for b in blocks)
        self._firsts = [k[0] for k in self._keys]
        self._len = sum(len(b) for b in blocks)
        self._lookup: Lookup | None = None
        self.last: Placed | None = blocks[0][0] if blocks else None

    @classmethod
    def of(cls, page_shift: int, placed: list[Placed]) -> LayoutIndex:
        ordered = sorted(placed, key=lambda p: p.start)
        return cls(page_shift, tuple(tuple(ordered[i : i + BLOCK])
                                     for i in range(0, len(ordered), BLOCK)))

    def __len__(self) -> int:
        return self._len

    def placed(self) -> list[Placed]:
        """Every region in gpa order (O(n): for listings, not lookups)."""
        return [p for b in self._blocks for p in b]

    def lookup(self, bad: int, ro_bad: int) -> Lookup:
        """The vectorized lookup of this layout (built on first use)."""
        found = self._lookup
        if found is None:
            found = self._lookup = Lookup(self.placed(), self.page_shift, bad, ro_bad)
        return found

    def _locate(self, gpa: int) -> tuple[int, int]:
        """(block, position) of the last region starting at or below ``gpa``; (-1, -1)."""
        b = bisect.bisect_right(self._firsts, gpa) - 1
        if b < 0:
            return -1, -1
        return b, bisect.bisect_right(self._keys[b], gpa) - 1

    def _from(self, b: int, i: int) -> Iterator[Placed]:
        """Regions from (block b, position i) on, in gpa order."""
        blocks = self._blocks
        while b < len(blocks):
            block = blocks[b]
            while i < len(block):
                yield block[i]
                i += 1
            b, i = b + 1, 0

    def following(self, gpa: int) -> Iterator[Placed]:
        """Regions in gpa order from the one starting at or below ``gpa`` (else the first)."""
        b, i = self._locate(gpa)
        return self._from(b, i) if b >= 0 else self._from(0, 0)

    def find(self, gpa: int) -> Placed | None:
        """The region containing ``gpa``; it becomes the ``last`` hint."""
        b, i = self._locate(gpa)
        if b >= 0:
            placed = self._blocks[b][i]
            if gpa < placed.end:
                self.last = placed
                return placed
        return None

    def neighbours(self, gpa: int) -> tuple[Placed | None, Placed | None]:
        b, i = self._locate(gpa)
        below = self._blocks[b][i] if b >= 0 else None
        after = self._from(b, i + 1) if b >= 0 else self._from(0, 0)
        return below, next(after, None)

    def overlapping(self, gpa: int, size: int, skip: GuestRegion | None = None) -> Placed | None:
        b, i = self._locate(gpa)
        for placed in self._from(b, i) if b >= 0 else self._from(0, 0):
            if placed.start >= gpa + size:
                break
            if placed.region is not skip and placed.end > gpa:
                return placed
        return None

    def inserted(self, placed: Placed) -> LayoutIndex:
        """A new index with ``placed`` added at its start."""
        gpa = placed.start
        blocks, keys = list(self._blocks), list(self._keys)
        if not blocks:
            return LayoutIndex(self.page_shift, ((placed,),), ((gpa,),))
        b = max(bisect.bisect_right(self._firsts, gpa) - 1, 0)
        i = bisect.bisect_right(keys[b], gpa)
        block = (*blocks[b][:i], placed, *blocks[b][i:])
        key = (*keys[b][:i], gpa, *keys[b][i:])
        if len(block) > 2 * BLOCK:
            blocks[b : b + 1] = [block[:BLOCK], block[BLOCK:]]
            keys[b : b + 1] = [key[:BLOCK], key[BLOCK:]]
        else:
            blocks[b], keys[b] = block, key
        return LayoutIndex(self.page_shift, tuple(blocks), tuple(keys))

    def removed(self, placed: Placed) -> LayoutIndex:
        """A new index without ``placed``."""
        b = bisect.bisect_right(self._firsts, placed.start) - 1
        block = self._blocks[b] if b >= 0 else ()
        i = next((k for k, candidate in enumerate(block) if candidate is placed), -1)
        if i < 0:
            raise LayoutError(f"{placed.region!r} is not in the layout at {placed.start:#x}")
        blocks, keys = list(self._blocks), list(self._keys)
        if len(block) == 1:
            del blocks[b], keys[b]
        else:
            blocks[b] = block[:i] + block[i + 1 :]
            keys[b] = keys[b][:i] + keys[b][i + 1 :]
        return LayoutIndex(self.page_shift, tuple(blocks), tuple(keys))

    def replaced(self, old: Placed, new: Placed) -> LayoutIndex:
        """A new index with ``old`` replaced by ``new`` (a move or a flag change)."""
        if new.start == old.start:
            b, i = self._locate(old.start)
            if b < 0 or self._blocks[b][i] is not old:
                raise LayoutError(f"{old.region!r} is not in the layout at {old.start:#x}")
            blocks = list(self._blocks)
            blocks[b] = (*blocks[b][:i], new, *blocks[b][i + 1 :])
            return LayoutIndex(self.page_shift, tuple(blocks), self._keys)
        return self.removed(old).inserted(new)

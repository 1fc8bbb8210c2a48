"""A sorted set of ints kept as a list of short sorted blocks (the layout sortedcontainers
uses): insert and remove cost ``O(log n)`` bisects plus a memmove of one block of at most
``2 * LOAD`` entries, and predecessor/successor queries are two C-level bisects."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Final

# Final: compiled, these are C statics (a name imported from bisect would be looked up in
# the module's globals on every call).
bisect_left: Final = bisect.bisect_left
bisect_right: Final = bisect.bisect_right
# Whether this module runs compiled (mypyc): then a binary search is a native loop over
# small ints, cheaper than a call of bisect's C function with its generic compares.
_COMPILED: Final = not __file__.endswith(".py")


def _left(a: list[int], x: int) -> int:
    """``bisect_left(a, x)``."""
    if not _COMPILED:
        return bisect_left(a, x)
    lo = 0
    hi = len(a)
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _right(a: list[int], x: int) -> int:
    """``bisect_right(a, x)``."""
    if not _COMPILED:
        return bisect_right(a, x)
    lo = 0
    hi = len(a)
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


LOAD = 256


class SortedInts:
    """Distinct ints in ascending order."""

    __slots__ = ("_len", "_lists", "_maxes")

    def __init__(self) -> None:
        self._lists: list[list[int]] = []
        self._maxes: list[int] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for block in list(self._lists):
            yield from list(block)

    def add(self, value: int) -> None:
        maxes = self._maxes
        lists = self._lists
        if not maxes:
            lists.append([value])
            maxes.append(value)
            self._len = 1
            return
        pos = _left(maxes, value)
        if pos == len(maxes):
            pos -= 1
            block = lists[pos]
            block.append(value)
            maxes[pos] = value
        else:
            block = lists[pos]
            block.insert(_right(block, value), value)
        self._len += 1
        if len(block) > 2 * LOAD:
            half = block[LOAD:]
            del block[LOAD:]
            maxes[pos] = block[-1]
            lists.insert(pos + 1, half)
            maxes.insert(pos + 1, half[-1])

    def remove(self, value: int) -> None:
        maxes = self._maxes
        pos = _left(maxes, value)
        if pos == len(maxes):
            raise KeyError(value)
        block = self._lists[pos]
        i = _left(block, value)
        if block[i] != value:
            raise KeyError(value)
        del block[i]
        self._len -= 1
        if block:
            maxes[pos] = block[-1]
        else:
            del self._lists[pos]
            del maxes[pos]

    def replace(self, old: int, new: int) -> None:
        """Remove ``old`` and add ``new``; in place when ``new`` keeps ``old``'s position
        (a MOVE by less than the distance to the neighbours, the common case)."""
        maxes = self._maxes
        lists = self._lists
        pos = _left(maxes, old)
        if pos < len(maxes):
            block = lists[pos]
            i = _left(block, old)
            if i < len(block) and block[i] == old:
                lo = block[i - 1] if i else (maxes[pos - 1] if pos else None)
                last = i == len(block) - 1
                hi = block[i + 1] if not last else (lists[pos + 1][0] if pos + 1 < len(lists)
                                                    else None)
                if (lo is None or lo < new) and (hi is None or new < hi):
                    block[i] = new
                    if last:
                        maxes[pos] = new
                    return
        self.remove(old)
        self.add(new)

    def le(self, value: int) -> int | None:
        """Largest element ``<= value``."""
        maxes = self._maxes
        pos = _left(maxes, value)
        if pos == len(maxes):
            return maxes[-1] if maxes else None
        block = self._lists[pos]
        i = _right(block, value)
        if i:
            return block[i - 1]
        return maxes[pos - 1] if pos else None

    def lt(self, value: int) -> int | None:
        """Largest element ``< value``."""
        return self.le(value - 1)

    def ge(self, value: int) -> int | None:
        """Smallest element ``>= value``."""
        maxes = self._maxes
        pos = _left(maxes, value)
        if pos == len(maxes):
            return None
        block = self._lists[pos]
        return block[_left(block, value)]

    def iter_from(self, value: int) -> Iterator[int]:
        """Elements ``>= value`` in ascending order."""
        maxes = self._maxes
        lists = self._lists
        pos = _left(maxes, value)
        if pos == len(maxes):
            return
        block = lists[pos]
        yield from block[_left(block, value):]
        for block in lists[pos + 1:]:
            yield from block

    def check(self) -> list[str]:
        """Structural problems (empty when consistent)."""
        problems = []
        flat = [v for block in self._lists for v in block]
        if any(a >= b for a, b in itertools.pairwise(flat)):
            problems.append("sorted index out of order or with duplicates")
        if len(flat) != self._len:
            problems.append(f"sorted index length {self._len} != {len(flat)} entries")
        if [b[-1] for b in self._lists if b] != self._maxes or any(not b for b in self._lists):
            problems.append("sorted index block maxima inconsistent")
        return problems

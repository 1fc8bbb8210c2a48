"""An interval index over host virtual addresses (the kernel's per-set ``hva_tree``).

hva ranges of slots may overlap (two slots may share memory), so this is a true interval
index. It is a centered interval tree whose centres are fixed by the address bits: an interval
``[start, last]`` lives in the node of the smallest aligned power-of-two block containing it,
``(k, start >> k)`` with ``k = bit_length(start ^ last)``; every interval in a node straddles
the block's midpoint, so within a node those containing a point form a prefix of one of two
sorted lists. A stabbing query visits one node per occupied level (at most 65), each in
``O(log m + hits)``; insert and remove touch one node. Cost does not depend on the number of
intervals stored elsewhere.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort


class _Node:
    __slots__ = ("by_last", "by_start")

    def __init__(self) -> None:
        self.by_start: list[tuple[int, int]] = []  # (start, key) ascending
        self.by_last: list[tuple[int, int]] = []  # (-last, key) ascending = last descending


class HvaIndex:
    """Intervals ``[start, last]`` (inclusive, like ``interval_tree_node``) keyed by an int."""

    __slots__ = ("_level_counts", "_levels", "_nodes", "_size")

    def __init__(self) -> None:
        self._nodes: dict[tuple[int, int], _Node] = {}
        self._level_counts = [0] * 66
        self._levels = 0  # bit k set iff some interval lives at level k
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def insert(self, start: int, last: int, key: int) -> None:
        k = (start ^ last).bit_length()
        nk = (k, start >> k)
        node = self._nodes.get(nk)
        if node is None:
            node = self._nodes[nk] = _Node()
        insort(node.by_start, (start, key))
        insort(node.by_last, (-last, key))
        self._level_counts[k] += 1
        self._levels |= 1 << k
        self._size += 1

    def remove(self, start: int, last: int, key: int) -> None:
        k = (start ^ last).bit_length()
        nk = (k, start >> k)
        node = self._nodes[nk]
        entry = (start, key)
        i = bisect_left(node.by_start, entry)
        if i == len(node.by_start) or node.by_start[i] != entry:
            raise KeyError((start, last, key))
        del node.by_start[i]
        entry = (-last, key)
        del node.by_last[bisect_left(node.by_last, entry)]
        if not node.by_start:
            del self._nodes[nk]
        self._level_counts[k] -= 1
        if not self._level_counts[k]:
            self._levels &= ~(1 << k)
        self._size -= 1

    def stab(self, point: int) -> list[int]:
        """Keys of all intervals containing ``point``."""
        out: list[int] = []
        levels = self._levels
        nodes = self._nodes
        while levels:
            low = levels & -levels
            k = low.bit_length() - 1
            levels ^= low
            node = nodes.get((k, point >> k))
            if node is None:
                continue
            if k == 0:
                out.extend(key for _, key in node.by_start)
            elif point < ((point >> k) << k) + (1 << (k - 1)):
                # Left of the midpoint: every interval ends past it, so start <= point decides.
                entries = node.by_start
                end = bisect_right(entries, (point, 1 << 64))
                out.extend(key for _, key in entries[:end])
            else:
                entries = node.by_last
                end = bisect_right(entries, (-point, 1 << 64))
                out.extend(key for _, key in entries[:end])
        return out

    def items(self) -> list[tuple[int, int, int]]:
        """Every ``(start, last, key)`` (for integrity checks; O(n))."""
        out: list[tuple[int, int, int]] = []
        for node in self._nodes.values():
            lasts = {key: -neg for neg, key in node.by_last}
            out.extend((start, lasts[key], key) for start, key in node.by_start)
        return out

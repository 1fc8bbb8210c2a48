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

import bisect
from typing import Final

# Final: compiled, these are C statics (a name imported from bisect would be looked up in
# the module's globals on every call).
bisect_left: Final = bisect.bisect_left
bisect_right: Final = bisect.bisect_right
insort: Final = bisect.insort

class _Many:
    """A node holding two or more intervals: ``(start, key)`` ascending and ``(-last, key)``
    ascending (the prefixes a stab takes). A node with one interval holds just the
    ``(start, last, key)`` tuple (most nodes: slots rarely share an aligned block)."""

    __slots__ = ("by_last", "by_start")

    def __init__(self, by_start: list[tuple[int, int]], by_last: list[tuple[int, int]]) -> None:
        self.by_start = by_start
        self.by_last = by_last


class HvaIndex:
    """Intervals ``[start, last]`` (inclusive, like ``interval_tree_node``) keyed by an int."""

    __slots__ = ("_level_nodes", "_levels", "_nodes", "_size")

    def __init__(self) -> None:
        self._nodes: dict[int, _Many | tuple[int, int, int]] = {}
        self._level_nodes = [0] * 66  # nodes per level
        self._levels = 0  # bit k set iff some node lives at level k
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def insert(self, start: int, last: int, key: int) -> None:
        k = (start ^ last).bit_length()
        nk = ((start >> k) << 7) | k
        node = self._nodes.get(nk)
        if node is None:
            self._nodes[nk] = (start, last, key)
            self._level_nodes[k] += 1
            self._levels |= 1 << k
        elif isinstance(node, _Many):
            insort(node.by_start, (start, key))
            insort(node.by_last, (-last, key))
        else:
            s, e, key0 = node
            self._nodes[nk] = _Many(sorted([(s, key0), (start, key)]),
                                    sorted([(-e, key0), (-last, key)]))
        self._size += 1

    def remove(self, start: int, last: int, key: int) -> None:
        k = (start ^ last).bit_length()
        nk = ((start >> k) << 7) | k
        node = self._nodes.get(nk)
        if node is None:
            raise KeyError((start, last, key))
        if isinstance(node, _Many):
            by_start = node.by_start
            entry = (start, key)
            i = bisect_left(by_start, entry)
            if i == len(by_start) or by_start[i] != entry:
                raise KeyError((start, last, key))
            del by_start[i]
            by_last = node.by_last
            del by_last[bisect_left(by_last, (-last, key))]
            if len(by_start) == 1:
                (s, key0), = by_start
                self._nodes[nk] = (s, -by_last[0][0], key0)
        else:
            s, e, key0 = node
            if s != start or e != last or key0 != key:
                raise KeyError((start, last, key))
            del self._nodes[nk]
            self._level_nodes[k] -= 1
            if not self._level_nodes[k]:
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
            node = nodes.get(((point >> k) << 7) | k)
            if node is None:
                continue
            if not isinstance(node, _Many):
                s, e, key = node
                if s <= point <= e:
                    out.append(key)
            elif k == 0:
                out.extend(key for _, key in node.by_start)
            elif point < ((point >> k) << k) + (1 << (k - 1)):
                # Left of the midpoint: every interval ends past it, so start <= point decides.
                entries = node.by_start
                end = bisect_right(entries, (point, 1 << 64))
                out.extend(key for _, key in entries[:end])
            else:
                ends = node.by_last
                end = bisect_right(ends, (-point, 1 << 64))
                out.extend(key for _, key in ends[:end])
        return out

    def items(self) -> list[tuple[int, int, int]]:
        """Every ``(start, last, key)`` (for integrity checks; O(n))."""
        out: list[tuple[int, int, int]] = []
        for node in self._nodes.values():
            if not isinstance(node, _Many):
                out.append(node)
                continue
            lasts = {key: -neg for neg, key in node.by_last}
            out.extend((start, lasts[key], key) for start, key in node.by_start)
        return out

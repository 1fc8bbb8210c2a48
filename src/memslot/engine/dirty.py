"""A slot's dirty bitmap, described sparsely so that its cost follows the pages written, not
the slot size (``kvm_alloc_dirty_bitmap`` allocates ``2 * ALIGN(npages, 64) / 8`` bytes; the
second half is only KVM_GET_DIRTY_LOG's scratch buffer and is accounted, not modelled)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .ledger import AllocGroup

if TYPE_CHECKING:  # numpy is imported where a bitmap is read (its import is most of start-up)
    import numpy as np

WORD_BITS = 64
ALL_ONES = (1 << 64) - 1


def dirty_bitmap_bytes(npages: int) -> int:
    """``kvm_dirty_bitmap_bytes``: ``ALIGN(npages, BITS_PER_LONG) / 8``."""
    return ((npages + 63) & ~63) >> 3


class DirtyBitmap:
    """64-bit words of a dirty log. Words absent from ``words`` hold the fill value: all zero,
    or (after ``KVM_DIRTY_LOG_INITIALLY_SET``) bits ``[0, npages)`` set.

    vCPUs mark pages while the VMM reads and clears the log, with no lock in common (marks
    run under srcu, KVM_GET/CLEAR_DIRTY_LOG under slots_lock); the kernel makes each word
    operation atomic (``set_bit_le``, ``xchg``, ``atomic_long_fetch_andnot``), so no mark is
    lost and a read sees whole words. Here a lock gives the same guarantees: the engine
    passes one per VM (``lock``), so creating a bitmap costs no new lock.
    """

    __slots__ = ("_lock", "alloc", "filled", "npages", "nwords", "words")

    def __init__(
        self,
        npages: int,
        alloc: AllocGroup | None,
        initially_set: bool = False,
        lock: threading.Lock | None = None,
    ) -> None:
        self.npages = npages
        self.nwords = (npages + 63) >> 6
        self.alloc = alloc
        self.words: dict[int, int] = {}
        self.filled = initially_set
        self._lock = lock if lock is not None else threading.Lock()

    def _fill(self, index: int) -> int:
        if not self.filled:
            return 0
        if index == self.nwords - 1 and self.npages & 63:
            return (1 << (self.npages & 63)) - 1
        return ALL_ONES

    def set_bit(self, page: int) -> None:
        """``set_bit_le(rel_gfn, dirty_bitmap)`` from ``mark_page_dirty_in_slot``."""
        index = page >> 6
        with self._lock:
            word = self.words.get(index)
            if word is None:
                word = self._fill(index)
            self.words[index] = word | (1 << (page & 63))

    def check(self, npages: int, owner: str) -> list[str]:
        """Problems with this bitmap as the log of ``owner``, a slot of ``npages`` pages."""
        problems = []
        if self.npages != npages:
            problems.append(f"{owner} dirty bitmap sized for {self.npages} pages, slot has "
                            f"{npages}")
        # kvm_alloc_dirty_bitmap: two halves of kvm_dirty_bitmap_bytes each.
        if self.alloc is None or self.alloc.bytes != 2 * dirty_bitmap_bytes(npages):
            problems.append(f"{owner} dirty bitmap allocation does not match its size")
        if any(w >> 64 or w < 0 for w in self.words.values()) or any(
            i >= self.nwords for i in self.words
        ):
            problems.append(f"{owner} dirty bitmap holds words outside its size")
        return problems

    def to_array(self) -> np.ndarray:
        """The log as little-endian ``uint64`` words (what KVM_GET_DIRTY_LOG copies out)."""
        with self._lock:
            return self._to_array()

    def _to_array(self) -> np.ndarray:
        import numpy as np

        if self.filled:
            out = np.full(self.nwords, ALL_ONES, dtype="<u8")
            if self.nwords and self.npages & 63:
                out[-1] = (1 << (self.npages & 63)) - 1
        else:
            out = np.zeros(self.nwords, dtype="<u8")
        if self.words:
            index = np.fromiter(self.words.keys(), dtype=np.int64, count=len(self.words))
            values = np.fromiter(self.words.values(), dtype=np.uint64, count=len(self.words))
            out[index] = values
        return out

    def to_bytes(self) -> bytes:
        return self.to_array().tobytes()

    def harvest(self) -> bytes:
        """Copy out and clear (KVM_GET_DIRTY_LOG without manual protect: ``xchg`` per word)."""
        with self._lock:
            data = self._to_array().tobytes()
            self.words = {}
            self.filled = False
        return data

    def clear(self, first_word: int, masks: np.ndarray) -> None:
        """Clear ``masks[i] & word[first_word + i]`` (KVM_CLEAR_DIRTY_LOG); bits past the slot
        stay clear because they were never set."""
        with self._lock:
            self._clear(first_word, masks)

    def _clear(self, first_word: int, masks: np.ndarray) -> None:
        import numpy as np

        words = self.words
        nonzero = np.flatnonzero(masks)
        for i in nonzero.tolist():
            index = first_word + i
            if index >= self.nwords:
                break
            word = words.get(index)
            if word is None:
                word = self._fill(index)
            word &= ~int(masks[i])
            if word or self.filled:
                words[index] = word
            else:
                words.pop(index, None)

    def count(self) -> int:
        """Number of dirty pages."""
        import numpy as np

        return int(np.unpackbits(self.to_array().view(np.uint8)).sum())

    def dirty_pages(self) -> np.ndarray:
        """Slot-relative indices of the dirty pages, ascending."""
        import numpy as np

        bits = np.unpackbits(self.to_array().view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[: self.npages])

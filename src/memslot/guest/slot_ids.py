"""Memslot ids for the regions of one :class:`~memslot.guest.GuestMemory`: lowest free first,
among ids it does not use and no other user of the VM holds ("foreign" ids, learnt from the
VM's slots), below ``KVM_CAP_NR_MEMSLOTS``."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from .address import LayoutError

__all__ = ["SlotIds"]


class SlotIds:
    """The allocator. Not thread-safe: the owner serialises layout changes."""

    def __init__(self, limit: int, foreign: Iterable[int] = ()) -> None:
        self.limit = limit
        self.foreign = set(foreign)
        self.used: set[int] = set()
        self._free: list[int] = []  # heap of released ids below _next
        self._next = 0

    def _taken(self, slot: int) -> bool:
        return slot in self.used or slot in self.foreign

    def take(self, wanted: int | None = None) -> int:
        """Claim ``wanted``, or the lowest free id. :class:`LayoutError` when it is taken or
        out of range, or when every id is."""
        if wanted is not None:
            if not 0 <= wanted < self.limit:
                raise LayoutError(f"slot id {wanted} is outside 0..{self.limit - 1}")
            if self._taken(wanted):
                raise LayoutError(f"slot id {wanted} is in use")
            self.used.add(wanted)
            return wanted
        while self._free and self._taken(self._free[0]):
            heapq.heappop(self._free)
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            while self._taken(self._next):
                self._next += 1
            if self._next >= self.limit:
                raise LayoutError(
                    f"no free memslot id: all {self.limit} ids (KVM_CAP_NR_MEMSLOTS) are in use "
                    f"({len(self.used)} by this GuestMemory)"
                )
            slot = self._next
            self._next += 1
        self.used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        self.used.discard(slot)
        if slot < self._next:
            heapq.heappush(self._free, slot)

    def forget(self, slot: int) -> None:
        """Drop a claim without offering the id again (it turned out to be foreign)."""
        self.used.discard(slot)

    def set_foreign(self, foreign: Iterable[int]) -> None:
        self.foreign = set(foreign)

    def plan(self, wanted: Sequence[int]) -> list[int]:
        """Ids for regions that recorded ``wanted`` (a snapshot's layout): each keeps its
        recorded id when that is free and below the limit, the others get the lowest ids that
        are free and not kept by another region. Nothing is claimed; raises
        :class:`LayoutError` only when fewer ids are free than regions."""
        keep = {w for w in wanted if 0 <= w < self.limit and not self._taken(w)}
        if len(keep) != len([w for w in wanted if w in keep]):
            raise LayoutError("a layout records the same slot id twice")
        out: list[int] = []
        candidate = 0
        for w in wanted:
            if w in keep:
                out.append(w)
                continue
            while candidate < self.limit and (self._taken(candidate) or candidate in keep):
                candidate += 1
            if candidate >= self.limit:
                raise LayoutError(
                    f"{len(wanted)} regions need slot ids, but only "
                    f"{self.limit - len(self.used) - len(self.foreign)} of the {self.limit} "
                    "(KVM_CAP_NR_MEMSLOTS) are free"
                )
            out.append(candidate)
            candidate += 1
        return out

"""The allocation ledger: every allocation the kernel makes for memslots, live until the step
that frees it, with fault injection (``ENOMEM`` on the nth allocation).

Sizes follow the kernel's allocators: ``kzalloc`` for slot structs (not in VmallocUsed),
``__vcalloc`` (vmalloc) for dirty bitmaps and per-arch arrays. A vmalloc area of ``n`` pages
also needs its ``area->pages`` pointer array (``8 * n`` bytes); when that exceeds a page it is
itself vmalloc'd (mm/vmalloc.c ``__vmalloc_area_node``) and counts in /proc/meminfo VmallocUsed.

Allocations that the kernel makes back to back for one purpose (x86's rmap, lpage_info and
write-track arrays of a slot) are booked as one :class:`AllocGroup`: one ledger entry, one
journal entry, with the individual :class:`Allocation` records (serial numbers consecutive)
materialised only when someone looks. Fault injection still counts allocations one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Final, NamedTuple

KMALLOC: Final = "kmalloc"
VMALLOC: Final = "vmalloc"

# Allocation kinds (``inject_enomem(kind=...)`` counts only these).
KIND_SLOT: Final = "slot"
KIND_INVALID_SLOT: Final = "invalid_slot"
KIND_DIRTY_BITMAP: Final = "dirty_bitmap"
KIND_RMAP: Final = "rmap"
KIND_LPAGE_INFO: Final = "lpage_info"
KIND_WRITE_TRACK: Final = "write_track"
KIND_PPC_RMAP: Final = "ppc_rmap"
KINDS: Final = (
    KIND_SLOT,
    KIND_INVALID_SLOT,
    KIND_DIRTY_BITMAP,
    KIND_RMAP,
    KIND_LPAGE_INFO,
    KIND_WRITE_TRACK,
    KIND_PPC_RMAP,
)

_LEVEL_NAMES: Final = {1: "4K", 2: "2M", 3: "1G"}


def vmalloc_footprint(nbytes: int, page_size: int = 4096) -> int:
    """Bytes by which VmallocUsed grows for one vmalloc of ``nbytes`` (pages, plus the page
    pointer array when that array is itself vmalloc'd, recursively)."""
    pages = -(-nbytes // page_size)
    total = pages * page_size
    array = 8 * pages
    if array > page_size:
        total += vmalloc_footprint(array, page_size)
    return total


class Spec(NamedTuple):
    """What one allocation asks for, with its derived sizes."""

    kind: str
    level: int
    entries: int
    entry_size: int
    allocator: str
    bytes: int
    vmalloc_bytes: int


@lru_cache(maxsize=65536)
def spec(
    kind: str, entries: int, entry_size: int, allocator: str = VMALLOC, level: int = 0,
    page_size: int = 4096,
) -> Spec:
    """A (cached) allocation request: the kernel's sizes for ``entries`` x ``entry_size``."""
    nbytes = entries * entry_size
    vm = vmalloc_footprint(nbytes, page_size) if allocator == VMALLOC else 0
    return Spec(kind, level, entries, entry_size, allocator, nbytes, vm)


class Allocation(NamedTuple):
    """One kernel allocation; ``serial`` makes it unique."""

    serial: int
    kind: str
    as_id: int
    slot_id: int
    entries: int
    entry_size: int
    allocator: str
    level: int
    bytes: int
    vmalloc_bytes: int

    @property
    def label(self) -> str:
        """``rmap[2M]``, ``dirty_bitmap``, ..."""
        if self.level:
            return f"{self.kind}[{_LEVEL_NAMES.get(self.level, self.level)}]"
        return self.kind

    @property
    def owner(self) -> tuple[int, int]:
        return (self.as_id, self.slot_id)

    def as_dict(self) -> dict[str, object]:
        return {
            "serial": self.serial,
            "kind": self.kind,
            "level": self.level,
            "owner": [self.as_id, self.slot_id],
            "entries": self.entries,
            "entry_size": self.entry_size,
            "bytes": self.bytes,
            "allocator": self.allocator,
            "vmalloc_bytes": self.vmalloc_bytes,
        }

    def __repr__(self) -> str:
        return (
            f"<Allocation #{self.serial} {self.label} of {self.as_id}:{self.slot_id} "
            f"{self.entries}x{self.entry_size}B={self.bytes}B {self.allocator}>"
        )


class AllocGroup:
    """Allocations made back to back for one owner: one ledger entry (``serial`` is the
    first allocation's serial number; they are consecutive). Immutable; equal when every
    field is. (A plain class, not a NamedTuple: compiled, one is built per allocation without
    a Python-level call.)"""

    __slots__ = ("_freed", "as_id", "bytes", "serial", "slot_id", "specs", "vmalloc_bytes")

    def __init__(self, serial: int, as_id: int, slot_id: int, specs: tuple[Spec, ...],
                 bytes: int, vmalloc_bytes: int) -> None:
        self.serial = serial
        self.as_id = as_id
        self.slot_id = slot_id
        self.specs = specs
        self.bytes = bytes
        self.vmalloc_bytes = vmalloc_bytes
        self._freed = False  # the ledger's mark (not part of the value)

    def _key(self) -> tuple[int, int, int, tuple[Spec, ...], int, int]:
        return (self.serial, self.as_id, self.slot_id, self.specs, self.bytes,
                self.vmalloc_bytes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AllocGroup):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, AllocGroup):
            return NotImplemented
        return not (self is other or self._key() == other._key())

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def items(self) -> tuple[Allocation, ...]:
        """The individual allocations (serials ``serial .. serial + len - 1``)."""
        a, i, first = self.as_id, self.slot_id, self.serial
        return tuple(
            Allocation(first + n, s.kind, a, i, s.entries, s.entry_size, s.allocator, s.level,
                       s.bytes, s.vmalloc_bytes)
            for n, s in enumerate(self.specs)
        )

    def first(self, kind: str, level: int = 0) -> Allocation | None:
        for a in self.items:
            if a.kind == kind and a.level == level:
                return a
        return None

    def __repr__(self) -> str:
        return f"<AllocGroup #{self.serial} {[a.label for a in self.items]} {self.bytes}B>"


class SpecGroup(NamedTuple):
    """Specs allocated together, with their totals computed once."""

    specs: tuple[Spec, ...]
    bytes: int
    vmalloc_bytes: int

    @classmethod
    def of(cls, specs: tuple[Spec, ...]) -> SpecGroup:
        return cls(specs, sum(s.bytes for s in specs), sum(s.vmalloc_bytes for s in specs))


class AllocFailed(Exception):
    """An injected ENOMEM hit the ``index``-th allocation of a group (``spec`` failed)."""

    def __init__(self, index: int, spec: Spec) -> None:
        self.index = index
        self.spec = spec


class Ledger:
    """Live allocations, running totals and the armed ENOMEM fault."""

    __slots__ = (
        "_dead",
        "_fault_countdown",
        "_fault_kind",
        "_order",
        "_serial",
        "allocated",
        "freed",
        "live_bytes",
        "page_size",
        "vmalloc_bytes",
    )

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        # Groups in allocation (serial) order; a freed one is marked and stays until the
        # dead outnumber the live (then the list is rebuilt: amortised O(1) per free, with
        # no hashing of serial numbers on the request path).
        self._order: list[AllocGroup] = []
        self._dead = 0
        self.live_bytes = 0
        self.vmalloc_bytes = 0
        self._serial = 0
        self._fault_countdown = 0
        self._fault_kind: str | None = None
        # Journals of the request in progress (reset by the engine per request): groups.
        self.allocated: list[AllocGroup] = []
        self.freed: list[AllocGroup] = []

    def inject_enomem(self, nth: int = 1, kind: str | None = None) -> None:
        """Make the ``nth`` allocation from now (of ``kind`` only, if given) fail, once."""
        if nth < 1:
            raise ValueError("nth must be >= 1")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown allocation kind {kind!r}; kinds: {', '.join(KINDS)}")
        self._fault_countdown = nth
        self._fault_kind = kind

    def spec(self, kind: str, entries: int, entry_size: int, allocator: str = VMALLOC,
             level: int = 0) -> Spec:
        return spec(kind, entries, entry_size, allocator, level, self.page_size)

    def alloc_group(self, as_id: int, slot_id: int, group: SpecGroup) -> AllocGroup:
        """Allocate ``group.specs`` in order as one ledger entry. If an injected fault hits
        one of them, the ones before it are allocated and freed again (journalled) and
        :class:`AllocFailed` is raised, as the kernel's unwind would leave it."""
        specs = group.specs
        if self._fault_countdown:
            self._check_fault(as_id, slot_id, specs)
        serial = self._serial + 1
        self._serial += len(specs)
        g = AllocGroup(serial, as_id, slot_id, specs, group.bytes, group.vmalloc_bytes)
        self._order.append(g)
        self.live_bytes += group.bytes
        self.vmalloc_bytes += group.vmalloc_bytes
        self.allocated.append(g)
        return g

    def alloc(self, as_id: int, slot_id: int, one: Spec) -> AllocGroup | None:
        """Allocate one thing; ``None`` if the injected fault fires (the kernel's NULL)."""
        if self._fault_countdown:
            try:
                self._check_fault(as_id, slot_id, (one,))
            except AllocFailed:
                return None
        self._serial = serial = self._serial + 1
        g = AllocGroup(serial, as_id, slot_id, (one,), one.bytes, one.vmalloc_bytes)
        self._order.append(g)
        self.live_bytes += one.bytes
        self.vmalloc_bytes += one.vmalloc_bytes
        self.allocated.append(g)
        return g

    def _check_fault(self, as_id: int, slot_id: int, specs: tuple[Spec, ...]) -> None:
        kind = self._fault_kind
        for index, s in enumerate(specs):
            if kind is not None and s.kind != kind:
                continue
            self._fault_countdown -= 1
            if self._fault_countdown:
                continue
            self._fault_kind = None
            if index:
                # The allocations before the failing one happened and are unwound.
                partial = self.alloc_group(as_id, slot_id, SpecGroup.of(specs[:index]))
                self.free(partial)
            raise AllocFailed(index, s)

    def free(self, g: AllocGroup) -> None:
        """Release a group (a double free is a model bug and raises ``KeyError``)."""
        if g._freed:
            raise KeyError(g.serial)
        g._freed = True
        self._dead += 1
        if self._dead > 32 and self._dead * 2 > len(self._order):
            self._order = [x for x in self._order if not x._freed]
            self._dead = 0
        self.live_bytes -= g.bytes
        self.vmalloc_bytes -= g.vmalloc_bytes
        self.freed.append(g)

    def begin(self) -> None:
        """Start the journals of a new request."""
        self.allocated = []
        self.freed = []

    def _live_groups(self) -> list[AllocGroup]:
        """The live groups in serial order (a snapshot)."""
        return [g for g in list(self._order) if not g._freed]

    def is_live(self, g: AllocGroup) -> bool:
        """Not freed (a group is only ever made by the ledger of its VM)."""
        return not g._freed

    def check(self, holders: Iterable[tuple[str, str, AllocGroup]]) -> list[str]:
        """Ownership problems, given what each live slot holds as ``(owner, what, group)``:
        a group held by two owners, a held group already freed, a live group nobody holds
        (a leak), and totals that do not add up."""
        problems: list[str] = []
        owned: dict[int, str] = {}
        for owner, what, g in holders:
            prior = owned.get(g.serial)
            if prior is not None and prior != owner:
                problems.append(f"{what} #{g.serial} shared by {prior} and {owner}")
            owned[g.serial] = owner
            if not self.is_live(g):
                problems.append(f"{owner} holds freed {g!r}")
        groups = self._live_groups()
        for g in groups:
            if g.serial not in owned:
                for a in g.items:
                    problems.append(
                        f"leak: {a.label} #{a.serial} of slot {a.as_id}:{a.slot_id} "
                        f"({a.bytes} bytes) is allocated but no live slot owns it"
                    )
        live = sum(g.bytes for g in groups)
        vmalloc = sum(g.vmalloc_bytes for g in groups)
        if (live, vmalloc) != (self.live_bytes, self.vmalloc_bytes):
            problems.append(f"ledger totals {self.live_bytes} bytes ({self.vmalloc_bytes} "
                            f"vmalloc) != sum of live groups {live} ({vmalloc})")
        return problems

    @property
    def groups(self) -> list[AllocGroup]:
        return self._live_groups()

    @property
    def live(self) -> dict[int, Allocation]:
        """Every live allocation by serial."""
        return {a.serial: a for g in self._live_groups() for a in g.items}

    def __iter__(self) -> Iterator[Allocation]:
        return iter(list(self.live.values()))

    def __len__(self) -> int:
        return sum(len(g.specs) for g in self._live_groups())


def flatten(groups: list[AllocGroup]) -> list[Allocation]:
    """The individual allocations of a journal."""
    return [a for g in groups for a in g.items]

"""Random request sequences weighted to the edges of every rule, run on the model and the
real kernel side by side (or on the model alone with its integrity check).

Each sequence runs on a fresh VM pair; a divergence ends the sequence and yields a
JSON-lines reproducer (the sequence up to the diverging request, with the kernel's errno as
``expect``) that ``memslot replay --backend both`` replays.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import constants as c
from ..backends.base import VM
from ..backends.dual import Divergence
from ..backends.model import ModelVM
from ..engine.slot import MemorySlot
from ..errors import KvmError
from ..profile import Profile
from ..request import MemoryRegion
from ..trace.jsonl import dumps
from ..trace.records import ClearDirtyLog, EnableCap, GetDirtyLog, SetRegion, TraceOp
from .replay import Replayer

PAGE = c.PAGE_SIZE
UA_BASE = 0x7F0000000000
SAFE_PAGES = 1 << 18  # larger successful slots would cost the kernel real vmalloc memory
MAX_PAGES = c.KVM_MEM_MAX_NR_PAGES


@dataclass
class FuzzReport:
    requests: int = 0
    agreed: int = 0
    sequences: int = 0
    divergences: list[tuple[str, list[str]]] = field(default_factory=list)
    #: How often each outcome occurred: ("CREATE", "ok"), ("MOVE", "overlap"), ...
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    check_failures: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.agreed / self.requests if self.requests else 1.0


class Generator:
    """Produces the next operation from the model's current slots."""

    def __init__(self, rnd: random.Random, profile: Profile) -> None:
        self.rnd = rnd
        self.p = profile
        self.user_slots = profile.user_mem_slots
        self.page = profile.page_size
        self.max_gfn = profile.max_gfn if profile.arch == "x86" else (1 << 40) - 1
        self.ua_limit = profile.user_addr_limit or (1 << 64) - PAGE

    # -- building blocks ------------------------------------------------------------------
    def _id(self) -> int:
        r = self.rnd
        choice = r.random()
        if choice < 0.75:
            return r.randrange(12)
        edges = [self.user_slots - 1, self.user_slots, self.user_slots + 1, c.KVM_MEM_SLOTS_NUM,
                 c.KVM_MEM_SLOTS_NUM - 1, 0xFFFF, 1 << 16, (1 << 16) | 1, 2 << 16, 0xFFFFFFFF]
        return r.choice(edges)

    def _pages(self) -> int:
        r = self.rnd
        return r.choice([1, 1, 2, 3, 16, 63, 64, 65, 100, 511, 512, 513, 1024, 4096, 1 << 18])

    def _flags(self) -> int:
        r = self.rnd
        x = r.random()
        if x < 0.92:
            return r.choice([0, 0, 0, 1, 1, 2, 3])
        return r.choice([4, 8, 1 << 16, 1 << 17, 1 << 31, 5, 6, 7, 1 << r.randrange(32)])

    def _gpa(self, slots: list[tuple[int, int]]) -> int:
        """A gpa near an existing slot (adjacent, overlapping by one page) or at an edge."""
        r = self.rnd
        x = r.random()
        page = self.page
        if slots and x < 0.6:
            base, npages = r.choice(slots)
            return r.choice([
                base * page, (base + npages) * page, (base + npages - 1) * page,
                (base - 1) * page if base else 0, (base + 1) * page, base * page - 4096 * 512,
            ]) % (1 << 64)
        if x < 0.85:
            return r.randrange(0, 4096) * page
        return r.choice([
            (self.max_gfn + 1) * page - page, (self.max_gfn + 1) * page, (1 << 64) - page,
            (1 << 64) - 2 * page, 1 << 63, 0xFFFFF000, 0x800, 1, page + 1,
        ])

    def _uaddr(self) -> int:
        r = self.rnd
        if r.random() < 0.85:
            return UA_BASE + r.randrange(0, 1 << 16) * self.page
        return r.choice([0, self.ua_limit - self.page, self.ua_limit, self.ua_limit + self.page,
                         UA_BASE + 8, 0xFFFF888000000000, (1 << 64) - self.page,
                         1 << 56]) % (1 << 64)

    def _size(self, npages: int) -> int:
        r = self.rnd
        if r.random() < 0.9:
            return npages * self.page
        return r.choice([self.page + 1, 1, (MAX_PAGES + 1) * self.page, (MAX_PAGES + 2) * self.page,
                         (1 << 64) - self.page, 0])

    # -- operations -----------------------------------------------------------------------
    def next(self, model: ModelVM) -> TraceOp:
        slots = [s for a in range(model.nr_address_spaces) for s in model.memslots(a)]
        ranges = [(s.base_gfn, s.npages) for s in slots]
        r = self.rnd
        x = r.random()
        op: TraceOp
        if x < 0.30:
            op = SetRegion(MemoryRegion(self._id(), self._flags(), self._gpa(ranges),
                                        self._size(self._pages()), self._uaddr()))
        elif x < 0.62 and slots:
            op = SetRegion(self._modify(r.choice(slots), ranges))
        elif x < 0.70:
            sid = r.choice([s.id | (s.as_id << 16) for s in slots] or [0])
            gpa = r.choice([0, 0x800, 1 << 63])
            ua = r.choice([0, UA_BASE + 8, self.ua_limit + self.page, self.ua_limit]) % (1 << 64)
            flags = r.choice([0, 0, 1, 2, 4, 8])
            op = SetRegion(MemoryRegion(r.choice([sid, self._id()]), flags, gpa, 0, ua))
        elif x < 0.82:
            op = GetDirtyLog(r.choice([s.id | (s.as_id << 16) for s in slots] + [self._id()]))
        elif x < 0.96:
            op = self._clear(slots)
        else:
            op = self._cap()
        return self._safe(op)

    def _modify(self, s: MemorySlot, ranges: list[tuple[int, int]]) -> MemoryRegion:
        r = self.rnd
        raw = (s.as_id << 16) | s.id
        flags = s.flags & 0xFFFF
        gpa = s.guest_phys_addr
        size = s.memory_size
        ua = s.userspace_addr
        kind = r.random()
        if kind < 0.25:  # FLAGS_ONLY: toggle dirty logging (also on read-only slots)
            flags ^= c.KVM_MEM_LOG_DIRTY_PAGES
        elif kind < 0.55:  # MOVE: by a page, onto itself, onto a neighbour, to the edges
            gpa = r.choice([gpa + self.page, gpa - self.page if gpa else 0, gpa,
                            self._gpa(ranges), gpa + size, (self.max_gfn + 1) * self.page - size,
                            (self.max_gfn + 1) * self.page, gpa + 1])
            if r.random() < 0.3:
                flags ^= c.KVM_MEM_LOG_DIRTY_PAGES
        elif kind < 0.65:
            flags ^= c.KVM_MEM_READONLY
        elif kind < 0.75:
            size = r.choice([size + self.page, size - self.page, size * 2, size + 1])
        elif kind < 0.85:
            ua = r.choice([ua + self.page, ua + 8, ua])
        elif kind < 0.88:
            flags |= r.choice([4, 8, 1 << 16])
        u64 = 1 << 64
        return MemoryRegion(raw, flags % (1 << 32), gpa % u64, max(size, 0) % u64, ua % u64)

    def _clear(self, slots: list[MemorySlot]) -> TraceOp:
        r = self.rnd
        if slots and r.random() < 0.85:
            s = r.choice(slots)
            sid, n = (s.as_id << 16) | s.id, s.npages
        else:
            sid, n = self._id(), 64
        first = r.choice([0, 0, 64, 128, 1, 63, n, n + 64, (n // 64) * 64])
        rest = max(n - first, 0)
        num = r.choice([0, rest, rest + 1, 64, 63, 1, rest - 1 if rest else 0, 128,
                        (rest // 64) * 64])
        bitmap: bytes | None = r.choice([None, b"", b"\xff" * ((num + 63) // 64 * 8),
                                         b"\x55" * 8])
        return ClearDirtyLog(sid, first, num, bitmap)

    def _cap(self) -> TraceOp:
        r = self.rnd
        if r.random() < 0.9:
            return EnableCap(c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, (r.choice([0, 1, 2, 3, 4, 7]),),
                             r.choice([0, 0, 0, 1]))
        # Mostly sizes the kernel refuses; a valid one (rarely) turns the ring on for the rest
        # of the sequence (sequences also start with a ring now and then, see _sequence).
        size = r.choice([2048, 3000, 1 << 21, 0, 4095, 5000]) if r.random() < 0.9 else 1 << 16
        return EnableCap(r.choice([c.KVM_CAP_DIRTY_LOG_RING, c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL]),
                         (size,))

    def _safe(self, op: TraceOp) -> TraceOp:
        """Keep successful kernel allocations small: a request that would pass the size
        limit with more than SAFE_PAGES pages gets a misaligned uaddr, so it still exercises
        the order of the checks but is refused before anything is allocated."""
        if isinstance(op, SetRegion):
            reg = op.region
            npages = reg.memory_size // self.page
            if SAFE_PAGES < npages <= MAX_PAGES:
                return SetRegion(reg._replace(userspace_addr=reg.userspace_addr | 8))
        return op


def _pair(profile: Profile, backend: str) -> tuple[VM, ModelVM]:
    model = ModelVM(profile)
    if backend == "model":
        return model, model
    from ..backends.dual import DualVM
    from ..backends.kvm import KvmVM

    return DualVM(model, KvmVM()), model


def run_fuzz(
    ops: int,
    seed: int,
    profile: Profile,
    backend: str = "both",
    sequence_length: int = 400,
    progress: Callable[[int], None] | None = None,
) -> FuzzReport:
    """Run ``ops`` requests in sequences of ``sequence_length``, each on a fresh VM pair."""
    report = FuzzReport()
    rnd = random.Random(seed)
    done = 0
    while done < ops:
        report.sequences += 1
        count = min(sequence_length, ops - done)
        for line in _sequence(rnd, profile, backend, count, report):
            del line
        done += count
        if progress is not None:
            progress(done)
    return report


def _sequence(
    rnd: random.Random, profile: Profile, backend: str, count: int, report: FuzzReport
) -> Iterator[str]:
    vm, model = _pair(profile, backend)
    gen = Generator(rnd, profile)
    replayer = Replayer(vm)
    history: list[TraceOp] = []
    first: list[TraceOp] = []
    if rnd.random() < 0.1:
        ring = (c.KVM_CAP_DIRTY_LOG_RING if profile.dirty_ring_tso
                else c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
        first.append(EnableCap(ring, (rnd.choice([4096, 1 << 16, 1 << 20]),)))
    try:
        for index in range(count):
            op = first.pop() if first and index == 0 else gen.next(model)
            step = replayer.step(op)
            report.requests += 1
            report.outcomes[_outcome_key(op, step, model)] += 1
            recorded = _with_expect(op, step.errno)
            history.append(recorded)
            divergent = [p for p in step.problems if p.startswith("divergence")]
            if divergent:
                report.divergences.append((divergent[0], [dumps(o) for o in history]))
                return
            report.agreed += 1
            if backend == "model":
                problems = model.check()
                if problems:
                    report.check_failures.append((problems[0], [dumps(o) for o in history]))
                    return
            yield ""
        if backend != "model":
            problems = model.check()
            if problems:
                report.check_failures.append((problems[0], [dumps(o) for o in history]))
    finally:
        vm.close()


def _outcome_key(op: TraceOp, step: object, model: ModelVM) -> tuple[str, str]:
    from ..errors import errno_name
    from .replay import ReplayStep

    assert isinstance(step, ReplayStep)
    if isinstance(op, SetRegion) and model.last_result is not None:
        r = model.last_result
        return (str(r.change) if r.change else "-", r.rule.code if r.rule else "ok")
    return (op.op, "ok" if not step.errno else errno_name(step.errno or 0))


def _with_expect(op: TraceOp, err: int | None) -> TraceOp:
    from dataclasses import replace

    return replace(op, expect=err)


__all__ = ["Divergence", "FuzzReport", "Generator", "KvmError", "run_fuzz"]

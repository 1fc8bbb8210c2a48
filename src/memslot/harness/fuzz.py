"""Random request sequences weighted to the edges of every rule, run on the model and the
real kernel side by side (or on the model alone with its integrity check).

Besides v1 memslot requests and the dirty log, a sequence creates guest_memfds and binds them
with REGION2 (offsets at the file end and near 2^63, closed and reused fd numbers), asks
KVM_CHECK_EXTENSION over the capability range on the VM fd and on /dev/kvm, enables
capabilities with 64-bit arguments, creates and closes vCPUs between requests, forks (Python's
``os.fork`` and libc's ``fork()``) and calls from the child, and ends with a random teardown
order (the VM fd before or after its guest_memfds and vCPUs, the references compared at
every step).

Each sequence runs on a fresh VM pair; a divergence ends the sequence and yields a
JSON-lines reproducer (the sequence up to the diverging operation, with the kernel's errno as
``expect``) that ``memslot replay --backend both`` replays whole: the lifetime operations
(vCPUs made and closed, guest_memfds closed, forks, the teardown's closes) are trace records
too (``create_vcpu``, ``close_vcpu``, ``close_guest_memfd``, ``fork``, ``close_vm``), run
through the same replayer as the requests.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import constants as c
from ..arch import arch_class
from ..backends.base import VM
from ..backends.dual import Divergence
from ..backends.model import ModelVM
from ..engine.caps import DERIVED
from ..engine.slot import MemorySlot
from ..errors import KvmError, errno_name
from ..profile import Profile
from ..request import MemoryRegion
from ..trace.jsonl import dumps
from ..trace.records import (
    FORK_CALLS,
    FORK_HOWS,
    CheckExtension,
    ClearDirtyLog,
    CloseGuestMemfd,
    CloseVcpu,
    CloseVm,
    CreateGuestMemfd,
    CreateVcpu,
    EnableCap,
    Fork,
    GetDirtyLog,
    SetRegion,
    TraceOp,
)
from .replay import Replayer, ReplayStep

PAGE = c.PAGE_SIZE
UA_BASE = 0x7F0000000000
SAFE_PAGES = 1 << 18  # larger successful slots would cost the kernel real vmalloc memory
MAX_PAGES = c.KVM_MEM_MAX_NR_PAGES
MAX_VCPUS_PER_VM = 4  # real vCPUs cost the kernel memory; ids past the limits cost nothing
#: Capability numbers past any the kernel knows, and values a ``long`` sees as negative.
#: Capability numbers no modelled kernel assigns (7.3's last is 251): every arch answers 0.
#: A preset states no arch answers, so only these and the derived ones are asked of it
#: (4, KVM_CAP_SET_TSS_ADDR, and 200, KVM_CAP_SREGS2, are 1 on every x86 kernel).
UNASSIGNED_CAPS = (255, 511)
CAP_EDGES = (1000, 1 << 31, (1 << 32) + c.KVM_CAP_USER_MEMORY, 1 << 63,
             (1 << 63) | c.KVM_CAP_NR_MEMSLOTS, (1 << 64) - 1)
#: Capabilities KVM_ENABLE_CAP passes to x86's arch handler, which refuses them (EINVAL):
#: check-only capabilities and unassigned numbers.
NOT_ENABLEABLE = (0, c.KVM_CAP_USER_MEMORY, c.KVM_CAP_NR_VCPUS, c.KVM_CAP_NR_MEMSLOTS,
                  c.KVM_CAP_SYNC_MMU, c.KVM_CAP_GUEST_MEMFD, 1000, 0xFFFFFFFF)


#: What a sequence is made of: trace records (lifetime ones included).
FuzzOp = TraceOp


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
        #: Live guest_memfds (fd number as the caller sees it -> size) and closed numbers.
        self.gmems: dict[int, int] = {}
        self.closed_fds: list[int] = []
        self.vcpus: list[int] = []
        self.vcpu_ids: set[int] = set()
        #: A detected profile records the host (its arch answers, CPU count, vCPU limits): the
        #: whole capability range is compared. A preset states no host: only what the model
        #: derives from the kernel alone (not the vCPU limits, which are host or config facts).
        self.detected = bool(profile.extensions)
        host_caps = {c.KVM_CAP_NR_VCPUS, c.KVM_CAP_MAX_VCPUS, c.KVM_CAP_MAX_VCPU_ID}
        self.caps = (list(range(0, 260)) if self.detected
                     else [*sorted(DERIVED - host_caps), *UNASSIGNED_CAPS])
        self.user_slots = profile.user_mem_slots
        self.page = profile.page_size
        # The last gfn the arch lets a slot cover: gpas around it probe that bound.
        limit = arch_class(profile).gfn_limit(profile)
        self.arch_caps = sorted(arch_class(profile).enable_caps)
        self.max_gfn = limit - 1 if limit is not None else (1 << 40) - 1
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
    def next(self, model: ModelVM) -> FuzzOp:
        slots = [s for a in range(model.nr_address_spaces) for s in model.memslots(a)]
        ranges = [(s.base_gfn, s.npages) for s in slots]
        r = self.rnd
        x = r.random()
        op: FuzzOp
        if x < 0.26:
            op = SetRegion(MemoryRegion(self._id(), self._flags(), self._gpa(ranges),
                                        self._size(self._pages()), self._uaddr()))
        elif x < 0.54 and slots:
            op = SetRegion(self._modify(r.choice(slots), ranges))
        elif x < 0.61:
            sid = r.choice([s.id | (s.as_id << 16) for s in slots] or [0])
            gpa = r.choice([0, 0x800, 1 << 63])
            ua = r.choice([0, UA_BASE + 8, self.ua_limit + self.page, self.ua_limit]) % (1 << 64)
            flags = r.choice([0, 0, 1, 2, 4, 8])
            op = SetRegion(MemoryRegion(r.choice([sid, self._id()]), flags, gpa, 0, ua))
        elif x < 0.71:
            op = GetDirtyLog(r.choice([s.id | (s.as_id << 16) for s in slots] + [self._id()]))
        elif x < 0.82:
            op = self._clear(slots)
        elif x < 0.85:
            op = self._cap()
        elif x < 0.92:
            op = self._gmem(ranges)
        elif x < 0.965:
            op = CheckExtension(self._cap_number(), system=r.random() < 0.4)
        elif x < 0.995:
            op = self._vcpu()
        else:
            op = Fork(r.choice(FORK_HOWS), r.choice(FORK_CALLS))
        return self._safe(op)

    # -- guest_memfd ------------------------------------------------------------------------
    def _gmem(self, ranges: list[tuple[int, int]]) -> FuzzOp:
        """Create a file, close one, or bind with REGION2 (mostly to a live file, at offsets
        by the file's end and near 2^63; also closed numbers and plain fds)."""
        r = self.rnd
        x = r.random()
        page = self.page
        if x < 0.25 or (not self.gmems and x < 0.6):
            size = r.choice([page, 2 * page, 16 * page, 256 * page, page, 2 * page]
                            if r.random() < 0.85 else
                            [0, page + 1, 1 << 63, (1 << 63) - page, (1 << 64) - page])
            flags = r.choice([0, 0, 1, 2, 3]) if r.random() < 0.9 else r.choice([4, 1 << 63])
            return CreateGuestMemfd(size, flags)
        if x < 0.33 and self.gmems:
            return CloseGuestMemfd(r.choice(sorted(self.gmems)))
        fds = sorted(self.gmems)
        if fds and r.random() < 0.8:
            fd = r.choice(fds)
            fsize = self.gmems[fd]
        else:
            fd = r.choice([*self.closed_fds, 0, 1, 2, 0xFFFFFFFF])
            fsize = 2 * page
        npages = r.choice([1, 1, 2, fsize // page, fsize // page + 1])
        size = max(npages, 1) * page
        offset = r.choice([0, 0, page, fsize - page, fsize - size, fsize, fsize + page,
                           (1 << 63) - page, (1 << 63) - size, 1 << 63, (1 << 64) - page,
                           0x800]) % (1 << 64)
        flags = c.KVM_MEM_GUEST_MEMFD | r.choice([0, 0, 0, c.KVM_MEM_LOG_DIRTY_PAGES,
                                                  c.KVM_MEM_READONLY])
        if r.random() < 0.1:
            flags = r.choice([0, c.KVM_MEM_LOG_DIRTY_PAGES])  # a v2 request without a file
        sid = r.choice([r.randrange(12), r.randrange(12), self._id()])
        gpa = self._gpa(ranges) if r.random() < 0.3 else r.randrange(0x100, 0x200) * page
        return SetRegion(MemoryRegion(sid, flags, gpa, size, UA_BASE + r.randrange(64) * page,
                                      offset, fd))

    # -- capabilities ------------------------------------------------------------------------
    def _cap_number(self) -> int:
        r = self.rnd
        return r.choice(self.caps) if r.random() < 0.95 else r.choice(CAP_EDGES)

    # -- vCPUs ---------------------------------------------------------------------------------
    def _vcpu(self) -> FuzzOp:
        r = self.rnd
        if self.vcpus and r.random() < 0.3:
            return CloseVcpu(r.choice(self.vcpus))
        # The id limit is a host fact: at and around it only where the profile was detected.
        limit = self.p.max_vcpu_ids if self.detected else 1 << 32
        if len(self.vcpu_ids) >= MAX_VCPUS_PER_VM or r.random() < 0.4:
            # Ids the kernel refuses before allocating anything, or one it has already.
            taken = sorted(self.vcpu_ids)
            return CreateVcpu(r.choice([limit, limit + 1, 1 << 32, 1 << 40, *taken[:1]]))
        return CreateVcpu(r.choice([None, None, 0, 1, limit - 1 if self.detected else 2]))

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
        x = r.random()
        wide = [0, 1 << 32, (1 << 32) | 1, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1,
                r.randrange(1 << 64)]
        if x < 0.5:
            arg = r.choice([0, 1, 2, 3, 4, 7]) if r.random() < 0.8 else r.choice(wide)
            return EnableCap(c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, (arg,), r.choice([0, 0, 0, 1]))
        if x < 0.65:
            arg = r.choice([0, 200000, *wide])
            args = (arg,) if r.random() < 0.8 else (arg, *(r.choice(wide) for _ in range(3)))
            return EnableCap(c.KVM_CAP_HALT_POLL, args, r.choice([0, 0, 0, 1, 1 << 31]))
        if x < 0.75:
            return EnableCap(r.choice(NOT_ENABLEABLE), (r.choice(wide),))
        if x < 0.85 and self.detected and self.arch_caps:
            # The arch's own capabilities (what VMMs enable), their arguments at the edges of
            # each check; a detected profile records the host answers some of them depend on.
            arg = r.choice([0, 1, 2, 3, 4, 8, 12, 16, 24, 48, 49, 0x1000, 4096, 4097,
                            (1 << 32) | 1, *wide])
            return EnableCap(r.choice(self.arch_caps), (arg,), r.choice([0, 0, 0, 0, 1]))
        # Mostly sizes the kernel refuses, also in the high 32 bits that
        # kvm_vm_ioctl_enable_dirty_log_ring truncates away; a valid one (rarely) turns the
        # ring on for the rest of the sequence (sequences also start with one, see _sequence).
        if r.random() < 0.9:
            size = r.choice([2048, 3000, 1 << 21, 0, 4095, 5000, 1 << 32, (1 << 32) | 3000,
                             (1 << 40) | (1 << 21)])
        else:
            size = r.choice([1 << 16, (1 << 32) | 0x1000, (1 << 63) | 0x10000])
        return EnableCap(r.choice([c.KVM_CAP_DIRTY_LOG_RING, c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL]),
                         (size,))

    def _safe(self, op: FuzzOp) -> FuzzOp:
        """Keep successful kernel allocations small: a request that would pass the size
        limit with more than SAFE_PAGES pages gets a misaligned uaddr, so it still exercises
        the order of the checks but is refused before anything is allocated."""
        if isinstance(op, SetRegion):
            reg = op.region
            npages = reg.memory_size // self.page
            if SAFE_PAGES < npages <= MAX_PAGES:
                return SetRegion(reg._replace(userspace_addr=reg.userspace_addr | 8))
        return op


TEARDOWNS = ("close", "vm-fd-first", "files-first", "interleaved")


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
    """Run ``ops`` requests in sequences of ``sequence_length``, each on a fresh VM pair.
    ``KeyboardInterrupt`` propagates untouched (never a result)."""
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


class _Diverged(Exception):
    """Internal: a lifetime operation diverged (``what``)."""

    def __init__(self, what: str, kernel_errno: int | None = None) -> None:
        self.what = what
        self.kernel_errno = kernel_errno


def _sequence(
    rnd: random.Random, profile: Profile, backend: str, count: int, report: FuzzReport
) -> Iterator[str]:
    vm, model = _pair(profile, backend)
    gen = Generator(rnd, profile)
    replayer = Replayer(vm)
    history = _History()
    first: list[FuzzOp] = []
    if rnd.random() < 0.1:
        ring = (c.KVM_CAP_DIRTY_LOG_RING if profile.dirty_ring_tso
                else c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
        first.append(EnableCap(ring, (rnd.choice([4096, 1 << 16, 1 << 20]),)))
    closed = False
    try:
        for index in range(count):
            op = first.pop() if first and index == 0 else gen.next(model)
            report.requests += 1
            if isinstance(op, SetRegion) and op.region.guest_memfd is not None:
                # The number as generated (a live, closed or foreign fd), never one the
                # replayer would create for a trace that names an fd without creating it.
                number = op.region.guest_memfd
                replayer._gmem.setdefault((op.vm, number), number)
            step = replayer.step(op)
            report.outcomes[_outcome_key(op, step, model)] += 1
            op = _track(gen, op, step)
            history.record(_with_expect(op, step.errno))
            divergent = [p for p in step.problems if p.startswith("divergence")]
            if divergent:
                report.divergences.append((divergent[0], history.lines()))
                return
            report.agreed += 1
            if backend == "model":
                problems = model.check()
                if problems:
                    report.check_failures.append((problems[0], history.lines()))
                    return
            yield ""
        if backend != "model":
            problems = model.check()
            if problems:
                report.check_failures.append((problems[0], history.lines()))
                return
            from ..backends.dual import Divergence, DualVM

            if isinstance(vm, DualVM):
                try:
                    vm.verify()
                except Divergence as exc:
                    report.divergences.append((f"divergence: {exc}", history.lines()))
                    return
        order = rnd.choice(TEARDOWNS)
        try:
            _teardown(replayer, history, model, gen, order, rnd)
            closed = True
        except _Diverged as exc:
            report.divergences.append((f"divergence: teardown {order}: {exc.what}",
                                       history.lines()))
            return
        report.outcomes[("teardown", order)] += 1
    finally:
        if not closed:
            vm.close()


class _History:
    """The reproducer of a sequence: every operation done so far, as trace records with the
    kernel's errno as ``expect`` (lifetime operations included)."""

    def __init__(self) -> None:
        self.ops: list[TraceOp] = []

    def record(self, op: TraceOp) -> None:
        self.ops.append(op)

    def lines(self) -> list[str]:
        return [dumps(op) for op in self.ops]


def _track(gen: Generator, op: TraceOp, step: ReplayStep) -> TraceOp:
    """Keep the generator's view of live fds and vCPUs; returns ``op`` as the reproducer
    records it (with the guest_memfd number or capability value the call gave)."""
    if step.errno != 0:
        return op
    if isinstance(op, CreateGuestMemfd) and step.value is not None:
        gen.gmems[step.value] = op.size
        return dataclasses.replace(op, fd=step.value)
    if isinstance(op, CheckExtension):
        return dataclasses.replace(op, value=step.value)
    if isinstance(op, CloseGuestMemfd):
        gen.gmems.pop(op.fd, None)
        gen.closed_fds.append(op.fd)
    elif isinstance(op, CreateVcpu) and step.value is not None:
        gen.vcpus.append(step.value)
        gen.vcpu_ids.add(step.value)
    elif isinstance(op, CloseVcpu) and op.vcpu_id in gen.vcpus:
        gen.vcpus.remove(op.vcpu_id)
    return op


def _teardown(replayer: Replayer, history: _History, model: ModelVM, gen: Generator,
              order: str, rnd: random.Random) -> None:
    """Close the VM in ``order`` (each close a record of the reproducer); the references must
    agree at every step, and the model must keep every slot's metadata until the last
    reference goes (kvm_destroy_vm)."""
    vm = replayer.vm

    def close(op: TraceOp) -> None:
        step = replayer.step(op)
        history.record(_with_expect(op, step.errno))
        divergent = [p for p in step.problems if p.startswith("divergence")]
        if divergent:
            raise _Diverged(divergent[0].removeprefix("divergence: "))

    try:
        if order == "close":
            close(CloseVm("all"))
            if model.vmalloc_bytes() or model.metadata_bytes():
                raise _Diverged("metadata left after close()")
            return
        held = [("gmem", fd) for fd in sorted(gen.gmems)] + [("vcpu", v) for v in gen.vcpus]
        rnd.shuffle(held)
        position = {"vm-fd-first": 0, "files-first": len(held)}.get(
            order, rnd.randrange(len(held) + 1))
        held.insert(position, ("vm", 0))
        metadata = model.metadata_bytes()
        for kind, number in held:
            close(CloseVm("fd") if kind == "vm" else
                  CloseGuestMemfd(number) if kind == "gmem" else CloseVcpu(number))
            refs = vm.references()
            if refs.alive and model.metadata_bytes() != metadata:
                raise _Diverged(f"metadata freed while {refs} hold the VM")
        if vm.references().alive or model.metadata_bytes() or model.vmalloc_bytes():
            raise _Diverged("the VM outlived its last reference")
    except Divergence as exc:
        raise _Diverged(str(exc)) from None
    finally:
        vm.close()


def _outcome_key(op: TraceOp, step: object, model: ModelVM) -> tuple[str, str]:
    from .replay import ReplayStep

    assert isinstance(step, ReplayStep)
    if isinstance(op, SetRegion) and model.last_result is not None:
        r = model.last_result
        kind = str(r.change) if r.change else "-"
        if op.region.guest_memfd is not None:
            kind = f"v2 {kind}"
        return (kind, r.rule.code if r.rule else "ok")
    if isinstance(op, CheckExtension):
        where = "check_extension system" if op.system else "check_extension vm"
        return (where, "ok" if not step.errno else errno_name(step.errno or 0))
    if isinstance(op, EnableCap):
        name = c.CAPABILITY_NAMES.get(op.cap, "other")
        wide = " 64-bit" if any(a >> 32 for a in op.args) else ""
        result = "ok" if not step.errno else errno_name(step.errno or 0)
        return (f"enable_cap {name.removeprefix('KVM_CAP_')}{wide}", result)
    if isinstance(op, Fork):
        result = "ok" if not step.errno else errno_name(step.errno or 0)
        return (op.op, f"{op.how} {op.call} {result}")
    return (op.op, "ok" if not step.errno else errno_name(step.errno or 0))


def _with_expect(op: TraceOp, err: int | None) -> TraceOp:
    return dataclasses.replace(op, expect=err)


__all__ = ["Divergence", "FuzzReport", "Generator", "KvmError", "run_fuzz"]

"""Random request sequences against a naive reference model, on every preset.

The reference is written from the spec, not from the model: a dict of slots, a linear
overlap scan, the classification of spec 2.1, the checks of spec 1 in table order, the
arch prepare checks of spec 4.1/5, the allocation order of spec 3.1 (new slot, INVALID copy,
dirty bitmap, arch arrays) for injected ENOMEM, the generation arithmetic of spec 3.1 and
the dirty-log rules of spec 7 (bitmaps, GET/CLEAR, manual protect, the dirty ring).

Values are weighted to the edges: slot ids at and past the limit, as_id bits, every flag
bit, misalignment by a byte and by a page, gpa + size wrapping at 2^64, the max gfn / IPA /
mem_limit, the user address limit, overlaps by one page, MOVE onto itself and next to a
neighbour, FLAGS_ONLY toggles on read-only slots, deletes of missing slots, dirty-log
get/clear with every range rule, and ENOMEM. After every step ``check()`` must be empty and
the model must agree with the reference.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import memslot
from memslot import KvmError, ModelVM, Profile
from memslot.constants import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
)
from memslot.engine.change import ChangeType
from memslot.request import MemoryRegion

LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
GMEM = KVM_MEM_GUEST_MEMFD
U64 = 1 << 64
MAX_PAGES = (1 << 31) - 1
BAD_FD = 0xFFFFFFFF
MiB = 1 << 20
CREATE, DELETE, MOVE, FLAGS_ONLY, NOOP = (ChangeType.CREATE, ChangeType.DELETE,
                                          ChangeType.MOVE, ChangeType.FLAGS_ONLY,
                                          ChangeType.NOOP)
STEPS = settings(max_examples=100, stateful_step_count=40, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------
class RefBitmap:
    """A dirty log kept sparsely: the fill value of ``[0, npages)`` and the pages that
    differ from it."""

    def __init__(self, npages: int, filled: bool) -> None:
        self.npages = npages
        self.filled = filled
        self.flipped: set[int] = set()

    def set(self, page: int) -> None:
        (self.flipped.discard if self.filled else self.flipped.add)(page)

    def clear(self, page: int) -> None:
        (self.flipped.add if self.filled else self.flipped.discard)(page)

    def to_bytes(self) -> bytes:
        value = (1 << self.npages) - 1 if self.filled else 0
        for page in self.flipped:
            value ^= 1 << page
        return value.to_bytes((self.npages + 63) // 64 * 8, "little")


@dataclass
class RefSlot:
    base: int
    npages: int
    flags: int
    uaddr: int
    bitmap: RefBitmap | None = None


class Refused(Exception):
    def __init__(self, err: int, change: ChangeType | None = None) -> None:
        self.err = err
        self.change = change


@dataclass
class Reference:
    """What the spec says a VM of profile ``p`` holds and answers."""

    p: Profile
    slots: dict[tuple[int, int], RefSlot] = field(default_factory=dict)
    gens: list[int] = field(default_factory=list)
    manual: int = 0
    ring: int = 0  # dirty ring size in bytes, 0 without a ring
    fault: list[str | None] | None = None  # [kind] while an ENOMEM is armed (nth = 1)

    def __post_init__(self) -> None:
        self.gens = list(range(self.p.nr_address_spaces))

    # -- arch facts -----------------------------------------------------------------------
    @property
    def user_slots(self) -> int:
        return 32767 - self.p.internal_mem_slots

    def _alloc(self, kind: str, change: ChangeType) -> None:
        if self.fault is not None and self.fault[0] in (None, kind):
            self.fault = None
            raise Refused(errno.ENOMEM, change)

    def _arch_prepare(self, change: ChangeType, base: int, npages: int, flags: int,
                      uaddr: int) -> None:
        p = self.p
        ps = p.page_size
        if p.arch == "x86":
            if change in (CREATE, MOVE):
                bits = p.phys_bits if p.tdp else 52
                if base + npages - 1 > (1 << (bits - 12)) - 1:
                    raise Refused(errno.EINVAL, change)
        elif p.arch == "arm64":
            if change is not DELETE and base + npages > (1 << p.ipa_bits) // ps:
                raise Refused(errno.EFAULT, change)
        elif p.arch == "riscv":
            if change is not DELETE and base + npages >= (1 << p.ipa_bits) // ps:
                raise Refused(errno.EFAULT, change)
        elif p.arch == "s390":
            if change in (CREATE, MOVE):
                if uaddr % MiB or (npages * ps) % MiB:
                    raise Refused(errno.EINVAL, change)
                if base * ps + npages * ps > p.mem_limit:
                    raise Refused(errno.EINVAL, change)
        elif p.arch == "ppc-hv" and change is CREATE and (npages * 8) >> 16 > p.totalram_pages:
            raise Refused(errno.ENOMEM, change)

    # -- KVM_SET_USER_MEMORY_REGION{,2} -------------------------------------------------------
    def request(self, r: MemoryRegion) -> tuple[int, ChangeType | None]:
        """Apply ``r``; return (errno, change) like the model's record."""
        try:
            change = self._request(r)
        except Refused as refusal:
            return refusal.err, refusal.change
        return 0, change

    def _request(self, r: MemoryRegion) -> ChangeType:
        p = self.p
        ps = p.page_size
        as_id, sid = r.slot >> 16, r.slot & 0xFFFF
        flags, gpa, size, uaddr = r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr
        if r.guest_memfd is None and flags & ~(LOG | RO):
            raise Refused(errno.EINVAL)
        if sid >= self.user_slots:
            raise Refused(errno.EINVAL)
        valid = LOG | (GMEM if p.guest_memfd else 0)
        if flags & GMEM:
            valid &= ~LOG
        elif p.readonly_mem:
            valid |= RO
        if flags & ~valid:
            raise Refused(errno.EINVAL)
        if size % ps or gpa % ps or uaddr % ps:
            raise Refused(errno.EINVAL)
        if p.arch == "arm64" and uaddr >> 56:
            raise Refused(errno.EINVAL)
        limit = p.user_addr_limit
        if limit is not None and (
            # powerpc64 from 7.2: address and size each below the limit; else their sum.
            (uaddr | size) >= limit if p.access_ok_mask else uaddr + size > limit
        ):
            raise Refused(errno.EINVAL)
        if flags & GMEM and (r.guest_memfd_offset % ps or r.guest_memfd_offset + size >= U64):
            raise Refused(errno.EINVAL)
        if as_id >= p.nr_address_spaces:
            raise Refused(errno.EINVAL)
        if gpa + size >= U64:
            raise Refused(errno.EINVAL)
        npages = size // ps
        if npages > MAX_PAGES:
            raise Refused(errno.EINVAL)
        key = (as_id, sid)
        old = self.slots.get(key)
        base = gpa // ps
        if size == 0:
            if old is None:
                raise Refused(errno.EINVAL)
            change = DELETE
        elif old is None:
            change = CREATE
        else:
            if flags & GMEM:
                raise Refused(errno.EINVAL)
            if uaddr != old.uaddr or npages != old.npages or (flags ^ old.flags) & (RO | GMEM):
                raise Refused(errno.EINVAL)
            if base != old.base:
                change = MOVE
            elif flags != old.flags:
                change = FLAGS_ONLY
            else:
                return NOOP
        if change in (CREATE, MOVE):
            for (a, i), s in self.slots.items():  # the naive overlap scan
                if a == as_id and i != sid and s.base < base + npages and base < s.base + s.npages:
                    raise Refused(errno.EEXIST, change)
        n_as = p.nr_address_spaces
        if change is not DELETE:
            self._alloc("slot", change)
            if flags & GMEM:
                raise Refused(errno.EBADF, change)  # the only fd used is never open
        if change in (DELETE, MOVE):
            self._alloc("invalid_slot", change)
            self.gens[as_id] += n_as  # swap #1: the INVALID copy
        try:
            bitmap = None
            if change is not DELETE and flags & LOG:
                if old is not None and old.bitmap is not None:
                    bitmap = old.bitmap  # carried over, even with a ring
                elif not self.ring:  # kvm_use_dirty_bitmap
                    self._alloc("dirty_bitmap", change)
                    bitmap = RefBitmap(npages, bool(self.manual & 2))
            if change is DELETE:
                assert old is not None
                self._arch_prepare(change, old.base, old.npages, old.flags, old.uaddr)
            else:
                self._arch_prepare(change, base, npages, flags, uaddr)
        except Refused:
            if change in (DELETE, MOVE):
                self.gens[as_id] += n_as  # swap #2: the old slot restored
            raise
        self.gens[as_id] += n_as  # install
        if change is DELETE:
            del self.slots[key]
        else:
            self.slots[key] = RefSlot(base, npages, flags, uaddr, bitmap)
        return change

    # -- dirty logging --------------------------------------------------------------------
    def _log_slot(self, slot: int) -> RefSlot:
        if self.ring:
            raise Refused(errno.ENXIO)
        as_id, sid = slot >> 16, slot & 0xFFFF
        if as_id >= self.p.nr_address_spaces or sid >= self.user_slots:
            raise Refused(errno.EINVAL)
        s = self.slots.get((as_id, sid))
        if s is None or s.bitmap is None:
            raise Refused(errno.ENOENT)
        return s

    def get_dirty_log(self, slot: int) -> bytes:
        s = self._log_slot(slot)
        assert s.bitmap is not None
        data = s.bitmap.to_bytes()
        if not self.manual:
            s.bitmap.filled = False
            s.bitmap.flipped = set()
        return data

    def clear_dirty_log(self, slot: int, first: int, num: int, mask: bytes | None) -> None:
        if not self.p.manual_dirty_log_caps:
            raise Refused(errno.ENOTTY)
        if self.ring:
            raise Refused(errno.ENXIO)
        as_id, sid = slot >> 16, slot & 0xFFFF
        if as_id >= self.p.nr_address_spaces or sid >= self.user_slots:
            raise Refused(errno.EINVAL)
        if first % 64:
            raise Refused(errno.EINVAL)
        s = self._log_slot(slot)
        n = s.npages
        if first > n or num > n - first or (num < n - first and num % 64):
            raise Refused(errno.EINVAL)
        nbytes = (num + 63) // 64 * 8
        if nbytes and mask is None:
            raise Refused(errno.EFAULT)
        assert s.bitmap is not None
        bits = int.from_bytes(mask or b"", "little")
        while bits:
            low = bits & -bits
            page = first + low.bit_length() - 1
            if page < n:
                s.bitmap.clear(page)
            bits ^= low

    def mark_page_dirty(self, gfn: int, as_id: int) -> bool:
        for (a, _), s in self.slots.items():
            if a == as_id and s.base <= gfn < s.base + s.npages:
                if not s.flags & LOG:
                    return False
                if self.ring:
                    return True  # pushed to the ring
                if s.bitmap is None:
                    return False
                s.bitmap.set(gfn - s.base)
                return True
        return False

    def enable_manual(self, arg: int) -> None:
        caps = self.p.manual_dirty_log_caps
        if not caps:
            raise Refused(errno.EINVAL)
        allowed = caps if arg & 1 else 1
        if arg & ~allowed:
            raise Refused(errno.EINVAL)
        self.manual = arg

    def enable_ring(self, size: int) -> None:
        """kvm_vm_ioctl_enable_dirty_log_ring, checks in source order (no vCPUs here)."""
        p = self.p
        if not (p.dirty_ring_tso or p.dirty_ring_acq_rel):
            raise Refused(errno.EINVAL)
        if not size or size & (size - 1):
            raise Refused(errno.EINVAL)
        if size < (64 + p.cpu_dirty_log_size) * 16 or size < p.page_size:
            raise Refused(errno.EINVAL)
        if size > 65536 * 16:
            raise Refused(errno.E2BIG)
        if self.ring:
            raise Refused(errno.EINVAL)
        self.ring = size


# ---------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------
def _limits(p: Profile) -> list[int]:
    """Guest-physical limits worth probing on this profile (bytes)."""
    if p.arch == "x86":
        return [(p.max_gfn + 1) * p.page_size]
    if p.arch in ("arm64", "riscv"):
        return [1 << p.ipa_bits]
    if p.arch == "s390":
        return [p.mem_limit & ~(MiB - 1), p.mem_limit]
    return [1 << 52]


class MemslotMachine(RuleBasedStateMachine):
    """Drives one ModelVM and one Reference with the same random calls."""

    PROFILE: str | Profile = "x86_64-shadow"

    def __init__(self) -> None:
        super().__init__()
        self.vm = ModelVM(self.PROFILE)
        self.p = self.vm.profile
        self.ref = Reference(self.p)

    def teardown(self) -> None:
        self.vm.close()
        assert self.vm.allocations() == []

    # -- value pools, weighted to the edges -------------------------------------------------
    def _slot_field(self, data: st.DataObject) -> int:
        user = self.ref.user_slots
        sid = data.draw(st.one_of(st.integers(0, 4), st.integers(0, 4), st.sampled_from(
            [user - 1, user, user + 1, 32766, 32767, 65535])), label="id")
        as_id = data.draw(st.one_of(st.integers(0, self.p.nr_address_spaces - 1),
                                    st.sampled_from([1, 2, 0xFFFF])), label="as_id")
        return (as_id << 16) | sid

    def _flags(self, data: st.DataObject) -> int:
        return data.draw(st.one_of(
            st.sampled_from([0, 0, LOG, RO, LOG | RO, GMEM, GMEM | LOG, GMEM | RO]),
            st.sampled_from([1 << b for b in range(32)]),
            st.integers(0, (1 << 32) - 1)), label="flags")

    def _size(self, data: st.DataObject) -> int:
        ps = self.p.page_size
        return data.draw(st.sampled_from([
            ps, 2 * ps, 3 * ps, MiB, 2 * MiB, 4 * MiB, 64 * ps, 513 * ps, ps + 1, ps - 1,
            MiB + ps, MAX_PAGES * ps, (MAX_PAGES + 1) * ps, U64 - ps, 0]), label="size")

    def _gpa(self, data: st.DataObject) -> int:
        ps = self.p.page_size
        near = [s.base * ps for s in self.ref.slots.values()]
        near += [(s.base + s.npages) * ps for s in self.ref.slots.values()]
        edges = [0, ps, MiB, 1 << 32, U64 - ps, U64 - 2 * ps]
        for limit in _limits(self.p):
            edges += [limit - ps, limit, limit - MiB, limit - 2 * MiB]
        base = data.draw(st.sampled_from(near + edges), label="gpa")
        delta = data.draw(st.sampled_from([0, 0, 0, ps, -ps, 1, MiB, -MiB]), label="gpa delta")
        return min(max(base + delta, 0), U64 - 1)

    def _uaddr(self, data: st.DataObject) -> int:
        ps = self.p.page_size
        limit = self.p.user_addr_limit if self.p.user_addr_limit is not None else U64 - ps
        pool = [0, 0, MiB, 1 << 32, limit - ps, limit - MiB, limit, 1 << 56, 1 << 63,
                U64 - ps, 1, MiB + ps]
        pool += [s.uaddr for s in self.ref.slots.values()]
        return data.draw(st.sampled_from(pool), label="uaddr")

    def _version(self, data: st.DataObject, flags: int) -> int | None:
        """``None`` for the v1 ioctl, else the v2 guest_memfd (never an open fd)."""
        if data.draw(st.booleans(), label="v2"):
            return BAD_FD if flags & GMEM else 0
        return None

    # -- requests ---------------------------------------------------------------------------
    def _submit(self, r: MemoryRegion) -> None:
        gens_before = list(self.ref.gens)
        want_err, want_change = self.ref.request(r)
        result = self.vm.submit(r)
        event(f"{result.errno_name} {result.change}")
        assert (result.errno, result.change) == (want_err, want_change), (
            r, result.summary(), want_err, want_change, gens_before)

    @rule(data=st.data())
    def random_request(self, data: st.DataObject) -> None:
        flags = self._flags(data)
        self._submit(MemoryRegion(self._slot_field(data), flags, self._gpa(data),
                                  self._size(data), self._uaddr(data),
                                  data.draw(st.sampled_from([0, 0, 1, U64 - self.p.page_size])),
                                  self._version(data, flags)))

    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        as_id = data.draw(st.integers(0, self.p.nr_address_spaces - 1))
        sid = data.draw(st.integers(0, 7))
        flags = data.draw(st.sampled_from([0, LOG, RO, LOG | RO] if self.p.readonly_mem
                                          else [0, LOG]))
        size = data.draw(st.sampled_from([MiB, 2 * MiB, 4 * MiB]))
        gpa = data.draw(st.integers(0, 64)) * MiB
        uaddr = data.draw(st.integers(0, 64)) * MiB
        self._submit(MemoryRegion((as_id << 16) | sid, flags, gpa, size, uaddr))

    def _existing(self, data: st.DataObject) -> tuple[tuple[int, int], RefSlot] | None:
        if not self.ref.slots:
            return None
        key = data.draw(st.sampled_from(sorted(self.ref.slots)), label="existing")
        return key, self.ref.slots[key]

    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        """MOVE by a page either way, onto itself, next to or onto a neighbour, past a
        limit; sometimes toggling dirty logging or another flag too."""
        got = self._existing(data)
        if got is None:
            return
        (as_id, sid), s = got
        ps = self.p.page_size
        others = [o for (a, i), o in self.ref.slots.items() if a == as_id and i != sid]
        targets = [s.base + 1, s.base - 1, s.base, s.base + s.npages, s.base - s.npages,
                   s.base + 256]
        for o in others:
            targets += [o.base + o.npages, o.base - s.npages, o.base, o.base - s.npages + 1]
        targets += [lim // ps - s.npages for lim in _limits(self.p)]
        targets += [lim // ps - s.npages + 1 for lim in _limits(self.p)]
        base = data.draw(st.sampled_from([t for t in targets if 0 <= t * ps < U64] or [0]))
        flags = s.flags ^ data.draw(st.sampled_from([0, 0, LOG, RO]))
        self._submit(MemoryRegion((as_id << 16) | sid, flags, base * ps, s.npages * ps,
                                  s.uaddr))

    @rule(data=st.data())
    def flags_only(self, data: st.DataObject) -> None:
        got = self._existing(data)
        if got is None:
            return
        (as_id, sid), s = got
        ps = self.p.page_size
        flags = s.flags ^ data.draw(st.sampled_from([LOG, LOG, RO, GMEM, 0, 8]))
        v2 = BAD_FD if flags & ~(LOG | RO) else None
        self._submit(MemoryRegion((as_id << 16) | sid, flags, s.base * ps, s.npages * ps,
                                  s.uaddr, 0, v2))

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """DELETE of an existing or missing id with whatever gpa/uaddr/flags (checked but
        ignored)."""
        got = self._existing(data)
        if got is not None and data.draw(st.booleans()):
            (as_id, sid), _ = got
            slot = (as_id << 16) | sid
        else:
            slot = self._slot_field(data)
        flags = data.draw(st.sampled_from([0, 0, LOG, RO, 8]))
        gpa = data.draw(st.sampled_from([0, 0, self.p.page_size, 1, 1 << 40]))
        uaddr = data.draw(st.sampled_from([0, 0, MiB, 1, self.p.user_addr_limit or 0, U64 - 4096]))
        self._submit(MemoryRegion(slot, flags, gpa, 0, uaddr))

    @rule(kind=st.sampled_from([None, "slot", "invalid_slot", "dirty_bitmap"]))
    def inject_enomem(self, kind: str | None) -> None:
        self.vm.inject_enomem(1, kind=kind)
        self.ref.fault = [kind]

    # -- dirty logging ------------------------------------------------------------------------
    def _log_target(self, data: st.DataObject) -> tuple[int, RefSlot | None]:
        small = [(k, s) for k, s in self.ref.slots.items() if s.npages <= 1 << 16]
        if small and data.draw(st.integers(0, 3)):
            (as_id, sid), s = data.draw(st.sampled_from(sorted(small, key=lambda x: x[0])))
            return (as_id << 16) | sid, s
        slot = self._slot_field(data)
        named = self.ref.slots.get((slot >> 16, slot & 0xFFFF))
        if named is not None and named.npages > 1 << 16:
            slot = self.ref.user_slots  # not a 2^31-page log copied out on every step
        return slot, None

    def _expect(self, call: Callable[[], object], ref_call: Callable[[], object]) -> None:
        try:
            want = ref_call()
            want_err = 0
        except Refused as refusal:
            want, want_err = None, refusal.err
        try:
            got = call()
            got_err = 0
        except KvmError as exc:
            got, got_err = None, exc.errno
        assert (got_err, got) == (want_err, want)

    @rule(data=st.data())
    def get_dirty_log(self, data: st.DataObject) -> None:
        slot, _ = self._log_target(data)
        self._expect(lambda: self.vm.get_dirty_log(slot), lambda: self.ref.get_dirty_log(slot))

    @rule(data=st.data())
    def clear_dirty_log(self, data: st.DataObject) -> None:
        slot, s = self._log_target(data)
        n = s.npages if s is not None else 100
        first = data.draw(st.sampled_from([0, 0, 64, 128, 1, 63, n, (n + 63) // 64 * 64,
                                           max(0, n // 64 * 64)]))
        num = data.draw(st.sampled_from([0, 1, 63, 64, 65, 128, n - first, n - first + 1,
                                         max(0, n - first - 1)]))
        num = max(num, 0)
        nbytes = (num + 63) // 64 * 8
        mask = data.draw(st.one_of(st.none(), st.binary(min_size=nbytes, max_size=nbytes)))
        self._expect(lambda: self.vm.clear_dirty_log(slot, first, num, mask),
                     lambda: self.ref.clear_dirty_log(slot, first, num, mask))

    @rule(data=st.data())
    def mark_page_dirty(self, data: st.DataObject) -> None:
        gfns = [g for s in self.ref.slots.values() for g in (s.base, s.base + s.npages - 1,
                                                              s.base + s.npages)]
        gfn = data.draw(st.sampled_from(gfns or [0]))
        as_id = data.draw(st.integers(0, self.p.nr_address_spaces - 1))
        assert self.vm.mark_page_dirty(gfn, as_id) == self.ref.mark_page_dirty(gfn, as_id)

    @rule(size=st.sampled_from([4096, 16384, 1 << 20, 3000, 2048, 1 << 21, 0]))
    def enable_dirty_ring(self, size: int) -> None:
        cap = KVM_CAP_DIRTY_LOG_RING if self.p.dirty_ring_tso else KVM_CAP_DIRTY_LOG_RING_ACQ_REL

        def call() -> None:
            self.vm.enable_cap(cap, size)

        self._expect(call, lambda: self.ref.enable_ring(size))

    @rule(arg=st.sampled_from([0, 1, 1, 3, 3, 2, 4, 5]))
    def enable_manual_protect(self, arg: int) -> None:
        def call() -> None:
            self.vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, arg)

        self._expect(call, lambda: self.ref.enable_manual(arg))

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def model_is_consistent(self) -> None:
        assert self.vm.check() == []

    @invariant()
    def model_matches_reference(self) -> None:
        ps = self.p.page_size
        for as_id in range(self.p.nr_address_spaces):
            got = [(s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr)
                   for s in self.vm.memslots(as_id)]
            want = sorted(((i, s.base, s.npages, s.flags, s.uaddr)
                           for (a, i), s in self.ref.slots.items() if a == as_id),
                          key=lambda t: t[1])
            assert got == want
            assert self.vm.generation(as_id) == self.ref.gens[as_id]
        assert self.vm.nr_memslot_pages == sum(s.npages for s in self.ref.slots.values())
        for (as_id, sid), s in self.ref.slots.items():
            slot = self.vm.memslot(sid, as_id)
            assert slot is not None
            assert self.vm.gfn_to_memslot(s.base, as_id) == slot
            assert self.vm.gfn_to_hva(s.base + s.npages - 1, as_id) == s.uaddr + (
                s.npages - 1) * ps
            assert (slot.dirty_bitmap is not None) == (s.bitmap is not None)
            assert s.bitmap is None or s.flags & LOG


def _machine(profile: str | Profile) -> type[MemslotMachine]:
    name = profile if isinstance(profile, str) else profile.name
    return STEPS(type(f"Machine_{name}", (MemslotMachine,), {"PROFILE": profile}))


TestX86Shadow = _machine("x86_64-shadow").TestCase
TestX86Smm = _machine("x86_64").TestCase
TestArm64 = _machine("arm64").TestCase
TestRiscv64 = _machine("riscv64").TestCase
TestS390x = _machine("s390x").TestCase
TestPpc64Hv = _machine(memslot.get_profile("ppc64-hv").replace(
    name="ppc64-hv-small", totalram_pages=1 << 10)).TestCase
TestPpc64Pr = _machine("ppc64-pr").TestCase
TestS390xLimit = _machine(memslot.get_profile("s390x").replace(
    name="s390x-1t", mem_limit=1 << 40)).TestCase

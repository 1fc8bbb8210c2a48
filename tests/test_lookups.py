"""Lookup structures against brute force, and the lookup API of ModelVM.

``HvaIndex`` (the per-set ``hva_tree`` interval tree), ``SortedInts`` (the gfn order of the
``gfn_tree``) and ``SlotSet`` (``struct kvm_memslots``: id hash, gfn tree, hva tree and
``last_used_slot``) are driven with random operations and compared with linear scans. Then
``gfn_to_hva`` (``__gfn_to_hva_many``) and ``hva_to_memslots`` (the MMU notifier walk).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memslot
from memslot import KVM_HVA_ERR_BAD, KVM_HVA_ERR_RO_BAD, ModelVM, kvm_is_error_hva
from memslot.backends.model import PAGE_OFFSET
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMSLOT_INVALID
from memslot.engine import sorted_ints
from memslot.engine.hva_index import HvaIndex
from memslot.engine.slot import MemorySlot
from memslot.engine.slotset import SlotSet
from memslot.engine.sorted_ints import SortedInts

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
U64 = (1 << 64) - 1
RO = KVM_MEM_READONLY
LOG = KVM_MEM_LOG_DIRTY_PAGES
UA = 0x7F00_0000_0000

# -- HvaIndex --------------------------------------------------------------------------------

# Points weighted to the places a centred, bit-aligned tree gets wrong: 0, the top of the
# address space, powers of two and their neighbours (node midpoints and block edges).
_edges = st.sampled_from([0, 1, 2, 3, U64, U64 - 1, 1 << 63, (1 << 63) - 1, (1 << 63) + 1])
_pow2 = st.builds(lambda k, d: max(0, min(U64, (1 << k) + d)), st.integers(0, 64),
                  st.integers(-2, 2))
_small = st.integers(0, 64)
_point = st.one_of(_edges, _pow2, _small, st.integers(0, U64))


@st.composite
def _interval(draw: st.DrawFn) -> tuple[int, int]:
    a, b = draw(_point), draw(_point)
    return (a, b) if a <= b else (b, a)


_hva_ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), _interval()),
        st.tuples(st.just("remove"), st.tuples(st.integers(0, 1000), st.just(0))),
        st.tuples(st.just("stab"), st.tuples(_point, st.just(0))),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_hva_ops)
def test_hva_index_matches_brute_force(ops: list[tuple[str, tuple[int, int]]]) -> None:
    index = HvaIndex()
    live: dict[int, tuple[int, int]] = {}

    def brute(point: int) -> list[int]:
        return sorted(k for k, (s, e) in live.items() if s <= point <= e)

    for key, (op, (a, b)) in enumerate(ops):
        if op == "insert":
            index.insert(a, b, key)
            live[key] = (a, b)
        elif op == "remove" and live:
            victim = sorted(live)[a % len(live)]
            index.remove(*live.pop(victim), victim)
        elif op == "stab":
            assert sorted(index.stab(a)) == brute(a), (a, live)
        # Endpoints of some live intervals, and one past them, after every step.
        for s, e in list(live.values())[:4]:
            for p in {s, e, max(0, s - 1), min(U64, e + 1)}:
                assert sorted(index.stab(p)) == brute(p)
        assert len(index) == len(live)
        assert sorted(index.items()) == sorted((s, e, k) for k, (s, e) in live.items())


def test_hva_index_duplicates_and_nested() -> None:
    """Identical intervals under different keys, nested and shared endpoints."""
    index = HvaIndex()
    spans = {1: (0, 4095), 2: (0, 4095), 3: (0, U64), 4: (4095, 4096), 5: (4096, 8191)}
    for k, (s, e) in spans.items():
        index.insert(s, e, k)
    assert sorted(index.stab(0)) == [1, 2, 3]
    assert sorted(index.stab(4095)) == [1, 2, 3, 4]
    assert sorted(index.stab(4096)) == [3, 4, 5]
    assert sorted(index.stab(U64)) == [3]
    index.remove(0, 4095, 2)
    assert sorted(index.stab(0)) == [1, 3]
    with pytest.raises(KeyError):
        index.remove(0, 4095, 2)
    with pytest.raises(KeyError):
        index.remove(0, 4095, 9)


# -- SortedInts ------------------------------------------------------------------------------


def _check_sorted(s: SortedInts, ref: list[int], probes: list[int]) -> None:
    assert list(s) == ref and len(s) == len(ref)
    assert s.check() == []
    for p in probes:
        le = [v for v in ref if v <= p]
        lt = [v for v in ref if v < p]
        ge = [v for v in ref if v >= p]
        assert s.le(p) == (le[-1] if le else None)
        assert s.lt(p) == (lt[-1] if lt else None)
        assert s.ge(p) == (ge[0] if ge else None)
        assert list(s.iter_from(p)) == ge


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 200)), max_size=250),
       st.lists(st.integers(-1, 202), max_size=8))
def test_sorted_ints_matches_sorted_list(
    ops: list[tuple[bool, int]], probes: list[int]
) -> None:
    """Small blocks (LOAD 2) so that splits and block removals happen in short runs."""
    old = sorted_ints.LOAD
    sorted_ints.LOAD = 2
    try:
        s = SortedInts()
        ref: set[int] = set()
        for add, v in ops:
            if add and v not in ref:
                s.add(v)
                ref.add(v)
            elif not add and v in ref:
                s.remove(v)
                ref.discard(v)
            elif not add:
                with pytest.raises(KeyError):
                    s.remove(v)
        _check_sorted(s, sorted(ref), [*probes, *sorted(ref)[:3]])
    finally:
        sorted_ints.LOAD = old


def test_sorted_ints_large_random_walk() -> None:
    """Real block size, enough values to split blocks many times, then empty again."""
    rnd = random.Random(7)
    s = SortedInts()
    ref: set[int] = set()
    values = rnd.sample(range(1 << 40), 6000)
    for v in values:
        s.add(v)
        ref.add(v)
    _check_sorted(s, sorted(ref), [rnd.randrange(1 << 40) for _ in range(50)])
    for v in rnd.sample(values, 5000):
        s.remove(v)
        ref.discard(v)
    _check_sorted(s, sorted(ref), [rnd.randrange(1 << 40) for _ in range(50)] + [0, 1 << 41])
    for v in list(ref):
        s.remove(v)
    assert list(s) == [] and s.le(5) is None and s.ge(0) is None and s.check() == []


# -- SlotSet ---------------------------------------------------------------------------------

_slot_ops = st.lists(
    st.tuples(st.sampled_from(["insert", "remove", "move", "flags", "find", "range", "hva"]),
              st.integers(0, 7), st.integers(0, 40), st.integers(1, 6)),
    max_size=60,
)


def _slot(slot_id: int, base: int, npages: int, ua_page: int, flags: int = 0) -> MemorySlot:
    return MemorySlot(slot_id, 0, base, npages, flags, ua_page * PAGE)


@settings(max_examples=300, deadline=None)
@given(_slot_ops)
def test_slot_set_matches_brute_force(ops: list[tuple[str, int, int, int]]) -> None:
    """Insert, remove and replace (MOVE / flag change) slots, and compare find (with its
    ``last_used`` cache), the gfn-range walk, the overlap check and the hva stab with
    linear scans of a plain dict."""
    s = SlotSet(0)
    ref: dict[int, MemorySlot] = {}

    def overlaps(slot_id: int, start: int, end: int) -> list[MemorySlot]:
        return [x for x in ref.values() if x.id != slot_id and x.base_gfn < end
                and start < x.base_gfn + x.npages]

    for op, slot_id, a, b in ops:
        if op == "insert" and slot_id not in ref and not overlaps(slot_id, a, a + b):
            new = _slot(slot_id, a, b, a % 5)
            s.insert(new)
            ref[slot_id] = new
        elif op == "remove" and slot_id in ref:
            s.remove(ref.pop(slot_id))
        elif op == "move" and slot_id in ref:
            old = ref[slot_id]
            if not overlaps(slot_id, a, a + old.npages):
                new = old._replace(base_gfn=a)
                s.replace(old, new)
                ref[slot_id] = new
        elif op == "flags" and slot_id in ref:
            old = ref[slot_id]
            new = old._replace(flags=old.flags ^ LOG)
            s.replace(old, new)
            ref[slot_id] = new
        elif op == "find":
            want = [x for x in ref.values() if x.base_gfn <= a < x.base_gfn + x.npages]
            assert s.find(a) == (want[0] if want else None)
        elif op == "range":
            want = sorted((x for x in ref.values() if x.base_gfn < a + b
                           and a < x.base_gfn + x.npages), key=lambda x: x.base_gfn)
            assert list(s.in_gfn_range(a, a + b)) == want
            other = overlaps(slot_id, a, a + b)
            found = s.overlapping_other(slot_id, a, a + b)
            assert (found is None) == (not other)
            assert found is None or found in other
        elif op == "hva":
            hva = a * PAGE + b
            want = sorted(x.id for x in ref.values()
                          if x.userspace_addr <= hva < x.userspace_addr + x.npages * PAGE)
            assert sorted(x.id for x in s.hva_lookup(hva)) == want
        assert list(s) == sorted(ref.values(), key=lambda x: x.base_gfn)
        assert s.by_id == ref and len(s) == len(ref)
        # The last-used cache never returns a slot that left the set.
        assert s.last_used is None or s.by_id.get(s.last_used.id) is s.last_used


def test_slot_set_last_used_follows_replace() -> None:
    """``last_used_slot`` moves with a replace and is dropped on remove."""
    s = SlotSet(0)
    a = _slot(1, 0, 10, 0)
    s.insert(a)
    assert s.find(5) is a and s.last_used is a
    b = a._replace(base_gfn=100)
    s.replace(a, b)
    assert s.find(5) is None and s.find(105) is b
    s.remove(b)
    assert s.last_used is None and s.find(105) is None


# -- ModelVM lookups -------------------------------------------------------------------------


def test_gfn_to_hva_no_slot_is_err_bad() -> None:
    vm = ModelVM("x86_64-shadow")
    assert vm.gfn_to_hva(0) == KVM_HVA_ERR_BAD
    vm.set_user_memory_region(0, 0, GiB, MiB, UA)
    base = GiB // PAGE
    assert vm.gfn_to_hva(base - 1) == KVM_HVA_ERR_BAD
    assert vm.gfn_to_hva(base + 256) == KVM_HVA_ERR_BAD
    assert vm.gfn_to_hva(base + 255, write=True) == UA + 255 * PAGE
    assert vm.gfn_to_memslot(base + 256) is None


def test_gfn_to_hva_invalid_slot_is_err_bad_for_reads_and_writes() -> None:
    """``__gfn_to_hva_many``: the INVALID test comes before the READONLY test."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, RO, 0, MiB, UA)
    seen: list[tuple[int, int, int]] = []

    def observer(event: memslot.SwapEvent) -> None:
        slot = vm.gfn_to_memslot(1)
        if slot is not None and slot.flags & KVM_MEMSLOT_INVALID:
            seen.append((slot.flags, vm.gfn_to_hva(1), vm.gfn_to_hva(1, write=True)))

    vm.add_observer(observer)
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert seen == [(RO | KVM_MEMSLOT_INVALID, KVM_HVA_ERR_BAD, KVM_HVA_ERR_BAD)]


def test_gfn_to_hva_readonly() -> None:
    vm = ModelVM("arm64")
    vm.set_user_memory_region(0, RO | LOG, 0, MiB, UA)
    assert vm.gfn_to_hva(2) == UA + 2 * PAGE
    assert vm.gfn_to_hva(2, write=True) == KVM_HVA_ERR_RO_BAD
    vm.set_user_memory_region(1, 0, GiB, MiB, UA)
    assert vm.gfn_to_hva(GiB // PAGE + 2, write=True) == UA + 2 * PAGE


def test_kvm_is_error_hva_boundary() -> None:
    """``kvm_is_error_hva(a) = a >= PAGE_OFFSET``; both error values qualify, every user
    address (below TASK_SIZE_MAX) does not."""
    assert KVM_HVA_ERR_BAD == PAGE_OFFSET and KVM_HVA_ERR_RO_BAD == PAGE_OFFSET + PAGE
    assert kvm_is_error_hva(KVM_HVA_ERR_BAD) and kvm_is_error_hva(KVM_HVA_ERR_RO_BAD)
    assert kvm_is_error_hva(U64)
    assert not kvm_is_error_hva(PAGE_OFFSET - 1)
    assert not kvm_is_error_hva(0x7FFFFFFFF000)
    assert not kvm_is_error_hva(0)


def test_gfn_to_hva_other_page_size() -> None:
    """ppc64: 64 KiB pages, so one gfn step is 64 KiB of hva."""
    vm = ModelVM("ppc64-hv@6.1")
    vm.set_user_memory_region(0, 0, 1 << 32, 16 << 16, 1 << 40)
    base = (1 << 32) >> 16
    assert vm.gfn_to_hva(base + 3) == (1 << 40) + 3 * (1 << 16)
    assert vm.gfn_to_hva(base + 16) == KVM_HVA_ERR_BAD


def test_hva_to_memslots_overlapping_across_slots_and_address_spaces() -> None:
    """The MMU notifier finds every slot of every address space mapping an hva; host
    ranges are inclusive intervals ``[ua, ua + size - 1]``."""
    vm = ModelVM("x86_64")
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, UA)
    vm.set_user_memory_region(1, 0, GiB, 1 * MiB, UA + MiB)
    vm.set_user_memory_region((1 << 16) | 0, 0, 0, 4 * MiB, UA)
    vm.set_user_memory_region((1 << 16) | 7, 0, 8 * GiB, PAGE, UA + 2 * MiB - PAGE)

    def found(hva: int) -> list[tuple[int, int]]:
        return sorted((s.as_id, s.id) for s in vm.hva_to_memslots(hva))

    assert found(UA - 1) == []
    assert found(UA) == [(0, 0), (1, 0)]
    assert found(UA + MiB - 1) == [(0, 0), (1, 0)]
    assert found(UA + MiB) == [(0, 0), (0, 1), (1, 0)]
    assert found(UA + 2 * MiB - PAGE) == [(0, 0), (0, 1), (1, 0), (1, 7)]
    assert found(UA + 2 * MiB - 1) == [(0, 0), (0, 1), (1, 0), (1, 7)]
    assert found(UA + 2 * MiB) == [(1, 0)]
    assert found(UA + 4 * MiB - 1) == [(1, 0)]
    assert found(UA + 4 * MiB) == []
    # A MOVE keeps the hva range; a DELETE drops it.
    vm.set_user_memory_region(1, 0, 2 * GiB, MiB, UA + MiB)
    assert found(UA + MiB) == [(0, 0), (0, 1), (1, 0)]
    vm.set_user_memory_region((1 << 16) | 0, 0, 0, 0, 0)
    assert found(UA) == [(0, 0)]
    assert vm.check() == []


def test_gfn_to_memslot_per_address_space() -> None:
    vm = ModelVM("x86_64")
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region((1 << 16) | 0, 0, GiB, MiB, UA)
    assert vm.gfn_to_memslot(0).as_id == 0
    assert vm.gfn_to_memslot(0, as_id=1) is None
    assert vm.gfn_to_memslot(GiB // PAGE, as_id=1).as_id == 1
    assert vm.gfn_to_hva(GiB // PAGE, as_id=1) == UA
    with pytest.raises(ValueError):
        vm.gfn_to_memslot(0, as_id=2)
    with pytest.raises(ValueError):
        ModelVM("x86_64-shadow").memslots(1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, 64), st.integers(1, 8),
                          st.integers(0, 12), st.booleans()), max_size=25),
       st.lists(st.integers(0, 80), min_size=1, max_size=10))
def test_vm_lookups_match_scan_of_memslots(
    requests: list[tuple[int, int, int, int, bool]], gfns: list[int]
) -> None:
    """After random CREATE/MOVE/DELETE requests, every lookup agrees with a linear scan of
    ``memslots()``."""
    vm = ModelVM("x86_64-shadow")
    for slot_id, base, npages, ua_page, ro in requests:
        existing = vm.memslot(slot_id)
        if existing is not None and base % 3 == 0:
            vm.submit(memslot.MemoryRegion(slot_id, 0, 0, 0, 0))
        elif existing is not None:
            vm.submit(memslot.MemoryRegion(slot_id, existing.flags, base * PAGE,
                                           existing.npages * PAGE, existing.userspace_addr))
        else:
            vm.submit(memslot.MemoryRegion(slot_id, RO if ro else 0, base * PAGE, npages * PAGE,
                                           ua_page * PAGE))
    slots = vm.memslots()
    assert vm.check() == []
    for gfn in gfns:
        want = [s for s in slots if s.base_gfn <= gfn < s.base_gfn + s.npages]
        assert vm.gfn_to_memslot(gfn) == (want[0] if want else None)
        for write in (False, True):
            hva = vm.gfn_to_hva(gfn, write=write)
            if not want:
                assert hva == KVM_HVA_ERR_BAD
            elif write and want[0].flags & RO:
                assert hva == KVM_HVA_ERR_RO_BAD
            else:
                assert hva == want[0].userspace_addr + (gfn - want[0].base_gfn) * PAGE
        hva = gfn * PAGE + 17
        assert sorted(s.id for s in vm.hva_to_memslots(hva)) == sorted(
            s.id for s in slots if s.userspace_addr <= hva < s.userspace_addr + s.npages * PAGE)
    for s in slots:
        assert vm.memslot(s.id) == s

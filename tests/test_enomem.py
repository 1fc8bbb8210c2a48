"""ENOMEM at every allocation a request makes, for every change type on every preset.

For each scenario the request is first run on a twin VM to learn its allocations
(``result.allocated``, in order). Then, on a fresh VM per case, the nth allocation (counted
over all kinds, and separately per kind with ``inject_enomem(nth, kind=...)``) is made to fail.
The kernel unwinds (``kvm_set_memory_region`` / ``kvm_set_memslot`` /
``kvm_prepare_memory_region`` / ``kvm_alloc_memslot_metadata``): errno ENOMEM, slots,
``nr_memslot_pages`` and every live allocation exactly as before, and the generation moved only
by the swaps that happened (spec 3.1): ``2 * N_AS`` when a DELETE/MOVE failed after its INVALID
swap, 0 when the new-slot or INVALID-slot kzalloc failed, 0 for CREATE/FLAGS_ONLY. The same
request then succeeds.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import memslot
from memslot import ModelVM
from memslot.constants import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES
from memslot.engine.change import ChangeType
from memslot.request import MemoryRegion

MiB = 1 << 20
GiB = 1 << 30
LOG = KVM_MEM_LOG_DIRTY_PAGES
GMEM = KVM_MEM_GUEST_MEMFD
SIZE = 2 * MiB  # a multiple of every preset's page size and of s390's 1 MiB segment
UA = 64 * GiB  # 1 MiB aligned, below every preset's user address limit

# "x86_64+root": the TDP preset after its first shadow root (rmaps and write tracking exist).
# Every preset whose kernel keeps the invariants (5.6's MOVE breaks them by design: that is
# the seed thread's bug, shown in test_versions.py).
PROFILES = [*sorted(n for n, p in memslot.PRESETS.items() if p.move_reallocates_arch),
            "x86_64+root"]

# Rule code reported for a failure of each allocation kind.
RULE_OF_KIND = {
    "slot": "alloc-slot",
    "invalid_slot": "alloc-invalid",
    "dirty_bitmap": "alloc-dirty-bitmap",
    "rmap": "x86-alloc-metadata",
    "lpage_info": "x86-alloc-metadata",
    "write_track": "x86-alloc-metadata",
    "ppc_rmap": "ppc-alloc-rmap",
}


@dataclass(frozen=True)
class Scenario:
    """Slot 1 starts as ``start`` (flags, gpa) or absent; the request sets it to ``to``
    (flags, gpa) or deletes it (``None``). Slot 0 is a neighbour right below gpa 4 GiB."""

    name: str
    change: ChangeType
    start: tuple[int, int] | None
    to: tuple[int, int] | None
    gmem: bool = False


SCENARIOS = [
    Scenario("create", ChangeType.CREATE, None, (0, 8 * GiB)),
    Scenario("create-log", ChangeType.CREATE, None, (LOG, 8 * GiB)),
    Scenario("create-gmem", ChangeType.CREATE, None, (GMEM, 8 * GiB), gmem=True),
    Scenario("delete", ChangeType.DELETE, (0, 8 * GiB), None),
    Scenario("delete-log", ChangeType.DELETE, (LOG, 8 * GiB), None),
    Scenario("delete-gmem", ChangeType.DELETE, (GMEM, 8 * GiB), None, gmem=True),
    Scenario("move", ChangeType.MOVE, (0, 8 * GiB), (0, 16 * GiB)),
    Scenario("move-by-one-page", ChangeType.MOVE, (0, 8 * GiB), (0, 8 * GiB + 64 * 1024)),
    Scenario("move-onto-neighbour-edge", ChangeType.MOVE, (0, 8 * GiB), (0, 4 * GiB)),
    Scenario("move-keeps-log", ChangeType.MOVE, (LOG, 8 * GiB), (LOG, 16 * GiB)),
    Scenario("move-turns-log-on", ChangeType.MOVE, (0, 8 * GiB), (LOG, 16 * GiB)),
    Scenario("move-turns-log-off", ChangeType.MOVE, (LOG, 8 * GiB), (0, 16 * GiB)),
    Scenario("flags-log-on", ChangeType.FLAGS_ONLY, (0, 8 * GiB), (LOG, 8 * GiB)),
    Scenario("flags-log-off", ChangeType.FLAGS_ONLY, (LOG, 8 * GiB), (0, 8 * GiB)),
]


def _profile(name: str) -> memslot.Profile:
    if name == "x86_64+root":
        return memslot.get_profile("x86_64")
    return memslot.get_profile(name)


BY_NAME = {sc.name: sc for sc in SCENARIOS}
# guest_memfd scenarios only where the profile has CONFIG_KVM_GUEST_MEMFD.
CASES = [(p, sc) for p in PROFILES for sc in SCENARIOS if not sc.gmem or _profile(p).guest_memfd]
CASE_IDS = [f"{p}-{sc.name}" for p, sc in CASES]


def _gmem_flags(vm: ModelVM) -> int:
    # arm64 accepts only guest_memfd slots whose file is mmap-able (GMEM_ONLY).
    return 1 if vm.profile.arch == "arm64" else 0


def _build(profile: str, sc: Scenario) -> tuple[ModelVM, MemoryRegion]:
    """A VM in the scenario's starting state and the request to test."""
    vm = ModelVM(_profile(profile))
    if profile == "x86_64+root":
        vm.first_shadow_root()
    as_id = vm.nr_address_spaces - 1
    slot = (as_id << 16) | 1
    fd = vm.create_guest_memfd(4 * SIZE, _gmem_flags(vm)) if sc.gmem else None
    vm.set_user_memory_region((as_id << 16) | 0, 0, 4 * GiB - SIZE, SIZE, UA)
    if sc.start is not None:
        flags, gpa = sc.start
        vm.apply(MemoryRegion(slot, flags, gpa, SIZE, UA + GiB, 0, fd))
    if sc.to is None:
        request = MemoryRegion(slot, 0, 0, 0, 0)
    else:
        flags, gpa = sc.to
        request = MemoryRegion(slot, flags, gpa, SIZE, UA + GiB, 0, fd)
    assert vm.check() == []
    return vm, request


def _snapshot(vm: ModelVM) -> tuple[object, ...]:
    slots = tuple(
        tuple((s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr,
               None if s.dirty_bitmap is None else id(s.dirty_bitmap), id(s.arch))
              for s in vm.memslots(a))
        for a in range(vm.nr_address_spaces)
    )
    ledger = frozenset(a.serial for a in vm.allocations())
    return slots, vm.nr_memslot_pages, ledger, vm.metadata_bytes(), vm.vmalloc_bytes()


def _shape(vm: ModelVM) -> tuple[object, ...]:
    """Slots and the sizes of what they hold, without identities (to compare with a twin)."""
    slots = tuple(
        tuple((s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr)
              for s in vm.memslots(a))
        for a in range(vm.nr_address_spaces)
    )
    sizes = sorted((a.label, a.entries, a.entry_size) for a in vm.allocations())
    return slots, vm.nr_memslot_pages, sizes, vm.metadata_bytes(), vm.vmalloc_bytes()


def _expected_generation_delta(vm: ModelVM, change: ChangeType, failed_kind: str) -> int:
    """Spec 3.1: only DELETE/MOVE failing after the INVALID swap (prepare) moves it, by 2N."""
    if change in (ChangeType.DELETE, ChangeType.MOVE) and failed_kind not in (
        "slot", "invalid_slot"
    ):
        return 2 * vm.nr_address_spaces
    return 0


def _cases(profile: str, sc: Scenario) -> tuple[list[str], object]:
    """The kinds a twin VM allocates for the request, in order, and its resulting shape."""
    twin, request = _build(profile, sc)
    result = twin.submit(request)
    assert result.ok and result.change is sc.change, result.summary()
    assert twin.check() == []
    return [a.kind for a in result.allocated], _shape(twin)


def _fail_once(
    profile: str, sc: Scenario, arm: Callable[[ModelVM], None], failed_kind: str,
    twin_shape: object,
) -> None:
    vm, request = _build(profile, sc)
    as_id = request.as_id
    before = _snapshot(vm)
    gens = [vm.generation(a) for a in range(vm.nr_address_spaces)]
    arm(vm)
    result = vm.submit(request)
    assert result.errno == errno.ENOMEM, result.summary()
    assert result.change is sc.change
    assert result.rule is not None and result.rule.code == RULE_OF_KIND[failed_kind]
    assert _snapshot(vm) == before
    expected = list(gens)
    expected[as_id] += _expected_generation_delta(vm, sc.change, failed_kind)
    assert [vm.generation(a) for a in range(vm.nr_address_spaces)] == expected
    assert (result.generation_before, result.generation_after) == (gens[as_id], expected[as_id])
    assert not result.generation_after >> 63
    # Everything this request allocated was released again.
    assert {a.serial for a in result.allocated} <= {a.serial for a in result.freed}
    assert vm.check() == []
    retry = vm.submit(request)
    assert retry.ok and retry.change is sc.change, retry.summary()
    assert vm.check() == []
    assert _shape(vm) == twin_shape


@pytest.mark.parametrize(("profile", "sc"), CASES, ids=CASE_IDS)
def test_enomem_at_every_allocation(profile: str, sc: Scenario) -> None:
    """The nth allocation of the request fails, for every n."""
    kinds, twin_shape = _cases(profile, sc)
    assert kinds, "every change allocates at least a slot struct"
    for nth, kind in enumerate(kinds, 1):
        _fail_once(profile, sc, lambda vm, n=nth: vm.inject_enomem(n), kind, twin_shape)


@pytest.mark.parametrize(("profile", "sc"), CASES, ids=CASE_IDS)
def test_enomem_at_every_allocation_of_each_kind(profile: str, sc: Scenario) -> None:
    """``inject_enomem(nth, kind=...)`` counts only allocations of that kind."""
    kinds, twin_shape = _cases(profile, sc)
    for kind, count in Counter(kinds).items():
        for nth in range(1, count + 1):
            _fail_once(profile, sc, lambda vm, n=nth, k=kind: vm.inject_enomem(n, kind=k), kind,
                       twin_shape)


def test_expected_allocation_sequences() -> None:
    """The allocation order the cases above rely on: new slot, INVALID copy, dirty bitmap,
    then the x86 arrays rmap L1..L3, lpage_info L2, L3, write-track."""
    kinds, _ = _cases("x86_64-shadow", BY_NAME["move-turns-log-on"])
    assert kinds == ["slot", "invalid_slot", "dirty_bitmap", "rmap", "rmap", "rmap",
                     "lpage_info", "lpage_info", "write_track"]
    kinds, _ = _cases("x86_64", BY_NAME["create-log"])  # lazy rmaps, no write tracking
    assert kinds == ["slot", "dirty_bitmap", "lpage_info", "lpage_info"]
    kinds, _ = _cases("ppc64-hv", BY_NAME["move"])  # MOVE shares the rmap
    assert kinds == ["slot", "invalid_slot"]
    kinds, _ = _cases("ppc64-hv", BY_NAME["create"])
    assert kinds == ["slot", "ppc_rmap"]
    kinds, _ = _cases("s390x", BY_NAME["delete"])
    assert kinds == ["invalid_slot"]


def test_fault_of_absent_kind_stays_armed() -> None:
    """A fault armed for a kind the request never allocates does not fire; the next
    allocation of that kind fails."""
    vm = ModelVM("x86_64-shadow")
    vm.inject_enomem(1, kind="dirty_bitmap")
    vm.set_user_memory_region(0, 0, 0, SIZE, UA)
    result = vm.submit(MemoryRegion(0, LOG, 0, SIZE, UA))
    assert result.errno == errno.ENOMEM and result.rule.code == "alloc-dirty-bitmap"
    vm.set_user_memory_region(0, LOG, 0, SIZE, UA)
    assert vm.check() == []


def test_fault_fires_once_and_counts_across_requests() -> None:
    """``nth`` counts allocations from now on, across requests, and fires once."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, 0, SIZE, UA)  # 7 allocations: slot + 6 arrays
    vm.inject_enomem(8)  # the 8th from now: the 1st of the next request
    vm.set_user_memory_region(1, 0, GiB, SIZE, UA)  # 7 allocations, no fault
    result = vm.submit(MemoryRegion(2, 0, 2 * GiB, SIZE, UA))
    assert result.errno == errno.ENOMEM and result.rule.code == "alloc-slot"
    vm.set_user_memory_region(2, 0, 2 * GiB, SIZE, UA)
    assert vm.check() == []


def test_inject_enomem_rejects_bad_arguments() -> None:
    vm = ModelVM("x86_64-shadow")
    with pytest.raises(ValueError):
        vm.inject_enomem(0)
    with pytest.raises(ValueError):
        vm.inject_enomem(1, kind="no-such-kind")


def test_ppc_totalram_refusal_allocates_nothing() -> None:
    """kvmppc_core_prepare_memory_region_hv: ENOMEM from the size test, before vzalloc."""
    p = memslot.get_profile("ppc64-hv").replace(name="ppc-tiny", totalram_pages=1)
    vm = ModelVM(p)
    before = _snapshot(vm)
    result = vm.submit(MemoryRegion(0, 0, 0, 16384 * p.page_size, 0))
    assert result.errno == errno.ENOMEM and result.rule.code == "ppc-rmap-totalram"
    assert [a.kind for a in result.allocated] == ["slot"]
    assert _snapshot(vm) == before and vm.generation() == 0
    assert vm.check() == []

"""ENOMEM at every allocation a request makes, for every change type on every preset.

For each scenario the request is first run on a twin VM to learn its allocations
(``result.allocated``, in order). Then, on a fresh VM per case, the nth allocation (counted
over all kinds, and separately per kind with ``inject_enomem(nth, kind=...)``) is made to fail.
The kernel unwinds (``kvm_set_memory_region`` / ``kvm_set_memslot`` /
``kvm_prepare_memory_region`` / ``kvm_alloc_memslot_metadata``): errno ENOMEM, slots,
``nr_memslot_pages`` and every live allocation exactly as before, and the generation moved only
by the swaps that happened (spec 3.1): ``2 * N_AS`` when a DELETE/MOVE failed after its INVALID
swap, 0 when the new-slot or INVALID-slot kzalloc failed, 0 for CREATE/FLAGS_ONLY. The same
request then succeeds. The steps the engine recorded are the twin's up to the one that failed,
then exactly the unwind steps that undo what was done.
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
from memslot.engine import result as steps_
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


# The forward step whose allocation a failure of each kind hits (arch kinds: "prepare: arch").
STEP_OF_KIND = {
    "slot": steps_.STEP_ALLOC_SLOT,
    "invalid_slot": steps_.STEP_ALLOC_INVALID,
    "dirty_bitmap": steps_.STEP_ALLOC_BITMAP,
}


def _expected_steps(twin_steps: list[str], sc: Scenario, failed_kind: str) -> list[str]:
    """The twin's steps up to the failing one, then the unwind of ``kvm_prepare_memory_region``
    (a fresh bitmap), ``kvm_set_memslot`` (restore swap, kfree INVALID) and
    ``kvm_set_memory_region`` (unbind guest_memfd, kfree new)."""
    failing = STEP_OF_KIND.get(failed_kind, steps_.STEP_PREPARE_ARCH)
    done = twin_steps[:twin_steps.index(failing) + 1]
    unwind = []
    if failing == steps_.STEP_PREPARE_ARCH and steps_.STEP_ALLOC_BITMAP in done:
        unwind.append(steps_.STEP_FREE_BITMAP)
    if steps_.STEP_INVALIDATE in done:
        unwind += [steps_.STEP_RESTORE, steps_.STEP_FREE_INVALID]
    if steps_.STEP_GMEM_BIND in done:
        unwind.append(steps_.STEP_GMEM_UNBIND)
    if steps_.STEP_ALLOC_SLOT in done and failing != steps_.STEP_ALLOC_SLOT:
        unwind.append(steps_.STEP_FREE_NEW)
    return done + unwind


def _expected_generation_delta(vm: ModelVM, change: ChangeType, failed_kind: str) -> int:
    """Spec 3.1: only DELETE/MOVE failing after the INVALID swap (prepare) moves it, by 2N."""
    if change in (ChangeType.DELETE, ChangeType.MOVE) and failed_kind not in (
        "slot", "invalid_slot"
    ):
        return 2 * vm.nr_address_spaces
    return 0


@dataclass(frozen=True)
class Twin:
    """What the request does on a VM without faults."""

    kinds: list[str]  # allocation kinds, in order
    shape: object
    steps: list[str]


def _cases(profile: str, sc: Scenario) -> Twin:
    """The kinds a twin VM allocates for the request, in order, its resulting shape and the
    steps it took."""
    twin, request = _build(profile, sc)
    result = twin.submit(request)
    assert result.ok and result.change is sc.change, result.summary()
    assert twin.check() == []
    assert steps_.STEP_COMMIT in result.steps and steps_.STEP_FREE_NEW not in result.steps
    return Twin([a.kind for a in result.allocated], _shape(twin), list(result.steps))


def _fail_once(
    profile: str, sc: Scenario, arm: Callable[[ModelVM], None], failed_kind: str, twin: Twin
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
    assert result.steps == _expected_steps(twin.steps, sc, failed_kind)
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
    assert _shape(vm) == twin.shape
    assert retry.steps == twin.steps


@pytest.mark.parametrize(("profile", "sc"), CASES, ids=CASE_IDS)
def test_enomem_at_every_allocation(profile: str, sc: Scenario) -> None:
    """The nth allocation of the request fails, for every n."""
    twin = _cases(profile, sc)
    assert twin.kinds, "every change allocates at least a slot struct"
    for nth, kind in enumerate(twin.kinds, 1):
        _fail_once(profile, sc, lambda vm, n=nth: vm.inject_enomem(n), kind, twin)


@pytest.mark.parametrize(("profile", "sc"), CASES, ids=CASE_IDS)
def test_enomem_at_every_allocation_of_each_kind(profile: str, sc: Scenario) -> None:
    """``inject_enomem(nth, kind=...)`` counts only allocations of that kind."""
    twin = _cases(profile, sc)
    for kind, count in Counter(twin.kinds).items():
        for nth in range(1, count + 1):
            _fail_once(profile, sc, lambda vm, n=nth, k=kind: vm.inject_enomem(n, kind=k), kind,
                       twin)


def test_expected_allocation_sequences() -> None:
    """The allocation order the cases above rely on: new slot, INVALID copy, dirty bitmap,
    then the x86 arrays rmap L1..L3, lpage_info L2, L3, write-track."""
    kinds = _cases("x86_64-shadow", BY_NAME["move-turns-log-on"]).kinds
    assert kinds == ["slot", "invalid_slot", "dirty_bitmap", "rmap", "rmap", "rmap",
                     "lpage_info", "lpage_info", "write_track"]
    kinds = _cases("x86_64", BY_NAME["create-log"]).kinds  # lazy rmaps, no write tracking
    assert kinds == ["slot", "dirty_bitmap", "lpage_info", "lpage_info"]
    kinds = _cases("ppc64-hv", BY_NAME["move"]).kinds  # MOVE shares the rmap
    assert kinds == ["slot", "invalid_slot"]
    kinds = _cases("ppc64-hv", BY_NAME["create"]).kinds
    assert kinds == ["slot", "ppc_rmap"]
    kinds = _cases("s390x", BY_NAME["delete"]).kinds
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


# -- the recorded steps of whole requests, and of refusals that are not ENOMEM ------------------
S = steps_


def test_steps_of_each_change_as_taken() -> None:
    """What the engine records for each change type (x86 shadow: metadata on every slot)."""
    vm = ModelVM("x86_64-shadow")
    head = [S.STEP_VALIDATE, S.STEP_ALLOC_SLOT]
    invalidate = [S.STEP_ALLOC_INVALID, S.STEP_INVALIDATE]
    tail = [S.STEP_INSTALL, S.STEP_FREE_INVALID, S.STEP_COMMIT, S.STEP_FREE_OLD]
    cases = [
        ((0, LOG, 0, SIZE, UA), [*head, S.STEP_ALLOC_BITMAP, S.STEP_PREPARE_ARCH,
                                 S.STEP_INSTALL, S.STEP_COMMIT]),
        ((0, LOG, 0, SIZE, UA), [S.STEP_VALIDATE, S.STEP_NOOP]),
        ((0, LOG, GiB, SIZE, UA), head + invalidate + [S.STEP_KEEP_BITMAP, S.STEP_PREPARE_ARCH]
         + tail),
        ((0, 0, GiB, SIZE, UA), [*head, S.STEP_PREPARE_ARCH, S.STEP_INSTALL, S.STEP_COMMIT,
                                 S.STEP_FREE_OLD]),
        ((0, 0, 0, 0, 0), [S.STEP_VALIDATE, *invalidate, S.STEP_PREPARE_ARCH, S.STEP_REMOVE,
                           S.STEP_FREE_INVALID, S.STEP_COMMIT, S.STEP_FREE_OLD]),
        ((0, 0, 0, 0, 0), [S.STEP_VALIDATE]),  # EINVAL: no such slot
    ]
    for request, expected in cases:
        result = vm.submit(MemoryRegion(*request))
        assert result.steps == expected, result.summary()
        assert result.as_dict()["steps"] == expected
    assert vm.check() == []


def test_steps_of_an_arch_refusal_after_a_fresh_bitmap_and_the_invalid_swap() -> None:
    """x86 MOVE past kvm_mmu_max_gfn with dirty logging turned on: the bitmap allocated in
    prepare is freed, the old slot swapped back, the working copy and new slot freed."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, 0, SIZE, UA)
    result = vm.submit(MemoryRegion(0, LOG, 1 << 60, SIZE, UA))
    assert result.rule is not None and result.rule.code == "x86-max-gfn"
    assert result.steps == [
        S.STEP_VALIDATE, S.STEP_ALLOC_SLOT, S.STEP_ALLOC_INVALID, S.STEP_INVALIDATE,
        S.STEP_ALLOC_BITMAP, S.STEP_PREPARE_ARCH, S.STEP_FREE_BITMAP, S.STEP_RESTORE,
        S.STEP_FREE_INVALID, S.STEP_FREE_NEW]
    assert vm.check() == []


def test_steps_of_a_refused_delete() -> None:
    """s390 protected VM: DELETE fails in arch prepare after the INVALID swap; no new slot."""
    vm = ModelVM("s390x")
    vm.set_user_memory_region(0, 0, 0, SIZE, UA)
    vm.arch.profile = vm.profile.replace(name="s390x-pv", protected=True)
    result = vm.submit(MemoryRegion(0, 0, 0, 0, 0))
    assert result.rule is not None and result.rule.code == "s390-pv"
    assert result.steps == [S.STEP_VALIDATE, S.STEP_ALLOC_INVALID, S.STEP_INVALIDATE,
                            S.STEP_PREPARE_ARCH, S.STEP_RESTORE, S.STEP_FREE_INVALID]


def test_steps_of_guest_memfd_refusals() -> None:
    """A bind that fails frees only the new slot; an arch refusal after the bind unbinds too."""
    vm = ModelVM("arm64")
    bad = vm.submit(MemoryRegion(0, GMEM, 0, SIZE, UA, 0, 1 << 20))  # no such fd
    assert bad.rule is not None and bad.rule.code == "gmem-badf"
    assert bad.steps == [S.STEP_VALIDATE, S.STEP_ALLOC_SLOT, S.STEP_GMEM_BIND, S.STEP_FREE_NEW]
    fd = vm.create_guest_memfd(SIZE, 0)  # not mmap-able: arm64 prepare refuses it
    refused = vm.submit(MemoryRegion(0, GMEM, 0, SIZE, UA, 0, fd))
    assert refused.rule is not None and refused.rule.code == "arm64-gmem-only"
    assert refused.steps == [S.STEP_VALIDATE, S.STEP_ALLOC_SLOT, S.STEP_GMEM_BIND,
                             S.STEP_PREPARE_ARCH, S.STEP_GMEM_UNBIND, S.STEP_FREE_NEW]
    assert vm.check() == []
    # The range is free again: a mmap-able file of its own binds and installs.
    ok = vm.submit(MemoryRegion(0, GMEM, 0, SIZE, UA, 0, vm.create_guest_memfd(SIZE, 1)))
    assert ok.ok and S.STEP_GMEM_UNBIND not in ok.steps, ok.summary()
    vm.close()

"""Memslot generations (spec 3.1, checklist rules 36-41): ``kvm_swap_active_memslots`` sets
bit 63 while a swap is in flight and then adds ``N_AS``; address space i starts at i
(``kvm_create_vm``). CREATE and FLAGS_ONLY swap once, DELETE and MOVE twice (INVALID copy,
then install), a failed DELETE/MOVE prepare twice (INVALID copy, then restore), everything
else not at all."""

from __future__ import annotations

import errno

import pytest

import memslot
from memslot import ModelVM, SwapEvent
from memslot.constants import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
)
from memslot.engine.change import ChangeType
from memslot.request import MemoryRegion

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
BIT63 = 1 << 63
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
UA = 0x7F00_0000_0000


def gens(vm: ModelVM) -> list[int]:
    return [vm.generation(a) for a in range(vm.nr_address_spaces)]


class Recorder:
    """Observer: per swap, the event and the generations every address space shows."""

    def __init__(self, vm: ModelVM) -> None:
        self.vm = vm
        self.events: list[tuple[SwapEvent, list[int]]] = []
        vm.add_observer(self)

    def __call__(self, event: SwapEvent) -> None:
        self.events.append((event, gens(self.vm)))

    def take(self) -> list[tuple[SwapEvent, list[int]]]:
        out, self.events = self.events, []
        return out


def _request(vm: ModelVM, region: MemoryRegion) -> memslot.OpResult:
    result = vm.submit(region)
    assert vm.check() == []
    return result


@pytest.mark.parametrize("as_id", [0, 1])
def test_rules_36_37_deltas_per_change_both_address_spaces(as_id: int) -> None:
    """x86 with SMM (N_AS = 2): every change of one address space moves only its own
    generation, by N_AS per swap; generations stay ``== as_id (mod 2)``."""
    vm = ModelVM("x86_64")
    rec = Recorder(vm)
    other = 1 - as_id
    s = (as_id << 16) | 4
    vm.set_user_memory_region((other << 16) | 4, 0, 0, MiB, UA)  # the other AS has a slot too
    rec.take()
    steps = [
        (MemoryRegion(s, 0, 0, MiB, UA), ChangeType.CREATE, ["install"]),
        (MemoryRegion(s, LOG, 0, MiB, UA), ChangeType.FLAGS_ONLY, ["install"]),
        (MemoryRegion(s, LOG, 0, MiB, UA), ChangeType.NOOP, []),
        (MemoryRegion(s, 0, GiB, MiB, UA), ChangeType.MOVE, ["invalidate", "install"]),
        (MemoryRegion(s, 0, GiB + PAGE, MiB, UA), ChangeType.MOVE, ["invalidate", "install"]),
        (MemoryRegion(s, 0, 0, 0, 0), ChangeType.DELETE, ["invalidate", "install"]),
        (MemoryRegion(s, RO, 0, MiB, UA), ChangeType.CREATE, ["install"]),
        (MemoryRegion(s, RO | LOG, 0, MiB, UA), ChangeType.FLAGS_ONLY, ["install"]),
        (MemoryRegion(s, RO, 2 * GiB, MiB, UA), ChangeType.MOVE, ["invalidate", "install"]),
    ]
    for region, change, phases in steps:
        before = gens(vm)
        result = _request(vm, region)
        assert result.ok and result.change is change
        events = rec.take()
        assert [e.phase for e, _ in events] == phases
        after = gens(vm)
        assert after[other] == before[other]
        assert after[as_id] == before[as_id] + 2 * len(phases)
        assert (result.generation_before, result.generation_after) == (before[as_id],
                                                                        after[as_id])
        assert all(g % 2 == i for i, g in enumerate(after))
        # Each swap: the in-flight value is the previous stable one with bit 63 set.
        stable = before[as_id]
        for event, seen in events:
            assert event.as_id == as_id and event.change is change
            assert event.generation == stable | BIT63
            assert seen[as_id] == stable | BIT63 and seen[other] == before[other]
            stable += 2


def test_rule_36_one_address_space_steps_by_one() -> None:
    vm = ModelVM("x86_64-shadow")
    assert gens(vm) == [0]
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    assert gens(vm) == [2]
    vm.set_user_memory_region(0, LOG, GiB, MiB, UA)
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert gens(vm) == [6]


@pytest.mark.parametrize("profile", sorted(memslot.PRESETS))
def test_rule_40_initial_generations(profile: str) -> None:
    vm = ModelVM(profile)
    assert gens(vm) == list(range(vm.nr_address_spaces))


_REFUSALS = [
    MemoryRegion(0, 4, 0, MiB, UA),  # v1 flag
    MemoryRegion(40000, 0, 0, MiB, UA),  # id
    MemoryRegion(1, 0, PAGE // 2, MiB, UA),  # gpa alignment
    MemoryRegion(1, 0, 0, MiB + 1, UA),  # size alignment
    MemoryRegion(1, 0, (1 << 64) - PAGE, MiB, UA),  # wrap
    MemoryRegion(1, 0, 0, (1 << 31) * PAGE, 0),  # max pages
    MemoryRegion(1, 0, 0, 0, 0),  # delete of a missing slot
    MemoryRegion(1, 0, GiB + PAGE, MiB, UA),  # overlap on CREATE
    MemoryRegion(0, 0, GiB + MiB, MiB, UA),  # overlap on MOVE
    MemoryRegion(0, 0, 0, 2 * MiB, UA),  # size change
    MemoryRegion(0, RO, 0, MiB, UA),  # READONLY toggle
    MemoryRegion(0, 0, 0, MiB, UA + PAGE),  # uaddr change
]


@pytest.mark.parametrize("profile", ["x86_64", "x86_64-shadow"])
def test_validation_failures_leave_generations(profile: str) -> None:
    """A refusal before ``kvm_set_memslot`` swaps nothing."""
    vm = ModelVM(profile)
    for as_id in range(vm.nr_address_spaces):
        vm.set_user_memory_region((as_id << 16) | 0, 0, 0, MiB, UA)
        vm.set_user_memory_region((as_id << 16) | 2, 0, GiB, 2 * MiB, UA)
    rec = Recorder(vm)
    for as_id in range(vm.nr_address_spaces):
        for region in _REFUSALS:
            region = region._replace(slot=region.slot | (as_id << 16))
            before = gens(vm)
            result = vm.submit(region)
            assert not result.ok, region
            assert gens(vm) == before
    assert rec.take() == []


def test_rule_38_x86_move_past_max_gfn_both_address_spaces() -> None:
    """The max-gfn refusal comes from arch prepare, after the INVALID swap: +2*N_AS."""
    vm = ModelVM("x86_64")
    rec = Recorder(vm)
    for as_id in (0, 1):
        s = (as_id << 16) | 9
        vm.set_user_memory_region(s, LOG, 0, MiB, UA)
        rec.take()
        slot = vm.memslot(9, as_id)
        before = gens(vm)
        result = _request(vm, MemoryRegion(s, LOG, 1 << 46, MiB, UA))
        assert result.errno == errno.EINVAL and result.rule.code == "x86-max-gfn"
        assert result.change is ChangeType.MOVE
        expected = list(before)
        expected[as_id] += 4
        assert gens(vm) == expected
        assert [e.phase for e, _ in rec.take()] == ["invalidate", "restore"]
        assert vm.memslot(9, as_id) == slot  # the very same slot is back
        # The same CREATE refusal swaps nothing.
        result = _request(vm, MemoryRegion((as_id << 16) | 10, 0, 1 << 46, MiB, UA))
        assert result.rule.code == "x86-max-gfn" and result.change is ChangeType.CREATE
        assert gens(vm) == expected and rec.take() == []


def test_rule_38_s390_pv_delete_fails_after_invalidation() -> None:
    """s390 refuses every change of a protected VM in arch prepare, DELETE included."""
    vm = ModelVM("s390x")
    vm.set_user_memory_region(0, 0, 0, MiB, 0)
    vm.set_user_memory_region(1, 0, GiB, MiB, 0)
    # KVM_PV_ENABLE happens after memory is set up; the model has no PV conversion call, so
    # its arch hooks are switched to the protected profile.
    vm.arch.profile = vm.profile.replace(name="s390x-pv", protected=True)
    rec = Recorder(vm)
    for region, change in ((MemoryRegion(0, 0, 0, 0, 0), ChangeType.DELETE),
                           (MemoryRegion(1, 0, 2 * GiB, MiB, 0), ChangeType.MOVE),
                           (MemoryRegion(1, LOG, GiB, MiB, 0), ChangeType.FLAGS_ONLY),
                           (MemoryRegion(2, 0, 4 * GiB, MiB, 0), ChangeType.CREATE)):
        before = gens(vm)[0]
        result = _request(vm, region)
        assert result.errno == errno.EINVAL and result.rule.code == "s390-pv"
        assert result.change is change
        double = change in (ChangeType.DELETE, ChangeType.MOVE)
        assert gens(vm)[0] == before + (2 if double else 0)
        assert [e.phase for e, _ in rec.take()] == (["invalidate", "restore"] if double else [])
    assert [s.id for s in vm.memslots()] == [0, 1]


def test_rule_38_arm64_move_past_ipa() -> None:
    vm = ModelVM("arm64")
    vm.set_user_memory_region(0, 0, 0, MiB, 0)
    result = _request(vm, MemoryRegion(0, 0, 1 << 40, MiB, 0))
    assert result.errno == errno.EFAULT and result.change is ChangeType.MOVE
    assert gens(vm) == [1 + 2]


def test_rule_39_failed_create_and_flags_only_prepare() -> None:
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    rec = Recorder(vm)
    result = _request(vm, MemoryRegion(1, 0, 1 << 52, PAGE, UA))
    assert result.rule.code == "x86-max-gfn" and gens(vm) == [1]
    vm.inject_enomem(1, kind="dirty_bitmap")
    result = _request(vm, MemoryRegion(0, LOG, 0, MiB, UA))
    assert result.errno == errno.ENOMEM and result.change is ChangeType.FLAGS_ONLY
    assert gens(vm) == [1] and rec.take() == []


def test_rule_16_noop_reissue_plus_zero() -> None:
    vm = ModelVM("x86_64")
    for as_id in (0, 1):
        vm.set_user_memory_region((as_id << 16) | 3, LOG | RO, GiB, MiB, UA)
    before = gens(vm)
    rec = Recorder(vm)
    for _ in range(3):
        for as_id in (0, 1):
            result = _request(vm, MemoryRegion((as_id << 16) | 3, LOG | RO, GiB, MiB, UA))
            assert result.change is ChangeType.NOOP
    assert gens(vm) == before and rec.take() == []


def test_non_memslot_operations_do_not_swap() -> None:
    """Dirty-log ioctls, capabilities, lookups and the lazy rmap allocation of the first
    shadow root change slot contents in place, never the generation."""
    vm = ModelVM("x86_64")
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    before = gens(vm)
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
    vm.mark_page_dirty(3)
    vm.get_dirty_log(0)
    vm.clear_dirty_log(0, 0, 256, bytes(32))
    vm.gfn_to_memslot(3)
    vm.hva_to_memslots(UA)
    vm.first_shadow_root()
    assert gens(vm) == before
    assert vm.check() == []


def test_rule_41_stable_generations_never_have_bit_63() -> None:
    """Across many successful and failed requests of both address spaces the generation seen
    outside a swap never has bit 63; inside every swap it does."""
    vm = ModelVM("x86_64")
    inside: list[int] = []
    vm.add_observer(lambda e: inside.append(vm.generation(e.as_id)))
    for i in range(40):
        as_id = i % 2
        s = (as_id << 16) | (i % 5)
        gpa = (i % 7) * GiB
        for region in (MemoryRegion(s, 0, gpa, MiB, UA), MemoryRegion(s, LOG, gpa, MiB, UA),
                       MemoryRegion(s, LOG, gpa + MiB, MiB, UA), MemoryRegion(s, 0, 0, 0, 0)):
            vm.submit(region)
            assert all(not g & BIT63 for g in gens(vm))
            assert [g % 2 for g in gens(vm)] == [0, 1]
    assert inside and all(g & BIT63 for g in inside)
    assert vm.check() == []


def test_observer_cannot_issue_requests() -> None:
    """Swaps happen under slots_lock; a request from inside an observer would deadlock in
    the kernel and is refused by the model."""
    vm = ModelVM("x86_64-shadow")

    def reenter(event: SwapEvent) -> None:
        vm.set_user_memory_region(5, 0, 8 * GiB, MiB, UA)

    vm.add_observer(reenter)
    with pytest.raises(RuntimeError):
        vm.set_user_memory_region(0, 0, 0, MiB, UA)
    assert vm.memslot(5) is None

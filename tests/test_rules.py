"""The checklist of spec section 11, rule by rule, on ModelVM.

Every test name carries the number of the rule it checks. The profile is the one the rule
is about: ``x86_64-shadow`` for "this host" (one address space, shadow paging), ``x86_64``
for SMM / two address spaces and TDP, and the other presets for their own arches.

Rules (or parts of rules) that do not apply to a pure model:

* Rule 2, the EFAULT part (``copy_from_user`` of the 32/160-byte struct faults): the Python
  API passes a request as values, there is no user pointer to fault. The EINVAL part is
  tested.
* Rule 45, "guest writes exit as MMIO": the model has no vCPU that could run a guest; the
  hva side (``KVM_HVA_ERR_RO_BAD`` for write translations) is tested.
* Rule 62, the FLAGS_ONLY part: a FLAGS_ONLY keeps the base and size of a slot that passed the
  same check at CREATE, so it cannot newly cross the IPA size; CREATE and MOVE are tested.
* Rule 69, the EFAULT part (bad ``dirty_bitmap`` pointer of KVM_GET_DIRTY_LOG): the model
  returns the bytes instead of writing through a pointer. (The NULL *input* buffer of
  KVM_CLEAR_DIRTY_LOG is modelled and tested under rules 72.)
* Rule 79 (NULL argument pointer -> EFAULT): no pointers in the Python API.
"""

from __future__ import annotations

import errno
import os
import statistics
import time
from collections.abc import Callable, Iterator

import pytest

import memslot
from memslot import KVM_HVA_ERR_BAD, KVM_HVA_ERR_RO_BAD, KvmError, ModelVM, kvm_is_error_hva
from memslot.constants import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_READONLY_MEM,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
)
from memslot.engine import sorted_ints
from memslot.engine.change import ChangeType
from memslot.engine.hva_index import HvaIndex
from memslot.engine.sorted_ints import SortedInts
from memslot.request import MemoryRegion

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
GMEM = KVM_MEM_GUEST_MEMFD
INVALID = KVM_MEMSLOT_INVALID
UA = 0x7F00_0000_0000  # 1 GiB aligned user address
TASK_SIZE_MAX = 0x7FFFFFFFF000
SHADOW = "x86_64-shadow"
SMM = "x86_64"


@pytest.fixture
def vm() -> Iterator[ModelVM]:
    """A VM of this host's kind (x86-64, shadow paging, one address space)."""
    with ModelVM(SHADOW) as machine:
        yield machine
        assert machine.check() == []


def refused(vm: ModelVM, err: int, code: str | None, call: Callable[[], object]) -> None:
    """``call`` raises KvmError ``err``; the record names rule ``code``; nothing changed."""
    before = _state(vm)
    with pytest.raises(KvmError) as info:
        call()
    assert info.value.errno == err, info.value
    if code is not None:
        assert vm.last_result is not None and vm.last_result.rule is not None
        assert vm.last_result.rule.code == code, vm.last_result.rule
    assert _state(vm) == before


def _state(vm: ModelVM) -> tuple[object, ...]:
    slots = tuple(
        tuple((s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr) for s in vm.memslots(a))
        for a in range(vm.nr_address_spaces)
    )
    return slots, vm.nr_memslot_pages, frozenset(a.serial for a in vm.allocations())


def gens(vm: ModelVM) -> list[int]:
    return [vm.generation(a) for a in range(vm.nr_address_spaces)]


# ---------------------------------------------------------------------------------------
# Section 1: validation
# ---------------------------------------------------------------------------------------
def test_rule_1_slot_field_splits_as_id_and_id() -> None:
    """``as_id = slot >> 16``, ``id = (u16)slot`` (kvm_set_memory_region)."""
    vm = ModelVM(SMM)
    vm.set_user_memory_region((1 << 16) | 5, 0, 0, MiB, UA)
    assert vm.memslot(5, as_id=1) is not None
    assert vm.memslot(5, as_id=0) is None
    s = vm.memslot(5, as_id=1)
    assert (s.as_id, s.id) == (1, 5)
    region = MemoryRegion((1 << 16) | 5, 0, 0, 0, 0)
    assert (region.as_id, region.id) == (1, 5)
    # A high as_id with a low id: the id part passes the user-slot check, the as_id fails.
    refused(vm, errno.EINVAL, "as-id", lambda: vm.set_user_memory_region(0xFFFF0007, 0, 0,
                                                                         MiB, UA))
    assert vm.check() == []


@pytest.mark.parametrize("bit", range(2, 32))
def test_rule_2_v1_extra_flag_bits_einval_first(vm: ModelVM, bit: int) -> None:
    """v1 takes only LOG_DIRTY|READONLY; the filter runs before every other check
    (kvm_vm_ioctl), even an out-of-range id and a misaligned size."""
    refused(vm, errno.EINVAL, "v1-flags",
            lambda: vm.set_user_memory_region(40000, 1 << bit, 0x800, 4097, 3))
    refused(vm, errno.EINVAL, "v1-flags",
            lambda: vm.set_user_memory_region(0, (1 << bit) | LOG, 0, MiB, UA))


def test_rule_2_v1_flags_accepted() -> None:
    """The two v1 flags are fine through v1."""
    vm = ModelVM(SHADOW)
    vm.set_user_memory_region(0, LOG | RO, 0, MiB, UA)
    assert vm.memslot(0).flags == LOG | RO


def test_rule_3_user_slot_id_limit_both_ioctls(vm: ModelVM) -> None:
    """``(u16)slot >= KVM_USER_MEM_SLOTS`` (32764 on x86) -> EINVAL, v1 and v2."""
    for slot_id in (32764, 32765, 32766, 32767, 65535):
        refused(vm, errno.EINVAL, "user-slot-id",
                lambda s=slot_id: vm.set_user_memory_region(s, 0, 0, MiB, UA))
        refused(vm, errno.EINVAL, "user-slot-id",
                lambda s=slot_id: vm.set_user_memory_region2(s, 0, 0, MiB, UA, guest_memfd=0))
    vm.set_user_memory_region(32763, 0, 0, MiB, UA)
    vm.set_user_memory_region2(32762, 0, GiB, MiB, UA, guest_memfd=0)


def test_rule_3_checked_on_low_16_bits_before_as_id() -> None:
    """The id test looks at the low 16 bits only and runs before the as_id test."""
    vm = ModelVM(SMM)
    refused(vm, errno.EINVAL, "user-slot-id",
            lambda: vm.set_user_memory_region((1 << 16) | 32764, 0, 0, MiB, UA))
    refused(vm, errno.EINVAL, "user-slot-id",
            lambda: vm.set_user_memory_region((7 << 16) | 32764, 0, 0, MiB, UA))


@pytest.mark.parametrize(("profile", "limit"), [("s390x", 32766), ("ppc64-hv", 32767),
                                                ("arm64", 32767), ("riscv64", 32767)])
def test_rule_3_user_slot_limit_other_arches(profile: str, limit: int) -> None:
    """KVM_USER_MEM_SLOTS per arch (s390 has one internal slot since 2025)."""
    vm = ModelVM(profile)
    size = max(MiB, vm.profile.page_size)
    refused(vm, errno.EINVAL, "user-slot-id",
            lambda: vm.set_user_memory_region(limit, 0, 0, size, 0))
    vm.set_user_memory_region(limit - 1, 0, 0, size, 0)
    assert vm.check() == []


@pytest.mark.parametrize("bit", range(3, 32))
def test_rule_4_unknown_flag_bits_einval_v2(vm: ModelVM, bit: int) -> None:
    """check_memory_region_flags: bits outside the valid set fail EINVAL."""
    refused(vm, errno.EINVAL, "flags",
            lambda: vm.set_user_memory_region2(0, 1 << bit, 0, MiB, UA, guest_memfd=0))


def test_rule_4_gmem_with_log_or_readonly_einval(vm: ModelVM) -> None:
    """GUEST_MEMFD drops LOG_DIRTY from, and never adds READONLY to, the valid set."""
    fd = vm.create_guest_memfd(4 * MiB)
    for extra in (LOG, RO, LOG | RO):
        refused(vm, errno.EINVAL, "flags",
                lambda e=extra: vm.set_user_memory_region2(0, GMEM | e, 0, MiB, UA,
                                                           guest_memfd=fd))
    vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=fd)


@pytest.mark.parametrize(("profile", "has_ro"), [
    ("x86_64", True), ("x86_64-shadow", True), ("arm64", True), ("riscv64", True),
    ("ppc64-hv", False), ("ppc64-pr", False), ("s390x", False),
])
def test_rule_5_readonly_only_where_supported(profile: str, has_ro: bool) -> None:
    """READONLY is valid iff the arch selects HAVE_KVM_READONLY_MEM."""
    vm = ModelVM(profile)
    size = max(MiB, vm.profile.page_size)
    assert vm.check_extension(KVM_CAP_READONLY_MEM) == int(has_ro)
    if has_ro:
        vm.set_user_memory_region(0, RO, 0, size, 0)
        assert vm.memslot(0).readonly
    else:
        refused(vm, errno.EINVAL, "flags", lambda: vm.set_user_memory_region(0, RO, 0, size, 0))
    assert vm.check() == []


@pytest.mark.parametrize("size", [1, 4095, 4097, MiB + 8, (1 << 64) - 1])
def test_rule_6_size_not_page_multiple(vm: ModelVM, size: int) -> None:
    refused(vm, errno.EINVAL, "size-align", lambda: vm.set_user_memory_region(0, 0, 0, size, UA))


def test_rule_6_size_page_is_arch_page() -> None:
    """Debian's ppc64el 6.1 uses 64 KiB pages: a 4 KiB size is not a page multiple there."""
    vm = ModelVM("ppc64-hv@6.1")
    refused(vm, errno.EINVAL, "size-align", lambda: vm.set_user_memory_region(0, 0, 0, PAGE, 0))
    vm.set_user_memory_region(0, 0, 0, 64 * KiB, 0)


def test_rule_7_gpa_alignment_also_for_delete(vm: ModelVM) -> None:
    refused(vm, errno.EINVAL, "gpa-align",
            lambda: vm.set_user_memory_region(0, 0, 0x800, MiB, UA))
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    refused(vm, errno.EINVAL, "gpa-align", lambda: vm.set_user_memory_region(0, 0, 0x800, 0, UA))
    refused(vm, errno.EINVAL, "gpa-align", lambda: vm.set_user_memory_region(0, 0, 1, 0, 0))
    vm.set_user_memory_region(0, 0, 0, 0, UA)
    assert vm.memslots() == []


def test_rule_8_uaddr_alignment_also_for_delete(vm: ModelVM) -> None:
    refused(vm, errno.EINVAL, "uaddr-align",
            lambda: vm.set_user_memory_region(0, 0, 0, MiB, UA + 8))
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    refused(vm, errno.EINVAL, "uaddr-align",
            lambda: vm.set_user_memory_region(0, 0, 0, 0, UA + 8))
    refused(vm, errno.EINVAL, "uaddr-align", lambda: vm.set_user_memory_region(0, 0, 0, 0, 1))
    assert len(vm.memslots()) == 1


def test_rule_9_access_ok_task_size_max(vm: ModelVM) -> None:
    """access_ok: ``uaddr + size`` must not wrap and must stay <= TASK_SIZE_MAX (observed)."""
    vm.set_user_memory_region(0, 0, 0, PAGE, TASK_SIZE_MAX - PAGE)
    refused(vm, errno.EINVAL, "access-ok",
            lambda: vm.set_user_memory_region(1, 0, GiB, PAGE, TASK_SIZE_MAX))
    refused(vm, errno.EINVAL, "access-ok",
            lambda: vm.set_user_memory_region(1, 0, GiB, 2 * PAGE, TASK_SIZE_MAX - PAGE))
    refused(vm, errno.EINVAL, "access-ok",
            lambda: vm.set_user_memory_region(1, 0, GiB, PAGE, 0xFFFF888000000000))
    refused(vm, errno.EINVAL, "access-ok",  # wraps past 2^64
            lambda: vm.set_user_memory_region(1, 0, GiB, 2 * PAGE, (1 << 64) - PAGE))
    # A DELETE is checked too: size 0 at TASK_SIZE_MAX is fine, one page beyond is not.
    refused(vm, errno.EINVAL, "access-ok",
            lambda: vm.set_user_memory_region(0, 0, 0, 0, 0x800000000000))
    vm.set_user_memory_region(0, 0, 0, 0, TASK_SIZE_MAX)
    assert vm.memslots() == []


def test_rule_10_uaddr_zero_and_unmapped_accepted(vm: ModelVM) -> None:
    """KVM never checks that the range is mapped; 0 is a valid address."""
    vm.set_user_memory_region(0, 0, 0, MiB, 0)
    vm.set_user_memory_region(1, 0, GiB, MiB, 1 << 40)  # an unmapped 1 TiB address
    assert [s.userspace_addr for s in vm.memslots()] == [0, 1 << 40]


def test_rule_11_as_id_beyond_address_spaces() -> None:
    """``as_id >= kvm_arch_nr_memslot_as_ids`` -> EINVAL: 1 AS here, 2 with SMM."""
    host = ModelVM(SHADOW)
    refused(host, errno.EINVAL, "as-id",
            lambda: host.set_user_memory_region((1 << 16) | 0, 0, 0, MiB, UA))
    smm = ModelVM(SMM)
    smm.set_user_memory_region((1 << 16) | 0, 0, 0, MiB, UA)
    refused(smm, errno.EINVAL, "as-id",
            lambda: smm.set_user_memory_region((2 << 16) | 0, 0, 0, MiB, UA))
    # A failure before the address space is known records no generation.
    assert smm.last_result.generation_before is None


@pytest.mark.parametrize("size", [PAGE, 2 * PAGE, MiB])
def test_rule_12_gpa_plus_size_wraps(vm: ModelVM, size: int) -> None:
    """Strict ``gpa + size < gpa``: a sum of exactly 2^64 wraps to 0 and fails."""
    gpa = (1 << 64) - PAGE
    refused(vm, errno.EINVAL, "gpa-wrap", lambda: vm.set_user_memory_region(0, 0, gpa, size, UA))


def test_rule_13_max_pages(vm: ModelVM) -> None:
    """``npages > KVM_MEM_MAX_NR_PAGES`` (2^31 - 1) -> EINVAL; 2^31 - 1 pages are fine."""
    refused(vm, errno.EINVAL, "max-pages",
            lambda: vm.set_user_memory_region(0, 0, 0, (1 << 31) * PAGE, 0))
    vm.set_user_memory_region(0, 0, 0, ((1 << 31) - 1) * PAGE, 0)
    assert vm.memslot(0).npages == (1 << 31) - 1
    assert vm.nr_memslot_pages == (1 << 31) - 1
    # The limit is for user ids only: an internal slot may be larger.
    vm.set_internal_memory_region(32765, 1 << 45, (1 << 31) * PAGE)
    assert vm.memslot(32765).npages == 1 << 31


def test_rule_14_delete_missing_slot(vm: ModelVM) -> None:
    refused(vm, errno.EINVAL, "delete-missing", lambda: vm.set_user_memory_region(3, 0, 0, 0, 0))
    vm.set_user_memory_region(3, 0, 0, MiB, UA)
    vm.set_user_memory_region(3, 0, 0, 0, 0)
    refused(vm, errno.EINVAL, "delete-missing", lambda: vm.set_user_memory_region(3, 0, 0, 0, 0))
    # With a flag outside the valid set the flag check answers first.
    refused(vm, errno.EINVAL, "flags",
            lambda: vm.set_user_memory_region2(3, 8, 0, 0, 0, guest_memfd=0))
    assert vm.last_result.change is None


def test_rule_14_delete_missing_in_other_address_space() -> None:
    vm = ModelVM(SMM)
    vm.set_user_memory_region(3, 0, 0, MiB, UA)
    refused(vm, errno.EINVAL, "delete-missing",
            lambda: vm.set_user_memory_region((1 << 16) | 3, 0, 0, 0, 0))


def test_rule_15_delete_ignores_fields_but_checks_them(vm: ModelVM) -> None:
    """DELETE ignores gpa, uaddr and valid flags, yet checks 5-11 still apply."""
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(0, RO | LOG, 16 * GiB, 0, 0x1234000)
    assert vm.last_result.change is ChangeType.DELETE
    assert vm.memslots() == []
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region2(0, GMEM, 0, 0, 0, guest_memfd=0xFFFFFFFF)  # fd never looked at
    assert vm.last_result.change is ChangeType.DELETE
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    refused(vm, errno.EINVAL, "flags",
            lambda: vm.set_user_memory_region2(0, 1 << 5, 0, 0, UA, guest_memfd=0))
    refused(vm, errno.EINVAL, "gmem-offset",
            lambda: vm.set_user_memory_region2(0, GMEM, 0, 0, UA, guest_memfd=0,
                                               guest_memfd_offset=7))
    refused(vm, errno.EINVAL, "access-ok",
            lambda: vm.set_user_memory_region(0, 0, 0, 0, 1 << 63))


def test_rule_16_identical_reissue_is_noop(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    before = _state(vm), gens(vm), vm.metadata_bytes()
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    r = vm.last_result
    assert r.ok and r.change is ChangeType.NOOP
    assert r.allocated == [] and r.freed == []
    assert r.generation_before == r.generation_after
    assert (_state(vm), gens(vm), vm.metadata_bytes()) == before


def test_rule_17_modify_uaddr_einval(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    refused(vm, errno.EINVAL, "modify-immutable",
            lambda: vm.set_user_memory_region(0, 0, 0, MiB, UA + PAGE))
    refused(vm, errno.EINVAL, "modify-immutable",  # also combined with a move
            lambda: vm.set_user_memory_region(0, 0, GiB, MiB, UA + PAGE))


def test_rule_18_modify_size_einval(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    for size in (MiB - PAGE, MiB + PAGE, 2 * MiB):
        refused(vm, errno.EINVAL, "modify-immutable",
                lambda s=size: vm.set_user_memory_region(0, 0, 0, s, UA))


def test_rule_19_toggle_readonly_einval(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(1, RO, GiB, MiB, UA)
    refused(vm, errno.EINVAL, "modify-immutable",
            lambda: vm.set_user_memory_region(0, RO, 0, MiB, UA))
    refused(vm, errno.EINVAL, "modify-immutable",
            lambda: vm.set_user_memory_region(1, 0, GiB, MiB, UA))
    refused(vm, errno.EINVAL, "modify-immutable",
            lambda: vm.set_user_memory_region(1, LOG, GiB, MiB, UA))


def test_rule_20_same_base_other_flags_is_flags_only(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    assert vm.last_result.change is ChangeType.FLAGS_ONLY
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    assert vm.last_result.change is ChangeType.FLAGS_ONLY
    # Observed: a read-only slot may toggle dirty logging, 2 -> 3 -> 2.
    vm.set_user_memory_region(1, RO, GiB, MiB, UA)
    vm.set_user_memory_region(1, RO | LOG, GiB, MiB, UA)
    assert vm.last_result.change is ChangeType.FLAGS_ONLY
    vm.set_user_memory_region(1, RO, GiB, MiB, UA)
    assert vm.last_result.change is ChangeType.FLAGS_ONLY
    assert vm.memslot(1).flags == RO


def test_rule_21_other_base_is_move_even_with_flag_change(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(0, LOG, GiB, MiB, UA)
    r = vm.last_result
    assert r.change is ChangeType.MOVE
    s = vm.memslot(0)
    assert (s.base_gfn, s.flags) == (GiB // PAGE, LOG)
    assert s.dirty_bitmap is not None
    vm.set_user_memory_region(0, 0, 2 * GiB, MiB, UA)
    assert vm.last_result.change is ChangeType.MOVE
    assert vm.memslot(0).dirty_bitmap is None


def test_rule_22_move_with_size_change_einval(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    refused(vm, errno.EINVAL, "modify-immutable",
            lambda: vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA))
    assert vm.last_result.change is None


def test_rule_23_create_and_move_overlap_eexist(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA)
    vm.set_user_memory_region(1, 0, 4 * GiB, 2 * MiB, UA)
    for gpa, size in ((GiB, 2 * MiB), (GiB - PAGE, 2 * PAGE), (GiB + 2 * MiB - PAGE, PAGE),
                      (GiB + PAGE, PAGE), (0, 4 * GiB)):
        refused(vm, errno.EEXIST, "overlap",
                lambda g=gpa, s=size: vm.set_user_memory_region(2, 0, g, s, UA))
        assert vm.last_result.change is ChangeType.CREATE
    refused(vm, errno.EEXIST, "overlap",
            lambda: vm.set_user_memory_region(1, 0, GiB + MiB, 2 * MiB, UA))
    assert vm.last_result.change is ChangeType.MOVE
    # Touching at either end is no overlap.
    vm.set_user_memory_region(2, 0, GiB - PAGE, PAGE, UA)
    vm.set_user_memory_region(3, 0, GiB + 2 * MiB, PAGE, UA)


def test_rule_24_move_may_overlap_itself(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA)
    vm.set_user_memory_region(0, 0, GiB + PAGE, 2 * MiB, UA)
    assert vm.last_result.change is ChangeType.MOVE
    vm.set_user_memory_region(0, 0, GiB - MiB, 2 * MiB, UA)
    assert vm.memslot(0).base_gfn == (GiB - MiB) // PAGE


def test_rule_25_address_spaces_never_conflict() -> None:
    vm = ModelVM(SMM)
    vm.set_user_memory_region(0, 0, 0, GiB, UA)
    vm.set_user_memory_region((1 << 16) | 1, 0, 0, GiB, UA)
    vm.set_user_memory_region((1 << 16) | 0, 0, GiB, GiB, UA)
    vm.set_user_memory_region(1, 0, 4 * GiB, GiB, UA)
    vm.set_user_memory_region((1 << 16) | 0, 0, 4 * GiB, GiB, UA)  # MOVE onto as 0's slot 1
    assert vm.last_result.change is ChangeType.MOVE
    assert vm.check() == []


def test_rule_26_no_overlap_check_for_flags_only_or_delete(vm: ModelVM) -> None:
    """kvm_check_memslot_overlap runs for CREATE and MOVE only. Requests cannot build an
    overlap, so one is forced into the set's indexes (as a kernel bug might): FLAGS_ONLY and
    DELETE of the overlapping slot still succeed, a MOVE of it fails EEXIST."""
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(1, 0, GiB, MiB, UA + GiB)
    s = vm._m.sets[0]
    moved = vm.memslot(1)._replace(base_gfn=128)  # now inside slot 0's [0, 256)
    s.replace(vm.memslot(1), moved)
    assert vm.gfn_to_memslot(200).id == 1
    vm.set_user_memory_region(1, LOG, 128 * PAGE, MiB, UA + GiB)
    assert vm.last_result.change is ChangeType.FLAGS_ONLY
    vm.set_user_memory_region(1, 0, 128 * PAGE, MiB, UA + GiB)
    assert vm.last_result.change is ChangeType.FLAGS_ONLY
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(1, 0, 129 * PAGE, MiB, UA + GiB)
    assert info.value.errno == errno.EEXIST and vm.last_result.change is ChangeType.MOVE
    vm.set_user_memory_region(1, 0, 0, 0, 0)
    assert vm.last_result.change is ChangeType.DELETE
    assert [x.id for x in vm.memslots()] == [0]


def test_rule_27_internal_slots_take_part_in_overlap(vm: ModelVM) -> None:
    """x86 internal slots (ids 32764..32766) are overlap-checked (v5.5+); none exist here."""
    assert vm.memslots() == []
    vm.set_internal_memory_region(32764, 0xFEE00000, PAGE)
    vm.set_internal_memory_region(32766, 0xFFFBD000, 3 * PAGE)
    assert [s.id for s in vm.memslots()] == [32764, 32766]
    refused(vm, errno.EEXIST, "overlap",
            lambda: vm.set_user_memory_region(0, 0, 0xFEE00000, PAGE, UA))
    refused(vm, errno.EEXIST, "overlap",
            lambda: vm.set_user_memory_region(0, 0, 0xC0000000, GiB, UA))
    vm.set_user_memory_region(0, 0, 0xFEE01000, PAGE, UA)
    with pytest.raises(ValueError):
        vm.set_internal_memory_region(32763, 0, PAGE)
    # Internal slots are not user-visible ids: user requests on them fail the id check.
    refused(vm, errno.EINVAL, "user-slot-id",
            lambda: vm.set_user_memory_region(32764, 0, 0, 0, 0))


def test_rule_28_shared_userspace_addr(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, UA)
    vm.set_user_memory_region(1, 0, GiB, 2 * MiB, UA)
    vm.set_user_memory_region(2, 0, 2 * GiB, 4 * MiB, UA - MiB)
    assert sorted(s.id for s in vm.hva_to_memslots(UA + PAGE)) == [0, 1, 2]
    assert vm.gfn_to_hva(0) == vm.gfn_to_hva(GiB // PAGE) == UA


def test_rule_29_x86_max_gfn_shadow(vm: ModelVM) -> None:
    """Shadow paging: B = 52, max gfn 2^40 - 1 (observed)."""
    refused(vm, errno.EINVAL, "x86-max-gfn",
            lambda: vm.set_user_memory_region(1, 0, 1 << 52, PAGE, UA))
    refused(vm, errno.EINVAL, "x86-max-gfn",
            lambda: vm.set_user_memory_region(1, 0, (1 << 52) - PAGE, 2 * PAGE, UA))
    vm.set_user_memory_region(0, 0, (1 << 52) - PAGE, PAGE, UA)
    vm.set_user_memory_region(1, 0, 0, PAGE, UA)
    refused(vm, errno.EINVAL, "x86-max-gfn",
            lambda: vm.set_user_memory_region(1, 0, 1 << 52, PAGE, UA))
    assert vm.last_result.change is ChangeType.MOVE


def test_rule_29_x86_max_gfn_tdp() -> None:
    """TDP: B = MAXPHYADDR (40 in the x86_64 preset, QEMU's q35 -cpu max)."""
    vm = ModelVM(SMM)
    vm.set_user_memory_region(0, 0, (1 << 40) - PAGE, PAGE, UA)
    refused(vm, errno.EINVAL, "x86-max-gfn",
            lambda: vm.set_user_memory_region(1, 0, 1 << 40, PAGE, UA))
    assert vm.profile.max_gfn == (1 << 28) - 1


def test_rule_30_move_with_external_page_tracker() -> None:
    """A MOVE while KVMGT tracks pages fails EINVAL; CREATE/FLAGS_ONLY/DELETE work."""
    p = memslot.get_profile(SHADOW).replace(name="kvmgt", external_page_tracker=True)
    vm = ModelVM(p)
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    g = vm.generation()
    refused(vm, errno.EINVAL, "x86-page-track-move",
            lambda: vm.set_user_memory_region(0, 0, GiB, MiB, UA))
    assert vm.generation() == g + 2  # failed prepare after the INVALID swap
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert vm.check() == []


def test_rule_31_gmem_slot_immutable(vm: ModelVM) -> None:
    """Every non-DELETE request on a guest_memfd slot fails EINVAL (check 15 or, with
    GMFIX, check 16); DELETE via v1 or v2 succeeds."""
    fd = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, GiB, MiB, UA, guest_memfd=fd)
    tries: list[tuple[str, Callable[[], object]]] = [
        ("modify-immutable", lambda: vm.set_user_memory_region(0, 0, GiB, MiB, UA)),
        ("modify-immutable", lambda: vm.set_user_memory_region(0, LOG, GiB, MiB, UA)),
        ("modify-immutable", lambda: vm.set_user_memory_region(0, 0, 2 * GiB, MiB, UA)),
        ("modify-immutable",
         lambda: vm.set_user_memory_region2(0, 0, GiB, MiB, UA, guest_memfd=fd)),
        ("modify-gmem",
         lambda: vm.set_user_memory_region2(0, GMEM, GiB, MiB, UA, guest_memfd=fd)),
        ("modify-gmem",
         lambda: vm.set_user_memory_region2(0, GMEM, 2 * GiB, MiB, UA, guest_memfd=fd)),
    ]
    for code, call in tries:
        refused(vm, errno.EINVAL, code, call)
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    vm.set_user_memory_region2(0, GMEM, GiB, MiB, UA, guest_memfd=fd)
    vm.set_user_memory_region2(0, GMEM, 0, 0, 0, guest_memfd=fd)
    assert vm.memslots() == []


def test_rule_31_without_gmfix_dropping_gmem_is_flags_only() -> None:
    """Before GMFIX (KM snapshot) dropping GUEST_MEMFD was taken as FLAGS_ONLY."""
    p = memslot.get_profile(SHADOW).replace(name="no-gmfix", gmem_toggle_fix=False)
    vm = ModelVM(p)
    fd = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, GiB, MiB, UA, guest_memfd=fd)
    vm.set_user_memory_region(0, 0, GiB, MiB, UA)
    assert vm.last_result.change is ChangeType.FLAGS_ONLY


def test_rule_32_gmem_fd_ebadf_and_einval(vm: ModelVM) -> None:
    refused(vm, errno.EBADF, "gmem-badf",
            lambda: vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=0xFFFFFFFF))
    plain = os.open(os.devnull, os.O_RDONLY)
    try:
        refused(vm, errno.EINVAL, "gmem-bind",
                lambda: vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=plain))
    finally:
        os.close(plain)
    with ModelVM(SHADOW) as other:
        theirs = other.create_guest_memfd(4 * MiB)
        refused(vm, errno.EINVAL, "gmem-bind",
                lambda: vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=theirs))
    fd = vm.create_guest_memfd(4 * MiB)
    for off in (1, 4095):
        refused(vm, errno.EINVAL, "gmem-offset",
                lambda o=off: vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=fd,
                                                         guest_memfd_offset=o))
    refused(vm, errno.EINVAL, "gmem-offset",  # offset + size wraps u64
            lambda: vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=fd,
                                               guest_memfd_offset=(1 << 64) - PAGE))
    refused(vm, errno.EINVAL, "gmem-bind",  # past the file's end
            lambda: vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=fd,
                                               guest_memfd_offset=3 * MiB + PAGE))
    vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=fd, guest_memfd_offset=3 * MiB)


def test_rule_33_gmem_offset_overlap_einval(vm: ModelVM) -> None:
    """Overlapping offset ranges of one guest_memfd: EINVAL on 6.18 (GM), not SRT's EEXIST."""
    fd = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 2 * MiB, UA, guest_memfd=fd, guest_memfd_offset=MiB)
    for off in (PAGE, MiB - PAGE, MiB, 2 * MiB, 3 * MiB - PAGE):
        refused(vm, errno.EINVAL, "gmem-bound",
                lambda o=off: vm.set_user_memory_region2(1, GMEM, GiB, MiB, UA, guest_memfd=fd,
                                                         guest_memfd_offset=o))
    vm.set_user_memory_region2(1, GMEM, GiB, MiB, UA, guest_memfd=fd, guest_memfd_offset=3 * MiB)
    vm.set_user_memory_region(0, 0, 0, 0, 0)  # DELETE unbinds
    vm.set_user_memory_region2(2, GMEM, 2 * GiB, 2 * MiB, UA, guest_memfd=fd,
                               guest_memfd_offset=MiB)


@pytest.mark.parametrize(("kernel", "err"), [("6.18", errno.EINVAL), ("7.2", errno.EEXIST),
                                             ("7.3", errno.EEXIST)])
def test_rule_33_gmem_bound_range_errno_by_version(kernel: str, err: int) -> None:
    """kvm_gmem_bind: a bound range is -EEXIST from 7.2 (Debian's 7.2.13 source; the lab's
    7.3 answered it), -EINVAL before (this host's 6.18)."""
    p = memslot.get_profile(SHADOW).replace(name=f"shadow-{kernel}", kernel=kernel,
                                            gmem_bind_eexist=None, gmem_bind_wraps=None)
    with ModelVM(p) as vm:
        fd = vm.create_guest_memfd(2 * MiB)
        vm.set_user_memory_region2(0, GMEM, 0, MiB, UA, guest_memfd=fd)
        refused(vm, err, "gmem-bound",
                lambda: vm.set_user_memory_region2(1, GMEM, GiB, MiB, UA, guest_memfd=fd,
                                                   guest_memfd_offset=MiB - PAGE))
        # offset + size reaching 2^63: wraps in loff_t before 7.2 (accepted), uoff_t after.
        big = (1 << 63) - PAGE
        if p.gmem_bind_wraps:
            vm.set_user_memory_region2(2, GMEM, 2 * GiB, PAGE, UA, guest_memfd=fd,
                                       guest_memfd_offset=big)
        else:
            refused(vm, errno.EINVAL, "gmem-bind",
                    lambda: vm.set_user_memory_region2(2, GMEM, 2 * GiB, PAGE, UA,
                                                       guest_memfd=fd, guest_memfd_offset=big))


def test_rule_34_overlap_before_gmem_bind(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    refused(vm, errno.EEXIST, "overlap",
            lambda: vm.set_user_memory_region2(1, GMEM, 0, MiB, UA, guest_memfd=0xFFFFFFFF))
    refused(vm, errno.EBADF, "gmem-badf",
            lambda: vm.set_user_memory_region2(1, GMEM, GiB, MiB, UA, guest_memfd=0xFFFFFFFF))


# Each entry violates one check of the section 1 table, in the kernel's order. A request that
# violates checks k..end must fail on check k.
_ORDER = ["v1-flags", "user-slot-id", "flags", "size-align", "gpa-align", "uaddr-align",
          "access-ok", "gmem-offset", "as-id", "gpa-wrap", "max-pages", "overlap", "gmem-badf"]


def _ordered_request(first: int, fd: int) -> MemoryRegion:
    on = set(range(first, len(_ORDER)))
    slot = 7
    flags = GMEM
    gpa = GiB if 11 in on else 4 * GiB
    size = 2 * MiB
    uaddr = 0x1000_0000
    offset = 0
    gmem: int | None = 0xFFFFFFFF if 12 in on else fd
    if 1 in on:
        slot = 32764
    if 2 in on:
        flags |= 8
    if 10 in on:
        size = (1 << 31) * PAGE
    if 3 in on:
        size += 1
    if 9 in on:
        gpa = (1 << 64) - PAGE
    if 4 in on:
        gpa += 0x800
    if 6 in on:
        uaddr = TASK_SIZE_MAX
    if 5 in on:
        uaddr += 8
    if 7 in on:
        offset = 1
    if 8 in on:
        slot |= 1 << 16
    if 0 in on:
        gmem = None
    return MemoryRegion(slot, flags, gpa, size, uaddr, offset, gmem)


@pytest.mark.parametrize("first", range(len(_ORDER) + 1))
def test_rule_35_first_failing_check_decides(first: int) -> None:
    """kvm_vm_ioctl / kvm_set_memory_region / check_memory_region_flags order."""
    vm = ModelVM(SHADOW)
    vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA)
    fd = vm.create_guest_memfd(4 * MiB)
    result = vm.submit(_ordered_request(first, fd))
    if first == len(_ORDER):
        assert result.ok and result.change is ChangeType.CREATE
    else:
        assert result.rule is not None and result.rule.code == _ORDER[first]
        assert result.errno == (errno.EEXIST if _ORDER[first] == "overlap" else
                                errno.EBADF if _ORDER[first] == "gmem-badf" else errno.EINVAL)
    assert vm.check() == []


# ---------------------------------------------------------------------------------------
# Section 3: generations
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [SHADOW, SMM])
def test_rule_36_create_and_flags_only_advance_by_n_as(profile: str) -> None:
    vm = ModelVM(profile)
    n = vm.nr_address_spaces
    for as_id in range(n):
        g = vm.generation(as_id)
        vm.set_user_memory_region((as_id << 16) | 1, 0, 0, MiB, UA)
        assert vm.generation(as_id) == g + n
        vm.set_user_memory_region((as_id << 16) | 1, LOG, 0, MiB, UA)
        assert vm.generation(as_id) == g + 2 * n
        r = vm.last_result
        assert (r.generation_before, r.generation_after) == (g + n, g + 2 * n)


@pytest.mark.parametrize("profile", [SHADOW, SMM])
def test_rule_37_delete_and_move_advance_by_2n(profile: str) -> None:
    vm = ModelVM(profile)
    n = vm.nr_address_spaces
    for as_id in range(n):
        vm.set_user_memory_region((as_id << 16) | 1, 0, 0, MiB, UA)
        g = vm.generation(as_id)
        other = [vm.generation(a) for a in range(n) if a != as_id]
        vm.set_user_memory_region((as_id << 16) | 1, 0, GiB, MiB, UA)
        assert vm.generation(as_id) == g + 2 * n
        vm.set_user_memory_region((as_id << 16) | 1, 0, 0, 0, 0)
        assert vm.generation(as_id) == g + 4 * n
        assert [vm.generation(a) for a in range(n) if a != as_id] == other


def test_rule_38_failed_prepare_of_move_and_delete() -> None:
    """Prepare failure after the INVALID swap: +2*N_AS, slot unchanged (kvm_set_memslot)."""
    vm = ModelVM(SMM)
    vm.set_user_memory_region((1 << 16) | 2, 0, 0, MiB, UA)
    g = vm.generation(1)
    refused(vm, errno.EINVAL, "x86-max-gfn",
            lambda: vm.set_user_memory_region((1 << 16) | 2, 0, 1 << 46, MiB, UA))
    assert vm.generation(1) == g + 4
    assert vm.memslot(2, 1).base_gfn == 0 and not vm.memslot(2, 1).invalid
    pv = ModelVM(memslot.get_profile("s390x").replace(name="s390x-pv", protected=True))
    refused(pv, errno.EINVAL, "s390-pv", lambda: pv.set_user_memory_region(0, 0, 0, MiB, 0))
    assert pv.generation() == 0  # CREATE failure: +0
    # A PV VM cannot delete the slots it was given before KVM_PV_ENABLE; the model has no
    # PV conversion call, so the arch hooks are switched to the protected profile instead.
    plain = ModelVM("s390x")
    plain.set_user_memory_region(0, 0, 0, MiB, 0)
    plain.arch.profile = pv.profile
    g = plain.generation()
    refused(plain, errno.EINVAL, "s390-pv", lambda: plain.set_user_memory_region(0, 0, 0, 0, 0))
    assert plain.generation() == g + 2
    assert plain.check() == []


def test_rule_39_failed_prepare_of_create_and_flags_only() -> None:
    vm = ModelVM(SHADOW)
    refused(vm, errno.EINVAL, "x86-max-gfn",
            lambda: vm.set_user_memory_region(0, 0, 1 << 52, PAGE, UA))
    assert vm.generation() == 0
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    g = vm.generation()
    vm.inject_enomem(1, kind="dirty_bitmap")
    refused(vm, errno.ENOMEM, "alloc-dirty-bitmap",
            lambda: vm.set_user_memory_region(0, LOG, 0, MiB, UA))
    assert vm.last_result.change is ChangeType.FLAGS_ONLY
    assert vm.generation() == g
    assert vm.check() == []


def test_rule_40_initial_generation_is_as_id() -> None:
    vm = ModelVM(SMM)
    assert gens(vm) == [0, 1]
    for i in range(6):
        vm.set_user_memory_region(((i % 2) << 16) | i, 0, i * GiB, MiB, UA)
        vm.set_user_memory_region(((i % 2) << 16) | i, 0, i * GiB + MiB, MiB, UA)
        assert [g % 2 for g in gens(vm)] == [0, 1]
    assert vm.check() == []


def test_rule_41_bit_63_only_while_swapping(vm: ModelVM) -> None:
    seen: list[tuple[int, int]] = []
    vm.add_observer(lambda e: seen.append((e.generation, vm.generation(e.as_id))))
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(0, 0, GiB, MiB, UA)
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert len(seen) == 5
    assert all(g >> 63 and live >> 63 for g, live in seen)
    assert not vm.generation() >> 63


# ---------------------------------------------------------------------------------------
# Section 6: lookups during and after updates
# ---------------------------------------------------------------------------------------
def test_rule_42_invalid_slot_visible_before_prepare(vm: ModelVM) -> None:
    """kvm_invalidate_memslot publishes the INVALID copy before kvm_prepare_memory_region."""
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    seen: list[tuple[str, object]] = []

    def observer(e: memslot.SwapEvent) -> None:
        seen.append((e.phase, vm.gfn_to_memslot(0)))

    vm.add_observer(observer)
    for request in ((0, 0, GiB, MiB, UA), (0, 0, 0, 0, 0)):
        seen.clear()
        vm.set_user_memory_region(*request)
        phase, slot = seen[0]
        assert phase == "invalidate"
        assert slot is not None and slot.flags & INVALID and slot.invalid
        steps = vm.last_result.steps
        assert steps.index("swap: old slot replaced by its INVALID copy") < steps.index(
            "prepare: arch")
        if vm.memslots():
            break
        vm.set_user_memory_region(0, 0, 0, MiB, UA)


def test_rule_43_invalid_slot_found_but_hva_bad(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    seen: list[tuple[object, int, int]] = []

    def observer(e: memslot.SwapEvent) -> None:
        if e.phase == "invalidate":
            seen.append((vm.gfn_to_memslot(5), vm.gfn_to_hva(5), vm.gfn_to_hva(5, write=True)))

    vm.add_observer(observer)
    vm.set_user_memory_region(0, 0, GiB, MiB, UA)
    (slot, hva, whva), = seen
    assert slot is not None and slot.invalid
    assert hva == whva == KVM_HVA_ERR_BAD and kvm_is_error_hva(hva)
    assert vm.gfn_to_hva(GiB // PAGE + 5) == UA + 5 * PAGE


def test_rule_44_gfn_to_hva_formula(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 3 * GiB, 4 * MiB, UA + 5 * PAGE)
    base = 3 * GiB // PAGE
    for off in (0, 1, 511, 1023):
        assert vm.gfn_to_hva(base + off) == UA + 5 * PAGE + off * PAGE
        assert vm.gfn_to_hva(base + off, write=True) == UA + 5 * PAGE + off * PAGE
    assert vm.gfn_to_hva(base + 1024) == KVM_HVA_ERR_BAD
    assert vm.gfn_to_hva(base - 1) == KVM_HVA_ERR_BAD


def test_rule_45_readonly_write_translation(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, RO, 0, MiB, UA)
    assert vm.gfn_to_hva(3) == UA + 3 * PAGE
    assert vm.gfn_to_hva(3, write=True) == KVM_HVA_ERR_RO_BAD
    assert kvm_is_error_hva(KVM_HVA_ERR_RO_BAD)
    assert KVM_HVA_ERR_RO_BAD == KVM_HVA_ERR_BAD + PAGE


def test_rule_46_nr_memslot_pages(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    vm.set_user_memory_region(1, 0, GiB, 3 * MiB, UA)
    assert vm.nr_memslot_pages == 1024
    vm.set_user_memory_region(1, 0, 2 * GiB, 3 * MiB, UA)
    vm.set_user_memory_region(1, LOG, 2 * GiB, 3 * MiB, UA)
    assert vm.nr_memslot_pages == 1024
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert vm.nr_memslot_pages == 768


# ---------------------------------------------------------------------------------------
# Section 4: x86 metadata
# ---------------------------------------------------------------------------------------
def _lpages(base: int, n: int, level: int) -> int:
    s = 9 * (level - 1)
    return ((base + n - 1) >> s) - (base >> s) + 1


def _arrays(vm: ModelVM, slot_id: int = 0) -> dict[str, tuple[int, int]]:
    slot = vm.memslot(slot_id)
    return {a["array"]: (a["entries"], a["bytes"]) for a in vm.describe_metadata(slot)["arrays"]}


@pytest.mark.parametrize(("base", "n"), [(0, 1), (1, 1), (511, 2), (0, 512), (1, 512),
                                         (513, 262144), (262143, 262146)])
def test_rule_47_rmap_entries_per_level(vm: ModelVM, base: int, n: int) -> None:
    vm.set_user_memory_region(0, 0, base * PAGE, n * PAGE, 0)
    arrays = _arrays(vm)
    for level, name in ((1, "rmap[4K]"), (2, "rmap[2M]"), (3, "rmap[1G]")):
        assert arrays[name] == (_lpages(base, n, level), 8 * _lpages(base, n, level))
    assert arrays["rmap[4K]"][0] == n


@pytest.mark.parametrize(("base", "n"), [(0, 1), (511, 2), (1, 262144), (262143, 262146)])
def test_rule_48_lpage_info_levels_2_and_3(vm: ModelVM, base: int, n: int) -> None:
    vm.set_user_memory_region(0, 0, base * PAGE, n * PAGE, 0)
    arrays = _arrays(vm)
    assert "lpage_info[4K]" not in arrays
    for level, name in ((2, "lpage_info[2M]"), (3, "lpage_info[1G]")):
        assert arrays[name] == (_lpages(base, n, level), 4 * _lpages(base, n, level))


def _marks(vm: ModelVM, slot_id: int = 0) -> dict[str, dict[str, bool]]:
    return vm.describe_metadata(vm.memslot(slot_id))["disallow_lpage"]


def test_rule_49_head_mark_iff_base_unaligned(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 512 * PAGE, 2048 * PAGE, 512 * PAGE)
    assert _marks(vm)["2M"]["head"] is False
    assert _marks(vm)["1G"]["head"] is True
    vm.set_user_memory_region(1, 0, GiB + PAGE, 2 * MiB, PAGE)
    assert _marks(vm, 1)["2M"]["head"] is True
    vm.set_user_memory_region(2, 0, 4 * GiB, 2 * MiB, 0)
    assert _marks(vm, 2)["1G"]["head"] is False


def test_rule_50_tail_mark_iff_end_unaligned(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, 0)
    assert _marks(vm)["2M"]["tail"] is False and _marks(vm)["1G"]["tail"] is True
    vm.set_user_memory_region(1, 0, GiB, GiB, 0)
    assert _marks(vm, 1)["1G"]["tail"] is False
    vm.set_user_memory_region(2, 0, 4 * GiB, 2 * MiB + PAGE, 0)
    assert _marks(vm, 2)["2M"]["tail"] is True


def test_rule_51_whole_array_marked_when_hva_misaligned(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, 4 * MiB, UA + PAGE)  # base ^ hva pfn = 1
    assert _marks(vm)["2M"]["whole"] and _marks(vm)["1G"]["whole"]
    assert vm.huge_ranges(vm.memslot(0)) == {"2M": [], "1G": []}
    vm.set_user_memory_region(1, 0, GiB, 4 * MiB, UA + 2 * MiB)  # aligned 2M, not 1G
    assert not _marks(vm, 1)["2M"]["whole"] and _marks(vm, 1)["1G"]["whole"]
    assert vm.huge_ranges(vm.memslot(1))["2M"] == [(GiB // PAGE, GiB // PAGE + 1024)]


def test_rule_52_one_entry_array_marked_at_both_ends_holds_1(vm: ModelVM) -> None:
    """Marks are assignments: a one-entry array misaligned at both ends holds 1, not 2."""
    vm.set_user_memory_region(0, 0, PAGE, 2 * PAGE, PAGE)
    m = _marks(vm)["2M"]
    assert m["head"] and m["tail"] and not m["whole"]
    assert _arrays(vm)["lpage_info[2M]"] == (1, 4)
    info = vm.memslot(0).arch.lpage_info[0]
    assert info.entries == 1 and info.marked(0)
    assert vm.huge_ranges(vm.memslot(0))["2M"] == []


def _kinds(vm: ModelVM, slot_id: int = 0) -> set[str]:
    return {a.label for a in vm.allocations() if a.slot_id == slot_id}


def test_rule_53_write_track_exists_iff_needed() -> None:
    shadow = ModelVM(SHADOW)
    shadow.set_user_memory_region(0, 0, 0, MiB, UA)
    assert _arrays(shadow)["write_track"] == (256, 512)
    tdp = ModelVM(SMM)
    tdp.set_user_memory_region(0, 0, 0, MiB, UA)
    assert "write_track" not in _kinds(tdp)
    ext = ModelVM(memslot.get_profile(SMM).replace(name="ext", external_write_tracking=True))
    ext.set_user_memory_region(0, 0, 0, MiB, UA)
    assert "write_track" in _kinds(ext)
    tdp.first_shadow_root()
    assert "write_track" in _kinds(tdp)
    tdp.set_user_memory_region(1, 0, GiB, MiB, UA)
    assert "write_track" in _kinds(tdp, 1)
    for machine in (shadow, tdp, ext):
        assert machine.check() == []


def test_rule_54_rmaps_iff_no_tdp_mmu_or_shadow_root() -> None:
    tdp = ModelVM(SMM)
    tdp.set_user_memory_region(0, 0, 0, MiB, UA)
    tdp.set_user_memory_region((1 << 16) | 3, 0, 0, MiB, UA)
    assert not any(a.kind == "rmap" for a in tdp.allocations())
    legacy = ModelVM(memslot.get_profile(SMM).replace(name="tdp-legacy-mmu", tdp_mmu=False))
    legacy.set_user_memory_region(0, 0, 0, MiB, UA)
    assert {a.label for a in legacy.allocations() if a.kind == "rmap"} == {
        "rmap[4K]", "rmap[2M]", "rmap[1G]"}
    tdp.first_shadow_root()  # allocates rmaps for every slot of every address space
    owners = {(a.as_id, a.slot_id) for a in tdp.allocations() if a.kind == "rmap"}
    assert owners == {(0, 0), (1, 3)}
    for machine in (tdp, legacy):
        assert machine.check() == []


def test_rule_55_move_allocates_fresh_arrays_frees_old_at_commit(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, UA)
    old = {a.serial for a in vm.allocations() if a.kind != "slot"}
    vm.set_user_memory_region(0, 0, 2 * MiB - PAGE, 2 * MiB, UA)
    r = vm.last_result
    new = {a.serial for a in vm.allocations() if a.kind != "slot"}
    assert old.isdisjoint(new)
    assert {a.serial for a in r.freed} >= old
    assert {a.serial for a in r.allocated} >= new
    arrays = _arrays(vm)
    assert arrays["rmap[2M]"][0] == 2 and arrays["lpage_info[2M]"][0] == 2
    # Freed only after the install swap (kvm_arch_commit_memory_region).
    assert r.steps.index("commit: accounting and arch") > r.steps.index("swap: install")


def test_rule_56_move_failure_frees_new_keeps_old(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, UA)
    before = {a.serial for a in vm.allocations()}
    arch = vm.memslot(0).arch
    vm.inject_enomem(1, kind="write_track")  # the last metadata array
    refused(vm, errno.ENOMEM, "x86-alloc-metadata",
            lambda: vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA))
    r = vm.last_result
    fresh = {a.serial for a in r.allocated}
    assert {a.label for a in r.allocated} >= {"rmap[4K]", "lpage_info[1G]"}
    assert fresh <= {a.serial for a in r.freed}
    assert {a.serial for a in vm.allocations()} == before
    assert vm.memslot(0).arch is arch


def test_rule_57_flags_only_shares_arrays(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, UA)
    arch = vm.memslot(0).arch
    vm.set_user_memory_region(0, LOG, 0, 2 * MiB, UA)
    assert vm.memslot(0).arch is arch
    assert [a.kind for a in vm.last_result.allocated] == ["slot", "dirty_bitmap"]
    assert [a.kind for a in vm.last_result.freed] == ["slot"]


def test_rule_58_delete_frees_everything(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, LOG, 0, 2 * MiB, UA)
    held = {a.serial for a in vm.allocations()}
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    freed = {a.serial for a in vm.last_result.freed}
    assert held <= freed
    assert {a.kind for a in vm.last_result.freed} == {
        "slot", "invalid_slot", "dirty_bitmap", "rmap", "lpage_info", "write_track"}
    assert vm.allocations() == [] and vm.metadata_bytes() == 0 and vm.vmalloc_bytes() == 0


# ---------------------------------------------------------------------------------------
# Other arches
# ---------------------------------------------------------------------------------------
def test_rule_59_ppc_hv_rmap_and_totalram_limit() -> None:
    vm = ModelVM("ppc64-hv")
    page = vm.profile.page_size
    vm.set_user_memory_region(0, 0, 0, 100 * page, 0)
    (rmap,) = [a for a in vm.allocations() if a.kind == "ppc_rmap"]
    assert (rmap.entries, rmap.entry_size, rmap.bytes) == (100, 8, 800)
    # (npages * 8) >> PAGE_SHIFT > totalram_pages() -> ENOMEM before vzalloc.
    small = ModelVM(vm.profile.replace(name="ppc-small", totalram_pages=16))
    limit = (17 * page) // 8  # smallest npages with (npages * 8) >> 16 == 17
    refused(small, errno.ENOMEM, "ppc-rmap-totalram",
            lambda: small.set_user_memory_region(0, 0, 0, limit * page, 0))
    small.set_user_memory_region(0, 0, 0, (limit - 1) * page, 0)
    small.inject_enomem(1, kind="ppc_rmap")
    refused(small, errno.ENOMEM, "ppc-alloc-rmap",
            lambda: small.set_user_memory_region(1, 0, 1 << 40, page, 0))


def test_rule_60_ppc_hv_move_and_flags_only_reuse_rmap() -> None:
    vm = ModelVM("ppc64-hv")
    page = vm.profile.page_size
    vm.set_user_memory_region(0, 0, 0, 16 * page, 0)
    rmap = vm.memslot(0).arch
    vm.set_user_memory_region(0, 0, 1 << 32, 16 * page, 0)
    assert vm.memslot(0).arch is rmap
    vm.set_user_memory_region(0, LOG, 1 << 32, 16 * page, 0)
    assert vm.memslot(0).arch is rmap
    assert rmap.serial in {a.serial for a in vm.allocations()}
    assert vm.check() == []


def test_rule_61_ppc_pr_no_metadata() -> None:
    vm = ModelVM("ppc64-pr")
    page = vm.profile.page_size
    vm.set_user_memory_region(0, 0, 0, 16 * page, 0)
    vm.set_user_memory_region(0, 0, 1 << 32, 16 * page, 0)
    assert [a.kind for a in vm.allocations()] == ["slot"]
    assert vm.memslot(0).arch is None


def test_rule_62_arm64_ipa_limit_efault() -> None:
    vm = ModelVM("arm64")  # 40-bit IPA
    refused(vm, errno.EFAULT, "arm64-ipa",
            lambda: vm.set_user_memory_region(1, 0, (1 << 40) - MiB, 2 * MiB, 0))
    vm.set_user_memory_region(0, 0, (1 << 40) - PAGE, PAGE, 0)
    refused(vm, errno.EFAULT, "arm64-ipa",
            lambda: vm.set_user_memory_region(1, 0, 1 << 40, PAGE, 0))
    vm.set_user_memory_region(1, 0, 0, PAGE, 0)
    refused(vm, errno.EFAULT, "arm64-ipa",
            lambda: vm.set_user_memory_region(1, 0, 1 << 40, PAGE, 0))
    assert vm.last_result.change is ChangeType.MOVE


def test_rule_62_riscv_gpa_limit_is_exclusive() -> None:
    vm = ModelVM("riscv64")  # 59-bit GPA (Sv57x4), base + npages >= limit fails
    refused(vm, errno.EFAULT, "riscv-gpa",
            lambda: vm.set_user_memory_region(0, 0, (1 << 59) - PAGE, PAGE, 0))
    vm.set_user_memory_region(0, 0, (1 << 59) - 2 * PAGE, PAGE, 0)
    refused(vm, errno.EFAULT, "riscv-gpa",
            lambda: vm.set_user_memory_region(0, 0, (1 << 59) - PAGE, PAGE, 0))


def test_rule_63_s390_segment_alignment_and_mem_limit() -> None:
    vm = ModelVM(memslot.get_profile("s390x").replace(name="s390-1g", mem_limit=GiB))
    refused(vm, errno.EINVAL, "s390-uaddr-1m",
            lambda: vm.set_user_memory_region(0, 0, 0, MiB, PAGE))
    refused(vm, errno.EINVAL, "s390-size-1m",
            lambda: vm.set_user_memory_region(0, 0, 0, MiB + PAGE, 0))
    refused(vm, errno.EINVAL, "s390-mem-limit",
            lambda: vm.set_user_memory_region(0, 0, GiB - MiB, 2 * MiB, 0))
    vm.set_user_memory_region(0, 0, GiB - MiB, MiB, 0)  # ends exactly at mem_limit
    vm.set_user_memory_region(1, 0, PAGE, MiB, 2 * MiB)  # gpa need only be page aligned
    refused(vm, errno.EINVAL, "s390-mem-limit",
            lambda: vm.set_user_memory_region(1, 0, GiB, MiB, 2 * MiB))
    assert vm.last_result.change is ChangeType.MOVE
    vm.set_user_memory_region(1, LOG, PAGE, MiB, 2 * MiB)  # FLAGS_ONLY is not checked
    vm.set_user_memory_region(1, 0, 0, 0, PAGE)  # nor is DELETE (beyond the generic checks)
    assert vm.check() == []


# ---------------------------------------------------------------------------------------
# Section 7: dirty logging
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", sorted(set(memslot.PRESETS) - {"s390x"}))
def test_rule_64_dirty_bitmap_size_every_arch(profile: str) -> None:
    vm = ModelVM(profile)
    page = vm.profile.page_size
    for i, n in enumerate((1, 63, 64, 65, 100, 4096 + 3)):
        vm.set_user_memory_region(i, LOG, i << 32, n * page, 0)
        bitmaps = [a for a in vm.last_result.allocated if a.kind == "dirty_bitmap"]
        assert [a.bytes for a in bitmaps] == [2 * ((n + 63) // 64 * 8)]
        assert len(vm.get_dirty_log(i)) == (n + 63) // 64 * 8


def test_rule_64_dirty_bitmap_size_s390() -> None:
    """s390 slots are 1 MiB multiples (256 pages)."""
    vm = ModelVM("s390x")
    vm.set_user_memory_region(0, LOG, 0, 3 * MiB, 0)
    (bitmap,) = [a for a in vm.allocations() if a.kind == "dirty_bitmap"]
    assert bitmap.bytes == 2 * 768 // 8


def test_rule_65_bitmap_only_when_logging_without_ring() -> None:
    vm = ModelVM(SHADOW)
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    assert vm.memslot(0).dirty_bitmap is None
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    assert [a.kind for a in vm.last_result.allocated] == ["slot", "dirty_bitmap"]
    vm.set_user_memory_region(1, LOG, GiB, MiB, UA)
    assert "dirty_bitmap" in {a.kind for a in vm.last_result.allocated}
    ring = ModelVM(SHADOW)
    ring.enable_cap(KVM_CAP_DIRTY_LOG_RING, 4096)
    ring.set_user_memory_region(0, LOG, 0, MiB, UA)
    assert ring.memslot(0).dirty_bitmap is None
    assert "dirty_bitmap" not in {a.kind for a in ring.allocations()}
    assert ring.mark_page_dirty(3) and ring.dirty_ring == [(0, 3)]
    # arm64: a ring "with bitmap" keeps allocating bitmaps.
    arm = ModelVM("arm64")
    arm.enable_cap(memslot.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096)
    arm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 1)
    arm.set_user_memory_region(0, LOG, 0, MiB, 0)
    assert arm.memslot(0).dirty_bitmap is not None
    for machine in (vm, ring, arm):
        assert machine.check() == []


def test_rule_66_move_and_flags_only_keep_bitmap(vm: ModelVM) -> None:
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    bitmap = vm.memslot(0).dirty_bitmap
    assert vm.mark_page_dirty(5) and vm.mark_page_dirty(70)
    vm.set_user_memory_region(0, LOG, GiB, MiB, UA)
    assert vm.memslot(0).dirty_bitmap is bitmap
    assert "dirty_bitmap" not in {a.kind for a in vm.last_result.allocated}
    log = int.from_bytes(vm.get_dirty_log(0), "little")
    assert log == (1 << 5) | (1 << 70)
    vm.set_user_memory_region(0, LOG, GiB, MiB, UA)  # NOOP
    vm.set_user_memory_region(0, LOG, 2 * GiB, MiB, UA)
    assert vm.memslot(0).dirty_bitmap is bitmap


def test_rule_66_marks_during_invalid_window_survive_move(vm: ModelVM) -> None:
    """The INVALID copy shares the old bitmap (kvm_copy_memslot) and mark_page_dirty_in_slot
    has no INVALID test, so a write logged mid-MOVE is in the log the moved slot keeps."""
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    logged: list[bool] = []

    def observer(e: memslot.SwapEvent) -> None:
        if e.phase == "invalidate":
            assert vm.gfn_to_memslot(9).invalid
            logged.append(vm.mark_page_dirty(9))

    vm.add_observer(observer)
    vm.set_user_memory_region(0, LOG, GiB, MiB, UA)
    assert logged == [True]
    assert int.from_bytes(vm.get_dirty_log(0), "little") == 1 << 9


def test_rule_67_log_off_frees_bitmap_at_commit(vm: ModelVM) -> None:
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    serial = vm.memslot(0).dirty_bitmap.alloc.serial
    vm.set_user_memory_region(0, 0, 0, MiB, UA)
    assert serial in {a.serial for a in vm.last_result.freed}
    assert vm.memslot(0).dirty_bitmap is None
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    serial = vm.memslot(0).dirty_bitmap.alloc.serial
    vm.set_user_memory_region(0, 0, GiB, MiB, UA)  # MOVE that turns logging off
    assert serial in {a.serial for a in vm.last_result.freed}
    refused(vm, errno.ENOENT, None, lambda: vm.get_dirty_log(0))


def test_rule_68_initially_set(vm: ModelVM) -> None:
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)
    vm.set_user_memory_region(0, LOG, 0, 100 * PAGE, UA)
    log = vm.get_dirty_log(0)
    assert len(log) == 16
    assert int.from_bytes(log, "little") == (1 << 100) - 1


def test_rule_69_get_dirty_log_errors_and_length() -> None:
    vm = ModelVM(SHADOW)
    vm.set_user_memory_region(0, 0, 0, 100 * PAGE, UA)
    vm.set_user_memory_region(1, LOG, GiB, 100 * PAGE, UA)
    for slot, err in ((0, errno.ENOENT), (2, errno.ENOENT), (32764, errno.EINVAL),
                      (1 << 16 | 1, errno.EINVAL)):
        with pytest.raises(KvmError) as info:
            vm.get_dirty_log(slot)
        assert info.value.errno == err
    assert len(vm.get_dirty_log(1)) == 16
    ring = ModelVM(SHADOW)
    ring.enable_cap(KVM_CAP_DIRTY_LOG_RING, 4096)
    ring.set_user_memory_region(1, LOG, 0, MiB, UA)
    for slot in (1, 32764, 5):  # the ring check comes first
        with pytest.raises(KvmError) as info:
            ring.get_dirty_log(slot)
        assert info.value.errno == errno.ENXIO


def test_rule_69_get_dirty_log_harvests_without_manual_protect(vm: ModelVM) -> None:
    vm.set_user_memory_region(1, LOG, GiB, 100 * PAGE, UA)
    vm.mark_page_dirty(GiB // PAGE + 99)
    assert int.from_bytes(vm.get_dirty_log(1), "little") == 1 << 99
    assert int.from_bytes(vm.get_dirty_log(1), "little") == 0


def _clear_errno(vm: ModelVM, slot: int, first: int, num: int, bitmap: bytes | None) -> int:
    try:
        vm.clear_dirty_log(slot, first, num, bitmap)
    except KvmError as exc:
        return exc.errno
    return 0


def test_rule_70_clear_first_page_alignment_before_lookup(vm: ModelVM) -> None:
    assert _clear_errno(vm, 1, 1, 64, bytes(8)) == errno.EINVAL  # absent slot
    assert _clear_errno(vm, 1, 0, 64, bytes(8)) == errno.ENOENT
    vm.set_user_memory_region(1, LOG, 0, 100 * PAGE, UA)
    assert _clear_errno(vm, 1, 63, 0, None) == errno.EINVAL


def test_rule_71_clear_range_rules(vm: ModelVM) -> None:
    vm.set_user_memory_region(1, LOG, 0, 100 * PAGE, UA)
    ones = b"\xff" * 16
    cases = [((0, 63), errno.EINVAL), ((64, 36), 0), ((64, 37), errno.EINVAL),
             ((128, 0), errno.EINVAL), ((0, 100), 0), ((0, 101), errno.EINVAL),
             ((0, 64), 0), ((64, 0), 0), ((0, 128), errno.EINVAL)]
    for (first, num), err in cases:
        assert _clear_errno(vm, 1, first, num, ones) == err, (first, num)


def test_rule_72_clear_zero_pages_with_null_buffer(vm: ModelVM) -> None:
    vm.set_user_memory_region(1, LOG, 0, 100 * PAGE, UA)
    vm.clear_dirty_log(1, 0, 0, None)
    vm.clear_dirty_log(1, 64, 0, None)
    assert _clear_errno(vm, 1, 0, 64, None) == errno.EFAULT


def test_rule_73_clear_without_manual_protect(vm: ModelVM) -> None:
    vm.set_user_memory_region(1, LOG, 0, 100 * PAGE, UA)
    for gfn in (1, 2, 70):
        vm.mark_page_dirty(gfn)
    vm.clear_dirty_log(1, 0, 64, (1 << 1).to_bytes(8, "little"))
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)  # only to read without harvesting
    assert int.from_bytes(vm.get_dirty_log(1), "little") == (1 << 2) | (1 << 70)


def test_rule_74_manual_protect2_enable_args(vm: ModelVM) -> None:
    assert vm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3
    for args, flags in (((2,), 0), ((4,), 0), ((5,), 0), ((1,), 1), ((0,), 2)):
        with pytest.raises(KvmError) as info:
            vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, *args, flags=flags)
        assert info.value.errno == errno.EINVAL
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    for arg in (3, 1, 0):  # also with slots present
        vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, arg)


def _cap_errno(vm: ModelVM, cap: int, arg: int) -> int:
    try:
        vm.enable_cap(cap, arg)
    except KvmError as exc:
        return exc.errno
    return 0


def test_rule_75_dirty_ring_enable(vm: ModelVM) -> None:
    cap = KVM_CAP_DIRTY_LOG_RING
    assert vm.check_extension(cap) == 1 << 20
    assert [_cap_errno(vm, cap, s) for s in (3000, 2048, 0, 1 << 21, 1 << 22)] == [
        errno.EINVAL, errno.EINVAL, errno.EINVAL, errno.E2BIG, errno.E2BIG]
    assert _cap_errno(vm, cap, 4096) == 0
    assert _cap_errno(vm, cap, 4096) == errno.EINVAL
    assert _cap_errno(vm, cap, 1 << 21) == errno.E2BIG  # size errnos before "already set"
    late = ModelVM(SHADOW)
    late.create_vcpu()
    assert _cap_errno(late, cap, 4096) == errno.EINVAL
    # An Intel host with PML reserves 64 + 512 entries of 16 bytes.
    pml = ModelVM(memslot.get_profile(SMM).replace(name="x86_64-pml", cpu_dirty_log_size=512))
    assert _cap_errno(pml, cap, 8192) == errno.EINVAL
    assert _cap_errno(pml, cap, 16384) == 0


# ---------------------------------------------------------------------------------------
# Section 8: limits
# ---------------------------------------------------------------------------------------
N_SMALL = 64


def _populate(vm: ModelVM, n: int) -> None:
    for i in range(n):
        vm.set_user_memory_region(i, 0, i * 4 * MiB, 2 * MiB, UA + i * 4 * MiB)


@pytest.fixture(scope="module")
def full_vm() -> Iterator[ModelVM]:
    """A shadow-paging VM with every user slot id 0..32763 in use."""
    with ModelVM(SHADOW) as machine:
        _populate(machine, machine.check_extension(KVM_CAP_NR_MEMSLOTS))
        yield machine


@pytest.mark.parametrize(("profile", "n"), [("x86_64", 32764), ("x86_64-shadow", 32764),
                                            ("s390x", 32766), ("ppc64-hv", 32767),
                                            ("ppc64-pr", 32767), ("arm64", 32767),
                                            ("riscv64", 32767)])
def test_rule_76_nr_memslots(profile: str, n: int) -> None:
    assert ModelVM(profile).check_extension(KVM_CAP_NR_MEMSLOTS) == n


def test_rule_76_all_user_ids_usable_at_once(full_vm: ModelVM) -> None:
    slots = full_vm.memslots()
    assert len(slots) == 32764 and [s.id for s in slots] == list(range(32764))
    refused(full_vm, errno.EINVAL, "user-slot-id",
            lambda: full_vm.set_user_memory_region(32764, 0, 1 << 45, 2 * MiB, UA))
    assert full_vm.check() == []


def test_rule_77_multi_address_space() -> None:
    assert ModelVM(SMM).check_extension(KVM_CAP_MULTI_ADDRESS_SPACE) == 2
    assert ModelVM(SHADOW).check_extension(KVM_CAP_MULTI_ADDRESS_SPACE) == 0
    assert ModelVM("arm64").check_extension(KVM_CAP_MULTI_ADDRESS_SPACE) == 0


def test_rule_78_forked_child_gets_eio() -> None:
    """kvm_vm_ioctl: ``kvm->mm != current->mm`` -> EIO for every VM ioctl."""
    vm = ModelVM(SHADOW)
    vm.set_user_memory_region(0, LOG, 0, MiB, UA)
    pid = os.fork()
    if pid == 0:  # child: report through the exit code only
        code = 1
        try:
            outcomes = []
            for call in (
                lambda: vm.set_user_memory_region(1, 0, GiB, MiB, UA),
                lambda: vm.set_user_memory_region(0, 0, 0, 0, 0),
                lambda: vm.set_user_memory_region(40000, 8, 1, 1, 1),  # EIO comes first
                lambda: vm.get_dirty_log(0),
                lambda: vm.clear_dirty_log(0, 0, 64, bytes(8)),
                lambda: vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1),
                lambda: vm.check_extension(KVM_CAP_NR_MEMSLOTS),
                lambda: vm.create_guest_memfd(MiB),
            ):
                try:
                    call()
                    outcomes.append(0)
                except KvmError as exc:
                    outcomes.append(exc.errno)
            code = 0 if outcomes == [errno.EIO] * 8 and len(vm.memslots()) == 1 else 3
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent is unaffected.
    vm.set_user_memory_region(1, 0, GiB, MiB, UA)
    assert vm.check() == []


# ---------------------------------------------------------------------------------------
# Rule 80: lookups, overlap checks and id lookups do not scan all slots
# ---------------------------------------------------------------------------------------
def _median_ns(fn: Callable[[], object], repeat: int = 25, number: int = 200) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter_ns() - t0) / number)
    return statistics.median(samples)


def _costs(vm: ModelVM, n: int) -> dict[str, float]:
    mid = n // 2
    gfn = mid * 4 * MiB // PAGE + 7
    spare = n - 1  # deleted and recreated in place so the count stays n
    spare_gpa = spare * 4 * MiB
    spare_ua = UA + spare * 4 * MiB

    def create_delete() -> None:
        vm.set_user_memory_region(spare, 0, spare_gpa, 0, spare_ua)
        vm.set_user_memory_region(spare, 0, spare_gpa, 2 * MiB, spare_ua)

    def overlap() -> None:
        vm.submit(MemoryRegion(spare, 0, mid * 4 * MiB, 2 * MiB, spare_ua))

    def move() -> None:
        vm.set_user_memory_region(mid, 0, mid * 4 * MiB + 2 * MiB, 2 * MiB, UA + mid * 4 * MiB)
        vm.set_user_memory_region(mid, 0, mid * 4 * MiB, 2 * MiB, UA + mid * 4 * MiB)

    vm.set_user_memory_region(spare, 0, spare_gpa, 0, spare_ua)
    try:
        costs = {"overlap": _median_ns(overlap, number=100)}
    finally:
        vm.set_user_memory_region(spare, 0, spare_gpa, 2 * MiB, spare_ua)
    assert vm.last_result.ok
    costs["lookup"] = _median_ns(lambda: vm.gfn_to_memslot(gfn))
    costs["miss"] = _median_ns(lambda: vm.gfn_to_memslot(gfn + 1024))
    costs["by_id"] = _median_ns(lambda: vm.memslot(mid))
    costs["hva"] = _median_ns(lambda: vm.hva_to_memslots(UA + mid * 4 * MiB + PAGE))
    costs["create+delete"] = _median_ns(create_delete, repeat=11, number=20)
    costs["move"] = _median_ns(move, repeat=11, number=20)
    return costs


def test_rule_80_costs_do_not_grow_with_slot_count(full_vm: ModelVM) -> None:
    """Per-operation cost with 32764 slots stays within 5x of the cost with 64."""
    small = ModelVM(SHADOW)
    _populate(small, N_SMALL)
    few = _costs(small, N_SMALL)
    many = _costs(full_vm, 32764)
    slow = {op: many[op] / few[op] for op in few if many[op] > 5 * few[op]}
    assert not slow, (slow, few, many)
    assert full_vm.check() == [] and small.check() == []


def test_rule_80_indexes_are_non_scanning_structures(full_vm: ModelVM) -> None:
    """The per-set indexes are a hash (id -> slot), a sorted list of short blocks (gfn order,
    bisected, not a flat array rewritten per insert) and an interval index (hva) whose stab
    visits one node per occupied level; nothing keeps a flat list of all slots."""
    s = full_vm._m.sets[0]
    n = len(s)
    assert n == 32764
    assert type(s.by_id) is dict and len(s.by_id) == n
    assert type(s.by_base) is dict and len(s.by_base) == n
    assert isinstance(s.bases, SortedInts) and len(s.bases) == n
    blocks = s.bases._lists
    assert len(blocks) > 32 and max(len(b) for b in blocks) <= 2 * sorted_ints.LOAD
    assert s.bases._maxes == [b[-1] for b in blocks]
    assert isinstance(s.hva, HvaIndex) and len(s.hva) == n
    # The 32764 hva ranges (2 MiB each, 4 MiB apart) spread over a few tree levels only:
    # a stab costs at most one node visit per level.
    assert bin(s.hva._levels).count("1") <= 2
    for name in ("bases", "hva", "by_id", "by_base"):
        assert not isinstance(getattr(s, name), list)

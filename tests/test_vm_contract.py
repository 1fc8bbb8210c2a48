"""The VM contract (``memslot.backends.base.VM``), psutil-style: the same behaviours run
against every backend — the model, /dev/kvm and both side by side. A behaviour that holds on
one and not another is a broken contract, whatever the backend's own tests say."""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable, Iterator

import pytest

import memslot
from memslot import FaultInjection, ModelIntrospection
from memslot.backends.base import VM
from memslot.constants import KVM_CAP_NR_MEMSLOTS, KVM_CAP_USER_MEMORY, KVM_MEM_LOG_DIRTY_PAGES
from memslot.errors import ClosedError, KvmError, UnsupportedError

UA = 0x7F0000000000
U64 = (1 << 64) - 1


def _model() -> VM:
    return memslot.ModelVM()


def _kvm() -> VM:
    return memslot.KvmVM()


def _dual() -> VM:
    return memslot.DualVM(memslot.ModelVM(memslot.detect_profile()), memslot.KvmVM())


BACKENDS = [
    pytest.param(_model, id="model"),
    pytest.param(_kvm, id="kvm", marks=pytest.mark.kvm),
    pytest.param(_dual, id="dual", marks=pytest.mark.kvm),
]


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest) -> Iterator[Callable[[], VM]]:
    """A VM factory; every VM it made is closed after the test, even a failing one."""
    made: list[VM] = []

    def factory() -> VM:
        made.append(request.param())
        return made[-1]

    try:
        yield factory
    finally:
        for vm in made:
            vm.close()


@pytest.fixture
def vm(make: Callable[[], VM]) -> VM:
    return make()


def errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except KvmError as exc:
        return exc.errno or 0
    return 0


def test_is_a_vm_with_the_kernels_page_size(vm: VM) -> None:
    assert isinstance(vm, VM)
    assert vm.page_size == mmap.PAGESIZE == 4096
    assert vm.nr_address_spaces >= 1


def test_slot_lifecycle_and_lookups(vm: VM) -> None:
    page = vm.page_size
    vm.set_user_memory_region(3, 0, 0x10 * page, 4 * page, UA)
    slot = vm.memslot(3)
    assert slot is not None and (slot.base_gfn, slot.npages) == (0x10, 4)
    assert vm.gfn_to_memslot(0x13) == slot and vm.gfn_to_memslot(0x14) is None
    assert [s.id for s in vm.memslots()] == [3]
    vm.set_user_memory_region(3, 0, 0x20 * page, 4 * page, UA)  # MOVE
    assert vm.gfn_to_memslot(0x10) is None and vm.memslot(3).base_gfn == 0x20  # type: ignore[union-attr]
    assert errno_of(lambda: vm.set_user_memory_region(4, 0, 0x21 * page, page, UA)) == errno.EEXIST
    vm.set_user_memory_region(3, 0, 0, 0, 0)  # DELETE
    assert vm.memslots() == [] and vm.memslot(3) is None
    assert errno_of(lambda: vm.set_user_memory_region(3, 0, 0, 0, 0)) == errno.EINVAL


def test_capabilities_on_both_fds(vm: VM) -> None:
    assert vm.check_extension(KVM_CAP_USER_MEMORY) == 1
    assert vm.check_system_extension(KVM_CAP_USER_MEMORY) == 1
    assert vm.check_extension(KVM_CAP_NR_MEMSLOTS) >= 32


def test_dirty_log(vm: VM) -> None:
    page = vm.page_size
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 100 * page, UA)
    assert vm.get_dirty_log(0) == bytes(16)
    assert errno_of(lambda: vm.get_dirty_log(1)) == errno.ENOENT


def test_host_mappings_are_recorded(vm: VM) -> None:
    vm.register_host_mapping(UA, 0x4000)
    vm.register_host_mapping(UA + 0x10000, 0x1000)
    assert vm.host_mappings() == [(UA, 0x4000), (UA + 0x10000, 0x1000)]
    vm.unregister_host_mapping(UA, 0x4000)
    assert vm.host_mappings() == [(UA + 0x10000, 0x1000)]
    with pytest.raises(ValueError, match="not registered"):
        vm.unregister_host_mapping(UA, 0x4000)
    with pytest.raises(ValueError, match="bad host mapping"):
        vm.register_host_mapping(UA, 0)
    with pytest.raises(ValueError, match="64-bit field"):
        vm.register_host_mapping(-4096, 0x1000)


def test_vcpus(vm: VM) -> None:
    assert vm.create_vcpu() == 0
    assert vm.create_vcpu() == 1
    assert errno_of(lambda: vm.create_vcpu(1)) == errno.EEXIST
    vm.close_vcpu(0)
    with pytest.raises(ValueError, match="not created"):
        vm.close_vcpu(0)
    # Closing the fd destroys no vCPU (kvm_vcpu_release only drops a VM reference).
    assert errno_of(lambda: vm.create_vcpu(0)) == errno.EEXIST
    assert vm.create_vcpu() == 2
    with pytest.raises(ValueError, match="64-bit field"):
        vm.create_vcpu(-1)


def test_guest_memfd_create_and_close(vm: VM) -> None:
    if not vm.check_extension(memslot.KVM_CAP_GUEST_MEMFD):
        pytest.skip("this kernel has no guest_memfd")  # pragma: no cover
    fd = vm.create_guest_memfd(0x10000)
    assert fd >= 0
    assert errno_of(lambda: vm.create_guest_memfd(0x1001)) == errno.EINVAL
    vm.close_guest_memfd(fd)
    with pytest.raises(ValueError, match="not a guest_memfd"):
        vm.close_guest_memfd(fd)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda vm: vm.check_extension(2**64 + 10), id="check_extension"),
        pytest.param(lambda vm: vm.check_system_extension(-1), id="check_system_extension"),
        pytest.param(lambda vm: vm.create_guest_memfd(2**64 + 4096), id="gmem-size"),
        pytest.param(lambda vm: vm.create_guest_memfd(4096, -1), id="gmem-flags"),
        pytest.param(lambda vm: vm.clear_dirty_log(0, -64, 64, None), id="clear-first"),
        pytest.param(lambda vm: vm.clear_dirty_log(0, 0, 1 << 32, None), id="clear-num"),
        pytest.param(lambda vm: vm.get_dirty_log(1 << 32), id="get-slot"),
        pytest.param(lambda vm: vm.enable_cap(1 << 32), id="cap"),
        pytest.param(lambda vm: vm.enable_cap(1, 1 << 64), id="cap-arg"),
        pytest.param(lambda vm: vm.enable_cap(1, flags=-1), id="cap-flags"),
        pytest.param(lambda vm: vm.set_user_memory_region(0, 0, -4096, 4096, UA), id="gpa"),
        pytest.param(lambda vm: vm.set_user_memory_region2(0, 4, 0, 4096, UA, 1 << 32), id="fd"),
    ],
)
def test_out_of_range_arguments_raise_before_any_ioctl(
    vm: VM, call: Callable[[VM], object]
) -> None:
    """A value the ioctl's field cannot carry is a ValueError everywhere (never truncated)."""
    with pytest.raises(ValueError, match="does not fit"):
        call(vm)
    assert vm.memslots() == []


def test_close_is_final_and_idempotent(make: Callable[[], VM]) -> None:
    vm = make()
    vm.close()
    assert vm.closed
    vm.close()
    for call in (
        lambda: vm.set_user_memory_region(0, 0, 0, 4096, UA),
        lambda: vm.memslots(),
        lambda: vm.check_extension(KVM_CAP_USER_MEMORY),
        lambda: vm.create_vcpu(),
        lambda: vm.host_mappings(),
    ):
        with pytest.raises(ClosedError):
            call()


def test_model_only_parts_are_protocols_not_classes(vm: VM) -> None:
    """Introspection: the model and DualVM (its model's); fault injection: the model alone,
    and DualVM refuses it without touching either half."""
    kernel_only = isinstance(vm, memslot.KvmVM)
    assert isinstance(vm, ModelIntrospection) == (not kernel_only)
    assert isinstance(vm, FaultInjection) == isinstance(vm, memslot.ModelVM)
    if isinstance(vm, ModelIntrospection):
        result = vm.submit(memslot.MemoryRegion(0, 0, 0, 4 * vm.page_size, UA))
        assert result.errno == 0 and str(result.change) == "CREATE"
        assert vm.last_result is result and vm.check() == []
        assert vm.metadata_bytes() > 0 and vm.generation() > 0
    if isinstance(vm, memslot.DualVM):
        with pytest.raises(UnsupportedError):
            vm.inject_enomem(1)
        with pytest.raises(UnsupportedError):
            vm.mark_page_dirty(0)
        vm.set_user_memory_region(1, 0, 0x100000, 4096, UA)  # no false divergence after


def test_sibling_is_a_fresh_vm_of_the_same_kind(vm: VM) -> None:
    vm.set_user_memory_region(0, 0, 0, 0x1000, 0)
    with vm.sibling() as other:
        assert type(other) is type(vm)
        assert other.memslots() == []
        assert other.page_size == vm.page_size
    assert other.closed and len(vm.memslots()) == 1


# KVM_ENABLE_CAP of x86's own capabilities (kvm_vm_ioctl_enable_cap): what VMMs enable --
# QEMU 7.2 enables EXCEPTION_PAYLOAD, X86_TRIPLE_FAULT_EVENT, X86_USER_SPACE_MSR and
# MAX_VCPU_ID on every VM -- and what the fuzzer sends, errno for errno on every backend.
# Each case: (what comes before: ("cap", CAP, ARG) or ("vcpu", ID)), cap, arg, flags, errno.
SPLIT, X2APIC, EXITS, PLATFORM, PAYLOAD, USER_MSR = 121, 129, 143, 159, 164, 188
BUS_LOCK, HYPERCALL, EMULATION, QUIRKS2, TRIPLE, NX, APIC_BUS = 193, 201, 204, 213, 218, 220, 237
MAX_VCPU_ID, SGX, COPY_ENC = 128, 196, 197
LIMIT = -(1 << 40)  # stands for KVM_MAX_VCPU_IDS, KVM_CHECK_EXTENSION(KVM_CAP_MAX_VCPU_ID)
ENABLE_CAP_CASES = [
    ((), PAYLOAD, 1, 0, 0), ((), TRIPLE, 1, 0, 0), ((), USER_MSR, 4, 0, 0),
    ((), USER_MSR, 8, 0, errno.EINVAL), ((), PLATFORM, 5, 0, 0), ((), PLATFORM, 1, 1, errno.EINVAL),
    ((), 116, 1 << 40, 0, 0),
    ((), MAX_VCPU_ID, 1, 0, 0), ((), MAX_VCPU_ID, 0, 0, 0),
    ((), MAX_VCPU_ID, LIMIT + 1, 0, errno.EINVAL),
    ((("cap", MAX_VCPU_ID, 1),), MAX_VCPU_ID, 1, 0, 0),
    ((("cap", MAX_VCPU_ID, 1),), MAX_VCPU_ID, 2, 0, errno.EINVAL),
    ((("vcpu", 0),), MAX_VCPU_ID, 1, 0, errno.EINVAL),  # the vCPU fixed KVM_MAX_VCPU_IDS
    ((("vcpu", 0),), MAX_VCPU_ID, LIMIT, 0, 0),
    ((), SPLIT, 24, 0, 0), ((), SPLIT, 4096, 0, 0), ((), SPLIT, 4097, 0, errno.EINVAL),
    ((("cap", SPLIT, 24),), SPLIT, 24, 0, errno.EEXIST),
    ((("vcpu", 0),), SPLIT, 24, 0, errno.EEXIST),
    ((), X2APIC, 3, 0, 0), ((), X2APIC, 8, 0, 0), ((), X2APIC, 4, 0, errno.EINVAL),
    ((("cap", SPLIT, 24),), X2APIC, 4, 0, 0),
    ((("cap", SPLIT, 24),), X2APIC, 12, 0, errno.EINVAL),
    ((), X2APIC, 16, 0, errno.EINVAL),
    ((), BUS_LOCK, 1, 0, 0), ((), BUS_LOCK, 2, 0, 0), ((), BUS_LOCK, 3, 0, errno.EINVAL),
    ((), BUS_LOCK, 4, 0, errno.EINVAL),
    ((), HYPERCALL, 1 << 12, 0, 0), ((), HYPERCALL, 1, 0, errno.EINVAL),
    ((), EMULATION, 1, 0, 0), ((), EMULATION, 2, 0, errno.EINVAL),
    ((), NX, 0, 0, 0), ((), NX, 1, 0, errno.EINVAL), ((("vcpu", 0),), NX, 0, 0, errno.EINVAL),
    ((), APIC_BUS, 1, 0, errno.ENXIO), ((("cap", SPLIT, 24),), APIC_BUS, 1, 0, 0),
    ((("cap", SPLIT, 24),), APIC_BUS, 0, 0, errno.EINVAL),
    ((("cap", SPLIT, 24),), APIC_BUS, 1 << 40, 0, errno.EINVAL),
    ((("cap", SPLIT, 24), ("vcpu", 0)), APIC_BUS, 1, 0, errno.EINVAL),
    ((), SGX, 0, 0, errno.EINVAL), ((), COPY_ENC, 0, 0, errno.EINVAL),
    ((), 1000, 1, 0, errno.EINVAL),
]


@pytest.mark.parametrize(("before", "cap", "arg", "flags", "expect"), ENABLE_CAP_CASES)
def test_enable_cap_of_x86_capabilities(make: Callable[[], VM], before: tuple[tuple[int, ...]],
                                        cap: int, arg: int, flags: int, expect: int) -> None:
    vm = make()
    if arg in (LIMIT, LIMIT + 1):
        arg = vm.check_extension(MAX_VCPU_ID) + arg - LIMIT
    for step in before:
        if step[0] == "cap":
            vm.enable_cap(step[1], step[2])
        else:
            vm.create_vcpu(step[1])
    assert errno_of(lambda: vm.enable_cap(cap, arg, flags=flags)) == expect


def test_max_vcpu_id_bounds_vcpu_creation(vm: VM) -> None:
    """kvm_arch_vcpu_precreate: ids at or above the VM's max vCPU id are EINVAL."""
    vm.enable_cap(MAX_VCPU_ID, 2)
    assert vm.create_vcpu(1) == 1
    assert errno_of(lambda: vm.create_vcpu(2)) == errno.EINVAL


PMU, NOTIFY = 212, 219


@pytest.mark.parametrize("cap", [QUIRKS2, EXITS, PMU, NOTIFY])
def test_enable_cap_host_masks_follow_check_extension(make: Callable[[], VM], cap: int) -> None:
    """Where the host decides (the quirks it supports, the exits it lets a guest keep, its
    PMU, notify VM exits), KVM_ENABLE_CAP accepts what KVM_CHECK_EXTENSION answered."""
    mask = make().check_extension(cap)
    if cap in (QUIRKS2, EXITS):  # each bit alone: accepted where the answer has it
        cases = {1 << bit: 0 if mask >> bit & 1 else errno.EINVAL for bit in range(12)}
    elif cap == PMU:  # KVM_PMU_CAP_DISABLE, with a PMU
        cases = {0: 0 if mask else errno.EINVAL, 1: 0 if mask else errno.EINVAL,
                 2: errno.EINVAL}
    else:  # KVM_X86_NOTIFY_VMEXIT_ENABLED, where the CPU has notify VM exits
        cases = {1: 0 if mask else errno.EINVAL, 0: errno.EINVAL, 4: errno.EINVAL}
    for value, want in cases.items():
        assert errno_of(lambda v=value: make().enable_cap(cap, v)) == want, (cap, value, mask)

"""Capabilities: ``KVM_CHECK_EXTENSION`` (``kvm_vm_ioctl_check_extension_generic``, then the
arch's ``kvm_vm_ioctl_check_extension``) and the generic part of ``KVM_ENABLE_CAP``
(``kvm_vm_ioctl_enable_cap_generic``) that is not dirty logging (``dirty_log.py``).

The model *derives* the answers listed in :data:`DERIVED` from its profile; every other
capability is answered from the profile's recorded table (``Profile.extensions``, filled by
``detect_profile()``) and is 0 where the profile records nothing — the model does not know
those (see docs/capabilities.md)."""

from __future__ import annotations

from ..constants import (
    KVM_CAP_ARM_VM_IPA_SIZE,
    KVM_CAP_CHECK_EXTENSION_VM,
    KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_ENABLE_CAP_VM,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_HALT_POLL,
    KVM_CAP_JOIN_MEMORY_REGIONS_WORKS,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MAX_VCPU_ID,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_NR_VCPUS,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_SYNC_MMU,
    KVM_CAP_USER_MEMORY,
    KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
)
from ..errors import KvmError
from ..profile import Profile
from . import change as ch
from .gmem import GUEST_MEMFD_FLAG_INIT_SHARED

U32 = (1 << 32) - 1

#: The capabilities whose answer the model derives from its profile (on either fd).
DERIVED = frozenset({
    KVM_CAP_USER_MEMORY, KVM_CAP_USER_MEMORY2, KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
    KVM_CAP_JOIN_MEMORY_REGIONS_WORKS, KVM_CAP_CHECK_EXTENSION_VM, KVM_CAP_ENABLE_CAP_VM,
    KVM_CAP_HALT_POLL, KVM_CAP_SYNC_MMU, KVM_CAP_NR_MEMSLOTS, KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_READONLY_MEM, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_NR_VCPUS, KVM_CAP_MAX_VCPUS, KVM_CAP_MAX_VCPU_ID,
    KVM_CAP_VM_TYPES, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_ARM_VM_IPA_SIZE,
})


def _derived(p: Profile, cap: int, on_vm: bool) -> int:
    ring = p.dirty_ring_max_bytes
    if cap == KVM_CAP_USER_MEMORY2:
        return int(p.user_memory2)
    if cap == KVM_CAP_MEMORY_ATTRIBUTES:
        return p.memory_attributes if on_vm else p.memory_attributes_system
    if cap == KVM_CAP_ARM_VM_IPA_SIZE:
        return p.ipa_limit or 0  # None on arches without KVM_CAP_ARM_VM_IPA_SIZE
    if cap in (KVM_CAP_USER_MEMORY, KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
               KVM_CAP_JOIN_MEMORY_REGIONS_WORKS, KVM_CAP_CHECK_EXTENSION_VM,
               KVM_CAP_ENABLE_CAP_VM, KVM_CAP_HALT_POLL, KVM_CAP_SYNC_MMU):
        return 1
    if cap == KVM_CAP_NR_MEMSLOTS:
        return p.user_mem_slots
    if cap == KVM_CAP_MULTI_ADDRESS_SPACE:
        return p.nr_address_spaces if p.nr_address_spaces > 1 else 0
    if cap == KVM_CAP_READONLY_MEM:
        return int(p.readonly_mem)
    if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
        return p.manual_dirty_log_caps
    if cap == KVM_CAP_DIRTY_LOG_RING:
        return ring if p.dirty_ring_tso else 0
    if cap == KVM_CAP_DIRTY_LOG_RING_ACQ_REL:
        return ring if p.dirty_ring_acq_rel else 0
    if cap == KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
        return int(p.dirty_ring_with_bitmap)
    if cap == KVM_CAP_GUEST_MEMFD:
        # 6.8..6.17: ``!kvm || kvm_arch_has_private_mem(kvm)``: /dev/kvm answers 1 wherever
        # the ioctl exists, a default VM 0 (the lab's amd64 6.12); 1 from 6.18.
        return int(p.guest_memfd or (not on_vm and bool(p.guest_memfd_ioctl)))
    if cap == KVM_CAP_GUEST_MEMFD_FLAGS:
        if not p.guest_memfd:
            return 0
        # kvm_gmem_get_supported_flags(NULL) offers INIT_SHARED whatever the arch says.
        return (p.guest_memfd_flags or 0) | (0 if on_vm else GUEST_MEMFD_FLAG_INIT_SHARED)
    if cap == KVM_CAP_NR_VCPUS:
        return p.nr_vcpus
    if cap == KVM_CAP_MAX_VCPUS:
        return p.max_vcpus
    if cap == KVM_CAP_MAX_VCPU_ID:
        return p.max_vcpu_ids if p.max_vcpu_id_cap else 0
    if cap == KVM_CAP_VM_TYPES:
        return p.vm_types
    raise AssertionError(cap)  # pragma: no cover - DERIVED and this function disagree


def check_extension(p: Profile, cap: int, on_vm: bool = True) -> int:
    """``KVM_CHECK_EXTENSION`` on a VM fd (``on_vm``) or on /dev/kvm (``kvm == NULL``).
    ``cap`` is the ioctl's unsigned long; the kernel switches on it as a ``long``, so values
    of 2^63 and above are negative and match nothing."""
    if cap in DERIVED:
        return _derived(p, cap, on_vm)
    for number, vm_answer, system_answer in p.extensions:
        if number == cap:
            return vm_answer if on_vm else system_answer
    return 0


def enable_halt_poll(args: tuple[int, ...], flags: int, what: str) -> int:
    """``KVM_CAP_HALT_POLL`` in ``kvm_vm_ioctl_enable_cap_generic``: no flags and a value
    that fits an unsigned int; returns the VM's new ``max_halt_poll_ns``."""
    arg0 = args[0] if args else 0
    if flags or arg0 != arg0 & U32:
        rule = ch.ENABLE_CAP_ARGS
        raise KvmError(rule.errno, str(rule), what)
    return arg0


__all__ = ["DERIVED", "check_extension", "enable_halt_poll"]

"""Kernel constants under their kernel names (include/uapi/linux/kvm.h, include/linux/kvm_host.h).

Values are those of the 6.18 kernel this project runs on; where older kernels differ the
profile (``memslot.profile``) carries the difference, not this module.
"""

from __future__ import annotations

from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

# struct kvm_userspace_memory_region.flags (uapi)
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2
# Kernel-internal slot flags, bits 16..31 (kvm_host.h); never valid in a request.
KVM_MEMSLOT_INVALID: Final = 1 << 16
KVM_MEMSLOT_GMEM_ONLY: Final = 1 << 17

# Limits (kvm_host.h): KVM_MEM_SLOTS_NUM = SHRT_MAX since v5.12 ("Raise the maximum number of
# user memslots"); the user slot count is that minus the arch's internal slots.
KVM_MEM_SLOTS_NUM: Final = 32767
KVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1
KVM_ADDRESS_SPACE_SHIFT: Final = 16

# KVM_CHECK_EXTENSION capabilities (uapi)
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_DESTROY_MEMORY_REGION_WORKS: Final = 21
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS: Final = 30
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_ENABLE_CAP_VM: Final = 98
KVM_CAP_CHECK_EXTENSION_VM: Final = 105
KVM_CAP_MAX_VCPU_ID: Final = 128
KVM_CAP_HALT_POLL: Final = 182
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_ARM_VM_IPA_SIZE: Final = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_DIRTY_LOG_RING: Final = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL: Final = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: Final = 225
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244
# x86's own VM capabilities (kvm_vm_ioctl_enable_cap in arch/x86/kvm/x86.c)
KVM_CAP_DISABLE_QUIRKS: Final = 116
KVM_CAP_SPLIT_IRQCHIP: Final = 121
KVM_CAP_X2APIC_API: Final = 129
KVM_CAP_X86_DISABLE_EXITS: Final = 143
KVM_CAP_MSR_PLATFORM_INFO: Final = 159
KVM_CAP_EXCEPTION_PAYLOAD: Final = 164
KVM_CAP_X86_USER_SPACE_MSR: Final = 188
KVM_CAP_X86_BUS_LOCK_EXIT: Final = 193
KVM_CAP_SGX_ATTRIBUTE: Final = 196
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM: Final = 197
KVM_CAP_EXIT_HYPERCALL: Final = 201
KVM_CAP_EXIT_ON_EMULATION_FAILURE: Final = 204
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: Final = 206
KVM_CAP_PMU_CAPABILITY: Final = 212
KVM_CAP_DISABLE_QUIRKS2: Final = 213
KVM_CAP_X86_TRIPLE_FAULT_EVENT: Final = 218
KVM_CAP_X86_NOTIFY_VMEXIT: Final = 219
KVM_CAP_VM_DISABLE_NX_HUGE_PAGES: Final = 220
KVM_CAP_X86_APIC_BUS_CYCLES_NS: Final = 237

# KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) argument bits (uapi)
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET: Final = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS: Final = (
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
)

# Dirty ring: struct kvm_dirty_gfn is 16 bytes; KVM_DIRTY_RING_MAX_ENTRIES (kvm_dirty_ring.h)
KVM_DIRTY_GFN_SIZE: Final = 16
KVM_DIRTY_RING_MAX_ENTRIES: Final = 65536

#: The x86 VM capabilities the model enables (``arch/x86_caps.py``; a recording keeps them).
X86_ENABLE_CAPS: Final = frozenset({
    KVM_CAP_DISABLE_QUIRKS, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X2APIC_API, KVM_CAP_X86_DISABLE_EXITS,
    KVM_CAP_MSR_PLATFORM_INFO, KVM_CAP_EXCEPTION_PAYLOAD, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_CAP_X86_BUS_LOCK_EXIT, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_CAP_PMU_CAPABILITY, KVM_CAP_DISABLE_QUIRKS2, KVM_CAP_X86_TRIPLE_FAULT_EVENT,
    KVM_CAP_X86_NOTIFY_VMEXIT, KVM_CAP_VM_DISABLE_NX_HUGE_PAGES, KVM_CAP_X86_APIC_BUS_CYCLES_NS,
    KVM_CAP_MAX_VCPU_ID,
})
CAPABILITY_NAMES: Final[dict[int, str]] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_CAP_") and isinstance(value, int)
}
FLAG_NAMES: Final[dict[int, str]] = {
    KVM_MEM_LOG_DIRTY_PAGES: "LOG_DIRTY_PAGES",
    KVM_MEM_READONLY: "READONLY",
    KVM_MEM_GUEST_MEMFD: "GUEST_MEMFD",
    KVM_MEMSLOT_INVALID: "INVALID",
    KVM_MEMSLOT_GMEM_ONLY: "GMEM_ONLY",
}


def flag_names(flags: int) -> str:
    """Render slot flags as ``LOG_DIRTY_PAGES|READONLY`` (``0`` when none, hex for unknown bits)."""
    if not flags:
        return "0"
    parts = [name for bit, name in FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(FLAG_NAMES)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts)


#: The public names: the kernel's constants and the flag helpers (``from memslot import *``).
__all__ = [
    *(name for name in dict(globals()) if name.startswith(("KVM_", "PAGE_"))),
    "CAPABILITY_NAMES",
    "FLAG_NAMES",
    "flag_names",
]

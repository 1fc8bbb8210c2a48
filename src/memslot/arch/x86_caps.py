"""x86's ``KVM_ENABLE_CAP`` on the VM fd (``kvm_vm_ioctl_enable_cap`` in
``arch/x86/kvm/x86.c``, reached for every capability ``kvm_vm_ioctl_enable_cap_generic`` does not
own) and the per-VM state it shares with vCPU creation (``kvm_arch_vcpu_precreate``).

Modelled, errno for errno: the capabilities VMMs enable (QEMU 7.2 enables
``EXCEPTION_PAYLOAD``, ``X86_TRIPLE_FAULT_EVENT``, ``X86_USER_SPACE_MSR`` and ``MAX_VCPU_ID``
on every VM) and those tied to memory or vCPUs: ``DISABLE_QUIRKS{,2}``, ``SPLIT_IRQCHIP``,
``X2APIC_API``, ``X86_DISABLE_EXITS``, ``MSR_PLATFORM_INFO``, ``X86_BUS_LOCK_EXIT``,
``EXIT_HYPERCALL``, ``EXIT_ON_EMULATION_FAILURE``, ``PMU_CAPABILITY``, ``X86_NOTIFY_VMEXIT``,
``VM_DISABLE_NX_HUGE_PAGES`` and ``X86_APIC_BUS_CYCLES_NS``. Where the answer depends on the
host (supported quirks, the exits it lets a guest keep, the PMU, notify VM exits), the model
reads what ``KVM_CHECK_EXTENSION`` answered for that capability (the profile's recorded
``extensions``; 0 where a preset records none). ``SGX_ATTRIBUTE`` (an SGX attribute file
descriptor) and ``VM_{COPY,MOVE}_ENC_CONTEXT_FROM`` (SEV) are not modelled: EINVAL, as on a
host without them. Versions: the Debian 5.10, 6.1, 6.12, 7.2 and 7.3 sources, and this
project's 6.18 host probed (its answers are those of 7.2 for every case here).
"""

from __future__ import annotations

import errno

from .. import constants as c
from ..engine.change import Rule
from ..profile import Profile
from ..versions import since

FUNCTION = "kvm_vm_ioctl_enable_cap"
KVM_CAP_DISABLE_QUIRKS = c.KVM_CAP_DISABLE_QUIRKS
KVM_CAP_SPLIT_IRQCHIP = c.KVM_CAP_SPLIT_IRQCHIP
KVM_CAP_X2APIC_API = c.KVM_CAP_X2APIC_API
KVM_CAP_X86_DISABLE_EXITS = c.KVM_CAP_X86_DISABLE_EXITS
KVM_CAP_MSR_PLATFORM_INFO = c.KVM_CAP_MSR_PLATFORM_INFO
KVM_CAP_EXCEPTION_PAYLOAD = c.KVM_CAP_EXCEPTION_PAYLOAD
KVM_CAP_X86_USER_SPACE_MSR = c.KVM_CAP_X86_USER_SPACE_MSR
KVM_CAP_X86_BUS_LOCK_EXIT = c.KVM_CAP_X86_BUS_LOCK_EXIT
KVM_CAP_EXIT_HYPERCALL = c.KVM_CAP_EXIT_HYPERCALL
KVM_CAP_EXIT_ON_EMULATION_FAILURE = c.KVM_CAP_EXIT_ON_EMULATION_FAILURE
KVM_CAP_PMU_CAPABILITY = c.KVM_CAP_PMU_CAPABILITY
KVM_CAP_DISABLE_QUIRKS2 = c.KVM_CAP_DISABLE_QUIRKS2
KVM_CAP_X86_TRIPLE_FAULT_EVENT = c.KVM_CAP_X86_TRIPLE_FAULT_EVENT
KVM_CAP_X86_NOTIFY_VMEXIT = c.KVM_CAP_X86_NOTIFY_VMEXIT
KVM_CAP_VM_DISABLE_NX_HUGE_PAGES = c.KVM_CAP_VM_DISABLE_NX_HUGE_PAGES
KVM_CAP_X86_APIC_BUS_CYCLES_NS = c.KVM_CAP_X86_APIC_BUS_CYCLES_NS

KVM_MAX_IRQ_ROUTES = 4096
KVM_X2APIC_API_USE_32BIT_IDS = 1
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 2
KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST = 4
KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST = 8
KVM_X86_DISABLE_VALID_EXITS = 0xF  # MWAIT | HLT | PAUSE | CSTATE, before the host's own mask
KVM_MSR_EXIT_REASON_VALID_MASK = 0x7  # INVAL | UNKNOWN | FILTER
KVM_BUS_LOCK_DETECTION_OFF, KVM_BUS_LOCK_DETECTION_EXIT = 1, 2
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << 12  # 1 << KVM_HC_MAP_GPA_RANGE
KVM_CAP_PMU_VALID_MASK = 1  # KVM_PMU_CAP_DISABLE
KVM_X86_NOTIFY_VMEXIT_ENABLED = 1
KVM_X86_NOTIFY_VMEXIT_VALID_BITS = 0x3
CAP_SYS_BOOT = 22
U64 = (1 << 64) - 1


def _rule(code: str, err: int, text: str, function: str = FUNCTION) -> Rule:
    return Rule(code, err, function, text)


X86_CAP_ARGS = _rule("x86-cap-args", errno.EINVAL,
                     "an x86 capability's argument has bits or a value it does not accept")
X86_CAP_HOST = _rule("x86-cap-host", errno.EINVAL,
                     "the host does not support it (KVM_CHECK_EXTENSION answers 0 or not "
                     "these bits)")
X86_CAP_VCPUS = _rule("x86-cap-vcpus", errno.EINVAL,
                      "only before the first vCPU is created")
X86_CAP_MAX_VCPU_ID = _rule("x86-max-vcpu-id", errno.EINVAL,
                            "max vCPU id above KVM_MAX_VCPU_IDS, below the BSP id, or changed "
                            "once set (a vCPU sets KVM_MAX_VCPU_IDS)")
X86_SPLIT_IRQCHIP = _rule("x86-split-irqchip", errno.EEXIST,
                          "an irqchip is already in the kernel, or vCPUs exist")
X86_APIC_BUS_IRQCHIP = _rule("x86-apic-bus-irqchip", errno.ENXIO,
                             "KVM_CAP_X86_APIC_BUS_CYCLES_NS needs an in-kernel (split) irqchip")
X86_NX_HUGE_PAGES_PERM = _rule("x86-nx-huge-pages-perm", errno.EPERM,
                               "disabling NX huge pages needs CAP_SYS_BOOT")
X86_VCPU_ID_LIMIT = _rule("x86-vcpu-id-limit", errno.EINVAL,
                          "vCPU id at or above the VM's max vCPU id (KVM_CAP_MAX_VCPU_ID)",
                          "kvm_arch_vcpu_precreate")
X86_CAP_UNKNOWN = _rule("x86-cap-unknown", errno.EINVAL,
                        "not an x86 VM capability of this kernel (or not modelled: SGX, SEV)")


def _capable_sys_boot() -> bool:
    """``capable(CAP_SYS_BOOT)`` of the calling process (its effective set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_BOOT & 1)
    except (OSError, ValueError):
        pass
    return False


class X86VmCaps:
    """One VM's x86 capability state: the irqchip mode, ``max_vcpu_ids`` and what vCPU
    creation and ``KVM_ENABLE_CAP`` read of it."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.irqchip_split = False  # KVM_CAP_SPLIT_IRQCHIP enabled (irqchip_in_kernel)
        self.max_vcpu_ids = 0  # kvm->arch.max_vcpu_ids: 0 until set by the cap or a vCPU
        self.bsp_vcpu_id = 0  # KVM_SET_BOOT_CPU_ID is not modelled

    def _since(self, version: str) -> bool:
        return self.profile.at_least(version)

    def _host(self, cap: int) -> int:
        """What ``KVM_CHECK_EXTENSION(cap)`` answered on the VM fd (0 where not recorded or
        where it answered an error)."""
        for number, vm_answer, _ in self.profile.extensions:
            if number == cap:
                return max(vm_answer, 0)
        return 0

    def vcpu_precreate(self, vcpu_id: int) -> Rule | None:
        """``kvm_arch_vcpu_precreate``: the VM's max vCPU id is fixed (KVM_MAX_VCPU_IDS unless
        the cap set one) and ``vcpu_id`` must be below it."""
        if not self._since("6.1"):  # absent in 5.10 (no KVM_CAP_MAX_VCPU_ID to enable)
            return None
        if not self.max_vcpu_ids:
            self.max_vcpu_ids = self.profile.max_vcpu_ids
        return X86_VCPU_ID_LIMIT if vcpu_id >= self.max_vcpu_ids else None

    def enable_cap(self, cap: int, args: tuple[int, ...], flags: int,
                   created_vcpus: int) -> Rule | None:
        """``kvm_vm_ioctl_enable_cap``: the rule refusing ``cap`` with ``args`` (``args[0]``
        is what every case reads), or ``None`` after applying it."""
        if flags:
            return X86_CAP_ARGS
        arg = args[0] if args else 0
        since_61 = self._since("6.1")
        if cap == KVM_CAP_DISABLE_QUIRKS:
            return None
        if cap == KVM_CAP_DISABLE_QUIRKS2 and since_61:
            return X86_CAP_ARGS if arg & ~self._host(KVM_CAP_DISABLE_QUIRKS2) else None
        if cap == KVM_CAP_SPLIT_IRQCHIP:
            # MAX_NR_RESERVED_IOAPIC_PINS is KVM_MAX_IRQ_ROUTES in every source read
            # (arch/x86/kvm/ioapic.h, 5.10.223 to 7.3-rc7).
            if arg > KVM_MAX_IRQ_ROUTES:
                return X86_CAP_ARGS
            if self.irqchip_split or created_vcpus:
                return X86_SPLIT_IRQCHIP
            self.irqchip_split = True
            return None
        if cap == KVM_CAP_X2APIC_API:
            return self._x2apic(arg)
        if cap == KVM_CAP_X86_DISABLE_EXITS:
            if self._since(since("x86-disable-exits-allowed")):  # and before vCPUs
                if arg & ~self._host(KVM_CAP_X86_DISABLE_EXITS):
                    return X86_CAP_ARGS
                return X86_CAP_VCPUS if created_vcpus else None
            return X86_CAP_ARGS if arg & ~KVM_X86_DISABLE_VALID_EXITS else None
        if cap in (KVM_CAP_MSR_PLATFORM_INFO, KVM_CAP_EXCEPTION_PAYLOAD):
            return None
        if cap == KVM_CAP_X86_USER_SPACE_MSR:
            return X86_CAP_ARGS if arg & ~KVM_MSR_EXIT_REASON_VALID_MASK else None
        if not since_61:
            return X86_CAP_UNKNOWN
        if cap == KVM_CAP_X86_TRIPLE_FAULT_EVENT:
            return None
        if cap == KVM_CAP_X86_BUS_LOCK_EXIT:
            both = KVM_BUS_LOCK_DETECTION_OFF | KVM_BUS_LOCK_DETECTION_EXIT
            return X86_CAP_ARGS if arg & ~both or arg & both == both else None
        if cap == KVM_CAP_EXIT_HYPERCALL:
            return X86_CAP_ARGS if arg & ~KVM_EXIT_HYPERCALL_VALID_MASK else None
        if cap == KVM_CAP_EXIT_ON_EMULATION_FAILURE:
            return X86_CAP_ARGS if arg & ~1 else None
        if cap == KVM_CAP_PMU_CAPABILITY:
            if not self._host(KVM_CAP_PMU_CAPABILITY):  # enable_pmu off
                return X86_CAP_HOST
            if arg & ~KVM_CAP_PMU_VALID_MASK:
                return X86_CAP_ARGS
            return X86_CAP_VCPUS if created_vcpus else None
        if cap == c.KVM_CAP_MAX_VCPU_ID:
            return self._max_vcpu_id(arg)
        if cap == KVM_CAP_X86_NOTIFY_VMEXIT:
            low = arg & 0xFFFFFFFF
            if low & ~KVM_X86_NOTIFY_VMEXIT_VALID_BITS:
                return X86_CAP_ARGS
            if not self._host(KVM_CAP_X86_NOTIFY_VMEXIT):
                return X86_CAP_HOST
            if not low & KVM_X86_NOTIFY_VMEXIT_ENABLED:
                return X86_CAP_ARGS
            return X86_CAP_VCPUS if created_vcpus else None
        if cap == KVM_CAP_VM_DISABLE_NX_HUGE_PAGES:
            if not _capable_sys_boot():
                return X86_NX_HUGE_PAGES_PERM
            if arg:
                return X86_CAP_ARGS
            return X86_CAP_VCPUS if created_vcpus else None
        if cap == KVM_CAP_X86_APIC_BUS_CYCLES_NS and self._since("6.12"):
            # tmict_to_ns() must not overflow: U32_MAX * 128 * ns within a u64.
            if not arg or (0xFFFFFFFF * 128) * arg > U64:
                return X86_CAP_ARGS
            if not self.irqchip_split:
                return X86_APIC_BUS_IRQCHIP
            return X86_CAP_VCPUS if created_vcpus else None
        return X86_CAP_UNKNOWN

    def _x2apic(self, arg: int) -> Rule | None:
        valid = KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
        if not self._since(since("x86-x2apic-suppress-eoi")):
            return X86_CAP_ARGS if arg & ~valid else None
        enable, disable = (KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST,
                           KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST)
        if arg & ~(valid | enable | disable):
            return X86_CAP_ARGS
        if arg & enable and (arg & disable or not self.irqchip_split):
            return X86_CAP_ARGS
        return None

    def _max_vcpu_id(self, arg: int) -> Rule | None:
        if arg > self.profile.max_vcpu_ids:
            return X86_CAP_MAX_VCPU_ID
        if self._since("6.12") and self.bsp_vcpu_id > arg:
            return X86_CAP_MAX_VCPU_ID
        if self.max_vcpu_ids == arg:
            return None
        if not self.max_vcpu_ids:
            self.max_vcpu_ids = arg
            return None
        return X86_CAP_MAX_VCPU_ID

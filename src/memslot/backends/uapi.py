"""The /dev/kvm user ABI this project uses, mirroring ``include/uapi/linux/kvm.h`` (x86-64).

Every struct is a :mod:`ctypes` structure whose size is asserted at import, and every ioctl
number is computed from the ``_IOC`` encoding and the struct size, then checked against the
values recorded in the specification (section 0). Only layouts and numbers live here; the
structure classes keep the kernel's (lower-case) struct names so they can be grepped for.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final


# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) --------------------------------
def ioc_encoding(machine: str) -> tuple[int, int, int, int]:
    """(_IOC_SIZEBITS, _IOC_NONE, _IOC_WRITE, _IOC_READ) of an architecture (``uname -m``):
    asm-generic's 14, 0, 1, 2, except where arch/*/include/uapi/asm/ioctl.h overrides them
    (powerpc, mips, sparc, alpha: 13 size bits, NONE 1, WRITE 4, READ 2; so
    KVM_SET_USER_MEMORY_REGION is 0x8020ae46 on ppc64le, 0x4020ae46 on x86-64)."""
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return 13, 1, 4, 2
    return 14, 0, 1, 2


_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS, _IOC_NONE, _IOC_WRITE, _IOC_READ = ioc_encoding(os.uname().machine)
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS

KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type[ctypes.Structure] | int) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(struct))


def _IOW(type_: int, nr: int, struct: type[ctypes.Structure] | int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes.Structure] | int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(struct))


def _size(struct: type[ctypes.Structure] | int) -> int:
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

# --- memslots ------------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    """Argument of ``KVM_SET_USER_MEMORY_REGION``."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    """Argument of ``KVM_SET_USER_MEMORY_REGION2`` (v6.8+); the pads are not checked."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
        ("guest_memfd_offset", u64),
        ("guest_memfd", u32),
        ("pad1", u32),
        ("pad2", u64 * 14),
    ]


class kvm_dirty_log(ctypes.Structure):
    """Argument of ``KVM_GET_DIRTY_LOG``; ``dirty_bitmap`` is a user pointer."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    """Argument of ``KVM_CLEAR_DIRTY_LOG``."""

    _fields_ = [
        ("slot", u32),
        ("num_pages", u32),
        ("first_page", u64),
        ("dirty_bitmap", u64),
    ]


class kvm_enable_cap(ctypes.Structure):
    """Argument of ``KVM_ENABLE_CAP``."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_create_guest_memfd(ctypes.Structure):
    """Argument of ``KVM_CREATE_GUEST_MEMFD`` (v6.8+)."""

    _fields_ = [("size", u64), ("flags", u64), ("reserved", u64 * 6)]


# --- x86 vCPU state (arch/x86/include/uapi/asm/kvm.h) --------------------------------------


class kvm_regs(ctypes.Structure):
    """General-purpose registers (``KVM_GET_REGS``/``KVM_SET_REGS``)."""

    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    """One segment register with its hidden descriptor cache."""

    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    """GDTR/IDTR."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS: Final = 256


class kvm_sregs(ctypes.Structure):
    """Special registers (``KVM_GET_SREGS``/``KVM_SET_SREGS``)."""

    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


# --- struct kvm_run ------------------------------------------------------------------------


class kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_io(ctypes.Structure):
    """``KVM_EXIT_IO``: the data lives in the kvm_run area at ``data_offset``."""

    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_mmio(ctypes.Structure):
    """``KVM_EXIT_MMIO``: for a read, user space fills ``data`` before the next ``KVM_RUN``."""

    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_memory_fault(ctypes.Structure):
    _fields_ = [("flags", u64), ("gpa", u64), ("size", u64)]


class kvm_run_exit(ctypes.Union):
    """The exit-specific union of ``struct kvm_run`` (fixed at 256 bytes)."""

    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", ctypes.c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES: Final = 2048


class kvm_run(ctypes.Structure):
    """The shared vCPU run area (``mmap`` of the vCPU fd at offset 0); x86 layout."""

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES),
    ]


KVM_RUN_HEADER_SIZE: Final = 32  # offset of the exit union

# --- size assertions (sizeof in the kernel's x86-64 ABI) -----------------------------------
_EXPECTED_SIZES: Final[dict[type[ctypes.Structure] | type[ctypes.Union], int]] = {
    kvm_userspace_memory_region: 32,
    kvm_userspace_memory_region2: 160,
    kvm_dirty_log: 16,
    kvm_clear_dirty_log: 24,
    kvm_enable_cap: 104,
    kvm_create_guest_memfd: 64,
    kvm_regs: 144,
    kvm_segment: 24,
    kvm_dtable: 16,
    kvm_sregs: 312,
    kvm_run_io: 16,
    kvm_run_mmio: 24,
    kvm_run_internal: 136,
    kvm_run_exit: 256,
    kvm_run: 32 + 256 + 16 + SYNC_REGS_SIZE_BYTES,
}
for _struct, _expected in _EXPECTED_SIZES.items():
    if ctypes.sizeof(_struct) != _expected:  # pragma: no cover - layout bug
        raise AssertionError(
            f"sizeof({_struct.__name__}) = {ctypes.sizeof(_struct)}, expected {_expected}"
        )
if (
    getattr(kvm_run, "u").offset != KVM_RUN_HEADER_SIZE  # noqa: B009
    or getattr(kvm_run, "kvm_valid_regs").offset != 288  # noqa: B009
):
    raise AssertionError("struct kvm_run layout mismatch")  # pragma: no cover

# --- ioctl numbers -------------------------------------------------------------------------
# system ioctls (/dev/kvm)
KVM_GET_API_VERSION: Final = _IO(KVMIO, 0x00)
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _IO(KVMIO, 0x04)
# VM ioctls
KVM_CREATE_VCPU: Final = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG: Final = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES: Final = _IO(KVMIO, 0x44)
KVM_GET_NR_MMU_PAGES: Final = _IO(KVMIO, 0x45)
KVM_SET_USER_MEMORY_REGION: Final = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _IO(KVMIO, 0x47)
KVM_SET_USER_MEMORY_REGION2: Final = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP: Final = _IO(KVMIO, 0x60)
KVM_ENABLE_CAP: Final = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG: Final = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
KVM_CREATE_GUEST_MEMFD: Final = _IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)
# vCPU ioctls
KVM_RUN: Final = _IO(KVMIO, 0x80)
KVM_GET_REGS: Final = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS: Final = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS: Final = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS: Final = _IOW(KVMIO, 0x84, kvm_sregs)

IOCTL_NAMES: Final[dict[int, str]] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == KVMIO
}

# Values recorded in the specification (section 0) and the well-known _IO numbers.
_KNOWN_IOCTLS: Final[dict[str, int]] = {
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_NR_MMU_PAGES": 0xAE44,
}
# powerpc (and mips, sparc, alpha): _IOC_NONE 1, _IOC_WRITE 4, 13 size bits.
_KNOWN_IOCTLS_POWERPC: Final[dict[str, int]] = {
    "KVM_SET_USER_MEMORY_REGION": 0x8020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x80A0AE49,
    "KVM_GET_DIRTY_LOG": 0x8010AE42,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_ENABLE_CAP": 0x8068AEA3,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_GET_API_VERSION": 0x2000AE00,
    "KVM_CREATE_VM": 0x2000AE01,
    "KVM_CHECK_EXTENSION": 0x2000AE03,
}
for _name, _value in (_KNOWN_IOCTLS if _IOC_WRITE == 1 else _KNOWN_IOCTLS_POWERPC).items():
    if globals()[_name] != _value:  # pragma: no cover - encoding bug
        raise AssertionError(f"{_name} = {globals()[_name]:#x}, expected {_value:#x}")

# --- kvm_run exit reasons ------------------------------------------------------------------
KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_SET_TPR: Final = 11
KVM_EXIT_TPR_ACCESS: Final = 12
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_IOAPIC_EOI: Final = 26
KVM_EXIT_HYPERV: Final = 27
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_DIRTY_RING_FULL: Final = 31
KVM_EXIT_AP_RESET_HOLD: Final = 32
KVM_EXIT_X86_BUS_LOCK: Final = 33
KVM_EXIT_XEN: Final = 34
KVM_EXIT_NOTIFY: Final = 37
KVM_EXIT_MEMORY_FAULT: Final = 39
KVM_EXIT_TDX: Final = 40

EXIT_REASON_NAMES: Final[dict[int, str]] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

# KVM_EXIT_INTERNAL_ERROR sub-errors
KVM_INTERNAL_ERROR_EMULATION: Final = 1
KVM_INTERNAL_ERROR_SIMUL_EX: Final = 2
KVM_INTERNAL_ERROR_DELIVERY_EV: Final = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4


def exit_reason_name(reason: int) -> str:
    """``6`` -> ``"KVM_EXIT_MMIO"`` (the number as text when unknown)."""
    return EXIT_REASON_NAMES.get(reason, str(reason))


def ioctl_name(request: int) -> str:
    """``0x4020AE46`` -> ``"KVM_SET_USER_MEMORY_REGION"`` (hex when unknown)."""
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")

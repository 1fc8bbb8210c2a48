"""``detect_profile()``: the versioned :class:`~memslot.profile.Profile` of the running kernel,
read from /dev/kvm capabilities, module parameters and harmless probes on scratch VMs (each
probe makes its own VM, issues memslot requests whose outcome reveals one fact, and closes
it; no vCPU runs and no memory is touched).

What it probes is what differs between kernel versions and hosts (see
``docs/kernel-versions.md``): the version (uname), the user slot count, the x86 max-gfn
refusal (up to 64-bit gpas, absent before 5.18), the x86 write-tracking policy (VmallocUsed
around one large slot), the access_ok limit on every arch, the arm64 IPA / riscv G-stage
size, the page size, REGION2 and guest_memfd, the dirty ring and the capabilities.
"""

from __future__ import annotations

import errno
import os
import platform
from collections.abc import Callable

from .. import constants as c
from ..arch import ARCH_HOOKS
from ..backends.base import VM
from ..engine.caps import DERIVED
from ..engine.gmem import GUEST_MEMFD_FLAG_MMAP
from ..errors import KvmError, KvmUnavailable
from ..profile import PML_LOG_NR_ENTRIES, PRESETS, Profile
from ..versions import at_least, since, version_tuple

_ARCHES = {"x86_64": "x86", "aarch64": "arm64", "riscv64": "riscv", "s390x": "s390",
           "ppc64le": "ppc-hv", "ppc64": "ppc-hv"}
UA = 0x10000000000  # 1 TiB: a user address KVM accepts without it being mapped
KVM_CAP_ARM_VM_IPA_SIZE = 165
#: Fields that describe the machine rather than the kernel; ignored when matching presets
#: (the CPU count, RAM, and the arch capabilities the model does not derive).
HOST_FIELDS = ("name", "description", "totalram_pages", "nr_vcpus", "extensions")
#: Capabilities below this number are recorded (6.18 numbers them up to 244).
CAP_SCAN_LIMIT = 1024


def _param(module: str, name: str) -> str | None:
    try:
        with open(f"/sys/module/{module}/parameters/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def _accepted(fn: Callable[[], None]) -> bool:
    try:
        fn()
    except KvmError as exc:
        if exc.errno in (errno.EINVAL, errno.EFAULT, errno.E2BIG):
            return False
        raise
    return True


def _probe(make_vm: Callable[[], VM], action: Callable[[VM], None]) -> bool:
    """Run ``action`` on a fresh scratch VM; True if KVM accepted it."""
    vm = make_vm()
    try:
        return _accepted(lambda: action(vm))
    finally:
        vm.close()


def _slot_ending_at(make_vm: Callable[[], VM], end: int, page: int) -> bool:
    """Is a one-page slot whose last byte is ``end - 1`` accepted?"""
    return _probe(make_vm, lambda vm: vm.set_user_memory_region(0, 0, end - page, page, UA))


def _largest_bits(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest ``b`` in ``[lo, hi]`` with ``ok(b)``, ``ok`` monotone (true then false);
    ``lo`` when even ``ok(lo)`` fails."""
    if not ok(lo):
        return lo
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _x86_gpa_limit(make_vm: Callable[[], VM], page: int) -> tuple[bool, int]:
    """(max-gfn refusal present, B) where B bounds the last gfn: ``2^(B-12) - 1``.

    Kernels before 5.18 accept any gpa below 2^64 (the last page ends at 2^64 - page,
    since gpa + size must not wrap); a slot ending there tells them apart, and MAXPHYADDR
    then comes from /proc/cpuinfo."""
    if _slot_ending_at(make_vm, (1 << 64) - page, page):
        return False, _cpuinfo_phys_bits()
    return True, _largest_bits(lambda b: _slot_ending_at(make_vm, 1 << b, page), 32, 63)


def _cpuinfo_phys_bits() -> int:
    """``address sizes : N bits physical`` of /proc/cpuinfo (52 when absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("address sizes"):
                    return int(line.split(":")[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 52


def _guest_addr_bits(make_vm: Callable[[], VM], page: int) -> int:
    """arm64 IPA size / riscv G-stage GPA size: the largest B with a slot ending at
    ``2^B - page`` accepted (arm64 refuses an end above 2^B, riscv an end at 2^B)."""
    return _largest_bits(lambda b: _slot_ending_at(make_vm, (1 << b) - page, page), 32, 64)


def _user_addr_limit(make_vm: Callable[[], VM], page: int) -> int | None:
    """TASK_SIZE_MAX as access_ok sees it (the largest ``uaddr + size`` accepted), on every
    arch: 2^47 - 4096 or 2^56 - 4096 (x86 4/5-level paging), 2^48 or 2^52 (arm64 VA_BITS),
    2^47 or 2^56 (riscv Sv48/Sv57), 2^46 or 2^52 (ppc64 4K/64K pages); ``None`` when every
    address passes (s390)."""
    def ends_ok(end: int) -> bool:
        return _probe(make_vm, lambda vm: vm.set_user_memory_region(
            0, 0, 0, page, end - page))

    if ends_ok((1 << 64) - page):
        return None
    bits = _largest_bits(lambda b: ends_ok((1 << b) - page), 36, 63)
    return 1 << bits if ends_ok(1 << bits) else (1 << bits) - page


def _access_ok_mask(make_vm: Callable[[], VM], page: int, limit: int) -> bool:
    """powerpc64's access_ok (7.2): address and size each below the limit, not their sum.
    A two-page range starting one page below the limit tells the two rules apart."""
    return _probe(make_vm, lambda vm: vm.set_user_memory_region(
        0, 0, 0, 2 * page, limit - page))


def _vmalloc_used() -> int:
    """VmallocUsed in bytes, folded in first where the kernel batches vmstat (7.x)."""
    try:
        with open("/proc/sys/vm/stat_refresh", "w") as f:
            f.write("1")
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("VmallocUsed:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmallocUsed in /proc/meminfo")


def _write_tracking_always(make_vm: Callable[[], VM], page: int, rmaps: bool) -> bool | None:
    """On a TDP host: does a slot get a write-track array (2 bytes per page) without any
    shadow root? Before 5.16 always, 5.16..6.5 with CONFIG_KVM_EXTERNAL_WRITE_TRACKING, later
    never. Measured as VmallocUsed around a 4 GiB slot (1 Mi pages: 2 MiB of write tracking,
    a few KiB of lpage_info, 8 MiB of rmaps where they are not lazy); ``None`` when
    VmallocUsed cannot be read or the reading is ambiguous."""
    npages = 1 << 20
    vm = make_vm()
    try:
        before = _vmalloc_used()
        vm.set_user_memory_region(0, 0, 1 << 32, npages * page, UA)
        delta = _vmalloc_used() - before
    except (OSError, KvmError):
        return None
    finally:
        vm.close()
    track = 2 * npages
    rest = delta - (8 * npages if rmaps else 0)
    if rest >= track * 9 // 10:
        return True
    if rest < track // 2:
        return False
    return None


def _answer(check: Callable[[int], int], cap: int) -> int:
    """A KVM_CHECK_EXTENSION answer as the arch returns it: ``-errno`` where it refuses to
    answer (arm64 5.10 and 6.1 give EINVAL for some capability numbers on a VM fd, 7.3 for
    KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED on /dev/kvm)."""
    try:
        return check(cap)
    except KvmError as e:
        return -(e.errno or 0)


def _kernel_version(release: str) -> str:
    major, minor = version_tuple(release)
    return f"{major}.{minor}"


def detect_profile(name: str = "detected") -> Profile:
    """The running kernel's profile. Raises :class:`KvmUnavailable` without a usable /dev/kvm."""
    from ..backends.kvm import KvmVM, kvm_available

    ok, why = kvm_available()
    if not ok:
        raise KvmUnavailable(why)
    machine = platform.machine()
    arch = _ARCHES.get(machine)
    if arch is None:
        raise KvmUnavailable(f"no profile rules for host architecture {machine!r}")
    hooks = ARCH_HOOKS[arch]  # the arch's facts: what to probe and how to read it
    page_size = os.sysconf("SC_PAGE_SIZE")
    page_shift = page_size.bit_length() - 1
    release = platform.release()
    kernel = _kernel_version(release)

    with KvmVM() as vm:
        cap = vm.check_extension
        nr_slots = cap(c.KVM_CAP_NR_MEMSLOTS)
        multi_as = cap(c.KVM_CAP_MULTI_ADDRESS_SPACE)
        readonly = bool(cap(c.KVM_CAP_READONLY_MEM))
        manual = cap(c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        ring_tso = bool(cap(c.KVM_CAP_DIRTY_LOG_RING))
        ring_acq = bool(cap(c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL))
        ring_bitmap = bool(cap(c.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP))
        region2 = bool(cap(c.KVM_CAP_USER_MEMORY2))
        gmem = bool(cap(c.KVM_CAP_GUEST_MEMFD))
        attributes = cap(c.KVM_CAP_MEMORY_ATTRIBUTES)
        memory_attributes_system = vm.check_system_extension(c.KVM_CAP_MEMORY_ATTRIBUTES)
        vm_types = cap(c.KVM_CAP_VM_TYPES) if c.KVM_CAP_VM_TYPES in hooks.arch_caps else 0
        ipa_limit = (cap(KVM_CAP_ARM_VM_IPA_SIZE) if KVM_CAP_ARM_VM_IPA_SIZE in hooks.arch_caps
                     else 0)
        vcpus = dict(
            vcpu_id_u32=_vcpu_id_truncated(),
            # Seen only where the arch refuses a taken id itself (ppc64 HV): by version.
            vcpu_exists_first=at_least(kernel, since("vcpu-exists-first")),
            nr_vcpus=cap(c.KVM_CAP_NR_VCPUS),
            max_vcpus=cap(c.KVM_CAP_MAX_VCPUS),
            max_vcpu_ids=cap(c.KVM_CAP_MAX_VCPU_ID),
        )
        if not vcpus["max_vcpu_ids"]:
            # riscv does not answer KVM_CAP_MAX_VCPU_ID; KVM_MAX_VCPU_IDS is KVM_MAX_VCPUS.
            vcpus.update(max_vcpu_ids=vcpus["max_vcpus"], max_vcpu_id_cap=False)
        answers = ((n, _answer(cap, n), _answer(vm.check_system_extension, n))
                   for n in range(CAP_SCAN_LIMIT) if n not in DERIVED)
        extensions = tuple(a for a in answers if a[1] or a[2])

    try:
        totalram = os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        totalram = 1 << 22
    # KVM_MEM_SLOTS_NUM: SHRT_MAX since 5.12; before, the arch's user slots plus x86's 3.
    internal = hooks.private_mem_slots
    if nr_slots + internal >= c.KVM_MEM_SLOTS_NUM - 2:
        mem_slots_num = c.KVM_MEM_SLOTS_NUM
        internal = c.KVM_MEM_SLOTS_NUM - nr_slots
    else:
        mem_slots_num = nr_slots + internal
    ua_limit = _user_addr_limit(KvmVM, page_size)
    fields: dict[str, object] = dict(
        name=name,
        totalram_pages=totalram,
        arch=arch,
        kernel=kernel,
        build=_kernel_build(),
        page_shift=page_shift,
        nr_address_spaces=multi_as if multi_as > 1 else 1,
        mem_slots_num=mem_slots_num,
        internal_mem_slots=internal,
        readonly_mem=readonly,
        user_memory2=region2,
        guest_memfd=gmem,
        memory_attributes=attributes,
        memory_attributes_system=memory_attributes_system,
        vm_types=vm_types,
        manual_dirty_log_caps=manual,
        dirty_ring_tso=ring_tso,
        dirty_ring_acq_rel=ring_acq,
        dirty_ring_with_bitmap=ring_bitmap,
        user_addr_limit=ua_limit,
        access_ok_mask=ua_limit is not None and _access_ok_mask(KvmVM, page_size, ua_limit),
        move_reallocates_arch=at_least(kernel, "5.7"),  # never probed: 5.6 would crash
        extensions=extensions,
        **vcpus,
    )
    fields["unknown_ioctl_errno"] = (
        _unknown_ioctl_errno(KvmVM, page_size) if not region2
        else hooks.unknown_vm_ioctl_errno)
    gmem_ioctl, gmem_flags = _guest_memfd_ioctl(KvmVM, page_size)
    fields.update(guest_memfd_ioctl=gmem_ioctl, guest_memfd_flags=gmem_flags)
    notes = []
    if hooks.mmu_max_gfn:
        ept = _param("kvm_intel", "ept")
        npt = _param("kvm_amd", "npt")
        tdp = ept in ("Y", "1") or npt in ("Y", "1")
        tdp_mmu = tdp and _param("kvm", "tdp_mmu") in ("Y", "1")
        check, bits = _x86_gpa_limit(KvmVM, page_size)
        fields.update(tdp=tdp, tdp_mmu=tdp_mmu, phys_bits=bits if tdp else 52,
                      max_gfn_check=check)
        if tdp:
            always = _write_tracking_always(KvmVM, page_size, rmaps=not tdp_mmu)
            fields["external_write_tracking"] = (
                always if always is not None
                else not at_least(kernel, since("write-track-per-vm")))
        notes.append(f"{'TDP' if tdp else 'shadow paging'}"
                     f"{' with the TDP MMU (lazy rmaps)' if tdp_mmu else ''}, "
                     + (f"guest physical limit 2^{bits}" if check else "no max-gfn check"))
        if ring_tso:
            # A ring of 8 KiB holds 512 entries: enough for the 64 reserved ones, not for PML's.
            small_ring_ok = _probe(KvmVM, lambda vm: vm.enable_cap(
                c.KVM_CAP_DIRTY_LOG_RING, 8192))
            fields["cpu_dirty_log_size"] = 0 if small_ring_ok else PML_LOG_NR_ENTRIES
    elif hooks.guest_addr_space:
        bits = _guest_addr_bits(KvmVM, page_size)
        fields["ipa_bits"] = bits
        if ipa_limit:
            fields["ipa_limit"] = ipa_limit
        notes.append(f"{hooks.guest_addr_space} size {bits} bits")
    bind_flags = _gmem_bind_flags(KvmVM, page_size) if gmem else None
    if bind_flags is not None:
        # Probed with a file this arch lets a slot bind (arm64: mmap-able files only).
        fields["gmem_toggle_fix"] = _gmem_toggle_refused(KvmVM, page_size, bind_flags)
        fields["gmem_bind_wraps"] = _gmem_bind_wraps(KvmVM, page_size, bind_flags)
        fields["gmem_bind_eexist"] = (
            _gmem_bound_errno(KvmVM, page_size, bind_flags) == errno.EEXIST)
    fields["description"] = (
        f"detected from /dev/kvm on {platform.node() or 'this host'} "
        f"(Linux {release}, {machine}" + (f"; {notes[0]}" if notes else "") + ")"
    )
    return Profile(**fields)  # type: ignore[arg-type]


def _unknown_ioctl_errno(make_vm: Callable[[], VM], page_size: int) -> int:
    """What the kernel answers to KVM_SET_USER_MEMORY_REGION2 when it does not know it."""
    vm = make_vm()
    try:
        vm.set_user_memory_region2(0, 0, 0, page_size, UA, guest_memfd=0)
    except KvmError as exc:
        return exc.errno or errno.ENOTTY
    finally:
        vm.close()
    return errno.ENOTTY


def _guest_memfd_ioctl(make_vm: Callable[[], VM], page_size: int) -> tuple[bool, int]:
    """(KVM_CREATE_GUEST_MEMFD exists, the creation flags it accepts)."""
    vm = make_vm()
    try:
        try:
            vm.create_guest_memfd(page_size)
        except KvmError:
            return False, 0
        flags = 0
        for bit in (1, 2):  # GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
            try:
                vm.create_guest_memfd(page_size, bit)
                flags |= bit
            except KvmError:
                pass
        return True, flags
    finally:
        vm.close()


def _gmem_bind_flags(make_vm: Callable[[], VM], page_size: int) -> int | None:
    """Creation flags of a guest_memfd a slot can bind here: 0, else GUEST_MEMFD_FLAG_MMAP
    (arm64's kvm_arch_prepare_memory_region takes gmem-only slots alone); ``None`` if
    neither binds (the gmem facts then follow the version)."""
    for flags in (0, GUEST_MEMFD_FLAG_MMAP):
        vm = make_vm()
        try:
            fd = vm.create_guest_memfd(page_size, flags)
            vm.set_user_memory_region2(0, c.KVM_MEM_GUEST_MEMFD, 0, page_size, UA, fd, 0)
            return flags
        except KvmError:
            continue
        finally:
            vm.close()
    return None


def _gmem_toggle_refused(make_vm: Callable[[], VM], page_size: int, flags: int) -> bool:
    """Whether dropping GUEST_MEMFD from a slot is refused (the 6.18.y fix)."""
    vm = make_vm()
    try:
        fd = vm.create_guest_memfd(page_size, flags)
        vm.set_user_memory_region2(
            0, c.KVM_MEM_GUEST_MEMFD, 0, page_size, UA, fd, 0)
        return not _accepted(lambda: vm.set_user_memory_region(
            0, 0, 0, page_size, UA))
    except KvmError:
        return True
    finally:
        vm.close()


def differences(a: Profile, b: Profile) -> dict[str, tuple[object, object]]:
    """Kernel facts where two profiles differ (machine facts such as total RAM ignored)."""
    da, db = a.as_dict(), b.as_dict()
    return {k: (da[k], db.get(k)) for k in da
            if k not in HOST_FIELDS and da[k] != db.get(k)}


def matching_preset(profile: Profile) -> str | None:
    """The versioned preset whose kernel facts equal ``profile``'s, if any."""
    for name, preset in PRESETS.items():
        if "@" in name and not differences(profile, preset):
            return name
    return None


def _kernel_build() -> str:
    """``"debian"`` for a Debian kernel (``/proc/version`` names its maintainers), else
    ``"custom"``."""
    try:
        with open("/proc/version", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "custom"
    return "debian" if "debian" in text.lower() else "custom"


def _gmem_bind_wraps(make_vm: Callable[[], VM], page_size: int, flags: int) -> bool:
    """Whether kvm_gmem_bind accepts a range whose end reaches 2^63 (signed loff_t wrap)."""
    vm = make_vm()
    try:
        fd = vm.create_guest_memfd(2 * page_size, flags)
        return _accepted(lambda: vm.set_user_memory_region2(
            0, c.KVM_MEM_GUEST_MEMFD, 0, page_size, UA, fd, (1 << 63) - page_size))
    except KvmError:
        return False
    finally:
        vm.close()


def _gmem_bound_errno(make_vm: Callable[[], VM], page_size: int, flags: int) -> int:
    """The errno kvm_gmem_bind answers for a file range another slot holds (0: accepted)."""
    vm = make_vm()
    try:
        fd = vm.create_guest_memfd(2 * page_size, flags)
        vm.set_user_memory_region2(0, c.KVM_MEM_GUEST_MEMFD, 0, page_size, UA, fd, 0)
        vm.set_user_memory_region2(1, c.KVM_MEM_GUEST_MEMFD, page_size, page_size, UA, fd, 0)
    except KvmError as e:
        return e.errno or 0
    finally:
        vm.close()
    return 0


def _vcpu_id_truncated() -> bool:
    """Whether KVM_CREATE_VCPU truncates its id to a u32 (id 2^32 creates vCPU 0), probed on
    a VM of its own."""
    from ..backends.kvm import KvmVM

    with KvmVM() as vm:
        try:
            vm.create_vcpu(1 << 32)
        except KvmError:
            return False
        return True

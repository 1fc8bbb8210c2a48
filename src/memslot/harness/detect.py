"""``detect_profile()``: the :class:`~memslot.profile.Profile` of the running kernel, read from
/dev/kvm capabilities, module parameters and harmless probes on scratch VMs (each probe makes
its own VM, issues memslot requests whose outcome reveals one fact, and closes it; no vCPU
runs and no memory is touched)."""

from __future__ import annotations

import errno
import os
import platform
from collections.abc import Callable

from .. import constants as c
from ..backends.base import VM
from ..errors import KvmError, KvmUnavailable
from ..profile import PML_LOG_NR_ENTRIES, Profile

_ARCHES = {"x86_64": "x86", "aarch64": "arm64", "riscv64": "riscv", "s390x": "s390",
           "ppc64le": "ppc-hv", "ppc64": "ppc-hv"}
UA = 0x10000000000  # 1 TiB: a user address KVM accepts without it being mapped


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


def _highest_gpa_bits(make_vm: Callable[[], VM], page_size: int) -> int:
    """Largest B such that a one-page slot ending at 2^B is accepted (x86 max gfn rule)."""
    def ok(bits: int) -> bool:
        return _probe(make_vm, lambda vm: vm.set_user_memory_region(
            0, 0, (1 << bits) - page_size, page_size, UA))
    lo, hi = 32, 64  # ok(lo) holds on every host; find the largest accepted
    if not ok(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _user_addr_limit(make_vm: Callable[[], VM], page_size: int) -> int:
    """TASK_SIZE_MAX as access_ok sees it: the largest uaddr + size accepted."""
    candidates = (0x7FFFFFFFF000, 0x00FFFFFFFFFFF000)  # 4-level, LA57
    limit = candidates[0]
    for cand in candidates:
        if _probe(make_vm, lambda vm, cand=cand: vm.set_user_memory_region(  # type: ignore[misc]
                0, 0, 0, page_size, cand - page_size)):
            limit = cand
    return limit


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
    page_size = os.sysconf("SC_PAGE_SIZE")
    page_shift = page_size.bit_length() - 1

    with KvmVM() as vm:
        cap = vm.check_extension
        nr_slots = cap(c.KVM_CAP_NR_MEMSLOTS)
        multi_as = cap(c.KVM_CAP_MULTI_ADDRESS_SPACE)
        readonly = bool(cap(c.KVM_CAP_READONLY_MEM))
        manual = cap(c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        ring_tso = bool(cap(c.KVM_CAP_DIRTY_LOG_RING))
        ring_acq = bool(cap(c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL))
        ring_bitmap = bool(cap(c.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP))
        gmem = bool(cap(c.KVM_CAP_GUEST_MEMFD))

    try:
        totalram = os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        totalram = 1 << 22
    fields: dict[str, object] = dict(
        name=name,
        totalram_pages=totalram,
        arch=arch,
        kernel=platform.release(),
        page_shift=page_shift,
        nr_address_spaces=multi_as if multi_as > 1 else 1,
        internal_mem_slots=c.KVM_MEM_SLOTS_NUM - nr_slots,
        readonly_mem=readonly,
        guest_memfd=gmem,
        manual_dirty_log_caps=manual,
        dirty_ring_tso=ring_tso,
        dirty_ring_acq_rel=ring_acq,
        dirty_ring_with_bitmap=ring_bitmap,
        user_addr_limit=_user_addr_limit(KvmVM, page_size),
    )
    notes = []
    if arch == "x86":
        ept = _param("kvm_intel", "ept")
        npt = _param("kvm_amd", "npt")
        tdp = ept in ("Y", "1") or npt in ("Y", "1")
        tdp_mmu = tdp and _param("kvm", "tdp_mmu") in ("Y", "1")
        bits = _highest_gpa_bits(KvmVM, page_size)
        fields.update(tdp=tdp, tdp_mmu=tdp_mmu, phys_bits=bits if tdp else 52)
        notes.append(f"{'TDP' if tdp else 'shadow paging'}"
                     f"{' with the TDP MMU (lazy rmaps)' if tdp_mmu else ''}, "
                     f"guest physical limit 2^{bits}")
        if ring_tso:
            # A ring of 8 KiB holds 512 entries: enough for the 64 reserved ones, not for PML's.
            small_ring_ok = _probe(KvmVM, lambda vm: vm.enable_cap(
                c.KVM_CAP_DIRTY_LOG_RING, 8192))
            fields["cpu_dirty_log_size"] = 0 if small_ring_ok else PML_LOG_NR_ENTRIES
    if gmem:
        fields["gmem_toggle_fix"] = _gmem_toggle_refused(KvmVM, page_size)
    fields["description"] = (
        f"detected from /dev/kvm on {platform.node() or 'this host'} "
        f"(Linux {platform.release()}, {machine}" + (f"; {notes[0]}" if notes else "") + ")"
    )
    return Profile(**fields)  # type: ignore[arg-type]


def _gmem_toggle_refused(make_vm: Callable[[], VM], page_size: int) -> bool:
    """Whether dropping GUEST_MEMFD from a slot is refused (the 6.18.y fix)."""
    vm = make_vm()
    try:
        fd = vm.create_guest_memfd(page_size)
        vm.set_user_memory_region2(
            0, c.KVM_MEM_GUEST_MEMFD, 0, page_size, UA, fd, 0)
        return not _accepted(lambda: vm.set_user_memory_region(
            0, 0, 0, page_size, UA))
    except KvmError:
        return True
    finally:
        vm.close()

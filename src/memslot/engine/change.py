"""Change classification (``enum kvm_mr_change``) and the named validation rules."""

from __future__ import annotations

import enum
import errno
from typing import NamedTuple


class ChangeType(enum.Enum):
    """``KVM_MR_CREATE``, ``KVM_MR_DELETE``, ``KVM_MR_MOVE``, ``KVM_MR_FLAGS_ONLY``; ``NOOP``
    is the identical re-issue that ``kvm_set_memory_region`` answers with 0."""

    CREATE = "CREATE"
    DELETE = "DELETE"
    MOVE = "MOVE"
    FLAGS_ONLY = "FLAGS_ONLY"
    NOOP = "NOOP"

    def __str__(self) -> str:
        return self.value


CREATE = ChangeType.CREATE
DELETE = ChangeType.DELETE
MOVE = ChangeType.MOVE
FLAGS_ONLY = ChangeType.FLAGS_ONLY
NOOP = ChangeType.NOOP


class Rule(NamedTuple):
    """A check that can refuse a request: its errno, the kernel function it lives in, and why."""

    code: str
    errno: int
    function: str
    text: str

    def __str__(self) -> str:
        return f"{self.function}: {self.text}"


def _r(code: str, err: int, function: str, text: str) -> Rule:
    return Rule(code, err, function, text)


E = errno
# Generic rules, in the order kvm_vm_ioctl / kvm_set_memory_region apply them (6.18).
OTHER_MM = _r("other-mm", E.EIO, "kvm_vm_ioctl",
              "caller is not the VM's creator mm (forked child?)")
REGION2_MISSING = _r("region2-missing", E.ENOTTY, "kvm_vm_ioctl",
                     "KVM_SET_USER_MEMORY_REGION2 is unknown before 6.8 (ENOTTY; EINVAL on "
                     "arm64 and riscv)")
V1_FLAGS = _r("v1-flags", E.EINVAL, "kvm_vm_ioctl",
              "KVM_SET_USER_MEMORY_REGION (v1) takes only LOG_DIRTY_PAGES|READONLY")
USER_SLOT_ID = _r("user-slot-id", E.EINVAL, "kvm_vm_ioctl_set_memory_region",
                  "slot id >= KVM_USER_MEM_SLOTS")
FLAGS = _r("flags", E.EINVAL, "check_memory_region_flags", "flags outside the valid set")
SIZE_ALIGN = _r("size-align", E.EINVAL, "kvm_set_memory_region",
                "memory_size not a multiple of PAGE_SIZE")
GPA_ALIGN = _r("gpa-align", E.EINVAL, "kvm_set_memory_region",
               "guest_phys_addr not page aligned")
UADDR_ALIGN = _r("uaddr-align", E.EINVAL, "kvm_set_memory_region",
                 "userspace_addr not page aligned")
UADDR_TAGGED = _r("uaddr-tagged", E.EINVAL, "kvm_set_memory_region",
                  "userspace_addr carries a pointer tag (untagged_addr differs)")
ACCESS_OK = _r("access-ok", E.EINVAL, "kvm_set_memory_region",
               "userspace_addr + memory_size wraps or passes TASK_SIZE_MAX (access_ok)")
GMEM_OFFSET = _r("gmem-offset", E.EINVAL, "kvm_set_memory_region",
                 "guest_memfd_offset not page aligned or offset + size wraps")
AS_ID = _r("as-id", E.EINVAL, "kvm_set_memory_region",
           "address space >= kvm_arch_nr_memslot_as_ids or id >= KVM_MEM_SLOTS_NUM")
GPA_WRAP = _r("gpa-wrap", E.EINVAL, "kvm_set_memory_region",
              "guest_phys_addr + memory_size wraps past 2^64")
MAX_PAGES = _r("max-pages", E.EINVAL, "kvm_set_memory_region",
               "npages > KVM_MEM_MAX_NR_PAGES (2^31 - 1)")
DELETE_MISSING = _r("delete-missing", E.EINVAL, "kvm_set_memory_region",
                    "DELETE of a slot that does not exist")
DELETE_ACCOUNTING = _r("delete-accounting", E.EIO, "kvm_set_memory_region",
                       "nr_memslot_pages < old->npages (WARN)")
PAGES_WRAP = _r("pages-wrap", E.EINVAL, "kvm_set_memory_region",
                "nr_memslot_pages + npages wraps")
MODIFY_GMEM = _r("modify-gmem", E.EINVAL, "kvm_set_memory_region",
                 "an existing slot cannot take GUEST_MEMFD")
MODIFY_IMMUTABLE = _r("modify-immutable", E.EINVAL, "kvm_set_memory_region",
                      "userspace_addr, size, READONLY and GUEST_MEMFD of a slot are immutable")
OVERLAP = _r("overlap", E.EEXIST, "kvm_check_memslot_overlap",
             "range overlaps another slot in the address space")
ALLOC_SLOT = _r("alloc-slot", E.ENOMEM, "kvm_set_memory_region", "kzalloc of the new slot failed")
GMEM_BADF = _r("gmem-badf", E.EBADF, "kvm_gmem_bind", "guest_memfd is not an open fd")
GMEM_BIND = _r("gmem-bind", E.EINVAL, "kvm_gmem_bind",
               "not this VM's guest_memfd, or the offset range is outside the file")
GMEM_BOUND = _r("gmem-bound", E.EEXIST, "kvm_gmem_bind",
                "the guest_memfd range is already bound to another slot (EINVAL before 7.2)")
ALLOC_INVALID = _r("alloc-invalid", E.ENOMEM, "kvm_set_memslot",
                   "kzalloc of the INVALID working slot failed")
ALLOC_DIRTY_BITMAP = _r("alloc-dirty-bitmap", E.ENOMEM, "kvm_alloc_dirty_bitmap",
                        "dirty bitmap allocation failed")
# Dirty logging (kvm_main.c)
DIRTY_RING = _r("dirty-ring", E.ENXIO, "kvm_get_dirty_log_protect",
                "the VM uses a dirty ring without bitmap")
DIRTY_SLOT_ID = _r("dirty-slot-id", E.EINVAL, "kvm_get_dirty_log_protect",
                   "address space or id out of range")
DIRTY_NO_SLOT = _r("dirty-no-slot", E.ENOENT, "kvm_get_dirty_log_protect",
                   "no such slot, or it has no dirty bitmap")
CLEAR_FIRST_PAGE = _r("clear-first-page", E.EINVAL, "kvm_clear_dirty_log_protect",
                      "first_page not a multiple of 64")
CLEAR_RANGE = _r("clear-range", E.EINVAL, "kvm_clear_dirty_log_protect",
                 "range past the slot, or num_pages not a multiple of 64 short of the end")
CLEAR_UNSUPPORTED = _r("clear-unsupported", E.ENOTTY, "kvm_vm_ioctl",
                       "KVM_CLEAR_DIRTY_LOG needs KVM_GENERIC_DIRTYLOG_READ_PROTECT")
ENABLE_CAP_ARGS = _r("enable-cap-args", E.EINVAL, "kvm_vm_ioctl_enable_cap_generic",
                     "flags set or unsupported option bits")
ENABLE_CAP_UNKNOWN = _r("enable-cap-unknown", E.EINVAL, "kvm_vm_ioctl_enable_cap",
                        "capability cannot be enabled on this VM")
RING_SIZE = _r("ring-size", E.EINVAL, "kvm_vm_ioctl_enable_dirty_log_ring",
               "size not a power of two, or below one page or the reserved entries")
RING_TOO_BIG = _r("ring-too-big", E.E2BIG, "kvm_vm_ioctl_enable_dirty_log_ring",
                  "size above KVM_DIRTY_RING_MAX_ENTRIES entries")
RING_ONCE = _r("ring-once", E.EINVAL, "kvm_vm_ioctl_enable_dirty_log_ring",
               "dirty ring already enabled, or vCPUs already created")
RING_BITMAP = _r("ring-bitmap", E.EINVAL, "kvm_vm_ioctl_enable_cap_generic",
                 "ring-with-bitmap needs the arch, an enabled ring and no memslots")
GMEM_CREATE = _r("gmem-create", E.EINVAL, "kvm_gmem_create",
                 "size zero or not page aligned, or unknown flags")
GMEM_UNSUPPORTED = _r("gmem-unsupported", E.ENOTTY, "kvm_vm_ioctl",
                      "KVM_CREATE_GUEST_MEMFD needs CONFIG_KVM_GUEST_MEMFD")
VCPU_ID = _r("vcpu-id", E.EINVAL, "kvm_vm_ioctl_create_vcpu", "id >= KVM_MAX_VCPU_IDS")
VCPU_MAX = _r("vcpu-max", E.EINVAL, "kvm_vm_ioctl_create_vcpu",
              "kvm->created_vcpus already at kvm->max_vcpus")
VCPU_EXISTS = _r("vcpu-exists", E.EEXIST, "kvm_vm_ioctl_create_vcpu",
                 "a vCPU with this id exists")

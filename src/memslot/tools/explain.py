"""What KVM did with each request: change type, the kernel's steps, the first rule that
failed (errno, kernel function and source file, spec section), the metadata allocated and
freed, and the generations. :func:`explain_step` returns plain data for one replayed step."""

from __future__ import annotations

import re
from typing import Any

from .. import constants as c
from ..arch import ARCH_HOOKS
from ..engine.change import Rule
from ..engine.hooks import ArchHooks
from ..engine.ledger import Allocation
from ..errors import errno_name
from ..harness.replay import ReplayStep, describe_op
from ..profile import Profile
from ..request import MemoryRegion, slot_field
from ..trace.records import SetRegion

KVM_MAIN = "virt/kvm/kvm_main.c"
GUEST_MEMFD = "virt/kvm/guest_memfd.c"

#: Source file of each kernel function a rule names (generic code).
FUNCTION_FILES = {
    "kvm_vm_ioctl": KVM_MAIN,
    "kvm_vm_ioctl_set_memory_region": KVM_MAIN,
    "check_memory_region_flags": KVM_MAIN,
    "kvm_set_memory_region": KVM_MAIN,
    "kvm_check_memslot_overlap": KVM_MAIN,
    "kvm_set_memslot": KVM_MAIN,
    "kvm_alloc_dirty_bitmap": KVM_MAIN,
    "kvm_get_dirty_log_protect": KVM_MAIN,
    "kvm_clear_dirty_log_protect": KVM_MAIN,
    "kvm_vm_ioctl_enable_cap_generic": KVM_MAIN,
    "kvm_vm_ioctl_enable_dirty_log_ring": KVM_MAIN,
    "kvm_gmem_bind": GUEST_MEMFD,
    "kvm_gmem_create": GUEST_MEMFD,
    "kvm_alloc_memslot_metadata": "arch/x86/kvm/x86.c",
    "kvmppc_core_prepare_memory_region_hv": "arch/powerpc/kvm/book3s_hv.c",
}

#: What a VMM developer can do about a refusal, by rule code.
HINTS = {
    "v1-flags": "GUEST_MEMFD and other new flags need KVM_SET_USER_MEMORY_REGION2",
    "region2-missing": "this kernel predates KVM_SET_USER_MEMORY_REGION2 (6.8): use the v1 "
                       "ioctl, and check KVM_CAP_USER_MEMORY2 first",
    "user-slot-id": "slot ids run from 0 to KVM_CAP_NR_MEMSLOTS - 1 ({user_slots} here)",
    "flags": "only LOG_DIRTY_PAGES, READONLY (where KVM_CAP_READONLY_MEM) and GUEST_MEMFD "
             "(v2, alone or with nothing else) are valid",
    "size-align": "memory_size must be a multiple of the page size ({page_size} bytes)",
    "gpa-align": "guest_phys_addr must be page aligned ({page_size} bytes)",
    "uaddr-align": "userspace_addr must be page aligned ({page_size} bytes)",
    "access-ok": "the host range must end at or below TASK_SIZE_MAX and not wrap",
    "as-id": "this VM has {nr_as} address space(s) (KVM_CAP_MULTI_ADDRESS_SPACE); the slot "
             "field is as_id << 16 | id",
    "max-pages": "split the memory into slots of at most 2^31 - 1 pages "
                 "(KVM_MEM_MAX_NR_PAGES)",
    "delete-missing": "the slot id has no slot in this address space (already deleted?)",
    "modify-immutable": "size, userspace_addr and READONLY of a live slot cannot change: "
                        "delete the slot (size 0), then create it again",
    "modify-gmem": "a live slot cannot become a guest_memfd slot: delete and re-create it",
    "overlap": "the range intersects the slot named in the detail: delete or move that slot "
               "first (QEMU: 'File exists')",
    "x86-max-gfn": "the last gfn exceeds the host's guest physical address width",
    "arm64-ipa": "the slot ends past the VM's IPA size (KVM_VM_TYPE_ARM_IPA_SIZE)",
    "riscv-gpa": "the slot reaches the G-stage GPA size",
    "riscv-vma-write": "the host range meets memory mapped without PROT_WRITE (a program's "
                       "text, a PROT_READ file): map it writable or make the slot "
                       "KVM_MEM_READONLY",
    "riscv-pfnmap-dirty": "dirty logging over IO memory (a VM_PFNMAP mapping such as a "
                          "device BAR) is refused: log only RAM slots",
    "arm64-pfnmap-dirty": "dirty logging over IO memory (a VM_PFNMAP mapping such as a "
                          "device BAR) is refused: log only RAM slots",
    "s390-uaddr-1m": "s390 needs userspace_addr aligned to 1 MiB",
    "s390-size-1m": "s390 needs memory_size aligned to 1 MiB",
    "gmem-badf": "guest_memfd is not an open file descriptor of this process",
    "gmem-bind": "the guest_memfd offset range is outside the file or bound to another slot",
}

_ARCH_FUNCTIONS = ("kvm_arch_prepare_memory_region", "kvm_vm_ioctl_enable_cap")


def kernel_reference(rule: Rule, profile: Profile) -> dict[str, str]:
    """The rule's kernel function, its source file (per arch for arch hooks) and its row in
    the project's rule table (docs/rules.md, generated from the code)."""
    if rule.function in _ARCH_FUNCTIONS:
        hooks = ARCH_HOOKS.get(profile.arch)
        path = hooks.source_file if hooks is not None else ArchHooks.source_file
    else:
        path = FUNCTION_FILES.get(rule.function, KVM_MAIN)
    return {
        "function": rule.function,
        "file": path,
        "spec": f"docs/rules.md {rule.code}",
    }


def _hint(code: str, profile: Profile) -> str:
    text = HINTS.get(code, "")
    return text.format(user_slots=profile.user_mem_slots, page_size=profile.page_size,
                       nr_as=profile.nr_address_spaces)


def _allocation(a: Allocation) -> dict[str, Any]:
    return {
        "array": a.label,
        "owner": f"{a.as_id}:{a.slot_id}",
        "entries": a.entries,
        "entry_size": a.entry_size,
        "bytes": a.bytes,
        "allocator": a.allocator,
        "vmalloc_bytes": a.vmalloc_bytes,
    }


def _request(region: MemoryRegion) -> dict[str, Any]:
    out: dict[str, Any] = {
        "slot": region.slot, "as_id": region.as_id, "id": region.id,
        "flags": region.flags, "flag_names": c.flag_names(region.flags),
        "guest_phys_addr": region.guest_phys_addr, "memory_size": region.memory_size,
        "userspace_addr": region.userspace_addr,
    }
    if region.guest_memfd is not None:
        out["guest_memfd"] = region.guest_memfd
        out["guest_memfd_offset"] = region.guest_memfd_offset
    return out


def explain_step(step: ReplayStep, profile: Profile) -> dict[str, Any]:
    """One operation's explanation as plain data (see the module docstring)."""
    op = step.op
    out: dict[str, Any] = {
        "index": step.index,
        "line": op.line or None,
        "op": op.op,
        "text": describe_op(op),
        "note": op.note or None,
        "errno": step.errno,
        "errno_name": None if step.errno is None else errno_name(step.errno),
        "expect": op.expect,
        "expect_name": None if op.expect is None else errno_name(op.expect),
        "problems": list(step.problems),
    }
    if isinstance(op, SetRegion):
        out["request"] = _request(op.region)
    r = step.result
    if r is None:
        out["message"] = step.message or None
        return out
    out |= {
        "change": str(r.change) if r.change else None,
        "steps": list(r.steps),
        "rule": None,
        "detail": r.detail or None,
        "hint": None,
        "allocated": [_allocation(a) for a in r.allocated],
        "freed": [_allocation(a) for a in r.freed],
        "bytes_allocated": r.bytes_allocated,
        "bytes_freed": r.bytes_freed,
        "net_bytes": r.net_bytes,
        "vmalloc_delta": r.vmalloc_delta,
        "generation_before": r.generation_before,
        "generation_after": r.generation_after,
    }
    if r.errno and r.rule is not None:
        out["rule"] = {"code": r.rule.code, "text": r.rule.text,
                       **kernel_reference(r.rule, profile)}
        out["hint"] = _hint(r.rule.code, profile) or None
    return out


# -- a request given on the command line ----------------------------------------------------

_KEYS = {
    "slot": "slot", "as": "as_id", "as_id": "as_id", "id": "slot",
    "gpa": "guest_phys_addr", "guest_phys_addr": "guest_phys_addr",
    "size": "memory_size", "memory_size": "memory_size",
    "ua": "userspace_addr", "uaddr": "userspace_addr", "userspace_addr": "userspace_addr",
    "flags": "flags", "gmem": "guest_memfd", "guest_memfd": "guest_memfd",
    "gmem_offset": "guest_memfd_offset", "guest_memfd_offset": "guest_memfd_offset",
}
_FLAG_BITS = {
    "LOG_DIRTY_PAGES": c.KVM_MEM_LOG_DIRTY_PAGES, "LOG_DIRTY": c.KVM_MEM_LOG_DIRTY_PAGES,
    "DIRTY": c.KVM_MEM_LOG_DIRTY_PAGES, "READONLY": c.KVM_MEM_READONLY,
    "RO": c.KVM_MEM_READONLY, "GUEST_MEMFD": c.KVM_MEM_GUEST_MEMFD,
}
_SIZE = re.compile(r"(?i)^(\d+)\s*([kmgtp]i?b?)$")
_UNITS = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_number(text: str, what: str) -> int:
    """``4096``, ``0x1000``, ``4K``/``4KiB``, ``2M``, ``1G`` -> int (``ValueError`` otherwise)."""
    raw = text.strip().replace("_", "")
    m = _SIZE.match(raw)
    try:
        value = int(m.group(1)) << _UNITS[m.group(2)[0].lower()] if m else int(raw, 0)
    except ValueError:
        raise ValueError(f"{what}={text!r} is not a number (decimal, 0x hex, or 4K/2M/1G)") \
            from None
    if value < 0:
        raise ValueError(f"{what}={text!r} is negative")
    return value


def parse_flags(text: str) -> int:
    """``0``, ``0x3``, ``LOG_DIRTY_PAGES|READONLY`` (also ``,`` or ``+`` between names)."""
    raw = text.strip()
    try:
        return parse_number(raw, "flags")
    except ValueError:
        pass
    value = 0
    for part in re.split(r"[|,+]", raw):
        name = part.strip().upper().removeprefix("KVM_MEM_")
        if name not in _FLAG_BITS:
            raise ValueError(f"flags={text!r}: unknown flag {part.strip()!r} (LOG_DIRTY_PAGES, "
                             "READONLY, GUEST_MEMFD or a number)")
        value |= _FLAG_BITS[name]
    return value


def parse_request(tokens: list[str]) -> MemoryRegion:
    """``slot=1 gpa=0x100000 size=2M ua=0x7f0000000000 flags=READONLY`` -> a request.

    ``slot`` may be ``AS:ID``; ``size`` defaults to 0 (a DELETE), ``flags``/``gpa``/``ua`` to 0;
    ``gmem=FD`` (with ``gmem_offset=``) makes it a v2 request. ``ValueError`` on bad input.
    """
    values: dict[str, int] = {}
    for token in tokens:
        key, sep, text = token.partition("=")
        field = _KEYS.get(key.strip().lower())
        if not sep or field is None:
            raise ValueError(f"bad request field {token!r}: expected KEY=VALUE with KEY one of "
                             "slot, gpa, size, ua, flags, gmem, gmem_offset")
        if field in values:
            raise ValueError(f"request field {key!r} given twice")
        if field == "flags":
            values[field] = parse_flags(text)
        elif field == "slot" and ":" in text:
            as_text, _, id_text = text.partition(":")
            values["as_id"] = parse_number(as_text, "as")
            values[field] = parse_number(id_text, "slot")
        else:
            values[field] = parse_number(text, key)
    if "slot" not in values:
        raise ValueError("the request needs slot=ID (or slot=AS:ID)")
    as_id = values.pop("as_id", 0)
    slot = values["slot"]
    if as_id:
        if as_id > 0xFFFF or slot > 0xFFFF:
            raise ValueError("with an address space, as and id must each be below 65536")
        slot = slot_field(as_id, slot)
    limits = {"slot": 0xFFFFFFFF, "flags": 0xFFFFFFFF, "guest_memfd": 0xFFFFFFFF}
    for name, value in values.items():
        if value > limits.get(name, (1 << 64) - 1):
            raise ValueError(f"request field {name}={value:#x} is too large")
    gmem = values.get("guest_memfd")
    return MemoryRegion(slot, values.get("flags", 0), values.get("guest_phys_addr", 0),
                        values.get("memory_size", 0), values.get("userspace_addr", 0),
                        values.get("guest_memfd_offset", 0), gmem)

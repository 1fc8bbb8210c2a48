"""What changed in KVM_SET_USER_MEMORY_REGION handling, by kernel version.

Each :class:`Change` is one fact that differs between kernels: the release that brought it,
the kernel function (or header) it lives in, the commit title, and where it was confirmed.
The versioned presets in :mod:`memslot.profile` are built from these facts, ``memslot
compat`` names the release where a refusing rule changes, and ``docs/kernel-versions.md``
is the same table for people.
"""

from __future__ import annotations

from typing import NamedTuple


class Change(NamedTuple):
    """One behaviour change: ``key`` is what profiles and rules refer to."""

    key: str
    since: str  # first release with the new behaviour, "X.Y"
    function: str
    title: str
    what: str
    confirmed: str  # where the before/after was read or measured
    #: ``since`` is the first X.Y release containing the change. ``False``: the commit's
    #: release could not be found, ``since`` is the earliest source read that has it and
    #: ``confirmed`` says which releases remain possible.
    pinned: bool = True
    #: ``"upstream"`` (a kernel commit), ``"debian"`` (Debian's build configuration) or
    #: ``"lab"`` (how the lab's guest boots; the same source behaves both ways).
    kind: str = "upstream"


def version_tuple(version: str) -> tuple[int, int]:
    """``"6.12"`` (or ``"6.12.117-1"``, ``"7.3~rc7"``) -> ``(6, 12)``."""
    parts = version.replace("~", ".").replace("-", ".").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"not a kernel version: {version!r}") from None


def at_least(version: str, since: str) -> bool:
    return version_tuple(version) >= version_tuple(since)


#: Debian's exact sources read for every change (linux-source-X.Y).
SOURCES_READ = "5.10.223, 6.1.176, 6.12.117, 7.2.13, 7.3-rc7"

CHANGES: dict[str, Change] = {c.key: c for c in (
    Change("move-realloc-arch", "5.7", "kvm_arch_prepare_memory_region (x86)",
           "KVM: x86: Allocate new rmap and large page tracking when moving memslot",
           "x86 MOVE allocates rmap/lpage_info for the new base and frees the old arrays; "
           "before, the arrays sized and marked for the old base were kept (reads past their "
           "end, stale disallow_lpage marks) (`move_reallocates_arch`)",
           "patch mail 20200121223157.15263-2 (v5 01/19); v6 merged for 5.7 (edd4fa37baa6); "
           "5.10.223 has it"),
    Change("initially-set", "5.7", "kvm_vm_ioctl_enable_cap_generic",
           "KVM: x86: enable dirty log gradually in small chunks",
           "KVM_DIRTY_LOG_INITIALLY_SET joins KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: it answers 3, "
           "not 1, where the arch defines KVM_DIRTY_LOG_MANUAL_CAPS (x86, arm64; the generic "
           "value stays 1) (`manual_dirty_log_caps`)",
           "3c9bd4006bfc, applied Mar 2020 with the seed series' release (kernel-history); "
           "5.10.223 x86 and arm64 kvm_host.h define both bits"),
    Change("dirty-ring", "5.11", "kvm_vm_ioctl_enable_dirty_log_ring",
           "KVM: Dirty ring support (x86)", "KVM_CAP_DIRTY_LOG_RING on x86 (`dirty_ring_tso`)",
           "KVM_CAP_DIRTY_LOG_RING (192) merged for 5.11 (kernel-history); absent in "
           "5.10.223 arch/x86/kvm/Kconfig, present in 6.1.176"),
    Change("user-slots-32k", "5.12", "kvm_vm_ioctl_set_memory_region / KVM_USER_MEM_SLOTS",
           "KVM: Raise the maximum number of user memslots",
           "KVM_MEM_SLOTS_NUM becomes SHRT_MAX: user slots 509 -> 32764 on x86, 512 -> 32767 "
           "on arm64 and ppc, 32 -> 32767 on s390 (`mem_slots_num`)",
           "4fc096a99e01 (Message-Id 20210127175731.2020089-3), in Linus' tree by 2021-02-22, "
           "the 5.12 merge window; 5.10.223 kvm_host.h (x86 509+3, arm64 512, ppc 512, s390 "
           "32); 6.1.176 SHRT_MAX"),
    Change("lazy-rmaps", "5.14", "kvm_memslots_have_rmaps",
           "KVM: x86/mmu: Lazily allocate memslot rmaps",
           "with the TDP MMU rmaps are allocated at the first shadow root, not per slot "
           "(`tdp_mmu`)",
           "d501f747ef5c, release from the merge list around it (kernel-history); 5.10.223 "
           "kvm_alloc_memslot_metadata allocates rmaps always; 6.1.176 lazily"),
    Change("x86-max-vcpus", "5.15", "kvm_vm_ioctl_check_extension (x86)",
           "KVM: x86: Bump KVM_MAX_VCPUS to 1024",
           "KVM_CAP_MAX_VCPUS 288 -> 1024, KVM_CAP_MAX_VCPU_ID 1023 -> 4096 (`max_vcpus`, "
           "`max_vcpu_ids`)",
           "5.10.223 and 6.1.176 kvm_host.h; lab amd64 5.10 answers 288 / 1023"),
    Change("write-track-config", "5.16", "kvm_page_track_write_tracking_enabled",
           "KVM: x86: only allocate gfn_track when necessary",
           "TDP hosts allocate the 2-byte-per-page write-track array only with shadow roots "
           "or CONFIG_KVM_EXTERNAL_WRITE_TRACKING (which Debian's KVMGT build selects) "
           "(`external_write_tracking`)",
           "deae4a10f166, committed 2021-10-01 for the 5.16 merge window; 5.10.223 "
           "page_track.c allocates always; 6.1.176 IS_ENABLED(CONFIG_...)"),
    Change("x86-max-gfn", "5.18", "kvm_arch_prepare_memory_region (x86)",
           "KVM: x86/mmu: Do not create SPTEs for GFNs that exceed host.MAXPHYADDR",
           "CREATE/MOVE whose last gfn exceeds kvm_mmu_max_gfn() fails EINVAL "
           "(`max_gfn_check`)",
           "86931ff7207b in 5.18-rc5 (failed to apply to 5.15-stable); absent in 5.10.223 (a "
           "gpa at 2^63 is accepted), present in 6.1.176"),
    Change("x86-la57-debian", "6.1", "Debian amd64 config",
           "Debian: user space with 5-level paging",
           "TASK_SIZE_MAX 2^56 - 4096 for access_ok, 2^47 - 4096 before (`user_addr_limit`)",
           "lab amd64 5.10 (2^47 - 4096) and 6.1 (2^56 - 4096)", kind="debian"),
    Change("arm64-dirty-ring", "6.2", "arch/arm64/kvm/Kconfig",
           "KVM: arm64: Enable ring-based dirty memory tracking",
           "arm64 gets the ACQ_REL dirty ring with KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP "
           "(`dirty_ring_acq_rel`, `dirty_ring_with_bitmap`)",
           "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (225) numbered after 6.1's caps "
           "(kernel-history); absent in 6.1.176 arm64 Kconfig, present in 6.12.117"),
    Change("dirty-ring-acq-rel", "6.1", "arch/x86/kvm/Kconfig (HAVE_KVM_DIRTY_RING_ACQ_REL)",
           "KVM: Add KVM_CAP_DIRTY_LOG_RING_ACQ_REL capability and config option",
           "KVM_CAP_DIRTY_LOG_RING_ACQ_REL (223); x86 selects it next to the TSO ring "
           "(`dirty_ring_acq_rel`)",
           "cap 223 with the arm64 dirty-ring preparation, 6.1 (kernel-history); 6.1.176 x86 "
           "Kconfig selects both"),
    Change("x86-kvmgt-move", "6.6", "kvm_arch_prepare_memory_region (x86)",
           "KVM: x86: Reject memslot MOVE operations if KVMGT is attached",
           "MOVE fails EINVAL while an external page-track user (KVMGT) is attached "
           "(`external_page_tracker`)",
           "merged with 'KVM x86 MMU changes for 6.6' (d011151616e7: overhaul of the "
           "page-track APIs and KVMGT's usage); present in 6.12.117"),
    Change("region2", "6.8", "kvm_vm_ioctl",
           "KVM: Add KVM_SET_USER_MEMORY_REGION2 (guest_memfd series)",
           "KVM_SET_USER_MEMORY_REGION2 and KVM_CAP_USER_MEMORY2; before it the ioctl is "
           "unknown (ENOTTY on x86/ppc/s390, EINVAL on arm64/riscv); the v1 ioctl refuses "
           "flags outside LOG_DIRTY_PAGES|READONLY first (`user_memory2`, "
           "`unknown_ioctl_errno`)",
           "guest_memfd series, 6.8 (kernel-history: caps 231..235); absent in 6.1.176 (x86 "
           "`default: r = -ENOTTY`, arm64 `default: return -EINVAL`), present in 6.12.117"),
    Change("x86-vm-types", "6.8", "kvm_vm_ioctl_check_extension (x86)",
           "KVM: x86: Add support for \"protected VMs\" that can utilize private memory",
           "KVM_CAP_VM_TYPES (the default VM's bit); VMs with private memory have one "
           "address space (`vm_types`)",
           "guest_memfd series, 6.8 (kernel-history: cap 235); present in 6.12.117"),
    Change("arm64-lpa2", "6.8", "kvm_set_ipa_limit (arm64)",
           "KVM: arm64: LPA2 support (52-bit IPA/PA with 4K and 16K pages)",
           "with LPA2 the IPA limit is no longer capped at 48 bits for 4K/16K pages: "
           "KVM_CAP_ARM_VM_IPA_SIZE answers 52 on QEMU's -cpu max (`ipa_limit`)",
           "'KVM/arm64 updates for Linux 6.8' (5f53d88f10eb): \"LPA2 support, adding 52bit "
           "IPA/PA capability for 4kB and 16kB base granule sizes\"; 6.1.176 caps PARange at "
           "48 unless 64K pages, 6.12.117 only without LPA2"),
    Change("write-track-per-vm", "6.9", "kvm_page_track_write_tracking_enabled",
           "KVM: x86/mmu: allocate write-tracking metadata on demand (external users)",
           "external write tracking becomes per VM (enabled when KVMGT registers): a TDP "
           "VM without KVMGT no longer allocates write-track arrays even on Debian's config "
           "(`external_write_tracking`)",
           "'KVM x86 MMU changes for 6.9' (41ebae2ecd14): \"Allocate write-tracking metadata "
           "on-demand ... kernels built with KVMGT support\"; 6.1.176 static config, 6.12.117 "
           "kvm->arch.external_write_tracking_enabled; lab VmallocUsed (6.1 +512 KiB/GiB, "
           "6.12 none)"),
    Change("vcpu-id-ulong", "6.11", "kvm_vm_ioctl_create_vcpu",
           "KVM: Reject overly excessive IDs in KVM_CREATE_VCPU",
           "the vCPU id is an unsigned long: an id of 2^32 or more fails EINVAL instead of "
           "being truncated to a u32 (`vcpu_id_u32` before)",
           "patch mail 20240614202859.3597745 (Mathias Krause); 'KVM generic changes for "
           "6.11' (86014c1e20fa): \"Take the vCPU @id as an unsigned long instead of u32\"; "
           "6.1.176 u32 id, 6.12.117 unsigned long; lab amd64 5.10 truncates"),
    Change("vcpu-exists-first", "7.3", "kvm_vm_ioctl_create_vcpu",
           "(commit not found; descriptive) duplicate vCPU id checked before the arch hooks",
           "a taken id fails EEXIST before kvm_arch_vcpu_precreate / kvm_arch_vcpu_create "
           "run (before, the arch's own refusal came first: ppc64 HV answered EINVAL for a "
           "taken vcore) (`vcpu_exists_first`)",
           "7.2.13 checks kvm_get_vcpu_by_id() after kvm_arch_vcpu_create(), 7.3-rc7 before "
           "kvm_arch_vcpu_precreate() under guard(mutex); lab ppc64el 7.3 answers EEXIST "
           "where 7.2 answers EINVAL; no release lies between, so 7.3 is exact"),
    Change("x86-private-mem", "6.11", "kvm_supported_mem_attributes, kvm_gmem_create",
           "KVM: SEV: Select KVM_GENERIC_PRIVATE_MEM when CONFIG_KVM_AMD_SEV=y",
           "Debian's x86 build has the generic memory attributes and guest_memfd: "
           "KVM_CAP_MEMORY_ATTRIBUTES on /dev/kvm answers PRIVATE (8), KVM_CREATE_GUEST_MEMFD "
           "exists (the default VM still refuses the slot flag) (`memory_attributes_system`, "
           "`guest_memfd_ioctl`)",
           "the code is 6.8's (guest_memfd series); Debian's config reaches it through "
           "KVM_AMD_SEV selecting KVM_GENERIC_PRIVATE_MEM, present in 6.12.117 "
           "arch/x86/kvm/Kconfig (6.1.176 has no guest_memfd); the select came with SEV-SNP "
           "host support in '[GIT PULL] KVM changes for 6.11 merge window' (2024-07-19, "
           "Michael Roth's patch among the SNP commits): 6.11 on Debian's config "
           "(CONFIG_KVM_AMD_SEV=y); lab amd64 7.3 answers 8"),
    Change("x86-max-vcpus-debian", "6.12", "Debian amd64 config (CONFIG_KVM_MAX_NR_VCPUS)",
           "Debian: CONFIG_KVM_MAX_NR_VCPUS=4096",
           "KVM_CAP_MAX_VCPUS 4096, KVM_CAP_MAX_VCPU_ID 16384 (`max_vcpus`, `max_vcpu_ids`)",
           "lab amd64 6.1 (1024 / 4096) and 6.12, 7.2 (4096 / 16384)", kind="debian"),
    Change("ppc-4k-pages", "6.12", "Debian ppc64el config",
           "Debian: ppc64el kernels use 4 KiB pages",
           "Debian's ppc64el kernel builds 4 KiB pages (64 TiB user range) instead of 64 KiB "
           "(4 PiB): memslot sizes, alignment and the access_ok limit follow (`page_shift`, "
           "`user_addr_limit`)",
           "lab ppc64el 6.1 vs 6.12 (issue 12)", kind="debian"),
    Change("arm64-va52", "6.12", "Debian arm64 config (CONFIG_ARM64_VA_BITS_52)",
           "Debian: arm64 kernels with 52-bit virtual addresses",
           "TASK_SIZE_MAX = 2^52 for access_ok, 2^48 before (`user_addr_limit`)",
           "lab arm64 5.10 vs 6.12 (issue 12)", kind="debian"),
    Change("guest-memfd-any-vm", "6.18", "check_memory_region_flags",
           "KVM: Allow and advertise support for host mmap() on guest_memfd files (guest_memfd "
           "mmap series)",
           "KVM_MEM_GUEST_MEMFD valid on every VM (CONFIG_KVM_GUEST_MEMFD), mmap / "
           "init-shared creation flags; before it only on VM types with private memory (not "
           "the default x86 VM), never on arm64/riscv (`guest_memfd`, `guest_memfd_flags`)",
           "series 20250729225455.670324 applied after 6.16; its KVM_CAP_GUEST_MEMFD_MMAP was "
           "still \"not-yet-released\" on 2025-10-03 (20251003232606.4070510-2), after 6.17 "
           "shipped: 6.18. 6.12.117 kvm_arch_has_private_mem(kvm); 7.2.13 "
           "IS_ENABLED(CONFIG_KVM_GUEST_MEMFD)"),
    Change("arm64-guest-memfd", "6.18", "kvm_arch_prepare_memory_region (arm64)",
           "KVM: arm64: Enable support for guest_memfd backed memory",
           "arm64 selects KVM_GUEST_MEMFD; guest_memfd slots must be mmap-able (gmem-only)",
           "the same guest_memfd mmap series (6.18, see guest-memfd-any-vm); absent in "
           "6.12.117, present in 7.2.13"),
    Change("gmem-toggle-fix", "6.19", "kvm_set_memory_region",
           "KVM: Disallow toggling KVM_MEM_GUEST_MEMFD on an existing memslot",
           "a FLAGS_ONLY change cannot add or drop GUEST_MEMFD (`gmem_toggle_fix`)",
           "'KVM fixes for 6.19-rc1' (0499add8efd7); backported to stable: Debian's 6.12.117 "
           "and 7.2.13 have it"),
    Change("s390-ucontrol-slot", "6.14", "KVM_INTERNAL_MEM_SLOTS (s390)",
           "KVM: s390: fake memslot for ucontrol VMs",
           "s390 has one internal slot: 32766 user slots (`internal_mem_slots`)",
           "the patch (v3 03/15, 20250117190938.93793-4) adds `#define KVM_INTERNAL_MEM_SLOTS "
           "1` to s390's kvm_host.h; merged by 'KVM changes for Linux 6.14-rc2' "
           "(kvm-s390-next-6.14-2, pulled after 6.14-rc1): 6.14. Absent in 6.12.117, present "
           "in 7.2.13"),
    Change("gmem-bind-uoff", "7.2", "kvm_gmem_bind",
           "KVM: guest_memfd: treat binding offsets and sizes as unsigned (uoff_t)",
           "offset + size is computed in uoff_t: a range reaching 2^63 no longer wraps "
           "negative past the file-size check, it fails EINVAL (`gmem_bind_wraps` before)",
           "'KVM guest_memfd changes for 7.2' (06ba195f136a): \"Treat memslot binding offsets "
           "and sizes as unsigned values\"; 6.12.117 loff_t offset, 7.2.13 and 7.3-rc7 "
           "uoff_t; this host's 6.18 accepts the wrap"),
    Change("gmem-bind-eexist", "7.2", "kvm_gmem_bind",
           "KVM: guest_memfd: return -EEXIST for a range already bound to a memslot",
           "binding a guest_memfd range that another slot holds fails EEXIST, was EINVAL "
           "(`gmem_bind_eexist`)",
           "'KVM guest_memfd changes for 7.2' (06ba195f136a): \"Return -EEXIST instead of "
           "-EINVAL if userspace attempts to bind a gmem range to multiple memslots\"; "
           "6.12.117 r = -EINVAL, 7.2.13 and 7.3-rc7 r = -EEXIST; this host's 6.18 answers "
           "EINVAL, lab amd64 7.3 EEXIST"),
    Change("riscv-manual-caps", "7.2", "arch/riscv/include/asm/kvm_host.h",
           "RISC-V: KVM: KVM_DIRTY_LOG_INITIALLY_SET",
           "riscv defines KVM_DIRTY_LOG_MANUAL_CAPS with INITIALLY_SET: "
           "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 answers 3, not the generic 1 "
           "(`manual_dirty_log_caps`)",
           "6.12.117 generic KVM_DIRTY_LOG_MANUAL_CAPS; 7.2.13 riscv defines both bits; lab "
           "riscv64 6.12 answers 1. Not pinned: the commit was not found in the patch "
           "archives searched, nor in 'KVM/riscv changes for 6.17' (kvm-riscv-6.17-1, which "
           "brought the dirty ring); any of 6.13..7.2", pinned=False),
    Change("riscv-dirty-ring", "6.17", "arch/riscv/kvm/Kconfig",
           "RISC-V: KVM: Enable ring-based dirty memory tracking",
           "riscv selects HAVE_KVM_DIRTY_RING_ACQ_REL (`dirty_ring_acq_rel`)",
           "f55ffaf89636 (Quan Zhou), in 'KVM/riscv changes for 6.17' (tags/kvm-riscv-6.17-1, "
           "pulled 2025-07-28 for the 6.17 merge window; a fix to it was queued 'as fixes for "
           "Linux-6.17'): 6.17. Absent in 6.12.117, present in 7.2.13"),
    Change("riscv-sv48-lab", "7.2", "TASK_SIZE_64 (arch/riscv)",
           "riscv user space paging mode chosen at boot",
           "access_ok limit 2^47 with Sv48 (the lab's 7.2), 2^56 with Sv57 (its 6.12): "
           "TASK_SIZE_64 is the same expression in both sources (`user_addr_limit`)",
           "lab riscv64 6.12 and 7.2", kind="lab"),
    Change("x86-disable-exits-allowed", "6.18", "kvm_vm_ioctl_enable_cap (x86)",
           "(commit not found) KVM_CAP_X86_DISABLE_EXITS checks kvm_get_allowed_disable_exits()",
           "X86_DISABLE_EXITS accepts only the exits KVM_CHECK_EXTENSION allows (not the fixed "
           "KVM_X86_DISABLE_VALID_EXITS) and only before vCPUs exist "
           "(`memslot/arch/x86_caps.py`)",
           "6.12.117 `args[0] & ~KVM_X86_DISABLE_VALID_EXITS`, 7.2.13 "
           "`kvm_get_allowed_disable_exits()`; this host's 6.18 behaves as 7.2. Not pinned "
           "(the commit was not found): any of 6.13..6.18 (every modelled version answers the "
           "same for any of them)",
           pinned=False),
    Change("x86-x2apic-suppress-eoi", "6.18", "kvm_vm_ioctl_enable_cap (x86)",
           "KVM: x86: Add x2APIC \"features\" to control EOI broadcast suppression",
           "X2APIC_API takes KVM_X2APIC_{ENABLE,DISABLE}_SUPPRESS_EOI_BROADCAST (4, 8): not "
           "both, and ENABLE only with a split irqchip (`memslot/arch/x86_caps.py`)",
           "6.12.117 knows bits 0-1 only, 7.2.13 all four; this host's 6.18.44 accepts 4 "
           "(after SPLIT_IRQCHIP) and 8. Not pinned: the series (Khushit Shah) was still "
           "reviewed on kvm@ in January 2026, after 6.18 was released (its merge was not "
           "found), so upstream has it from 7.0 or later and 6.18.44 from a stable backport; "
           "the model's 6.18 is this host's answer, a 6.18 before the backport refuses 4 and 8",
           pinned=False),
    Change("ppc-access-ok-mask", "7.2", "__access_ok (arch/powerpc/include/asm/uaccess.h)",
           "powerpc/uaccess: a simpler __access_ok for ppc64",
           "address and size each below TASK_SIZE_MAX (`!((size | addr) & ~(TASK_SIZE_MAX - "
           "1))`), so the range may end past it (`access_ok_mask`)",
           "6.1.176 / 6.12.117 generic `size <= limit && addr <= limit - size`, 7.2.13 / "
           "7.3-rc7 powerpc's; lab ppc64el 7.2 accepts ua=0x3ffffffff000 size=0x1ff000. The "
           "patch itself was not found. 'powerpc-7.0-1' (192c0159402e) brought Christophe "
           "Leroy's uaccess series, but its 'powerpc/uaccess: Implement masked user access' "
           "(v5 7/7, 861574d51bbd) adds mask_user_address() and leaves __access_ok alone, so "
           "that merge does not pin it: 6.13..7.2 remain possible", pinned=False),
)}


def since(key: str) -> str:
    """The release of change ``key`` (the presets are built from these)."""
    return CHANGES[key].since


def changes_markdown() -> str:
    """The table of :data:`CHANGES` for ``docs/kernel-versions.md``, oldest first."""
    rows = ["| release | what changed (profile field) | kernel function | commit | confirmed |",
            "|---|---|---|---|---|"]
    for c in sorted(CHANGES.values(), key=lambda c: (version_tuple(c.since), c.key)):
        release = c.since + {"debian": " (Debian)", "lab": " (lab)"}.get(c.kind, "")
        if not c.pinned:
            release += " (not pinned)"
        commit = "-" if c.kind != "upstream" else c.title
        cells = [release, c.what, f"`{c.function}`", commit, c.confirmed]
        rows.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(rows) + "\n"


#: The release named by a refusing rule's ``changes_in`` (``memslot compat``): rule code ->
#: change key. Rules absent here are the same on every modelled kernel.
RULE_CHANGES: dict[str, str] = {
    "user-slot-id": "user-slots-32k",
    "as-id": "user-slots-32k",
    "x86-max-gfn": "x86-max-gfn",
    "region2-missing": "region2",
    "v1-flags": "region2",
    "flags": "guest-memfd-any-vm",
    "gmem-unsupported": "guest-memfd-any-vm",
    "arm64-gmem-only": "arm64-guest-memfd",
    "ring-unsupported": "dirty-ring",
    "gmem-bound": "gmem-bind-eexist",
}


DOC_BEGIN = "<!-- changes table: generated from memslot.versions.CHANGES -->"
DOC_END = "<!-- end of the generated table -->"


def update_docs(path: str) -> bool:
    """Rewrite the generated table in ``path`` (docs/kernel-versions.md) from
    :data:`CHANGES`; True when the file changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    new = f"{head}{DOC_BEGIN}\n{changes_markdown()}{DOC_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


__all__ = ["CHANGES", "RULE_CHANGES", "SOURCES_READ", "Change", "at_least", "changes_markdown",
           "since", "update_docs", "version_tuple"]

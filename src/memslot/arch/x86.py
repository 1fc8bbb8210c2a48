"""x86 memslot metadata (arch/x86/kvm/x86.c, mmu/mmu.c, mmu/page_track.c, 6.18).

Per slot KVM keeps, described here without being materialised:

* ``rmap[L-1]`` for L = 1..3 (4K, 2M, 1G): ``lpages(L)`` 8-byte heads, only while
  ``kvm_memslots_have_rmaps`` (always with shadow paging or the legacy TDP MMU; lazily,
  from the first shadow root, with the TDP MMU);
* ``lpage_info[L-2]`` for L = 2..3: ``lpages(L)`` 4-byte ``disallow_lpage`` counters whose
  initial marks are facts about the slot's base, end and ``userspace_addr``;
* ``gfn_write_track``: ``npages`` 2-byte counters when write tracking is enabled.

``lpages(L) = ((base + npages - 1) >> 9(L-1)) - (base >> 9(L-1)) + 1`` (``__kvm_mmu_slot_lpages``),
so the shapes depend on the base's alignment: a MOVE must allocate fresh arrays
(``kvm_alloc_memslot_metadata`` zeroes ``new->arch`` first; "KVM: x86: Allocate new rmap and large
page tracking when moving memslot", 2020) and commit frees the old ones.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, ClassVar, Final, NamedTuple

from ..constants import KVM_CAP_VM_TYPES, X86_ENABLE_CAPS
from ..engine import change as ch
from ..engine.change import ChangeType, Rule
from ..engine.hooks import ArchHooks, PrepareError
from ..engine.ledger import (
    KIND_LPAGE_INFO,
    KIND_RMAP,
    KIND_WRITE_TRACK,
    Allocation,
    AllocFailed,
    AllocGroup,
    Ledger,
    Spec,
    SpecGroup,
    spec,
)
from ..engine.slot import MemorySlot
from ..profile import Profile
from .x86_caps import X86VmCaps

KVM_NR_PAGE_SIZES = 3  # 4K, 2M, 1G
HUGE_LEVELS = (2, 3)
LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G"}
RMAP_HEAD_SIZE = 8  # struct kvm_rmap_head { unsigned long val; }
LPAGE_INFO_SIZE = 4  # struct kvm_lpage_info { int disallow_lpage; }
WRITE_TRACK_SIZE = 2  # unsigned short

VARIANT_REUSE_ARCH_ON_MOVE = "x86-reuse-arch-on-move"

# Final names: mypyc keeps them in C statics (a module attribute lookup each time otherwise).
_CREATE: Final = ch.CREATE
_MOVE: Final = ch.MOVE
_FLAGS_ONLY: Final = ch.FLAGS_ONLY
_SPECS_CACHED: Final = 4096  # slot shapes whose metadata specs a VM keeps

MAX_GFN = Rule("x86-max-gfn", errno.EINVAL, "kvm_arch_prepare_memory_region",
               "last gfn above kvm_mmu_max_gfn()")
PAGE_TRACK_MOVE = Rule("x86-page-track-move", errno.EINVAL, "kvm_arch_prepare_memory_region",
                       "MOVE with an external page-track user (KVMGT) attached")
ALLOC_METADATA = Rule("x86-alloc-metadata", errno.ENOMEM, "kvm_alloc_memslot_metadata",
                      "rmap / lpage_info / write-track allocation failed")


def hpage_shift(level: int) -> int:
    """``KVM_HPAGE_GFN_SHIFT(level) = 9 * (level - 1)``."""
    return 9 * (level - 1)


def lpages(base_gfn: int, npages: int, level: int) -> int:
    """``__kvm_mmu_slot_lpages``: entries per level for a slot."""
    s = 9 * (level - 1)
    return ((base_gfn + npages - 1) >> s) - (base_gfn >> s) + 1


class LpageInfo(NamedTuple):
    """One ``lpage_info`` array: its allocation and its initial disallow marks, as set by
    ``kvm_alloc_memslot_metadata`` (assignments, so a one-entry array marked at both ends
    holds 1)."""

    alloc: Allocation
    level: int
    head: bool  # linfo[0] = 1: base not aligned to the huge page
    tail: bool  # linfo[lpages - 1] = 1: base + npages not aligned
    whole: bool  # every entry = 1: base and userspace_addr disagree modulo the huge page

    @property
    def entries(self) -> int:
        return self.alloc.entries

    def marked(self, index: int) -> bool:
        return (
            self.whole
            or (index == 0 and self.head)
            or (index == self.alloc.entries - 1 and self.tail)
        )


class X86SlotArch:
    """``struct kvm_arch_memory_slot`` as a description: the slot shape the arrays were made
    for (their sizes and initial marks follow from it) and the ledger groups holding them.
    Immutable; equal when every field is (a plain class: compiled, built without a
    Python-level call)."""

    __slots__ = ("base_gfn", "groups", "npages", "userspace_addr")

    def __init__(self, base_gfn: int, npages: int, userspace_addr: int,
                 groups: tuple[AllocGroup, ...]) -> None:
        self.base_gfn = base_gfn
        self.npages = npages
        self.userspace_addr = userspace_addr
        self.groups = groups

    def _key(self) -> tuple[int, int, int, tuple[AllocGroup, ...]]:
        return (self.base_gfn, self.npages, self.userspace_addr, self.groups)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, X86SlotArch):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, X86SlotArch):
            return NotImplemented
        return not (self is other or self._key() == other._key())

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"X86SlotArch(base_gfn={self.base_gfn}, npages={self.npages}, "
                f"userspace_addr={self.userspace_addr}, groups={self.groups!r})")

    def _replace(self, *, base_gfn: int | None = None, npages: int | None = None,
                 userspace_addr: int | None = None,
                 groups: tuple[AllocGroup, ...] | None = None) -> X86SlotArch:
        """A copy with the fields given replaced (as ``NamedTuple._replace``)."""
        return X86SlotArch(
            self.base_gfn if base_gfn is None else base_gfn,
            self.npages if npages is None else npages,
            self.userspace_addr if userspace_addr is None else userspace_addr,
            self.groups if groups is None else groups,
        )

    def _items(self) -> list[Allocation]:
        return [a for g in self.groups for a in g.items]

    @property
    def rmap(self) -> tuple[Allocation, ...]:
        """Per level 1..3; empty while rmaps are lazy (TDP MMU without a shadow root)."""
        return tuple(sorted((a for a in self._items() if a.kind == KIND_RMAP),
                            key=lambda a: a.level))

    @property
    def lpage_info(self) -> tuple[LpageInfo, ...]:
        """Levels 2 and 3, with the marks set for the shape the arrays were made for."""
        return tuple(
            LpageInfo(a, a.level, *expected_marks(self.base_gfn, self.npages,
                                                  self.userspace_addr, a.level))
            for a in self._items() if a.kind == KIND_LPAGE_INFO
        )

    @property
    def write_track(self) -> Allocation | None:
        for a in self._items():
            if a.kind == KIND_WRITE_TRACK:
                return a
        return None


@lru_cache(maxsize=65536)
def metadata_specs(
    base_gfn_low: int, npages: int, rmaps: bool, track: bool, page_size: int
) -> SpecGroup:
    """The allocations ``kvm_alloc_memslot_metadata`` makes, in order. Only the base's
    offset within a 1 GiB frame matters, so callers pass ``base_gfn % 2^18``."""
    out: list[Spec] = []
    if rmaps:
        out.extend(spec(KIND_RMAP, lpages(base_gfn_low, npages, level), RMAP_HEAD_SIZE,
                        level=level, page_size=page_size) for level in (1, 2, 3))
    out.extend(spec(KIND_LPAGE_INFO, lpages(base_gfn_low, npages, level), LPAGE_INFO_SIZE,
                    level=level, page_size=page_size) for level in HUGE_LEVELS)
    if track:
        out.append(spec(KIND_WRITE_TRACK, npages, WRITE_TRACK_SIZE, page_size=page_size))
    return SpecGroup.of(tuple(out))


def expected_marks(base_gfn: int, npages: int, uaddr: int, level: int) -> tuple[bool, bool, bool]:
    """(head, tail, whole) marks that ``kvm_alloc_memslot_metadata`` sets for this level."""
    mask = (1 << hpage_shift(level)) - 1
    return (
        bool(base_gfn & mask),
        bool((base_gfn + npages) & mask),
        bool((base_gfn ^ (uaddr >> 12)) & mask),
    )


def _allowed_indices(entries: int, head: bool, tail: bool, whole: bool) -> tuple[int, int]:
    """Index range ``[lo, hi)`` of entries left unmarked."""
    if whole:
        return (0, 0)
    lo = 1 if head else 0
    hi = entries - 1 if tail else entries
    return (lo, max(lo, hi))


class X86Arch(ArchHooks):
    """x86 hooks."""

    VARIANTS: ClassVar[tuple[str, ...]] = (VARIANT_REUSE_ARCH_ON_MOVE,)
    source_file: ClassVar[str] = "arch/x86/kvm/x86.c"
    #: rmap[3] and lpage_info[2] pointers (40) and gfn_write_track (8).
    slot_arch_struct_bytes: ClassVar[int] = 48
    huge_page_tracking: ClassVar[str | None] = "lpage_info"
    private_mem_slots: ClassVar[int] = 3
    mmu_max_gfn: ClassVar[bool] = True
    arch_caps: ClassVar[frozenset[int]] = frozenset({KVM_CAP_VM_TYPES})
    enable_caps: ClassVar[frozenset[int]] = X86_ENABLE_CAPS

    @classmethod
    def huge_page_sizes(cls, page_shift: int) -> tuple[int, ...]:
        return tuple(1 << (page_shift + hpage_shift(level)) for level in HUGE_LEVELS)

    @classmethod
    def gfn_limit(cls, profile: Profile) -> int | None:
        return profile.max_gfn + 1

    @classmethod
    def gpa_limit_text(cls, profile: Profile) -> str:
        return f"gfn<={profile.max_gfn:#x}" if profile.max_gfn_check else "none"

    def __init__(self, profile: Profile, ledger: Ledger, variants: frozenset[str]) -> None:
        super().__init__(profile, ledger, variants)
        p = self.profile
        self.shadow_root_allocated = False
        # Before 5.7 a MOVE kept the arrays made for the old base; the variant is an alias.
        self.reuse_on_move = (VARIANT_REUSE_ARCH_ON_MOVE in self.variants
                              or not p.move_reallocates_arch)
        self._page_shift = p.page_shift
        # kvm_mmu_max_gfn() refusal (5.18); before it every gfn below 2^52 of a u64 gpa passes.
        self._max_gfn = p.max_gfn if p.max_gfn_check else (1 << 64) - 1
        self._move_refused = p.external_page_tracker
        self._shape_key = (self.have_rmaps, self.write_tracking, p.page_size)
        self._specs: dict[int, SpecGroup] = {}  # metadata_specs by slot shape (see below)
        self.caps = X86VmCaps(p)  # KVM_ENABLE_CAP's per-VM state

    # -- state ----------------------------------------------------------------------------
    @property
    def have_rmaps(self) -> bool:
        """``kvm_memslots_have_rmaps``: ``!tdp_mmu_enabled || shadow_root_allocated``."""
        p = self.profile
        return not (p.tdp and p.tdp_mmu) or self.shadow_root_allocated

    @property
    def write_tracking(self) -> bool:
        """``kvm_page_track_write_tracking_enabled``."""
        p = self.profile
        return p.external_write_tracking or not p.tdp or self.shadow_root_allocated

    # -- hooks ------------------------------------------------------------------------------
    def enable_cap(self, cap: int, args: tuple[int, ...], flags: int,
                   created_vcpus: int) -> Rule | None:
        """``kvm_vm_ioctl_enable_cap`` of ``arch/x86/kvm/x86.c`` (``x86_caps.py``)."""
        return self.caps.enable_cap(cap, args, flags, created_vcpus)

    def vcpu_create(self, vcpu_id: int, existing: frozenset[int]) -> Rule | None:
        """``kvm_arch_vcpu_precreate``: below the VM's max vCPU id (``x86_caps.py``)."""
        return self.caps.vcpu_precreate(vcpu_id)

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        if change is _FLAGS_ONLY:
            assert old is not None
            return old.arch  # memcpy(&new->arch, &old->arch): the arrays are shared
        if change is _MOVE and self._move_refused:
            raise PrepareError(PAGE_TRACK_MOVE)
        if (change is _CREATE or change is _MOVE) and new is not None:
            last = new.base_gfn + new.npages - 1
            if last > self._max_gfn:
                raise PrepareError(MAX_GFN, f"last gfn {last:#x} > {self._max_gfn:#x}")
            if change is _MOVE and self.reuse_on_move:
                assert old is not None
                return old.arch  # kernels before the 2020 fix kept the old arrays
            return self._alloc_metadata(new.as_id, new.id, new.base_gfn, new.npages,
                                        new.userspace_addr)
        return None

    def _alloc_metadata(
        self, as_id: int, slot_id: int, base_gfn: int, npages: int, uaddr: int
    ) -> X86SlotArch:
        """``kvm_alloc_memslot_metadata``: rmaps (levels 1..3), lpage_info (2, 3), write
        track, in that order; on failure everything allocated so far is freed."""
        # Only the base's offset in a 1 GiB frame shapes the arrays (lpages), so one int
        # names the shape: the specs of each are computed once per VM (and per rmap state).
        key = (npages << 18) | (base_gfn & 0x3FFFF)
        specs = self._specs.get(key)
        if specs is None:
            rmaps, track, page_size = self._shape_key
            specs = metadata_specs(base_gfn & 0x3FFFF, npages, rmaps, track, page_size)
            if len(self._specs) >= _SPECS_CACHED:
                self._specs.clear()
            self._specs[key] = specs
        try:
            group = self.ledger.alloc_group(as_id, slot_id, specs)
        except AllocFailed as failed:
            s = failed.spec
            name = f"{s.kind}[{LEVEL_NAMES[s.level]}]" if s.level else s.kind
            raise PrepareError(ALLOC_METADATA, name) from None
        return X86SlotArch(base_gfn, npages, uaddr, (group,))

    def commit(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> None:
        # kvm_arch_commit_memory_region: a MOVE frees the old arrays (kvm_arch_free_memslot).
        if change is _MOVE and not self.reuse_on_move:
            assert old is not None
            self.free(old)

    def free(self, slot: MemorySlot) -> None:
        arch: X86SlotArch | None = slot.arch
        if arch is None:
            return
        for g in arch.groups:
            self.ledger.free(g)

    # -- model extras -------------------------------------------------------------------------
    def groups(self, arch: Any) -> tuple[AllocGroup, ...]:
        return () if arch is None else tuple(arch.groups)

    def allocations(self, arch: Any) -> Iterable[Allocation]:
        if arch is None:
            return ()
        out = list(arch.rmap)
        out.extend(info.alloc for info in arch.lpage_info)
        if arch.write_track is not None:
            out.append(arch.write_track)
        return out

    def on_vm_event(self, event: str, slots: Iterable[MemorySlot]) -> list[MemorySlot]:
        """``mmu_first_shadow_root_alloc``: the first shadow root allocates rmaps and write
        tracking for every slot (skipping arrays that exist); returns the updated slots."""
        if event != "shadow_root" or self.shadow_root_allocated:
            return []
        self.shadow_root_allocated = True
        self._shape_key = (self.have_rmaps, self.write_tracking, self.profile.page_size)
        self._specs.clear()
        out = []
        page_size = self.profile.page_size
        for slot in slots:
            arch: X86SlotArch = slot.arch
            base, n = arch.base_gfn, arch.npages
            specs: list[Spec] = []
            if not arch.rmap:
                specs.extend(spec(KIND_RMAP, lpages(base, n, level), RMAP_HEAD_SIZE,
                                  level=level, page_size=page_size) for level in (1, 2, 3))
            if arch.write_track is None:
                specs.append(spec(KIND_WRITE_TRACK, n, WRITE_TRACK_SIZE, page_size=page_size))
            if not specs:
                continue
            try:
                group = self.ledger.alloc_group(
                    slot.as_id, slot.id, SpecGroup.of(tuple(specs)))
            except AllocFailed:
                raise MemoryError("ENOMEM while allocating for the first shadow root") from None
            out.append(slot._replace(arch=arch._replace(groups=(*arch.groups, group))))
        return out

    def check_slot(self, slot: MemorySlot) -> list[str]:
        arch: X86SlotArch | None = slot.arch
        name = f"slot {slot.as_id}:{slot.id}"
        if arch is None:
            return [f"{name}: no x86 metadata"]
        problems: list[str] = []
        base, n = slot.base_gfn, slot.npages
        if arch.rmap:
            for level, a in zip((1, 2, 3), arch.rmap, strict=False):
                need = lpages(base, n, level)
                if a.entries < need:
                    s = hpage_shift(level)
                    first = ((base >> s) + a.entries) << s
                    problems.append(
                        f"{name}: rmap[{LEVEL_NAMES[level]}] has {a.entries} entries but gfns "
                        f"{max(first, base):#x}..{base + n - 1:#x} index {a.entries}..{need - 1} "
                        f"past its end (arrays sized for another base)"
                    )
                elif a.entries != need:
                    problems.append(f"{name}: rmap[{LEVEL_NAMES[level]}] has {a.entries} entries, "
                                    f"slot needs {need}")
        elif self.have_rmaps:
            problems.append(f"{name}: rmaps missing although the VM has rmaps")
        for info in arch.lpage_info:
            problems.extend(self._check_lpage(slot, info))
        if self.write_tracking or arch.write_track is not None:
            if arch.write_track is None:
                problems.append(f"{name}: write-track array missing")
            elif arch.write_track.entries != n:
                problems.append(f"{name}: write-track has {arch.write_track.entries} entries, "
                                f"slot has {n} pages")
        return problems

    def _check_lpage(self, slot: MemorySlot, info: LpageInfo) -> list[str]:
        name = f"slot {slot.as_id}:{slot.id} lpage_info[{LEVEL_NAMES[info.level]}]"
        base, n = slot.base_gfn, slot.npages
        s = hpage_shift(info.level)
        need = lpages(base, n, info.level)
        problems = []
        if info.entries < need:
            first = ((base >> s) + info.entries) << s
            problems.append(f"{name}: {info.entries} entries but gfns {max(first, base):#x}.."
                            f"{base + n - 1:#x} index past its end")
        elif info.entries != need:
            problems.append(f"{name}: {info.entries} entries, slot needs {need}")
        head, tail, whole = expected_marks(base, n, slot.userspace_addr, info.level)
        want = _allowed_indices(need, head, tail, whole)
        have = _allowed_indices(info.entries, info.head, info.tail, info.whole)
        have = (have[0], min(have[1], need))
        first = base >> s
        for lo, hi in _difference(have, want):
            problems.append(
                f"{name}: stale disallow marks allow huge mappings of gfns "
                f"{(first + lo) << s:#x}..{((first + hi) << s) - 1:#x}, which the slot does not "
                f"fully cover or whose hva is misaligned (marks set for another base)"
            )
        for lo, hi in _difference(want, have):
            problems.append(
                f"{name}: gfns {(first + lo) << s:#x}..{((first + hi) << s) - 1:#x} could be "
                f"mapped huge but are marked disallowed (marks set for another base)"
            )
        return problems

    def describe(self, slot: MemorySlot) -> dict[str, Any]:
        arch: X86SlotArch | None = slot.arch
        if arch is None:
            return {}
        arrays = []
        for a in self.allocations(arch):
            arrays.append({"array": a.label, "entries": a.entries, "bytes": a.bytes,
                           "vmalloc_bytes": a.vmalloc_bytes})
        marks = {
            LEVEL_NAMES[i.level]: {"head": i.head, "tail": i.tail, "whole": i.whole}
            for i in arch.lpage_info
        }
        return {"arrays": arrays, "disallow_lpage": marks,
                "huge": {k: [list(r) for r in v] for k, v in self.huge_ranges(slot).items()}}

    def huge_ranges(self, slot: MemorySlot) -> dict[str, list[tuple[int, int]]]:
        """Per huge size, gfn ranges the MMU may map huge according to the slot's marks."""
        arch: X86SlotArch | None = slot.arch
        out: dict[str, list[tuple[int, int]]] = {}
        if arch is None:
            return out
        for info in arch.lpage_info:
            s = hpage_shift(info.level)
            lo, hi = _allowed_indices(info.entries, info.head, info.tail, info.whole)
            first = slot.base_gfn >> s
            out[LEVEL_NAMES[info.level]] = (
                [((first + lo) << s, (first + hi) << s)] if hi > lo else []
            )
        return out


def _difference(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]]:
    """Index ranges in ``a`` but not in ``b`` (both half-open)."""
    out = []
    if a[0] < min(a[1], b[0]):
        out.append((a[0], min(a[1], b[0])))
    if max(a[0], b[1]) < a[1]:
        out.append((max(a[0], b[1]), a[1]))
    if b[1] <= b[0]:
        return [a] if a[1] > a[0] else []
    return out


def huge_eligible(base_gfn: int, npages: int, uaddr: int, level: int) -> tuple[int, int] | None:
    """The gfn range a correct ``lpage_info`` lets the MMU map with pages of ``level``
    (whole huge frames inside the slot, none if gfn and hva disagree modulo the frame)."""
    head, tail, whole = expected_marks(base_gfn, npages, uaddr, level)
    lo, hi = _allowed_indices(lpages(base_gfn, npages, level), head, tail, whole)
    if hi <= lo:
        return None
    s = hpage_shift(level)
    first = base_gfn >> s
    return ((first + lo) << s, (first + hi) << s)

"""The generic memslot engine: virt/kvm/kvm_main.c's ``kvm_set_memory_region`` and
``kvm_set_memslot`` with its helpers, as of Linux 6.18 (the kernel this project runs on).

One :class:`Memslots` is the memslot half of a ``struct kvm``: per address space a
:class:`~memslot.engine.slotset.SlotSet`, ``nr_memslot_pages``, the ledger and the arch
hooks. Requests are serialised by ``slots_lock``. Each "swap" of the kernel's
active/inactive sets is one atomic publication here: readers (lookups, other threads) hold
``srcu`` while they read, so they see the set before or after a swap, never half of one —
including the INVALID state a DELETE or MOVE publishes first.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ..constants import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GMEM_ONLY,
    KVM_MEMSLOT_INVALID,
)
from ..request import MemoryRegion, plain_v1
from . import change as ch
from . import gmem as gmem_files
from .change import ChangeType, Rule
from .dirty import DirtyBitmap, dirty_bitmap_bytes
from .hooks import PrepareError
from .ledger import (
    KIND_DIRTY_BITMAP,
    KIND_INVALID_SLOT,
    KIND_SLOT,
    KMALLOC,
    AllocGroup,
    Ledger,
)
from .mm import current as current_mm
from .result import (
    STAGE_ALLOC_INVALID,
    STAGE_ALLOC_SLOT,
    STAGE_ARCH,
    STAGE_BITMAP,
    STAGE_GMEM,
    STAGE_VALIDATE,
    STEP_ALLOC_BITMAP,
    STEP_ALLOC_INVALID,
    STEP_ALLOC_SLOT,
    STEP_COMMIT,
    STEP_FREE_BITMAP,
    STEP_FREE_INVALID,
    STEP_FREE_NEW,
    STEP_FREE_OLD,
    STEP_GMEM_BIND,
    STEP_GMEM_UNBIND,
    STEP_INSTALL,
    STEP_INVALIDATE,
    STEP_KEEP_BITMAP,
    STEP_NOOP,
    STEP_PREPARE_ARCH,
    STEP_REMOVE,
    STEP_RESTORE,
    STEP_VALIDATE,
    OpResult,
)
from .slot import MemorySlot
from .slotset import GEN_UPDATE_IN_PROGRESS, SlotSet

if TYPE_CHECKING:
    from ..profile import Profile
    from .hooks import ArchHooks

ULONG_MAX: Final = (1 << 64) - 1
_V1_FLAGS: Final = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
_IMMUTABLE_FLAGS: Final = KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD
# Whether this module runs compiled (mypyc). Compiled code runs no signal handler between
# two of its own C calls, so acquire() then try: leaves no window for a Ctrl-C to strike
# with the lock held; interpreted code can take one there, so it keeps with blocks.
_COMPILED: Final = not __file__.endswith(".py")
# The change types as Final names: mypyc keeps them in C statics (otherwise each use is an
# attribute lookup on the change module).
CREATE: Final = ch.CREATE
DELETE: Final = ch.DELETE
MOVE: Final = ch.MOVE
FLAGS_ONLY: Final = ch.FLAGS_ONLY
NOOP: Final = ch.NOOP


class SwapEvent(NamedTuple):
    """Passed to observers at each swap. ``generation`` still has bit 63 set (the update is
    in progress); ``phase`` is ``"invalidate"``, ``"install"`` or ``"restore"``."""

    as_id: int
    change: ChangeType
    phase: str
    generation: int
    old: MemorySlot | None
    new: MemorySlot | None


Observer = Callable[[SwapEvent], None]


class _Failed(Exception):
    """Internal: a step failed with ``rule`` (the request is then unwound); ``stage`` says
    where, for the step list of the result."""

    def __init__(self, rule: Rule, detail: str = "", stage: str = STAGE_VALIDATE) -> None:
        self.rule = rule
        self.detail = detail
        self.stage = stage


class DirtyLogConfig:
    """VM-wide dirty-logging state the memslot code consults (``struct kvm`` fields)."""

    __slots__ = ("dirty_ring_size", "dirty_ring_with_bitmap", "manual_dirty_log_protect")

    def __init__(self) -> None:
        self.manual_dirty_log_protect = 0
        self.dirty_ring_size = 0
        self.dirty_ring_with_bitmap = False

    @property
    def use_dirty_bitmap(self) -> bool:
        """``kvm_use_dirty_bitmap``: no ring, or a ring with bitmap."""
        return not self.dirty_ring_size or self.dirty_ring_with_bitmap

    @property
    def initially_set(self) -> bool:
        return bool(self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)


class Memslots:
    """The memslot state of one VM and the code that changes it."""

    def __init__(self, profile: Profile, arch: ArchHooks, ledger: Ledger) -> None:
        self.profile = profile
        self.arch = arch
        self.ledger = ledger
        self.nr_as = profile.nr_address_spaces
        self.sets = [SlotSet(i, profile.page_shift) for i in range(self.nr_as)]
        self.nr_memslot_pages = 0
        self.nr_memslots_dirty_logging = 0
        self.dirty = DirtyLogConfig()
        self.slots_lock = threading.Lock()
        self.srcu = threading.Lock()
        # Compiled, the locks are taken through their methods, bound once (a with block
        # looks __enter__ and __exit__ up each time); see _COMPILED.
        self._slots_acquire = self.slots_lock.acquire
        self._slots_release = self.slots_lock.release
        self._srcu_acquire = self.srcu.acquire
        self._srcu_release = self.srcu.release
        # Serialises dirty-bitmap words between markers and log readers (DirtyBitmap).
        self._bitmap_lock = threading.Lock()
        self.observers: list[Observer] = []
        self.creator_pid = os.getpid()
        self._mm = current_mm()  # kvm->mm
        self.struct_size = _struct_size(profile, arch)
        self._struct_spec = ledger.spec(KIND_SLOT, 1, self.struct_size, KMALLOC)
        self._invalid_spec = ledger.spec(KIND_INVALID_SLOT, 1, self.struct_size, KMALLOC)
        self.gmem_files: dict[int, gmem_files.GuestMemfd] = {}
        #: The backend's check of a request's ioctl fields (raises for values the struct
        #: cannot carry), for :meth:`submit`.
        self.check_fields: Callable[[MemoryRegion], None] = _no_field_check
        self._observer_thread: int | None = None
        # The step list of the request in progress (OpResult.steps), appended to as it runs.
        self._steps: list[str] = []
        # Profile facts used on every request, looked up once.
        p = profile
        self._page_shift = p.page_shift
        self._page_mask = p.page_size - 1
        self._user_slots = p.user_mem_slots
        self._mem_slots_num = p.mem_slots_num
        self._region2 = p.user_memory2
        # Before 6.8 KVM_SET_USER_MEMORY_REGION2 is an ioctl kvm_arch_vm_ioctl does not know.
        self._region2_missing = Rule(ch.REGION2_MISSING.code, p.unknown_ioctl_errno,
                                     ch.REGION2_MISSING.function, ch.REGION2_MISSING.text)
        self._gmem_bound = ch.GMEM_BOUND if p.gmem_bind_eexist else Rule(
            ch.GMEM_BOUND.code, errno.EINVAL, ch.GMEM_BOUND.function, ch.GMEM_BOUND.text)
        self._uaddr_limit = p.user_addr_limit
        self._tagged_uaddrs = arch.tagged_user_addresses
        self._immutable_flags = _IMMUTABLE_FLAGS if p.gmem_toggle_fix else KVM_MEM_READONLY
        valid = KVM_MEM_LOG_DIRTY_PAGES
        if p.guest_memfd:
            valid |= KVM_MEM_GUEST_MEMFD
        self._valid_flags = valid
        self._readonly = p.readonly_mem
        self._fast_bad_flags = ~(_V1_FLAGS if p.readonly_mem else KVM_MEM_LOG_DIRTY_PAGES)
        self._access_ok_mask = p.access_ok_mask
        self._fast_uaddr_limit = (
            min(p.user_addr_limit - p.access_ok_mask, 1 << 56)
            if p.user_addr_limit is not None else ULONG_MAX
        )
        self._max_size = KVM_MEM_MAX_NR_PAGES << p.page_shift

    @property
    def foreign_caller(self) -> bool:
        """True in a process forked after this VM was created (``kvm->mm != current->mm``):
        any fork, ``os.fork`` or libc's (see :mod:`memslot.engine.mm`)."""
        return current_mm() != self._mm

    # ==================================================================================
    # kvm_set_memory_region
    # ==================================================================================
    def submit(self, r: Any) -> OpResult:
        """``ModelVM.submit``'s work: the ioctl-field check (:attr:`check_fields`; the common
        request passes at once, checked here in compiled code), then the request."""
        if not plain_v1(r):
            self.check_fields(r)
        return self.set_memory_region(r)

    def set_memory_region(self, r: MemoryRegion, internal: bool = False) -> OpResult:
        """Apply one request; never raises for a kernel-level refusal (see ``result.errno``).

        ``internal`` is the in-kernel caller path (x86 ``__x86_set_memory_region``), which
        skips the user-only id check and v1 flag filter.
        """
        res = OpResult(r)
        if self._observer_thread is not None and self._observer_thread == threading.get_ident():
            raise RuntimeError("a memslot request was issued from inside an observer")
        if _COMPILED:
            self._slots_acquire()
            try:
                self._locked_request(r, res, internal)
            finally:
                self._slots_release()
        else:
            with self.slots_lock:
                self._locked_request(r, res, internal)
        return res

    def _locked_request(self, r: MemoryRegion, res: OpResult, internal: bool) -> None:
        """The request under ``slots_lock``: journals set up, refusals recorded."""
        ledger = self.ledger
        ledger.allocated = res._allocated
        ledger.freed = res._freed
        self._steps = res.steps
        try:
            self._set_memory_region(r, res, internal)
        except _Failed as failure:
            res.errno = failure.rule.errno
            res.rule = failure.rule
            res.detail = failure.detail
            res.stage = failure.stage
        if res.generation_before is not None:
            res.generation_after = self.sets[r.slot >> 16].generation

    def _passes_fast_checks(self, r: MemoryRegion, internal: bool) -> bool:
        """One expression that holds only when every check of :meth:`_validate` passes, for
        the common case (a plain v1 user request); when it does not hold, the ordered
        checks decide. Being conservative is allowed, accepting too much is not."""
        slot, flags, gpa, size, uaddr, _, gmem_fd = r
        return (
            gmem_fd is None
            and not internal
            and current_mm() == self._mm
            and not flags & self._fast_bad_flags
            and slot & 0xFFFF < self._user_slots
            and not (size | gpa | uaddr) & self._page_mask
            and uaddr + size <= self._fast_uaddr_limit
            and slot >> 16 < self.nr_as
            and not (gpa + size) >> 64  # <= ULONG_MAX, without a boxed compare
            and size <= self._max_size
        )

    def _validate(self, r: MemoryRegion, internal: bool) -> Rule | None:
        """The request checks of ``kvm_vm_ioctl`` -> ``kvm_set_memory_region`` that need no
        slot state, in the kernel's order; the first that fails decides the errno."""
        flags = r.flags
        slot_id = r.slot & 0xFFFF
        as_id = r.slot >> 16
        size = r.memory_size
        gpa = r.guest_phys_addr
        uaddr = r.userspace_addr
        # kvm_vm_ioctl: only the VM's creator mm may issue VM ioctls.
        if self.foreign_caller:
            return ch.OTHER_MM
        if not internal:
            if r.guest_memfd is not None and not self._region2:
                return self._region2_missing
            # kvm_vm_ioctl: the v1 ioctl accepts only the v1 flags (since REGION2, 6.8;
            # before, check_memory_region_flags refuses them with the same EINVAL).
            if r.guest_memfd is None and flags & ~_V1_FLAGS and self._region2:
                return ch.V1_FLAGS
            # kvm_vm_ioctl_set_memory_region: user ids, on the low 16 bits only.
            if slot_id >= self._user_slots:
                return ch.USER_SLOT_ID
        # check_memory_region_flags
        valid = self._valid_flags
        if flags & KVM_MEM_GUEST_MEMFD:
            valid &= ~KVM_MEM_LOG_DIRTY_PAGES
        elif self._readonly:
            valid |= KVM_MEM_READONLY
        if flags & ~valid:
            return ch.FLAGS
        mask = self._page_mask
        if size & mask:
            return ch.SIZE_ALIGN
        if gpa & mask:
            return ch.GPA_ALIGN
        if uaddr & mask:
            return ch.UADDR_ALIGN
        if self._tagged_uaddrs and uaddr >> 56:
            return ch.UADDR_TAGGED
        limit = self._uaddr_limit
        if limit is not None and (
            (uaddr | size) >= limit if self._access_ok_mask else uaddr + size > limit
        ):
            return ch.ACCESS_OK
        if flags & KVM_MEM_GUEST_MEMFD and (
            r.guest_memfd_offset & mask or r.guest_memfd_offset + size > ULONG_MAX
        ):
            return ch.GMEM_OFFSET
        if as_id >= self.nr_as or slot_id >= self._mem_slots_num:
            return ch.AS_ID
        if gpa + size > ULONG_MAX:
            return ch.GPA_WRAP
        if slot_id < self._user_slots and size >> self._page_shift > KVM_MEM_MAX_NR_PAGES:
            return ch.MAX_PAGES
        return None

    def _set_memory_region(self, r: MemoryRegion, res: OpResult, internal: bool) -> None:
        """``kvm_set_memory_region``: validate, classify against the old slot, allocate and
        fill the new slot (binding its guest_memfd range), then ``kvm_set_memslot``."""
        slot, flags, gpa, size, uaddr, _, _ = r
        slot_id = slot & 0xFFFF
        as_id = slot >> 16
        steps = self._steps
        steps.append(STEP_VALIDATE)
        if not self._passes_fast_checks(r, internal):
            rule = self._validate(r, internal)
            if rule is not None:
                if as_id < self.nr_as:
                    res.generation_before = self.sets[as_id].generation
                raise _Failed(rule)
        slots = self.sets[as_id]
        res.generation_before = slots.generation
        npages = size >> self._page_shift

        old = slots.by_id.get(slot_id)
        if not size:
            if old is None:
                raise _Failed(ch.DELETE_MISSING)
            if self.nr_memslot_pages < old.npages:
                raise _Failed(ch.DELETE_ACCOUNTING)
            res.change = DELETE
            self._set_memslot(old, None, DELETE)
            return

        base_gfn = gpa >> self._page_shift
        if old is None:
            change = CREATE
            if (self.nr_memslot_pages + npages) >> 64:  # > ULONG_MAX
                raise _Failed(ch.PAGES_WRAP)
        else:
            if flags & KVM_MEM_GUEST_MEMFD:
                raise _Failed(ch.MODIFY_GMEM)
            if (
                uaddr != old.userspace_addr
                or npages != old.npages
                or (flags ^ old.flags) & self._immutable_flags
            ):
                raise _Failed(ch.MODIFY_IMMUTABLE)
            if base_gfn != old.base_gfn:
                change = MOVE
            elif flags != old.flags & 0xFFFF:
                change = FLAGS_ONLY
            else:
                res.change = NOOP
                steps.append(STEP_NOOP)
                return
        res.change = change
        if change is not FLAGS_ONLY:
            other = slots.overlapping_other(slot_id, base_gfn, base_gfn + npages)
            if other is not None:
                raise _Failed(ch.OVERLAP, f"slot {as_id}:{other.id} at gfn "
                              f"{other.base_gfn:#x}+{other.npages:#x}")

        # kzalloc(new): the struct that will persist in the memslot sets.
        steps.append(STEP_ALLOC_SLOT)
        struct = self.ledger.alloc(as_id, slot_id, self._struct_spec)
        if struct is None:
            raise _Failed(ch.ALLOC_SLOT, stage=STAGE_ALLOC_SLOT)
        new = MemorySlot(slot_id, as_id, base_gfn, npages, flags, uaddr, None,
                                     None, struct, None, self._page_shift)
        try:
            if flags & KVM_MEM_GUEST_MEMFD:
                new = self._gmem_bind(new, r)
            try:
                self._set_memslot(old, new, change)
            except _Failed:
                if new.gmem is not None:
                    steps.append(STEP_GMEM_UNBIND)
                    self._gmem_unbind(new)
                raise
        except _Failed:
            steps.append(STEP_FREE_NEW)
            self.ledger.free(struct)
            raise

    # ==================================================================================
    # kvm_set_memslot and its steps
    # ==================================================================================
    def _set_memslot(
        self, old: MemorySlot | None, new: MemorySlot | None, change: ChangeType
    ) -> None:
        """``kvm_set_memslot``: invalidate (DELETE/MOVE), prepare, install, commit. ``new``
        is ``None`` for DELETE, as in the kernel."""
        invalid = None
        invalid_struct = None
        if change is DELETE or change is MOVE:
            assert old is not None
            self._steps.append(STEP_ALLOC_INVALID)
            invalid_struct = self.ledger.alloc(old.as_id, old.id, self._invalid_spec)
            if invalid_struct is None:
                raise _Failed(ch.ALLOC_INVALID, stage=STAGE_ALLOC_INVALID)
            invalid = self._invalidate_memslot(old, invalid_struct, change)
        try:
            new = self._prepare_memory_region(old, new, change)
        except _Failed:
            if invalid is not None and invalid_struct is not None:
                # Put the old slot back (a second swap) and drop the working copy.
                self._steps.append(STEP_RESTORE)
                self._swap_active_memslots(change, "restore", invalid, old)
                self._steps.append(STEP_FREE_INVALID)
                self.ledger.free(invalid_struct)
            raise
        if change is CREATE:
            assert new is not None
            self._create_memslot(new)
        elif change is DELETE:
            assert invalid is not None
            self._delete_memslot(invalid)
        elif change is MOVE:
            assert invalid is not None and new is not None
            self._move_memslot(new, invalid)
        else:
            assert old is not None and new is not None
            self._update_flags_memslot(old, new)
        if invalid_struct is not None:
            self._steps.append(STEP_FREE_INVALID)
            self.ledger.free(invalid_struct)  # kfree(invalid_slot)
        self._commit_memory_region(old, new, change)

    def _invalidate_memslot(
        self, old: MemorySlot, invalid_struct: AllocGroup, change: ChangeType
    ) -> MemorySlot:
        """``kvm_invalidate_memslot``: publish a copy of ``old`` flagged INVALID, so vCPUs
        stop using the range while the new slot is prepared; returns the copy."""
        invalid = MemorySlot(old.id, old.as_id, old.base_gfn, old.npages,
                                         old.flags | KVM_MEMSLOT_INVALID, old.userspace_addr,
                                         old.arch, old.dirty_bitmap, invalid_struct, old.gmem,
                                         old.page_shift)
        self._steps.append(STEP_INVALIDATE)
        self._swap_active_memslots(change, "invalidate", old, invalid)
        return invalid

    def _prepare_memory_region(
        self, old: MemorySlot | None, new: MemorySlot | None, change: ChangeType
    ) -> MemorySlot | None:
        """``kvm_prepare_memory_region``: the dirty bitmap (reused, allocated or dropped),
        then ``kvm_arch_prepare_memory_region``; returns ``new`` with both filled in. A
        bitmap allocated here is freed if the arch refuses. (The arch hooks never read the
        new slot's bitmap, so they get ``new`` before it is attached: one view less.)"""
        steps = self._steps
        if new is None:  # DELETE
            steps.append(STEP_PREPARE_ARCH)
            try:
                self.arch.prepare(change, old, None)
            except PrepareError as exc:
                raise _Failed(exc.rule, exc.detail, STAGE_ARCH) from None
            return None
        bitmap = None
        fresh = False
        if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            pass
        elif old is not None and old.dirty_bitmap is not None:
            steps.append(STEP_KEEP_BITMAP)
            bitmap = old.dirty_bitmap  # reused, contents preserved
        elif self.dirty.use_dirty_bitmap:
            steps.append(STEP_ALLOC_BITMAP)
            bitmap = self._alloc_dirty_bitmap(new)
            fresh = True
        steps.append(STEP_PREPARE_ARCH)
        try:
            arch = self.arch.prepare(change, old, new)
        except PrepareError as exc:
            if fresh and bitmap is not None:
                steps.append(STEP_FREE_BITMAP)
                self._free_bitmap(bitmap)
            raise _Failed(exc.rule, exc.detail, STAGE_ARCH) from None
        if arch is None and bitmap is None:
            return new
        return MemorySlot(new.id, new.as_id, new.base_gfn, new.npages, new.flags,
                                      new.userspace_addr, arch, bitmap, new.struct, new.gmem,
                                      new.page_shift)

    def _alloc_dirty_bitmap(self, new: MemorySlot) -> DirtyBitmap:
        """``kvm_alloc_dirty_bitmap``: ``__vcalloc(2, ALIGN(npages, 64) / 8)``, all set when
        manual protect starts with ``KVM_DIRTY_LOG_INITIALLY_SET``."""
        ledger = self.ledger
        a = ledger.alloc(new.as_id, new.id,
                         ledger.spec(KIND_DIRTY_BITMAP, 2, dirty_bitmap_bytes(new.npages)))
        if a is None:
            raise _Failed(ch.ALLOC_DIRTY_BITMAP, stage=STAGE_BITMAP)
        return DirtyBitmap(new.npages, a, self.dirty.initially_set, self._bitmap_lock)

    def _create_memslot(self, new: MemorySlot) -> None:
        """``kvm_create_memslot``: add ``new`` to the set."""
        self._steps.append(STEP_INSTALL)
        self._swap_active_memslots(CREATE, "install", None, new)

    def _delete_memslot(self, invalid: MemorySlot) -> None:
        """``kvm_delete_memslot``: drop the INVALID copy that stands for the old slot."""
        self._steps.append(STEP_REMOVE)
        self._swap_active_memslots(DELETE, "install", invalid, None)

    def _move_memslot(self, new: MemorySlot, invalid: MemorySlot) -> None:
        """``kvm_move_memslot``: ``new`` (at its new base) replaces the INVALID copy."""
        self._steps.append(STEP_INSTALL)
        self._swap_active_memslots(MOVE, "install", invalid, new)

    def _update_flags_memslot(self, old: MemorySlot, new: MemorySlot) -> None:
        """``kvm_update_flags_memslot``: ``new`` replaces ``old`` in place, no INVALID step."""
        self._steps.append(STEP_INSTALL)
        self._swap_active_memslots(FLAGS_ONLY, "install", old, new)

    def _commit_memory_region(
        self, old: MemorySlot | None, new: MemorySlot | None, change: ChangeType
    ) -> None:
        """``kvm_commit_memory_region``: accounting, the arch hook, then the old slot goes
        (DELETE: all of it; MOVE / FLAGS_ONLY: its struct, and its bitmap if ``new`` has
        none; its arch data may live on in ``new``)."""
        steps = self._steps
        steps.append(STEP_COMMIT)
        old_flags = 0 if old is None else old.flags
        new_flags = 0 if new is None else new.flags
        if change is DELETE:
            assert old is not None
            self.nr_memslot_pages -= old.npages
        elif change is CREATE:
            assert new is not None
            self.nr_memslot_pages += new.npages
        if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
            self.nr_memslots_dirty_logging += 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1
        self.arch.commit(change, old, new)
        if change is CREATE:
            return
        assert old is not None
        steps.append(STEP_FREE_OLD)
        if change is DELETE:
            self._free_memslot(old)
            return
        assert new is not None
        if old.dirty_bitmap is not None and new.dirty_bitmap is None:
            self._free_bitmap(old.dirty_bitmap)
        self.ledger.free(old.struct)  # type: ignore[arg-type]

    def _free_memslot(self, slot: MemorySlot) -> None:
        """``kvm_free_memslot``: unbind gmem, free the bitmap, the arch data, the struct."""
        if slot.gmem is not None:
            self._gmem_unbind(slot)
        if slot.dirty_bitmap is not None:
            self._free_bitmap(slot.dirty_bitmap)
        self.arch.free(slot)
        if slot.struct is not None:
            self.ledger.free(slot.struct)

    def _free_bitmap(self, bitmap: DirtyBitmap) -> None:
        """``kvm_destroy_dirty_bitmap``."""
        if bitmap.alloc is not None:
            self.ledger.free(bitmap.alloc)

    # ==================================================================================
    # publication (kvm_replace_memslot + kvm_swap_active_memslots)
    # ==================================================================================
    def _swap_active_memslots(
        self,
        change: ChangeType,
        phase: str,
        old: MemorySlot | None,
        new: MemorySlot | None,
    ) -> None:
        """Replace ``old`` by ``new`` in their address space, publish that atomically and
        advance the generation by N_AS. Observers run between publication and the final
        generation store, as vCPUs would."""
        if old is not None:
            slots = self.sets[old.as_id]
        else:
            assert new is not None
            slots = self.sets[new.as_id]
        # (no update is in progress outside slots_lock, so bit 63 of the generation is clear
        # here and the final store is the old value plus N_AS)
        before = slots.generation
        gen = before | GEN_UPDATE_IN_PROGRESS
        if _COMPILED:
            self._srcu_acquire()
            try:
                _publish(slots, old, new, gen)
            finally:
                self._srcu_release()
        else:
            with self.srcu:
                _publish(slots, old, new, gen)
        if self.observers:
            event = SwapEvent(slots.as_id, change, phase, gen, old, new)
            self._observer_thread = threading.get_ident()
            try:
                for observer in list(self.observers):
                    observer(event)
            finally:
                self._observer_thread = None
        slots.generation = before + self.nr_as

    # ==================================================================================
    # guest_memfd binding (kvm_gmem_bind / kvm_gmem_unbind)
    # ==================================================================================
    def _gmem_bind(self, new: MemorySlot, r: MemoryRegion) -> MemorySlot:
        """``kvm_gmem_bind``: bind the file range to ``new``; returns ``new`` carrying the
        binding (and ``KVM_MEMSLOT_GMEM_ONLY`` for a mmap-able file)."""
        self._steps.append(STEP_GMEM_BIND)
        fd = r.guest_memfd
        assert fd is not None
        g = gmem_files.lookup(fd)
        if g is None:
            if gmem_files.fd_is_open(fd):
                raise _Failed(ch.GMEM_BIND, f"fd {fd} is not a guest_memfd", STAGE_GMEM)
            raise _Failed(ch.GMEM_BADF, f"fd {fd}", STAGE_GMEM)
        if g.owner is not self:
            raise _Failed(ch.GMEM_BIND, "guest_memfd of another VM", STAGE_GMEM)
        # Before 7.2, loff_t arithmetic: offset + size is computed signed, so a sum reaching
        # 2^63 wraps negative and passes the "inside the file" test (the kernel accepts it;
        # modelled as it is). 7.2 computes in uoff_t.
        offset = r.guest_memfd_offset
        end = offset + r.memory_size
        if self.profile.gmem_bind_wraps and end >> 63:
            end = (end & ULONG_MAX) - (1 << 64)
        if offset >= 1 << 63 or offset & self._page_mask or end > g.size:
            raise _Failed(ch.GMEM_BIND, f"offset {offset:#x} + size outside the file",
                          STAGE_GMEM)
        start = offset >> self._page_shift
        if g.range_bound(start, start + new.npages):
            raise _Failed(self._gmem_bound, "range already bound to another slot", STAGE_GMEM)
        g.bind(start, start + new.npages, (new.as_id, new.id))
        flags = new.flags
        if g.flags & gmem_files.GUEST_MEMFD_FLAG_MMAP:
            flags |= KVM_MEMSLOT_GMEM_ONLY
        return MemorySlot(new.id, new.as_id, new.base_gfn, new.npages, flags,
                                      new.userspace_addr, None, None, new.struct,
                                      (fd, offset), new.page_shift)

    def _gmem_unbind(self, slot: MemorySlot) -> None:
        """``kvm_gmem_unbind``: release ``slot``'s file range, unless the file was closed
        (``kvm_gmem_release`` already dropped the bindings; the number may be another file's
        now, which a binding of this VM's slot tells apart)."""
        assert slot.gmem is not None
        g = gmem_files.lookup(slot.gmem[0])
        if g is not None and g.owner is self:
            g.unbind(slot.gmem[1] >> self._page_shift, (slot.as_id, slot.id))

    # ==================================================================================
    # lookups (readers)
    # ==================================================================================
    def find(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        with self.srcu:
            return self.sets[as_id].find(gfn)

    def ordered(self, as_id: int = 0) -> list[MemorySlot]:
        with self.srcu:
            return list(self.sets[as_id])

    def by_id(self, as_id: int, slot_id: int) -> MemorySlot | None:
        with self.srcu:
            return self.sets[as_id].by_id.get(slot_id)

    def hva_lookup(self, hva: int) -> list[MemorySlot]:
        with self.srcu:
            out: list[MemorySlot] = []
            for s in self.sets:
                out.extend(s.hva_lookup(hva))
            return out

    def all_slots(self) -> list[MemorySlot]:
        with self.srcu:
            return [slot for s in self.sets for slot in s]

    def replace_slots(self, updated: list[MemorySlot]) -> None:
        """Install arch-updated views of existing slots (same struct, in place in the kernel)."""
        with self.srcu:
            for new in updated:
                s = self.sets[new.as_id]
                s.replace(s.by_id[new.id], new)

    # ==================================================================================
    # integrity
    # ==================================================================================
    def check(self) -> list[str]:
        """Every invariant violation found (empty when the state is one the kernel could be
        in): each set's own checks, each slot's arch metadata and dirty bitmap, the ledger
        against what the slots hold, and the VM-wide counters."""
        problems: list[str] = []
        holders: list[tuple[str, str, AllocGroup]] = []
        total_pages = 0
        logging = 0
        use_bitmap = self.dirty.use_dirty_bitmap
        arch = self.arch
        with self.slots_lock, self.srcu:
            for s in self.sets:
                problems.extend(s.check(self.nr_as))
                for slot in s.by_id.values():
                    name = f"slot {slot.as_id}:{slot.id}"
                    total_pages += slot.npages
                    problems.extend(arch.check_slot(slot))
                    bitmap = slot.dirty_bitmap
                    if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                        logging += 1
                        if bitmap is None and use_bitmap:
                            problems.append(f"{name} logs dirty pages without a bitmap")
                    elif bitmap is not None:
                        problems.append(f"{name} has a dirty bitmap without LOG_DIRTY_PAGES")
                    if slot.struct is not None:
                        holders.append((name, "slot struct", slot.struct))
                    if bitmap is not None:
                        problems.extend(bitmap.check(slot.npages, name))
                        if bitmap.alloc is not None:
                            holders.append((name, "dirty bitmap", bitmap.alloc))
                    holders.extend((name, "arch arrays", g) for g in arch.groups(slot.arch))
            problems.extend(self.ledger.check(holders))
            if total_pages != self.nr_memslot_pages:
                problems.append(f"nr_memslot_pages {self.nr_memslot_pages} != sum of slot "
                                f"sizes {total_pages}")
            if logging != self.nr_memslots_dirty_logging:
                problems.append(f"nr_memslots_dirty_logging {self.nr_memslots_dirty_logging} "
                                f"!= {logging} slots with LOG_DIRTY_PAGES")
        return problems

    # ==================================================================================
    # teardown (kvm_destroy_vm -> kvm_free_memslots)
    # ==================================================================================
    def free_all(self) -> None:
        with self.slots_lock, self.srcu:
            self.ledger.begin()
            for s in self.sets:
                for slot in list(s):
                    s.remove(slot)
                    self._free_memslot(slot)


def _no_field_check(r: MemoryRegion) -> None:
    """Until a backend sets one: no field check."""


def _publish(slots: SlotSet, old: MemorySlot | None, new: MemorySlot | None, gen: int) -> None:
    """Under ``srcu``: ``old`` replaced by ``new`` in ``slots`` and the in-progress
    generation stored (``kvm_replace_memslot`` + the first half of
    ``kvm_swap_active_memslots``)."""
    if old is None:
        slots.insert(new)  # type: ignore[arg-type]
    elif new is None:
        slots.remove(old)
    else:
        slots.replace(old, new)
    slots.generation = gen


def _struct_size(profile: Profile, arch: ArchHooks) -> int:
    """``sizeof(struct kvm_memory_slot)`` on a 64-bit kernel: three pairs of tree nodes
    (hlist 16, interval-tree 48, rb 24 bytes each), base_gfn, npages, dirty_bitmap,
    userspace_addr (8 each), flags (4), id and as_id (2 each), the arch struct, and the gmem
    ``{file, pgoff}`` pair with CONFIG_KVM_GUEST_MEMFD."""
    generic = 2 * 16 + 2 * 48 + 2 * 24 + 4 * 8 + 4 + 2 + 2
    return generic + arch.slot_arch_struct_bytes + (16 if profile.guest_memfd else 0)


__all__ = ["GEN_UPDATE_IN_PROGRESS", "Memslots", "Observer", "SwapEvent"]

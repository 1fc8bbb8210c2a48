"""``DualVM``: every call goes to the model and to the real kernel; any disagreement — in
errno, in dirty-log bytes, in capability answers or in the slots a request touched — raises
:class:`Divergence`. This is the differential proof that the model is the kernel.

Each request compares only what it touched (the slot it names), so a call costs the same at
any number of slots; the whole slot set is compared at checkpoints (once as many requests as
there are slots have run, at least every :data:`CHECKPOINT_MIN` requests) and by
:meth:`DualVM.verify`. An interrupt (``KeyboardInterrupt``) between the two halves leaves them
in states nobody can know: it propagates untouched, and every later call refuses with
:class:`Interrupted` (a :class:`~memslot.errors.ClosedError`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..engine.slot import MemorySlot
from ..errors import ClosedError, KvmError, MemslotError, UnsupportedError, errno_name
from ..request import MemoryRegion
from .base import (
    U32,
    U64,
    VM,
    ModelIntrospection,
    VmaSource,
    VmaWalker,
    VmReferences,
    check_clear_dirty_log_args,
    check_enable_cap_args,
    check_region_fields,
    check_uint,
)

if TYPE_CHECKING:
    from ..engine.ledger import Allocation
    from ..engine.memslots import Observer
    from ..engine.result import OpResult

T = TypeVar("T")

#: Fewest requests between two whole-set comparisons.
CHECKPOINT_MIN = 256


class Divergence(MemslotError):
    """The model and the kernel answered one call differently."""

    def __init__(
        self, what: str, model: object, kernel: object, kernel_errno: int | None = None
    ) -> None:
        super().__init__(f"{what}: model {model} != kernel {kernel}")
        self.what = what
        self.model = model
        self.kernel = kernel
        #: The kernel's errno for the call (0 on success), when the call itself diverged.
        self.kernel_errno = kernel_errno


class Interrupted(ClosedError):
    """A call was interrupted between (or inside) the two halves: the DualVM is unusable."""


SlotKey = tuple[int, int, int, int, int, int]


def _slot_key(s: MemorySlot) -> SlotKey:
    return (s.as_id, s.id, s.base_gfn, s.npages, s.flags & 0xFFFF, s.userspace_addr)


def _outcome(fn: Callable[[], T]) -> tuple[int, T | None, KvmError | None]:
    try:
        return 0, fn(), None
    except KvmError as exc:
        return exc.errno or 0, None, exc


class DualVM(VM):
    """Apply each call to ``model`` and ``kernel`` (any two backends) and compare.

    Everything of the :class:`VM` contract runs on both. Of the model's introspection
    (:class:`ModelIntrospection`) the read-only part is the model's, and :meth:`submit` runs on
    both. Fault injection and modelled guest writes (:class:`FaultInjection`) have no kernel
    counterpart: they raise :class:`~memslot.errors.UnsupportedError`.
    """

    def __init__(self, model: VM, kernel: VM, compare_slots: bool = True) -> None:
        if model.page_size != kernel.page_size:
            raise ValueError(f"page sizes differ: model {model.page_size}, "
                             f"kernel {kernel.page_size}")
        self.model = model
        self.kernel = kernel
        self.compare_slots = compare_slots
        #: kernel guest_memfd fd -> the model's, so v2 requests name the same file to both.
        self._gmem_fds: dict[int, int] = {}
        #: An open file that is not a guest_memfd: what the model is shown for a number that
        #: is one of its own guest_memfds but, to the kernel, some other file.
        self._plain_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._interrupted: BaseException | None = None
        self._since_checkpoint = 0
        self._slot_count = 0  # at the last whole-set comparison
        self.calls = 0
        #: Where the model's arch walks the process's VMAs (arm64, riscv), it reads the
        #: kernel's over the range it walks, when it walks (the kernel walks
        #: ``current->mm``; the model knows only what it is told).
        self._vma_walker = (model if isinstance(model, VmaWalker) and model.walks_vmas
                            and isinstance(kernel, VmaSource) else None)
        if self._vma_walker is not None:
            source = kernel.process_vmas  # type: ignore[attr-defined]
            self._vma_walker.set_vma_source(
                lambda start, end, pfnmap: source(start, end, pfnmap=pfnmap))

    def __repr__(self) -> str:
        return f"<DualVM {self.model!r} | {self.kernel!r}>"

    # -- the comparison -------------------------------------------------------------------
    def _guard(self) -> None:
        if self._interrupted is not None:
            raise Interrupted(f"this DualVM was interrupted mid-call "
                              f"({type(self._interrupted).__name__}); its halves may differ")

    def _pair(self, on_model: Callable[[], T], on_kernel: Callable[[], T]) -> tuple[
        tuple[int, T | None, KvmError | None], tuple[int, T | None, KvmError | None]
    ]:
        """Run both halves. Anything but a kernel-style refusal (an interrupt above all)
        propagates unchanged and retires the DualVM."""
        self._guard()
        self.calls += 1
        try:
            m = _outcome(on_model)
            k = _outcome(on_kernel)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self._interrupted = exc
            raise
        return m, k

    def _both(self, what: str, on_model: Callable[[], T], on_kernel: Callable[[], T]) -> T | None:
        (m_err, m_val, _), (k_err, k_val, k_exc) = self._pair(on_model, on_kernel)
        if m_err != k_err:
            raise Divergence(what, errno_name(m_err), errno_name(k_err), k_err)
        if k_exc is not None:
            raise k_exc
        if m_val != k_val:
            shown_m = m_val.hex() if isinstance(m_val, bytes) else m_val
            shown_k = k_val.hex() if isinstance(k_val, bytes) else k_val
            raise Divergence(f"{what} result", shown_m, shown_k, k_err)
        return k_val

    def _check_touched(self, what: str, region: MemoryRegion, k_err: int) -> None:
        """Compare the slot the request named, then a whole-set checkpoint when due."""
        if not self.compare_slots:
            return
        as_id, slot_id = region.as_id, region.id
        if as_id < self.kernel.nr_address_spaces:
            m = self.model.memslot(slot_id, as_id)
            k = self.kernel.memslot(slot_id, as_id)
            mk = None if m is None else _slot_key(m)
            kk = None if k is None else _slot_key(k)
            if mk != kk:
                raise Divergence(f"slot {as_id}:{slot_id} after {what}", mk, kk, k_err)
        self._since_checkpoint += 1
        if self._since_checkpoint >= max(CHECKPOINT_MIN, self._slot_count):
            self._compare_all(f"checkpoint after {what}", k_err)

    def _compare_all(self, what: str, k_err: int | None = None) -> None:
        self._since_checkpoint = 0
        total = 0
        for as_id in range(self.kernel.nr_address_spaces):
            ms = [_slot_key(s) for s in self.model.memslots(as_id)]
            ks = [_slot_key(s) for s in self.kernel.memslots(as_id)]
            total += len(ks)
            if ms != ks:
                raise Divergence(f"slot set of address space {as_id} ({what})", ms, ks, k_err)
        self._slot_count = total

    def verify(self) -> None:
        """Compare the whole slot set of every address space now (:class:`Divergence`)."""
        self._guard()
        self._compare_all("verify")

    # -- requests -------------------------------------------------------------------------
    def _model_region(self, region: MemoryRegion) -> MemoryRegion:
        fd = region.guest_memfd
        if fd is None:
            return region
        if fd in self._gmem_fds:
            return region._replace(guest_memfd=self._gmem_fds[fd])
        if fd in self._gmem_fds.values():  # the model's own file, a plain file to the kernel
            return region._replace(guest_memfd=self._plain_fd)
        return region

    def apply(self, region: MemoryRegion) -> None:
        check_region_fields(region)
        self._guard()
        model_region = self._model_region(region)
        what = region.describe()
        (m_err, _, _), (k_err, _, k_exc) = self._pair(
            lambda: self.model.apply(model_region), lambda: self.kernel.apply(region)
        )
        if m_err != k_err:
            raise Divergence(what, errno_name(m_err), errno_name(k_err), k_err)
        self._check_touched(what, region, k_err)
        if k_exc is not None:
            raise k_exc

    # -- guest_memfd ----------------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        check_uint("size", size, U64)
        check_uint("flags", flags, U64)
        what = f"KVM_CREATE_GUEST_MEMFD size={size:#x} flags={flags:#x}"
        (m_err, m_fd, _), (k_err, k_fd, k_exc) = self._pair(
            lambda: self.model.create_guest_memfd(size, flags),
            lambda: self.kernel.create_guest_memfd(size, flags),
        )
        if m_err != k_err:
            # Keep the one that was created closable by close().
            if m_fd is not None:
                self.model.close_guest_memfd(m_fd)
            if k_fd is not None:
                self.kernel.close_guest_memfd(k_fd)
            raise Divergence(what, errno_name(m_err), errno_name(k_err), k_err)
        if k_exc is not None:
            raise k_exc
        assert m_fd is not None and k_fd is not None
        self._gmem_fds[k_fd] = m_fd
        return k_fd

    def close_guest_memfd(self, fd: int) -> None:
        self._guard()
        if fd not in self._gmem_fds:
            raise ValueError(f"fd {fd} is not a guest_memfd of this VM")
        m_fd = self._gmem_fds.pop(fd)
        try:
            self.model.close_guest_memfd(m_fd)
        finally:
            self.kernel.close_guest_memfd(fd)

    # -- vCPUs ----------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        value = self._both(f"KVM_CREATE_VCPU {vcpu_id}",
                           lambda: self.model.create_vcpu(vcpu_id),
                           lambda: self.kernel.create_vcpu(vcpu_id))
        assert value is not None
        return value

    def close_vcpu(self, vcpu_id: int) -> None:
        self._guard()
        try:
            self.model.close_vcpu(vcpu_id)
        finally:
            self.kernel.close_vcpu(vcpu_id)

    # -- capabilities ---------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        check_uint("cap", cap, U64)
        value = self._both(f"KVM_CHECK_EXTENSION {cap}", lambda: self.model.check_extension(cap),
                           lambda: self.kernel.check_extension(cap))
        assert value is not None
        return value

    def check_system_extension(self, cap: int) -> int:
        check_uint("cap", cap, U64)
        value = self._both(f"KVM_CHECK_EXTENSION {cap} (system fd)",
                           lambda: self.model.check_system_extension(cap),
                           lambda: self.kernel.check_system_extension(cap))
        assert value is not None
        return value

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        check_enable_cap_args(cap, args, flags)
        self._both(f"KVM_ENABLE_CAP {cap} {list(args)} flags={flags}",
                   lambda: self.model.enable_cap(cap, *args, flags=flags),
                   lambda: self.kernel.enable_cap(cap, *args, flags=flags))

    # -- dirty logging --------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> bytes:
        check_uint("slot", slot, U32)
        data = self._both(f"KVM_GET_DIRTY_LOG slot={slot:#x}",
                          lambda: self.model.get_dirty_log(slot),
                          lambda: self.kernel.get_dirty_log(slot))
        assert data is not None
        return data

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None
    ) -> None:
        check_clear_dirty_log_args(slot, first_page, num_pages)
        self._both(f"KVM_CLEAR_DIRTY_LOG slot={slot:#x} first={first_page} num={num_pages}",
                   lambda: self.model.clear_dirty_log(slot, first_page, num_pages, bitmap),
                   lambda: self.kernel.clear_dirty_log(slot, first_page, num_pages, bitmap))

    # -- the machine and the slots --------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self.kernel.page_size

    @property
    def nr_address_spaces(self) -> int:
        return self.kernel.nr_address_spaces

    def memslots(self, as_id: int = 0) -> list[MemorySlot]:
        """The model's slots (with their metadata); equal to the kernel's at every check."""
        self._guard()
        return self.model.memslots(as_id)

    def memslot(self, slot_id: int, as_id: int = 0) -> MemorySlot | None:
        self._guard()
        return self.model.memslot(slot_id, as_id)

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        self._guard()
        return self.model.gfn_to_memslot(gfn, as_id)

    # -- host memory ----------------------------------------------------------------------
    def register_host_mapping(
        self, addr: int, size: int, *, writable: bool = True, pfnmap: bool = False
    ) -> None:
        self._guard()
        self.model.register_host_mapping(addr, size, writable=writable, pfnmap=pfnmap)
        self.kernel.register_host_mapping(addr, size, writable=writable, pfnmap=pfnmap)

    def unregister_host_mapping(self, addr: int, size: int) -> None:
        self._guard()
        self.model.unregister_host_mapping(addr, size)
        self.kernel.unregister_host_mapping(addr, size)

    def host_mappings(self) -> list[tuple[int, int]]:
        return self.kernel.host_mappings()

    # -- the model's introspection (ModelIntrospection) -----------------------------------
    def _introspect(self) -> ModelIntrospection:
        if not isinstance(self.model, ModelIntrospection):
            raise UnsupportedError(f"{self.model!r} offers no model introspection")
        return self.model

    @property
    def last_result(self) -> OpResult | None:
        return self._introspect().last_result

    def submit(self, region: MemoryRegion) -> OpResult:
        """Apply on both, compare, and return the model's record (a refusal both agree on is
        ``result.errno``, as with ``ModelVM.submit``)."""
        model = self._introspect()
        with contextlib.suppress(KvmError):
            self.apply(region)
        result = model.last_result
        assert result is not None
        return result

    def describe_metadata(self, slot: MemorySlot) -> dict[str, Any]:
        return self._introspect().describe_metadata(slot)

    def slot_metadata_bytes(self, slot: MemorySlot) -> tuple[int, int]:
        return self._introspect().slot_metadata_bytes(slot)

    def metadata_bytes(self) -> int:
        return self._introspect().metadata_bytes()

    def vmalloc_bytes(self) -> int:
        return self._introspect().vmalloc_bytes()

    def allocations(self) -> list[Allocation]:
        return self._introspect().allocations()

    def generation(self, as_id: int = 0) -> int:
        return self._introspect().generation(as_id)

    def check(self) -> list[str]:
        """The model's own integrity check (empty when consistent)."""
        return self._introspect().check()

    def add_observer(self, observer: Observer) -> None:
        self._introspect().add_observer(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._introspect().remove_observer(observer)

    # -- what cannot run on both (FaultInjection: DualVM has no ledger) -------------------
    def inject_enomem(self, nth: int = 1, kind: str | None = None) -> None:
        """Refused: the kernel cannot be made to fail an allocation on request."""
        raise UnsupportedError("inject_enomem fails a model allocation only: the kernel "
                               "would go on, and the next call would diverge")

    def mark_page_dirty(self, gfn: int, as_id: int = 0) -> bool:
        """Refused: a modelled guest write has no kernel counterpart without a vCPU."""
        raise UnsupportedError("mark_page_dirty writes to the model only; run a vCPU on "
                               "the kernel instead")

    # -- lifetime -------------------------------------------------------------------------
    def close_vm_fd(self) -> None:
        self._guard()
        try:
            self.model.close_vm_fd()
        finally:
            self.kernel.close_vm_fd()

    def references(self) -> VmReferences:
        """The kernel's references, in its fd numbers (the model's must match them)."""
        self._guard()
        m, k = self.model.references(), self.kernel.references()
        back = {m_fd: k_fd for k_fd, m_fd in self._gmem_fds.items()}
        mapped = m._replace(guest_memfds=tuple(sorted(back.get(fd, fd) for fd in m.guest_memfds)))
        if mapped != k:
            raise Divergence("VM references", mapped, k)
        return k

    def sibling(self, vm_type: int = 0) -> DualVM:
        return DualVM(self.model.sibling(vm_type), self.kernel.sibling(vm_type))

    def close(self) -> None:
        if self._plain_fd >= 0:
            os.close(self._plain_fd)
            self._plain_fd = -1
        if self._vma_walker is not None:
            self._vma_walker.set_vma_source(None)
        try:
            self.model.close()
        finally:
            self.kernel.close()

    @property
    def closed(self) -> bool:
        return self.model.closed and self.kernel.closed


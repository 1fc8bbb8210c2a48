"""``DualVM``: every call goes to the model and to the real kernel; any disagreement — in
errno, in dirty-log bytes, in capability answers or in the resulting slot set — raises
:class:`Divergence`. This is the differential proof that the model is the kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..engine.slot import MemorySlot
from ..errors import KvmError, MemslotError, errno_name
from ..request import MemoryRegion
from .base import VM
from .model import ModelVM

T = TypeVar("T")


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


def _slot_key(s: MemorySlot) -> tuple[int, int, int, int, int, int]:
    return (s.as_id, s.id, s.base_gfn, s.npages, s.flags & 0xFFFF, s.userspace_addr)


def _outcome(fn: Callable[[], T]) -> tuple[int, T | None, KvmError | None]:
    try:
        return 0, fn(), None
    except KvmError as exc:
        return exc.errno or 0, None, exc


class DualVM(VM):
    """Apply each call to ``model`` and ``kernel`` (any two backends) and compare."""

    #: A modelled guest write has no kernel counterpart without a vCPU: not offered.
    mark_page_dirty = None

    def __init__(self, model: VM, kernel: VM, compare_slots: bool = True) -> None:
        self.model = model
        self.kernel = kernel
        self.compare_slots = compare_slots
        #: kernel guest_memfd fd -> the model's, so v2 requests name the same file to both.
        self._gmem_fds: dict[int, int] = {}
        self.calls = 0

    def __repr__(self) -> str:
        return f"<DualVM {self.model!r} | {self.kernel!r}>"

    def _both(self, what: str, on_model: Callable[[], T], on_kernel: Callable[[], T]) -> T | None:
        self.calls += 1
        m_err, m_val, _ = _outcome(on_model)
        k_err, k_val, k_exc = _outcome(on_kernel)
        if m_err != k_err:
            raise Divergence(what, errno_name(m_err), errno_name(k_err), k_err)
        if k_exc is not None:
            raise k_exc
        if m_val != k_val:
            shown_m = m_val.hex() if isinstance(m_val, bytes) else m_val
            shown_k = k_val.hex() if isinstance(k_val, bytes) else k_val
            raise Divergence(f"{what} result", shown_m, shown_k)
        return k_val

    def _check_slots(self, what: str) -> None:
        if not self.compare_slots:
            return
        for as_id in range(self.kernel.nr_address_spaces):
            ms = [_slot_key(s) for s in self.model.memslots(as_id)]
            ks = [_slot_key(s) for s in self.kernel.memslots(as_id)]
            if ms != ks:
                raise Divergence(f"slot set of address space {as_id} after {what}", ms, ks)

    # -- requests -------------------------------------------------------------------------
    def apply(self, region: MemoryRegion) -> None:
        model_region = region
        if region.guest_memfd is not None and region.guest_memfd in self._gmem_fds:
            model_region = region._replace(guest_memfd=self._gmem_fds[region.guest_memfd])
        what = region.describe()
        try:
            self._both(what, lambda: self.model.apply(model_region),
                       lambda: self.kernel.apply(region))
        finally:
            self._check_slots(what)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        what = f"KVM_CREATE_GUEST_MEMFD size={size:#x} flags={flags:#x}"
        m_err, m_fd, _ = _outcome(lambda: self.model.create_guest_memfd(size, flags))
        k_err, k_fd, k_exc = _outcome(lambda: self.kernel.create_guest_memfd(size, flags))
        if m_err != k_err:
            raise Divergence(what, errno_name(m_err), errno_name(k_err), k_err)
        if k_exc is not None:
            raise k_exc
        assert m_fd is not None and k_fd is not None
        self._gmem_fds[k_fd] = m_fd
        return k_fd

    # -- capabilities ---------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        value = self._both(f"KVM_CHECK_EXTENSION {cap}", lambda: self.model.check_extension(cap),
                           lambda: self.kernel.check_extension(cap))
        assert value is not None
        return value

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self._both(f"KVM_ENABLE_CAP {cap} {list(args)} flags={flags}",
                   lambda: self.model.enable_cap(cap, *args, flags=flags),
                   lambda: self.kernel.enable_cap(cap, *args, flags=flags))

    # -- dirty logging --------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> bytes:
        data = self._both(f"KVM_GET_DIRTY_LOG slot={slot:#x}",
                          lambda: self.model.get_dirty_log(slot),
                          lambda: self.kernel.get_dirty_log(slot))
        assert data is not None
        return data

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None
    ) -> None:
        self._both(f"KVM_CLEAR_DIRTY_LOG slot={slot:#x} first={first_page} num={num_pages}",
                   lambda: self.model.clear_dirty_log(slot, first_page, num_pages, bitmap),
                   lambda: self.kernel.clear_dirty_log(slot, first_page, num_pages, bitmap))

    # -- slots ----------------------------------------------------------------------------
    def memslots(self, as_id: int = 0) -> list[MemorySlot]:
        return self.model.memslots(as_id)

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        return self.model.gfn_to_memslot(gfn, as_id)

    @property
    def nr_address_spaces(self) -> int:
        return self.kernel.nr_address_spaces

    def check(self) -> list[str]:
        """The model's own integrity check (empty when consistent)."""
        return self.model.check() if isinstance(self.model, ModelVM) else []

    def __getattr__(self, name: str) -> Any:
        # Model-only introspection (metadata_bytes, describe_metadata, ...) passes through.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.model, name)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.model.close()
        finally:
            self.kernel.close()

    @property
    def closed(self) -> bool:
        return self.model.closed and self.kernel.closed

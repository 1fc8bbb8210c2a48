"""The VM API on a real ``/dev/kvm``: every request is an ioctl and every errno is the kernel's.

:class:`KvmVM` keeps its own record of the slots its successful requests created (the kernel
offers no way to list them), classified the way the kernel classifies a request: size 0 deletes,
an existing id gets the new base and flags, a new id is created. ``memslots()`` and
``gfn_to_memslot()`` answer from that record; raw ioctls issued through :meth:`KvmVM.ioctl`
bypass it.

Standard library only (``os``, ``fcntl``, ``mmap``, ``ctypes``). Ioctls are retried on
``EINTR``. A VM belongs to the process (``mm``) that created it: a call from a ``fork()``-ed
child is still issued, and the kernel's ``EIO`` comes back with an explanation.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from ..constants import (
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_MAX_NR_PAGES,
    PAGE_SIZE,
)
from ..engine.slot import MemorySlot
from ..errors import ClosedError, KvmError, KvmUnavailable, MemslotError
from ..request import MemoryRegion
from . import uapi
from .base import (
    U32,
    U64,
    VM,
    VmReferences,
    check_clear_dirty_log_args,
    check_enable_cap_args,
    check_host_range,
    check_region_fields,
    check_uint,
)
from .procmaps import read_vmas

if TYPE_CHECKING:
    from ..engine.vmas import Vma
    from .vcpu import Vcpu

__all__ = [
    "KVM_DEVICE",
    "HostMemory",
    "KvmVM",
    "UnownedMemoryError",
    "bitmap_bytes",
    "kvm_available",
]

KVM_DEVICE: Final = "/dev/kvm"
_C_INT_MIN: Final = -(1 << 31)
_C_INT_MAX: Final = (1 << 31) - 1
# The largest dirty bitmap the kernel can write: a slot of KVM_MEM_MAX_NR_PAGES pages.
_MAX_BITMAP: Final = ((KVM_MEM_MAX_NR_PAGES + 63) // 64) * 8
# User buffers above this size are anonymous mappings (zero pages, faulted in only if touched).
_MMAP_THRESHOLD: Final = 1 << 20

IoctlArg = int | bytearray | ctypes.Structure | ctypes.Union | ctypes.Array[Any]


class UnownedMemoryError(MemslotError):
    """A slot's userspace range is not memory this process mapped for the VM, so running a
    guest on it could read or write unrelated memory of this process."""


#: The kernel counts gfns and dirty bits in its own pages (16 KiB on arm64-16k, 64 KiB on some
#: ppc64 kernels), not in the uapi's 4 KiB.
HOST_PAGE_SHIFT = mmap.PAGESIZE.bit_length() - 1


def bitmap_bytes(npages: int) -> int:
    """Size of a dirty bitmap for ``npages`` pages: ``ALIGN(npages, 64) / 8``."""
    return ((npages + 63) // 64) * 8


# --- ioctl plumbing ------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _libc_ioctl(fd: int, request: int, arg: int) -> int:
    """``ioctl(fd, request, (unsigned long)arg)``, for values ``fcntl.ioctl`` cannot pass (it
    takes a C ``int``)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = int(_libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg & U64)))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _ioctl(fd: int, request: int, arg: IoctlArg = 0) -> int:
    """One ioctl, retried on ``EINTR``; raises ``OSError`` with the kernel's errno."""
    while True:
        try:
            if isinstance(arg, int) and not _C_INT_MIN <= arg <= _C_INT_MAX:
                return _libc_ioctl(fd, request, arg)
            return int(fcntl.ioctl(fd, request, arg))
        except InterruptedError:
            continue


class _UserBuffer:
    """Zeroed memory handed to the kernel by address (a ``bytearray``, or an anonymous mapping
    when large). ``data`` is copied to its start."""

    def __init__(self, size: int, data: bytes = b"") -> None:
        self.size = max(size, len(data), 1)
        self._store: bytearray | mmap.mmap
        if self.size > _MMAP_THRESHOLD:
            self._store = mmap.mmap(-1, -(-self.size // PAGE_SIZE) * PAGE_SIZE)
        else:
            self._store = bytearray(self.size)
        self._store[: len(data)] = data
        view = (ctypes.c_char * self.size).from_buffer(self._store)
        self.address = ctypes.addressof(view)
        del view  # the store is never resized, so the address stays valid until close()

    def read(self, length: int) -> bytes:
        return bytes(self._store[:length])

    def close(self) -> None:
        if isinstance(self._store, mmap.mmap):
            self._store.close()

    def __enter__(self) -> _UserBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _buffer_address(buf: bytearray | mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(view)
    del view
    return address


def kvm_available(path: str = KVM_DEVICE) -> tuple[bool, str]:
    """``(True, description)`` when a VM can be created on ``path``, else ``(False, reason)``."""
    try:
        with KvmVM(path) as vm:
            return True, f"{path}: API version {uapi.KVM_API_VERSION}, VM fd {vm.fd}"
    except KvmUnavailable as exc:
        return False, str(exc)


# --- host memory ---------------------------------------------------------------------------


class HostMemory:
    """An anonymous mapping owned by a :class:`KvmVM` (unmapped by ``vm.close()``) and
    registered as guest-backing memory. ``address`` is aligned as requested. :meth:`close`
    withdraws the registration before it unmaps, so memory mapped later at the same address is
    never taken for guest memory.

    ``shared`` (the default, as Python's ``mmap``) maps ``MAP_SHARED`` memory, whose pages a
    read faults in writable; ``shared=False`` maps ``MAP_PRIVATE`` memory, where a page
    nobody wrote is the read-only zero page. That shows in dirty logs: where the vCPU faults
    guest memory in itself (TDP), a read fault takes the page writable whenever the host's
    PTE already is (``hva_to_pfn_slow``: "map read fault as writable if possible"), and a
    writable SPTE in a dirty-logged slot marks the page dirty at once (``make_spte``), so a
    guest read dirties a shared page but not an untouched private one."""

    def __init__(self, size: int, align: int = PAGE_SIZE, *, hugepages: bool = False,
                 shared: bool = True) -> None:
        self._owner: weakref.ref[KvmVM] | None = None
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")
        if align < PAGE_SIZE or align & (align - 1):
            raise ValueError(f"align {align:#x} must be a power of two >= {PAGE_SIZE:#x}")
        extra = align - PAGE_SIZE
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        self._map: mmap.mmap | None = mmap.mmap(-1, size + extra, flags=flags)
        base = _buffer_address(self._map)
        self.offset = (-base) % align
        self.address = base + self.offset
        self.size = size
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE, self.offset, size)

    def _checked(self, offset: int, length: int) -> mmap.mmap:
        if self._map is None:
            raise ClosedError("host memory was unmapped")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise IndexError(f"[{offset:#x}, +{length:#x}) is outside {self.size:#x} bytes")
        return self._map

    def read(self, offset: int, length: int) -> bytes:
        start = self.offset + offset
        return self._checked(offset, length)[start : start + length]

    def write(self, offset: int, data: bytes) -> None:
        start = self.offset + offset
        self._checked(offset, len(data))[start : start + len(data)] = data

    @property
    def closed(self) -> bool:
        return self._map is None

    def close(self) -> None:
        """Unregister from the owning VM, then unmap (idempotent). Raises
        :class:`UnownedMemoryError` (and keeps the memory) while a vCPU is inside ``KVM_RUN``
        and a slot lies in this memory."""
        if self._map is None:
            return
        owner = self._owner() if self._owner is not None else None
        if owner is not None and not owner.closed:
            with contextlib.suppress(ValueError):  # unregistered by hand already
                owner.unregister_host_mapping(self.address, self.size)
        self._owner = None
        self._map.close()
        self._map = None

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._map is None else f"{self.address:#x}+{self.size:#x}"
        return f"HostMemory({state})"


# --- the VM --------------------------------------------------------------------------------


class _Resources:
    """What a KvmVM must release; held apart from the VM so a finalizer can release it."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.memories: list[HostMemory] = []
        self.log_buffer: mmap.mmap | None = None

    def release(self) -> None:
        for fd in reversed(self.fds):
            with contextlib.suppress(OSError):  # already closed behind our back
                os.close(fd)
        self.fds.clear()
        for memory in self.memories:
            memory.close()
        self.memories.clear()
        if self.log_buffer is not None:
            self.log_buffer.close()
            self.log_buffer = None


class KvmVM(VM):
    """One VM on ``/dev/kvm`` (``KVM_CREATE_VM`` of type ``vm_type``).

    Raises :class:`~memslot.errors.KvmUnavailable` when the device is missing, not permitted,
    not KVM, or speaks another API version. Failed requests raise
    :class:`~memslot.errors.KvmError` with the kernel's errno, ``rule`` = the ioctl name.
    """

    def __init__(self, path: str = KVM_DEVICE, vm_type: int = 0) -> None:
        self._path = path
        self._closed = True  # the VM fd
        self._released = True  # every fd and mapping
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._slots: dict[tuple[int, int], MemorySlot] = {}
        self._order: dict[int, tuple[list[int], list[MemorySlot]]] = {}
        self._gmem_fds: set[int] = set()
        self._mappings: list[tuple[int, int]] = []
        self._ownership_generation = 0
        #: Starts and merged ranges of the registered host memory (None: to rebuild).
        self._merged: tuple[list[int], list[tuple[int, int]]] | None = None
        self._vcpus: weakref.WeakSet[Vcpu] = weakref.WeakSet()
        self._vcpu_fds: dict[int, int] = {}  # vcpu id -> open fd, for create_vcpu()
        self._vcpu_ids: set[int] = set()  # every id create_vcpu() made (a vCPU outlives its fd)
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.release)
        self._kvm_fd = self._open_device(path)
        self._res.fds.append(self._kvm_fd)
        try:
            version = _ioctl(self._kvm_fd, uapi.KVM_GET_API_VERSION)
        except OSError as exc:
            self._finalizer()
            raise KvmUnavailable(
                exc.errno, f"{path} is not a KVM device (KVM_GET_API_VERSION: {exc.strerror})"
            ) from None
        if version != uapi.KVM_API_VERSION:
            self._finalizer()
            raise KvmUnavailable(
                f"{path} speaks KVM API version {version}, expected {uapi.KVM_API_VERSION}"
            )
        try:
            self._vm_fd = _ioctl(self._kvm_fd, uapi.KVM_CREATE_VM, vm_type)
        except OSError as exc:
            self._finalizer()
            raise KvmUnavailable(
                exc.errno, f"KVM_CREATE_VM(type={vm_type}) on {path} failed: {exc.strerror}"
            ) from None
        self._res.fds.append(self._vm_fd)
        self._closed = False
        self._released = False
        self._nr_as = max(1, self.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE))

    @staticmethod
    def _open_device(path: str) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                errno.ENOENT, f"{path} does not exist (no KVM in this kernel or container)"
            ) from None
        except PermissionError as exc:
            raise KvmUnavailable(
                exc.errno, f"no permission to open {path} read-write (join the 'kvm' group?)"
            ) from None
        except OSError as exc:
            raise KvmUnavailable(exc.errno, f"cannot open {path}: {exc.strerror}") from None

    # -- plumbing ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this KvmVM was closed")

    def _check_held(self) -> None:
        if self._released:
            raise ClosedError("this KvmVM was closed")

    @property
    def creator_pid(self) -> int:
        """The pid that created the VM; only its ``mm`` may issue VM and vCPU ioctls."""
        return self._pid

    def _error(self, err: int, rule: str, detail: str = "") -> KvmError:
        pid = os.getpid()
        if pid != self._pid:
            note = (
                f"VM created by pid {self._pid}, called from pid {pid}: "
                "KVM refuses ioctls from another mm"
            )
            detail = f"{detail}; {note}" if detail else note
        return KvmError(err, rule, detail)

    def ioctl(
        self, request: int, arg: IoctlArg = 0, *, detail: str = "", fd: int | None = None
    ) -> int:
        """Issue a raw ioctl on the VM fd (or ``fd``, e.g. a vCPU's) with this VM's error
        handling. Low-level: it does not update the slot record."""
        self._check_open()
        try:
            return _ioctl(self._vm_fd if fd is None else fd, request, arg)
        except OSError as exc:
            raise self._error(exc.errno or 0, uapi.ioctl_name(request), detail) from None

    @property
    def fd(self) -> int:
        """The VM file descriptor."""
        self._check_open()
        return self._vm_fd

    @property
    def kvm_fd(self) -> int:
        """The ``/dev/kvm`` file descriptor."""
        self._check_open()
        return self._kvm_fd

    # -- memslot requests -------------------------------------------------------------------
    def apply(self, region: MemoryRegion) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (``region.guest_memfd is None``) or ``...REGION2``."""
        check_region_fields(region)
        arg: ctypes.Structure
        if region.guest_memfd is None:
            request = uapi.KVM_SET_USER_MEMORY_REGION
            arg = uapi.kvm_userspace_memory_region(
                region.slot,
                region.flags,
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
            )
        else:
            request = uapi.KVM_SET_USER_MEMORY_REGION2
            arg = uapi.kvm_userspace_memory_region2(
                region.slot,
                region.flags,
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
                region.guest_memfd_offset,
                region.guest_memfd,
            )
        with self._lock:  # Vcpu.run() checks ownership and enters under this lock too
            if region.memory_size and self._running():
                self._check_owned(region.userspace_addr, region.memory_size,
                                  f"slot {region.as_id}:{region.id}")
            self.ioctl(request, arg, detail=region.describe())
            self._record(region)

    def _record(self, region: MemoryRegion) -> None:
        """Mirror the kernel's classification of a request that succeeded."""
        key = (region.as_id, region.id)
        old = self._slots.get(key)
        if region.memory_size == 0:
            self._slots.pop(key, None)
        elif old is not None:
            self._slots[key] = old._replace(base_gfn=region.guest_phys_addr >> HOST_PAGE_SHIFT,
                                            flags=region.flags)
        else:
            gmem = None
            if region.guest_memfd is not None and region.flags & KVM_MEM_GUEST_MEMFD:
                gmem = (region.guest_memfd, region.guest_memfd_offset)
            self._slots[key] = MemorySlot(
                id=region.id,
                as_id=region.as_id,
                base_gfn=region.guest_phys_addr >> HOST_PAGE_SHIFT,
                npages=region.memory_size >> HOST_PAGE_SHIFT,
                flags=region.flags,
                userspace_addr=region.userspace_addr,
                gmem=gmem,
            )
            self._ownership_generation += 1
        self._order.pop(region.as_id, None)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``; the fd is closed by :meth:`close` (or
        :meth:`close_guest_memfd`)."""
        check_uint("size", size, U64)
        check_uint("flags", flags, U64)
        fd = self.ioctl(
            uapi.KVM_CREATE_GUEST_MEMFD,
            uapi.kvm_create_guest_memfd(size, flags),
            detail=f"size={size:#x} flags={flags:#x}",
        )
        self._gmem_fds.add(fd)
        self._res.fds.append(fd)
        return fd

    def close_guest_memfd(self, fd: int) -> None:
        """Close a guest_memfd made by :meth:`create_guest_memfd`. A binding does not keep
        the file open ("the file pins KVM, not the other way 'round", ``kvm_gmem_bind``):
        ``kvm_gmem_release`` invalidates its bindings and drops the file's VM reference."""
        self._check_held()
        if fd not in self._gmem_fds:
            raise ValueError(f"fd {fd} is not a guest_memfd of this VM")
        self._gmem_fds.discard(fd)
        self._res.fds.remove(fd)
        os.close(fd)

    # -- vCPUs ------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        """``KVM_CREATE_VCPU`` without running it (the fd is kept; see :class:`Vcpu` for a
        vCPU that runs guest code). ``vcpu_id`` defaults to the lowest id this VM has not
        handed out."""
        self._check_open()
        if vcpu_id is None:
            taken = self._vcpu_ids | {v.vcpu_id for v in self._vcpus}
            vcpu_id = next(i for i in range(len(taken) + 1) if i not in taken)
        check_uint("vcpu_id", vcpu_id, U64)
        with self._lock:
            fd = self.ioctl(uapi.KVM_CREATE_VCPU, vcpu_id, detail=f"vcpu_id={vcpu_id}")
            self._vcpu_fds[vcpu_id] = fd
            self._vcpu_ids.add(vcpu_id)
            self._res.fds.append(fd)
        return vcpu_id

    def close_vcpu(self, vcpu_id: int) -> None:
        """Close a vCPU fd made by :meth:`create_vcpu` (the vCPU itself lives until the VM
        is destroyed; ``kvm_vcpu_release`` drops the fd's VM reference)."""
        self._check_held()
        with self._lock:
            fd = self._vcpu_fds.pop(vcpu_id, None)
            if fd is None:
                raise ValueError(f"vCPU {vcpu_id} was not created by create_vcpu()")
            self._res.fds.remove(fd)
            os.close(fd)

    # -- capabilities -----------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd."""
        check_uint("cap", cap, U64)
        return self.ioctl(uapi.KVM_CHECK_EXTENSION, cap, detail=f"cap={cap}")

    def check_system_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm``."""
        check_uint("cap", cap, U64)
        return self.ioctl(uapi.KVM_CHECK_EXTENSION, cap, detail=f"cap={cap}", fd=self.kvm_fd)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM fd with up to four ``args``."""
        check_enable_cap_args(cap, args, flags)
        arg = uapi.kvm_enable_cap(cap, flags, (uapi.u64 * 4)(*args))
        self.ioctl(
            uapi.KVM_ENABLE_CAP,
            arg,
            detail=f"cap={cap} flags={flags:#x} args={[hex(a) for a in args]}",
        )

    @property
    def page_size(self) -> int:
        """The host's page size (``mmap.PAGESIZE``)."""
        return mmap.PAGESIZE

    @property
    def nr_address_spaces(self) -> int:
        """``KVM_CAP_MULTI_ADDRESS_SPACE`` on the VM fd (0 means 1)."""
        self._check_open()
        return self._nr_as

    @property
    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE`` (size of a vCPU's kvm_run mapping)."""
        return self.ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE, fd=self.kvm_fd)

    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``."""
        check_uint("addr", addr, U64)
        self.ioctl(uapi.KVM_SET_TSS_ADDR, addr, detail=f"addr={addr:#x}")

    def set_nr_mmu_pages(self, pages: int) -> None:
        """``KVM_SET_NR_MMU_PAGES``."""
        check_uint("pages", pages, U64)
        self.ioctl(uapi.KVM_SET_NR_MMU_PAGES, pages, detail=f"pages={pages}")

    # -- dirty logging ----------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: ``ALIGN(npages, 64) / 8`` bytes, ``npages`` from the slot
        record. The kernel writes as many bytes as *its* slot needs, which the record cannot
        vouch for (a raw :meth:`ioctl` may have changed the slot), so the buffer handed over is
        always large enough for the largest slot there can be (a reserved, lazily faulted
        mapping); a slot the record lacks still gets the kernel's errno, and success is then
        refused with :class:`MemslotError`."""
        check_uint("slot", slot, U32)
        record = self._slots.get((slot >> 16, slot & 0xFFFF))
        size = bitmap_bytes(record.npages) if record is not None else _MAX_BITMAP
        buf = self._log_buffer()
        try:
            self.ioctl(
                uapi.KVM_GET_DIRTY_LOG,
                uapi.kvm_dirty_log(slot, 0, _buffer_address(buf)),
                detail=f"slot={slot >> 16}:{slot & 0xFFFF}",
            )
            if record is None:
                raise MemslotError(
                    f"KVM_GET_DIRTY_LOG succeeded for slot {slot:#x}, which this KvmVM never "
                    "created (was it made through a raw ioctl?)"
                )
            return buf[:size]
        finally:
            # Zero what was read (and on a stale record what the kernel may have written
            # beyond it stays faulted in; it is freed with the VM).
            buf.madvise(mmap.MADV_DONTNEED, 0, -(-size // PAGE_SIZE) * PAGE_SIZE)

    def _log_buffer(self) -> mmap.mmap:
        """The reserved dirty-log buffer (address space only until the kernel writes)."""
        self._check_open()
        if self._res.log_buffer is None:
            self._res.log_buffer = mmap.mmap(-1, _MAX_BITMAP, flags=mmap.MAP_PRIVATE)
        return self._res.log_buffer

    def get_dirty_log_raw(self, slot: int, address: int | None) -> None:
        """``KVM_GET_DIRTY_LOG`` with an arbitrary user address (``None`` = NULL). The kernel
        writes ``ALIGN(npages, 64) / 8`` bytes there: the caller owns that memory."""
        check_uint("slot", slot, U32)
        pointer = 0 if address is None else address
        check_uint("address", pointer, U64)
        self.ioctl(
            uapi.KVM_GET_DIRTY_LOG,
            uapi.kvm_dirty_log(slot, 0, pointer),
            detail=f"slot={slot >> 16}:{slot & 0xFFFF} bitmap={pointer:#x}",
        )

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None
    ) -> None:
        """``KVM_CLEAR_DIRTY_LOG``. ``bitmap=None`` passes NULL; a bitmap shorter than
        ``ALIGN(num_pages, 64) / 8`` bytes is zero-padded so the kernel never reads past it."""
        check_clear_dirty_log_args(slot, first_page, num_pages)
        detail = f"slot={slot >> 16}:{slot & 0xFFFF} first={first_page} num={num_pages}"
        if bitmap is None:
            self.ioctl(
                uapi.KVM_CLEAR_DIRTY_LOG,
                uapi.kvm_clear_dirty_log(slot, num_pages, first_page, 0),
                detail=detail + " bitmap=NULL",
            )
            return
        with _UserBuffer(bitmap_bytes(num_pages), bytes(bitmap)) as buf:
            self.ioctl(
                uapi.KVM_CLEAR_DIRTY_LOG,
                uapi.kvm_clear_dirty_log(slot, num_pages, first_page, buf.address),
                detail=detail,
            )

    # -- the slot record --------------------------------------------------------------------
    def _ordered(self, as_id: int) -> tuple[list[int], list[MemorySlot]]:
        self._check_open()
        if not 0 <= as_id < self._nr_as:
            raise ValueError(f"address space {as_id} does not exist (this VM has {self._nr_as})")
        with self._lock:
            cached = self._order.get(as_id)
            if cached is None:
                slots = sorted(
                    (s for s in self._slots.values() if s.as_id == as_id),
                    key=lambda s: s.base_gfn,
                )
                cached = ([s.base_gfn for s in slots], slots)
                self._order[as_id] = cached
            return cached

    def memslots(self, as_id: int = 0) -> list[MemorySlot]:
        """Slots of ``as_id`` in gfn order, from this VM's record of successful requests
        (``arch`` is ``None``: the kernel's metadata is not visible)."""
        return list(self._ordered(as_id)[1])

    def memslot(self, slot_id: int, as_id: int = 0) -> MemorySlot | None:
        """The recorded slot with this id (one dict lookup)."""
        self._check_open()
        if not 0 <= as_id < self._nr_as:
            raise ValueError(f"address space {as_id} does not exist (this VM has {self._nr_as})")
        return self._slots.get((as_id, slot_id))

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """The recorded slot containing ``gfn`` (slots never overlap, so one bisection)."""
        bases, slots = self._ordered(as_id)
        index = bisect.bisect_right(bases, gfn) - 1
        if index >= 0 and slots[index].contains_gfn(gfn):
            return slots[index]
        return None

    # -- memory this process owns for the guest ---------------------------------------------
    def register_host_mapping(
        self, addr: int, size: int, *, writable: bool = True, pfnmap: bool = False
    ) -> None:
        """Declare ``[addr, addr + size)`` memory this process mapped for the guest. A vCPU
        runs only while every slot lies inside registered memory. (``writable`` and
        ``pfnmap`` describe the VMA for a model; the kernel reads the real one.)"""
        self._check_open()
        check_host_range(addr, size)
        with self._lock:
            self._mappings.append((addr, size))
            self._ownership_generation += 1
            self._merged = None

    def unregister_host_mapping(self, addr: int, size: int) -> None:
        """Withdraw a range given to :meth:`register_host_mapping`. While a vCPU is inside
        ``KVM_RUN``, a range a slot still lies in is refused (:class:`UnownedMemoryError`):
        the guest could write whatever is mapped there next."""
        self._check_open()
        with self._lock:
            try:
                index = self._mappings.index((addr, size))
            except ValueError:
                raise ValueError(f"{addr:#x}+{size:#x} was not registered") from None
            del self._mappings[index]
            self._ownership_generation += 1
            self._merged = None
            if self._running():
                stranded = [s for s in self.unowned_slots()
                            if s.userspace_addr < addr + size
                            and addr < s.userspace_addr + s.memory_size]
                if stranded:
                    self._mappings.insert(index, (addr, size))
                    self._ownership_generation += 1
                    self._merged = None
                    s = stranded[0]
                    raise UnownedMemoryError(
                        f"{addr:#x}+{size:#x} backs slot {s.as_id}:{s.id} while a vCPU is "
                        "inside KVM_RUN: delete the slot or stop the vCPU first"
                    )

    def host_mappings(self) -> list[tuple[int, int]]:
        """Registered ``(addr, size)`` ranges."""
        self._check_open()
        with self._lock:
            return list(self._mappings)

    def process_vmas(self, start: int, end: int, *, pfnmap: bool = True) -> list[Vma]:
        """The VMAs of this process meeting ``[start, end)``: what an arch's
        ``kvm_arch_prepare_memory_region`` walks in ``current->mm`` for a slot there (read
        from /proc/self/maps, and /proc/self/smaps for ``VM_PFNMAP`` with ``pfnmap``)."""
        return read_vmas(start, end, pfnmap=pfnmap)

    def map_anonymous(
        self, size: int, align: int = PAGE_SIZE, *, hugepages: bool = False,
        shared: bool = True,
    ) -> HostMemory:
        """Map ``size`` bytes of anonymous memory at an ``align``-aligned address, register it,
        and unmap it when the VM closes (``shared``: see :class:`HostMemory`)."""
        self._check_open()
        memory = HostMemory(size, align, hugepages=hugepages, shared=shared)
        self._res.memories.append(memory)
        self.register_host_mapping(memory.address, memory.size)
        memory._owner = weakref.ref(self)
        return memory

    @property
    def ownership_generation(self) -> int:
        """Changes whenever a slot is created or a host mapping (un)registered."""
        return self._ownership_generation

    def unowned_slots(self) -> list[MemorySlot]:
        """Recorded slots whose ``[uaddr, uaddr + size)`` is not inside registered memory."""
        self._check_open()
        with self._lock:
            merged = _merge(self._mappings)
            starts = [start for start, _ in merged]
            bad = []
            for slot in self._slots.values():
                begin, end = slot.userspace_addr, slot.userspace_addr + slot.memory_size
                index = bisect.bisect_right(starts, begin) - 1
                if index < 0 or merged[index][1] < end:
                    bad.append(slot)
            return sorted(bad, key=lambda s: (s.as_id, s.base_gfn))

    def _running(self) -> bool:
        """Whether a vCPU of this VM is inside (or entering) ``KVM_RUN``."""
        return any(v._thread is not None for v in list(self._vcpus))

    def _check_owned(self, addr: int, size: int, what: str) -> None:
        """Raise :class:`UnownedMemoryError` unless ``[addr, addr + size)`` lies inside
        registered memory (checked on requests made while a vCPU runs)."""
        cached = self._merged
        if cached is None:  # rebuilt after a host mapping was (un)registered
            merged = _merge(self._mappings)
            cached = self._merged = ([start for start, _ in merged], merged)
        starts, merged = cached
        index = bisect.bisect_right(starts, addr) - 1
        if index < 0 or merged[index][1] < addr + size:
            raise UnownedMemoryError(
                f"{what} at ua {addr:#x}+{size:#x} is not inside memory this process mapped "
                "for the VM, and a vCPU is inside KVM_RUN: the guest could write there at once; "
                "refused before the kernel saw it"
            )

    def check_owned_memory(self) -> None:
        """Raise :class:`UnownedMemoryError` unless every slot is backed by registered memory."""
        bad = self.unowned_slots()
        if bad:
            listing = ", ".join(
                f"slot {s.as_id}:{s.id} ua {s.userspace_addr:#x}+{s.memory_size:#x}"
                for s in bad[:4]
            )
            more = f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""
            raise UnownedMemoryError(
                f"{listing}{more} not inside memory this process mapped for the VM "
                "(KvmVM.map_anonymous / register_host_mapping): the VM was built from recorded "
                "addresses, and a guest would read or write whatever this process has there; "
                "refusing to run a vCPU"
            )

    # -- vCPUs ------------------------------------------------------------------------------
    def _attach_vcpu(self, vcpu: Vcpu) -> None:
        self._check_open()
        self._vcpus.add(vcpu)

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close_vm_fd(self) -> None:
        """Close the VM fd alone (``kvm_vm_release``); guest_memfds and vCPU fds made by
        :meth:`create_guest_memfd` / :meth:`create_vcpu` stay open and keep the VM alive."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._res.fds.remove(self._vm_fd)
            os.close(self._vm_fd)

    def references(self) -> VmReferences:
        """The fds this object holds that reference the VM."""
        return VmReferences(not self._closed, tuple(sorted(self._gmem_fds)),
                            tuple(sorted(self._vcpu_fds)))

    def sibling(self, vm_type: int = 0) -> KvmVM:
        return KvmVM(self._path, vm_type=vm_type)

    def close(self) -> None:
        """Close the vCPUs, every fd (VM, guest_memfds, /dev/kvm) and owned mapping.
        Idempotent."""
        if self._released:
            return
        self._closed = self._released = True
        failures: list[Exception] = []
        for vcpu in list(self._vcpus):
            try:
                vcpu.close()
            except MemslotError as exc:  # still running elsewhere: its finalizer closes it
                failures.append(exc)
        self._finalizer()
        self._slots.clear()
        self._order.clear()
        self._gmem_fds.clear()
        self._vcpu_fds.clear()
        self._mappings.clear()
        if failures:
            raise failures[0]

    def __repr__(self) -> str:
        if self._closed:
            return "KvmVM(closed)"
        return f"KvmVM(fd={self._vm_fd}, slots={len(self._slots)})"


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(addr, size)`` ranges -> sorted, merged ``(start, end)`` intervals."""
    merged: list[tuple[int, int]] = []
    for start, size in sorted(ranges):
        end = start + size
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

"""A minimal x86 vCPU: a TEST TOOL for watching what a guest sees through the memslots, not a
VMM. No interrupts, no APIC, no paging set-up, no instruction completion beyond MMIO/PIO
data: it runs small hand-assembled real-mode snippets and reports each exit as a value.

A :class:`Vcpu` refuses to run while any slot of its VM lies outside memory this process
mapped for the guest (:meth:`KvmVM.map_anonymous` / :meth:`KvmVM.register_host_mapping`): a
VM rebuilt from recorded addresses would let the guest touch unrelated process memory.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import signal
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ..closing import Closing
from ..errors import ClosedError, MemslotError
from . import uapi
from .kvm import KvmVM, UnownedMemoryError

__all__ = [
    "Exit",
    "FailEntryExit",
    "GuestStopped",
    "HltExit",
    "InternalErrorExit",
    "IntrExit",
    "IoExit",
    "MmioExit",
    "RunView",
    "ShutdownExit",
    "UnknownExit",
    "UnownedMemoryError",
    "Vcpu",
    "VcpuError",
]

RFLAGS_RESERVED: Final = 0x2  # bit 1 is always set


class VcpuError(MemslotError):
    """Misuse of the test vCPU (not a kernel error)."""


# --- exits ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HltExit:
    """``KVM_EXIT_HLT``: the guest executed HLT."""


@dataclass(frozen=True)
class MmioExit:
    """``KVM_EXIT_MMIO``: an access to a gpa no (writable) slot backs. ``data`` holds the
    written bytes; for a read it is empty and :meth:`Vcpu.complete_mmio` supplies the value."""

    addr: int
    data: bytes
    is_write: bool
    length: int = 0


@dataclass(frozen=True)
class IoExit:
    """``KVM_EXIT_IO``: port I/O. ``data`` holds OUT data (``size * count`` bytes)."""

    port: int
    direction: int
    size: int
    data: bytes
    count: int = 1

    @property
    def is_out(self) -> bool:
        return self.direction == uapi.KVM_EXIT_IO_OUT

    @property
    def value(self) -> int:
        """The first OUT element as a little-endian integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True)
class ShutdownExit:
    """``KVM_EXIT_SHUTDOWN`` (e.g. a triple fault)."""


@dataclass(frozen=True)
class InternalErrorExit:
    """``KVM_EXIT_INTERNAL_ERROR`` with its sub-error and ``data[:ndata]``."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class FailEntryExit:
    """``KVM_EXIT_FAIL_ENTRY``."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class IntrExit:
    """``KVM_RUN`` returned ``EINTR`` after :meth:`Vcpu.kick` (``KVM_EXIT_INTR``)."""


@dataclass(frozen=True)
class UnknownExit:
    """Any other exit reason."""

    reason: int

    @property
    def name(self) -> str:
        return uapi.exit_reason_name(self.reason)


Exit = (
    HltExit
    | MmioExit
    | IoExit
    | ShutdownExit
    | InternalErrorExit
    | FailEntryExit
    | IntrExit
    | UnknownExit
)


class GuestStopped(VcpuError):
    """:meth:`Vcpu.run_until_hlt` ended without HLT; ``exit`` is the last exit (``None`` when
    ``max_exits`` ran out) and ``exits`` all of them."""

    def __init__(self, message: str, exit: Exit | None, exits: list[Exit]) -> None:
        super().__init__(message)
        self.exit = exit
        self.exits = exits


MmioHandler = Callable[[MmioExit], bytes | None]
IoHandler = Callable[[IoExit], bytes | None]


# --- the vCPU ------------------------------------------------------------------------------


class _RunArea:
    """The mmap-ed ``kvm_run`` area of one vCPU, shared by the :class:`RunView` objects handed
    out, so that a view kept past the vCPU raises instead of touching unmapped memory."""

    __slots__ = ("lock", "map", "open")

    def __init__(self, run_map: mmap.mmap) -> None:
        self.map = run_map
        self.open = True
        self.lock = threading.Lock()

    def release(self, fd: int) -> None:
        with self.lock:
            self.open = False
            self.map.close()
        os.close(fd)


_CTYPES_AGGREGATE: Final = (ctypes.Structure, ctypes.Union, ctypes.Array)


class RunView:
    """A checked view of ``struct kvm_run`` or one of its sub-structures (``run.mmio``,
    ``run.mmio.data``...): every read and write first checks, under the area's lock, that the
    vCPU still has it mapped, and raises :class:`~memslot.errors.ClosedError` once the vCPU was
    closed, its VM closed, or it was garbage collected. Scalars come back as Python values,
    structures and arrays as further views."""

    __slots__ = ("_area", "_obj")

    def __init__(self, obj: Any, area: _RunArea) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_area", area)

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        area = self._area
        with area.lock:
            if not area.open:
                raise ClosedError("the vCPU's kvm_run area was unmapped (the vCPU or its VM "
                                  "was closed)")
            value = fn(self._obj)
            if isinstance(value, _CTYPES_AGGREGATE):
                return RunView(value, area)
            if isinstance(value, list):  # a slice of an array
                return list(value)
            return value

    def __getattr__(self, name: str) -> Any:
        return self._call(lambda obj: getattr(obj, name))

    def __setattr__(self, name: str, value: Any) -> None:
        self._call(lambda obj: setattr(obj, name, value))

    def __getitem__(self, key: Any) -> Any:
        return self._call(lambda obj: obj[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._call(lambda obj: obj.__setitem__(key, value))

    def __len__(self) -> int:
        length: int = self._call(len)
        return length

    def __bytes__(self) -> bytes:
        data: bytes = self._call(bytes)
        return data

    def __repr__(self) -> str:
        state = "unmapped" if not self._area.open else type(self._obj).__name__
        return f"<RunView {state}>"


class Vcpu(Closing):
    """One vCPU of ``vm`` (``KVM_CREATE_VCPU`` + the mmap-ed ``kvm_run`` area).

    ``mmio_fill`` is the byte an MMIO read returns when the caller does not complete it.
    """

    def __init__(self, vm: KvmVM, vcpu_id: int = 0, *, mmio_fill: int = 0xFF) -> None:
        if not 0 <= mmio_fill <= 0xFF:
            raise ValueError(f"mmio_fill {mmio_fill:#x} is not a byte")
        vm.check_owned_memory()
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.mmio_fill = mmio_fill
        self._closed = True
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._checked_generation = -1
        self._pending_mmio = 0  # length of an MMIO read awaiting data
        self._pending_io: tuple[int, int] | None = None  # (offset, length) of an IN
        size = vm.vcpu_mmap_size
        self._fd = vm.ioctl(uapi.KVM_CREATE_VCPU, vcpu_id, detail=f"vcpu_id={vcpu_id}")
        try:
            self._map = mmap.mmap(
                self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self._fd)
            raise
        view = ctypes.c_char.from_buffer(self._map)
        # from_address holds no buffer export, so close() can unmap; every access checks
        # _closed first.
        self._run = uapi.kvm_run.from_address(ctypes.addressof(view))
        del view
        self._area = _RunArea(self._map)
        self._finalizer = weakref.finalize(self, self._area.release, self._fd)
        self._closed = False
        vm._attach_vcpu(self)

    # -- plumbing ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Vcpu was closed")
        if self.vm.closed:
            raise ClosedError("the Vcpu's KvmVM was closed")

    def _ioctl(self, request: int, arg: ctypes.Structure | int = 0) -> int:
        self._check_open()
        return self.vm.ioctl(request, arg, fd=self._fd, detail=f"vcpu {self.vcpu_id}")

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    @property
    def kvm_run(self) -> RunView:
        """The shared run area, as a checked view: after :meth:`close` (or the VM's close, or
        garbage collection of this vCPU) touching it raises
        :class:`~memslot.errors.ClosedError` instead of reading unmapped memory."""
        self._check_open()
        return RunView(self._run, self._area)

    # -- registers --------------------------------------------------------------------------
    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        self._ioctl(uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self._ioctl(uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        self._ioctl(uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self._ioctl(uapi.KVM_SET_SREGS, sregs)

    def setup_real_mode(self, rip: int, *, ds_base: int = 0, sp: int = 0) -> None:
        """Real mode with CS base 0, ``rip`` given, RFLAGS 2. ``ds_base`` sets DS's hidden
        base directly (code must not reload DS), so 16-bit code can reach any gpa."""
        sregs = self.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segment = getattr(sregs, name)
            segment.base = 0
            segment.selector = 0
            segment.limit = 0xFFFF
        sregs.ds.base = ds_base
        self.set_sregs(sregs)
        regs = uapi.kvm_regs()
        regs.rip = rip
        regs.rsp = sp
        regs.rflags = RFLAGS_RESERVED
        self.set_regs(regs)

    # -- running ----------------------------------------------------------------------------
    def complete_mmio(self, data: bytes) -> None:
        """Supply what the pending MMIO read returns (zero-padded to the access length)."""
        self._check_open()
        if not self._pending_mmio:
            raise VcpuError("no MMIO read is waiting for data")
        if len(data) > self._pending_mmio:
            raise ValueError(f"{len(data)} bytes for a {self._pending_mmio}-byte MMIO read")
        ctypes.memmove(self._run.mmio.data, data.ljust(self._pending_mmio, b"\0"), len(data))
        self._pending_mmio = 0

    def complete_io(self, data: bytes) -> None:
        """Supply the data of a pending port IN."""
        self._check_open()
        if self._pending_io is None:
            raise VcpuError("no port IN is waiting for data")
        offset, length = self._pending_io
        if len(data) > length:
            raise ValueError(f"{len(data)} bytes for a {length}-byte IN")
        self._map[offset : offset + len(data)] = data
        self._pending_io = None

    def _verify_memory(self) -> None:
        generation = self.vm.ownership_generation
        if generation != self._checked_generation:
            self.vm.check_owned_memory()
            self._checked_generation = generation

    def run(self) -> Exit:
        """``KVM_RUN`` once; returns the exit. Raises :class:`UnownedMemoryError` (without
        running) if a slot is not backed by memory this process mapped for the guest."""
        if not self._lock.acquire(blocking=False):
            raise VcpuError("this vCPU is already running in another thread")
        try:
            self._check_open()
            self._verify_memory()
            run = self._run
            if self._pending_mmio:
                ctypes.memset(run.mmio.data, self.mmio_fill, self._pending_mmio)
                self._pending_mmio = 0
            if self._pending_io is not None:
                offset, length = self._pending_io
                self._map[offset : offset + length] = bytes([self.mmio_fill]) * length
                self._pending_io = None
            # The ownership check and "running" are one step under the VM's lock, which
            # KvmVM.apply holds too: a slot request either lands before (and this check sees
            # it) or sees this vCPU running (and must be on owned memory).
            with self.vm._lock:
                self._verify_memory()
                self._thread = threading.get_ident()
            try:
                return self._enter(run)
            finally:
                self._thread = None
        finally:
            self._lock.release()

    def _enter(self, run: uapi.kvm_run) -> Exit:
        while True:
            try:
                fcntl.ioctl(self._fd, uapi.KVM_RUN, 0)
                break
            except InterruptedError:  # a signal: resume unless kick() asked to stop
                if run.immediate_exit:
                    run.immediate_exit = 0
                    return IntrExit()
            except OSError as exc:
                raise self.vm._error(exc.errno or 0, "KVM_RUN", f"vcpu {self.vcpu_id}") from None
        return self._decode(run)

    def _decode(self, run: uapi.kvm_run) -> Exit:
        reason = int(run.exit_reason)
        if reason == uapi.KVM_EXIT_HLT:
            return HltExit()
        if reason == uapi.KVM_EXIT_MMIO:
            mmio = run.mmio
            length = int(mmio.len)
            is_write = bool(mmio.is_write)
            if is_write:
                return MmioExit(int(mmio.phys_addr), bytes(mmio.data)[:length], True, length)
            self._pending_mmio = length
            return MmioExit(int(mmio.phys_addr), b"", False, length)
        if reason == uapi.KVM_EXIT_IO:
            io = run.io
            size, count, offset = int(io.size), int(io.count), int(io.data_offset)
            direction = int(io.direction)
            if direction == uapi.KVM_EXIT_IO_OUT:
                data = bytes(self._map[offset : offset + size * count])
            else:
                data = b""
                self._pending_io = (offset, size * count)
            return IoExit(int(io.port), direction, size, data, count)
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            ndata = min(int(internal.ndata), len(internal.data))
            return InternalErrorExit(int(internal.suberror), tuple(internal.data[:ndata]))
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            entry = run.fail_entry
            return FailEntryExit(int(entry.hardware_entry_failure_reason), int(entry.cpu))
        if reason == uapi.KVM_EXIT_INTR:
            return IntrExit()
        return UnknownExit(reason)

    def run_until_hlt(
        self,
        max_exits: int = 10_000,
        mmio_handler: MmioHandler | None = None,
        io_handler: IoHandler | None = None,
    ) -> list[Exit]:
        """Run until HLT, answering MMIO reads with ``mmio_handler(exit)`` (``None`` ->
        ``mmio_fill``) and port INs with ``io_handler``. Returns every exit, HLT last; raises
        :class:`GuestStopped` on any other terminal exit or after ``max_exits``."""
        exits: list[Exit] = []
        for _ in range(max_exits):
            exit_ = self.run()
            exits.append(exit_)
            if isinstance(exit_, HltExit):
                return exits
            if isinstance(exit_, MmioExit):
                answer = mmio_handler(exit_) if mmio_handler is not None else None
                if not exit_.is_write and answer is not None:
                    self.complete_mmio(answer)
            elif isinstance(exit_, IoExit):
                answer = io_handler(exit_) if io_handler is not None else None
                if not exit_.is_out and answer is not None:
                    self.complete_io(answer)
            else:
                raise GuestStopped(f"guest stopped with {exit_}", exit_, exits)
        raise GuestStopped(f"no HLT within {max_exits} exits", None, exits)

    def kick(self, signum: int = signal.SIGUSR1) -> None:
        """Make the current (or next) ``KVM_RUN`` return :class:`IntrExit`: sets
        ``immediate_exit`` and signals the running thread. ``signum`` must have a Python
        handler installed (its default action would kill the process)."""
        self._check_open()
        self._run.immediate_exit = 1
        thread = self._thread
        if thread is None:
            return
        handler = signal.getsignal(signum)
        if handler in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise VcpuError(f"install a handler for signal {signum} before kick()")
        signal.pthread_kill(thread, signum)

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 2.0) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd (idempotent). Waits up to ``timeout`` s
        for a ``run()`` in another thread to return."""
        if self._closed:
            return
        if not self._lock.acquire(timeout=timeout):
            raise VcpuError("vCPU is inside KVM_RUN in another thread: kick() it first")
        try:
            self._closed = True
            self._finalizer()
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"Vcpu({self.vcpu_id}, {state})"

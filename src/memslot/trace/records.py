"""Trace operations: what a VMM asked of KVM, one record per ioctl, whatever the source format.

Every record carries ``expect`` (the errno the trace recorded, ``None`` if unknown), the
``line`` it came from, an optional ``note`` and ``vm``: which VM of the trace it acts on (0,
1, ... in the order the trace first shows them; formats that know one VM say 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..request import MemoryRegion


@dataclass(frozen=True, slots=True)
class SetRegion:
    """``KVM_SET_USER_MEMORY_REGION{,2}``."""

    region: MemoryRegion
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="set", init=False)


@dataclass(frozen=True, slots=True)
class GetDirtyLog:
    """``KVM_GET_DIRTY_LOG``; ``expect_bitmap`` (hex in files) is checked when given."""

    slot: int
    expect: int | None = None
    line: int = 0
    note: str = ""
    expect_bitmap: bytes | None = None
    vm: int = 0
    op: str = field(default="get_dirty_log", init=False)


@dataclass(frozen=True, slots=True)
class ClearDirtyLog:
    """``KVM_CLEAR_DIRTY_LOG``; ``bitmap=None`` is a NULL pointer, ``b""`` all-ones of the
    needed length is spelled ``"all"`` in files."""

    slot: int
    first_page: int
    num_pages: int
    bitmap: bytes | None = None
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="clear_dirty_log", init=False)


@dataclass(frozen=True, slots=True)
class EnableCap:
    """``KVM_ENABLE_CAP`` on the VM fd."""

    cap: int
    args: tuple[int, ...] = ()
    flags: int = 0
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="enable_cap", init=False)


@dataclass(frozen=True, slots=True)
class MarkDirty:
    """A guest write to ``gfn`` (model: ``mark_page_dirty``). Not an ioctl; the kvm backend
    cannot replay it without a vCPU and reports it as skipped."""

    gfn: int
    as_id: int = 0
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="mark_dirty", init=False)


@dataclass(frozen=True, slots=True)
class CreateVm:
    """``KVM_CREATE_VM`` of ``vm_type``: VM number ``vm`` of the trace starts here."""

    vm_type: int = 0
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="create_vm", init=False)


@dataclass(frozen=True, slots=True)
class CheckExtension:
    """``KVM_CHECK_EXTENSION`` of ``cap`` on the VM fd (``system``: on ``/dev/kvm``);
    ``value`` (the ioctl's result) is checked when given."""

    cap: int
    value: int | None = None
    system: bool = False
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="check_extension", init=False)


@dataclass(frozen=True, slots=True)
class CreateGuestMemfd:
    """``KVM_CREATE_GUEST_MEMFD``; ``fd`` is the descriptor the trace got, which later
    ``SetRegion`` records name as ``guest_memfd`` (a replay maps it to the one it gets)."""

    size: int
    flags: int = 0
    fd: int | None = None
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="create_guest_memfd", init=False)


@dataclass(frozen=True, slots=True)
class CreateVcpu:
    """``KVM_CREATE_VCPU`` of ``vcpu_id`` (``None``: the lowest id the VM has not handed out,
    as both backends choose). Later records name the vCPU by that id."""

    vcpu_id: int | None = None
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="create_vcpu", init=False)


@dataclass(frozen=True, slots=True)
class CloseVcpu:
    """``close()`` of vCPU ``vcpu_id``'s fd (``kvm_vcpu_release``: the VM loses a
    reference; the vCPU lives until the VM is destroyed)."""

    vcpu_id: int
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="close_vcpu", init=False)


@dataclass(frozen=True, slots=True)
class CloseGuestMemfd:
    """``close()`` of guest_memfd ``fd`` (the number the trace's ``CreateGuestMemfd`` got;
    a replay closes the one it made in its place)."""

    fd: int
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="close_guest_memfd", init=False)


#: How :class:`Fork` forks: Python's ``os.fork`` (its at-fork hooks run) or libc's ``fork()``.
FORK_HOWS = ("os.fork", "libc")
#: What a forked child calls on the VM: each a VM ioctl (EIO: not the VM's mm) or a system one.
FORK_CALLS = ("set_user_memory_region", "get_dirty_log", "check_extension", "create_vcpu",
              "create_guest_memfd", "enable_cap", "check_system_extension")


@dataclass(frozen=True, slots=True)
class Fork:
    """Fork the VMM (``how``, one of :data:`FORK_HOWS`) and make one call (``call``, one of
    :data:`FORK_CALLS`) in the child; ``expect`` is the child's result."""

    how: str
    call: str
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="fork", init=False)


#: What :class:`CloseVm` closes: only the VM's fd (its guest_memfds and vCPUs keep it alive),
#: or everything the VM holds.
CLOSE_HOWS = ("fd", "all")


@dataclass(frozen=True, slots=True)
class CloseVm:
    """Close the VM: ``how="fd"`` closes its fd only (``kvm_vm_release``), ``"all"`` every
    fd it holds (VM, vCPUs, guest_memfds: ``kvm_destroy_vm``)."""

    how: str = "all"
    expect: int | None = None
    line: int = 0
    note: str = ""
    vm: int = 0
    op: str = field(default="close_vm", init=False)


TraceOp = (
    SetRegion | GetDirtyLog | ClearDirtyLog | EnableCap | MarkDirty | CreateVm | CheckExtension
    | CreateGuestMemfd | CreateVcpu | CloseVcpu | CloseGuestMemfd | Fork | CloseVm
)
#: The lifetime operations: descriptors and processes, no memslot request.
LIFETIME_OPS = frozenset({"create_vcpu", "close_vcpu", "close_guest_memfd", "fork", "close_vm"})


class TraceFormatError(ValueError):
    """A trace file could not be read; ``str()`` is one line naming file and line."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


class BadLine(str):
    """A line that is not text (binary, not UTF-8, too long), standing in its place in the
    stream of lines (as a blank line) so that line numbers stay right; ``problem`` says why.
    Parsers report it as an error of that line."""

    problem: str

    def __new__(cls, problem: str) -> BadLine:
        self = super().__new__(cls, "\n")
        self.problem = problem
        return self

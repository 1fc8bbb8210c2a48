"""Trace operations: what a VMM asked of KVM, one record per ioctl, whatever the source format.

Every record carries ``expect`` (the errno the trace recorded, ``None`` if unknown), the
``line`` it came from and an optional ``note``.
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
    op: str = field(default="set", init=False)


@dataclass(frozen=True, slots=True)
class GetDirtyLog:
    """``KVM_GET_DIRTY_LOG``; ``expect_bitmap`` (hex in files) is checked when given."""

    slot: int
    expect: int | None = None
    line: int = 0
    note: str = ""
    expect_bitmap: bytes | None = None
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
    op: str = field(default="mark_dirty", init=False)


TraceOp = SetRegion | GetDirtyLog | ClearDirtyLog | EnableCap | MarkDirty


class TraceFormatError(ValueError):
    """A trace file could not be read; ``str()`` is one line naming file and line."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")

"""Memslot operation traces: records, our JSON-lines format, QEMU trace logs, strace logs."""

from .jsonl import dumps, parse_lines
from .reader import iter_trace, read_trace
from .records import (
    CheckExtension,
    ClearDirtyLog,
    CloseGuestMemfd,
    CloseVcpu,
    CloseVm,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableCap,
    Fork,
    GetDirtyLog,
    MarkDirty,
    SetRegion,
    TraceFormatError,
    TraceOp,
)

__all__ = [
    "CheckExtension",
    "ClearDirtyLog",
    "CloseGuestMemfd",
    "CloseVcpu",
    "CloseVm",
    "CreateGuestMemfd",
    "CreateVcpu",
    "CreateVm",
    "EnableCap",
    "Fork",
    "GetDirtyLog",
    "MarkDirty",
    "SetRegion",
    "TraceFormatError",
    "TraceOp",
    "dumps",
    "iter_trace",
    "parse_lines",
    "read_trace",
]

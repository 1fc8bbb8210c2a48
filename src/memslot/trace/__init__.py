"""Memslot operation traces: records, our JSON-lines format, QEMU trace logs."""

from .jsonl import dumps, parse_lines
from .reader import iter_trace, read_trace
from .records import (
    ClearDirtyLog,
    EnableCap,
    GetDirtyLog,
    MarkDirty,
    SetRegion,
    TraceFormatError,
    TraceOp,
)

__all__ = [
    "ClearDirtyLog",
    "EnableCap",
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

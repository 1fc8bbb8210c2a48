"""Reading a trace for a command: the whole file is validated before anything is applied, and
bad input ends the command with one line (exit status 2)."""

from __future__ import annotations

from ..tools.session import load_trace, parse_at
from ..trace.records import TraceFormatError, TraceOp
from .common import die


def read_trace_or_die(path: str, fmt: str, keep_going: bool) -> tuple[list[TraceOp], list[str]]:
    """The operations, and (with ``keep_going``) the malformed lines that were skipped."""
    try:
        ops, errors = load_trace(path, fmt, keep_going)
    except TraceFormatError as exc:
        die(str(exc))
    lines = [str(e) for e in errors]
    omitted = getattr(errors, "omitted", 0)
    if omitted:
        lines.append(f"{path}: {omitted} more malformed lines (not listed)")
    return ops, lines


def at_or_die(text: str | None, ops: list[TraceOp]) -> int | None:
    """``--at`` as a count of operations (``None`` when not given)."""
    if text is None:
        return None
    try:
        return parse_at(text, ops)
    except ValueError as exc:
        die(str(exc))

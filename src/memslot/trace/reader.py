"""Open a trace in any supported format: memslot JSON lines, a QEMU ``-trace
kvm_set_user_memory`` log or an strace log (auto-detected from the first meaningful line)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from .jsonl import parse_lines
from .records import TraceFormatError, TraceOp

FORMATS = ("auto", "jsonl", "qemu", "strace")
#: Longest line read whole; a longer one is an error (memory stays bounded per line).
MAX_LINE = 1 << 20
_TOO_LONG = "\0<line too long>"


def _open_text(path: str) -> TextIO:
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    try:
        return open(path, encoding="utf-8", errors="surrogateescape", newline=None)
    except FileNotFoundError:
        raise TraceFormatError(path, 0, "no such file") from None
    except IsADirectoryError:
        raise TraceFormatError(path, 0, "is a directory") from None
    except PermissionError:
        raise TraceFormatError(path, 0, "permission denied") from None
    except OSError as exc:
        raise TraceFormatError(path, 0, exc.strerror or str(exc)) from None


def sniff_line(line: str) -> str | None:
    """The format a line decides on, if any: a JSON object means ours, a QEMU memslot trace
    event means QEMU's; other lines (blank, QEMU's other output) decide nothing."""
    text = line.strip()
    if text.startswith("{"):
        return "jsonl"
    from .strace import is_strace_line

    if is_strace_line(line):  # first: an execve line may quote QEMU's -trace arguments
        return "strace"
    if "kvm_set_user_memory" in text or "kvm_clear_dirty_log" in text:
        return "qemu"
    return None


def sniff_format(lines: list[str]) -> str:
    """The first deciding line's format; ``"jsonl"`` when none decides."""
    for line in lines:
        fmt = sniff_line(line)
        if fmt is not None:
            return fmt
    return "jsonl"


def _checked_lines(
    lines: Iterable[str], path: str, errors: list[TraceFormatError] | None
) -> Iterator[str]:
    """Lines as they are, but binary ones raise (or, collecting errors, become blank so that
    line numbers stay right)."""
    for number, line in enumerate(lines, 1):
        problem = None
        if line is _TOO_LONG:
            problem = f"line longer than {MAX_LINE} characters"
        elif "\0" in line:
            problem = "binary data (NUL byte)"
        elif any(0xDC80 <= ord(ch) <= 0xDCFF for ch in line):
            problem = "not UTF-8 text"
        if problem is not None:
            error = TraceFormatError(path, number, problem)
            if errors is None:
                raise error
            errors.append(error)
            yield "\n"
            continue
        yield line


def iter_trace(
    path: str, fmt: str = "auto", errors: list[TraceFormatError] | None = None
) -> Iterator[TraceOp]:
    """Stream the operations of a trace file (``-`` is stdin). With ``errors`` a list,
    malformed lines are recorded there and skipped instead of raising."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}")
    stream = _open_text(path)
    try:
        head: list[str] = []
        if fmt == "auto":
            # Read until a line decides (QEMU may print other things first).
            while len(head) < 100_000:
                line = stream.readline(MAX_LINE + 1)
                if len(line) > MAX_LINE and not line.endswith("\n"):
                    raise TraceFormatError(path, len(head) + 1,
                                           f"line longer than {MAX_LINE} characters")
                if not line:
                    break
                head.append(line)
                if sniff_line(line) is not None:
                    break
            fmt = sniff_format(head)
        rest = _checked_lines(_Chain(head, stream), path, errors)
        if fmt == "jsonl":
            yield from parse_lines(rest, path, errors)
        elif fmt == "strace":
            from .strace import parse_strace

            yield from parse_strace(rest, path, errors)
        else:
            from .qemu import parse_qemu_trace

            yield from parse_qemu_trace(rest, path, errors)
    finally:
        if stream is not sys.stdin and path != "-":
            stream.close()


class _Chain:
    """Lines already read, then the rest of the stream."""

    def __init__(self, head: list[str], stream: TextIO) -> None:
        self.head = [h for h in head if h]
        self.stream = stream

    def __iter__(self) -> Iterator[str]:
        yield from self.head
        yield from bounded_lines(self.stream)


def bounded_lines(stream: TextIO) -> Iterator[str]:
    """Lines of ``stream``, never holding more than MAX_LINE characters of one; a longer line
    is consumed and replaced by a marker that :func:`_checked_lines` reports."""
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while True:
                rest = stream.readline(MAX_LINE)
                if not rest or rest.endswith("\n"):
                    break
            yield _TOO_LONG
            continue
        yield line


def read_trace(path: str, fmt: str = "auto") -> list[TraceOp]:
    """All operations of a trace file; raises :class:`TraceFormatError` on the first bad line."""
    return list(iter_trace(path, fmt))


def is_file(path: str) -> bool:
    return path == "-" or os.path.isfile(path)

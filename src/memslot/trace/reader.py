"""Open a trace in any supported format: memslot JSON lines or a QEMU ``-trace
kvm_set_user_memory`` log (auto-detected from the first meaningful line)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from .jsonl import parse_lines
from .records import TraceFormatError, TraceOp

FORMATS = ("auto", "jsonl", "qemu")


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


def sniff_format(lines: list[str]) -> str:
    """``"jsonl"`` if the first non-blank line is a JSON object, else ``"qemu"``."""
    for line in lines:
        text = line.strip()
        if text:
            return "jsonl" if text.startswith("{") else "qemu"
    return "jsonl"


def _checked_lines(
    lines: Iterable[str], path: str, errors: list[TraceFormatError] | None
) -> Iterator[str]:
    """Lines as they are, but binary ones raise (or, collecting errors, become blank so that
    line numbers stay right)."""
    for number, line in enumerate(lines, 1):
        problem = None
        if "\0" in line:
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
        try:
            head = [stream.readline() for _ in range(8)]
        except UnicodeDecodeError:
            raise TraceFormatError(path, 1, "not UTF-8 text") from None
        if fmt == "auto":
            fmt = sniff_format(head)
        rest = _checked_lines(_Chain(head, stream), path, errors)
        if fmt == "jsonl":
            yield from parse_lines(rest, path, errors)
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
        yield from self.stream


def read_trace(path: str, fmt: str = "auto") -> list[TraceOp]:
    """All operations of a trace file; raises :class:`TraceFormatError` on the first bad line."""
    return list(iter_trace(path, fmt))


def is_file(path: str) -> bool:
    return path == "-" or os.path.isfile(path)

"""Open a trace in any supported format: memslot JSON lines, a QEMU ``-trace
kvm_set_user_memory`` log or an strace log (auto-detected from the first meaningful line;
a path that names no file but the ``PATH.PID`` files of ``strace -ff -o PATH``, those files
as one log: :mod:`memslot.trace.strace_ff`).

Traces are read as a stream, one line at a time, from a file, from stdin (``-``) as lines
arrive, or (``follow``) from a log that keeps growing, like ``tail -f``. Nothing is held but
the current line (at most :data:`MAX_LINE` characters) and, while the format is not yet known,
the lines before the first one that decides it.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .jsonl import PARSES_BYTES, JsonLines, operations
from .lines import MAX_LINE, TOO_LONG, Counter, LineSource
from .records import BadLine, TraceFormatError, TraceOp
from .strace_ff import MergedLog, ff_files

FORMATS = ("auto", "jsonl", "qemu", "strace")
#: Lines read to decide the format before giving up (then: a QEMU log that has no event yet).
SNIFF_LINES = 100_000
#: What the hint of an input without operations suggests.
NO_OPERATIONS_HINT = ("did you run QEMU with -trace kvm_set_user_memory, record the VMM with "
                      "'memslot record', or write memslot JSON lines (docs/trace-format.md)?")
_BOM = "\ufeff"


@dataclass
class Follow:
    """How to follow a growing file: poll every ``interval`` seconds; stop after ``timeout``
    seconds without a new line (``None``: never), or when the file is replaced or truncated
    (``on_stop`` is told why)."""

    interval: float = 0.2
    timeout: float | None = None
    on_stop: Callable[[str], None] | None = None


def _open_binary(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise TraceFormatError(path, 0, "no such file") from None
    except IsADirectoryError:
        raise TraceFormatError(path, 0, "is a directory") from None
    except PermissionError:
        raise TraceFormatError(path, 0, "permission denied") from None
    except OSError as exc:
        raise TraceFormatError(path, 0, exc.strerror or str(exc)) from None


def _followed(stream: BinaryIO, path: str, follow: Follow) -> Iterator[bytes]:
    """Lines of a file that keeps growing: at the end, wait for more. A partial last line is
    held until its newline arrives (or the follow ends)."""
    pending = b""
    quiet_since = time.monotonic()
    fd_ino = os.fstat(stream.fileno()).st_ino
    while True:
        chunk = stream.readline(MAX_LINE + 1 - len(pending))
        if chunk:
            pending += chunk
            if pending.endswith(b"\n") or len(pending) > MAX_LINE:
                if len(pending) > MAX_LINE:  # too long: skip to its end
                    if not pending.endswith(b"\n"):
                        while True:
                            rest = stream.readline(MAX_LINE)
                            if not rest or rest.endswith(b"\n"):
                                break
                    pending = TOO_LONG
                yield pending
                pending = b""
                quiet_since = time.monotonic()
            continue
        reason = _changed(path, stream, fd_ino)
        if (reason is None and follow.timeout is not None
                and time.monotonic() - quiet_since >= follow.timeout):
            reason = f"no new line for {follow.timeout:g} s"
        if reason is not None:
            if pending:
                yield pending
            if follow.on_stop is not None:
                follow.on_stop(reason)
            return
        time.sleep(follow.interval)


def _changed(path: str, stream: BinaryIO, ino: int) -> str | None:
    """Why following ``path`` must stop (replaced, removed, truncated), or ``None``."""
    try:
        now = os.stat(path)
    except OSError:
        return "the file was removed"
    if now.st_ino != ino:
        return "the file was replaced"
    if now.st_size < stream.tell():
        return "the file was truncated"
    return None


def _checked_lines(
    lines: Iterable[str], path: str, errors: list[TraceFormatError] | None
) -> Iterator[str]:
    """Lines as they are; bad ones raise (or, collecting errors, become blank so that line
    numbers stay right)."""
    for number, line in enumerate(lines, 1):
        if type(line) is BadLine:
            error = TraceFormatError(path, number, line.problem)
            if errors is None:
                raise error
            errors.append(error)
        yield line


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


def sniff_format(lines: Iterable[str]) -> str:
    """The first deciding line's format; ``"none"`` when no line decides (no memslot
    operation can come from such lines)."""
    for line in lines:
        fmt = sniff_line(line)
        if fmt is not None:
            return fmt
    return "none"


class TraceReader:
    """The operations of a trace, as an iterator, read as they arrive.

    ``format`` is the format decided (``"none"`` when the input ended before any line
    decided: empty, or no memslot line at all), ``lines`` the number of lines read so far.
    With ``errors`` a list, malformed lines are recorded there and skipped instead of raising
    :class:`TraceFormatError`. ``follow`` reads a growing file (not stdin) until it stops.
    """

    def __init__(
        self,
        path: str,
        fmt: str = "auto",
        errors: list[TraceFormatError] | None = None,
        follow: Follow | None = None,
        ff: list[tuple[int, str]] | None = None,
    ) -> None:
        """``ff``: the ``(pid, path)`` files of one ``strace -ff`` run to read as one log
        (``path`` their prefix); found by themselves when ``path`` names no file."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown trace format {fmt!r}")
        self.path = path
        self.format = fmt
        self.errors = errors
        #: What the input could not tell (one line each, e.g. the strace options that leave
        #: calls out), known once it has been read.
        self.notes: list[str] = []
        self._merged: MergedLog | None = None
        files = ff or (ff_files(path) if follow is None and path != "-"
                       and not os.path.lexists(path) else [])
        if files:  # strace -ff -o PATH: PATH.PID, one file per process and thread
            try:
                self._merged = MergedLog(files, self.notes)
            except OSError as exc:
                raise TraceFormatError(path, 0, exc.strerror or str(exc)) from None
            self._source = LineSource(lines=self._merged.lines(Counter()))
        else:
            self._stream = _open_binary(path)
            self._source = (LineSource(lines=_followed(self._stream, path, follow))
                            if follow is not None and path != "-" else LineSource(self._stream))
        self._text = (self._decode(line) for line in self._source)
        self._head: list[str] = []
        self._sniffed = False

    @property
    def lines(self) -> int:
        """Lines read so far."""
        return self._source.n

    def _decode(self, line: str | bytes) -> str:
        """A line as text (a UTF-8 BOM at the start of the input dropped); a line that is not
        text becomes a :class:`BadLine` for the parser to report with its number."""
        if type(line) is str:  # (already text)
            return line
        assert isinstance(line, bytes)
        if line is TOO_LONG:
            return BadLine(f"line longer than {MAX_LINE} characters")
        if b"\0" in line:
            return BadLine("binary data (NUL byte)")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return BadLine("not UTF-8 text")
        if self._source.n == 1 and text.startswith(_BOM):
            text = text[1:]
        return text

    def _sniff(self) -> None:
        """Decide the format (``auto``): read until a line decides (QEMU may print other things
        first); the lines read are kept, for the parser to start with."""
        if self._sniffed:
            return
        self._sniffed = True
        if self.format != "auto":
            return
        head = self._head
        for line in self._text:
            head.append(line)
            fmt = None if type(line) is BadLine else sniff_line(line)
            if fmt is not None or len(head) >= SNIFF_LINES:
                break
        self.format = sniff_format(head)
        if self.format == "none" and len(head) >= SNIFF_LINES:
            self.format = "qemu"  # a long log without an event so far: keep reading

    def json_lines(self) -> JsonLines | None:
        """For a JSON-lines trace, its parser (the format decided first), to read the
        operations one at a time with :meth:`JsonLines.advance` instead of iterating this
        reader; ``None`` for any other format. The caller closes the reader."""
        self._sniff()
        if self.format != "jsonl":
            return None
        # (the lines undecoded where the parser takes bytes: it decodes, with _decode, the
        # lines it does not take as they are)
        source = self._source if PARSES_BYTES else LineSource(lines=self._text)
        return JsonLines(source, self.path, self.errors, self._decode, self._head)

    def __iter__(self) -> Iterator[TraceOp]:
        try:
            parser = self.json_lines()
            if parser is not None:  # reports a BadLine itself
                yield from operations(parser)
                return
            lines = _checked_lines(itertools.chain(self._head, self._text), self.path,
                                   self.errors)
            if self.format == "strace":
                from .strace import parse_strace

                yield from parse_strace(lines, self.path, self.errors, self.notes)
            elif self.format == "qemu":
                from .qemu import parse_qemu_trace

                yield from parse_qemu_trace(lines, self.path, self.errors)
            else:
                for _ in lines:  # report what is not text, as any format would
                    pass
        finally:
            self.close()

    def position(self) -> int:
        """Bytes read so far (0 where the input cannot tell)."""
        if self._merged is not None:
            return self._merged.tell()
        try:
            return self._stream.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        if self._merged is not None:
            self._merged.close()
        elif self._stream is not sys.stdin.buffer:
            self._stream.close()


def iter_trace(
    path: str, fmt: str = "auto", errors: list[TraceFormatError] | None = None
) -> Iterator[TraceOp]:
    """Stream the operations of a trace file (``-`` is stdin). With ``errors`` a list,
    malformed lines are recorded there and skipped instead of raising."""
    return iter(TraceReader(path, fmt, errors))


def read_trace(path: str, fmt: str = "auto") -> list[TraceOp]:
    """All operations of a trace file; raises :class:`TraceFormatError` on the first bad line."""
    return list(iter_trace(path, fmt))

"""Reading a trace for a command: the input options every command shares, streaming, and the
rule that bad input ends the command with one line (exit status 2) before anything is printed.

A regular file is read twice when the command prints results as it goes: once to validate
every line (nothing is held), once to act. Standard input (``-``) and ``--follow`` are acted on
line by line as they arrive; a bad line there ends the command where it stands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from ..tools.session import At, ErrorSample
from ..trace.jsonl import JsonLines
from ..trace.reader import FORMATS, NO_OPERATIONS_HINT, Follow, TraceReader
from ..trace.records import TraceFormatError, TraceOp
from ..trace.strace_ff import ff_group
from .common import die


def add_input_options(p: argparse.ArgumentParser, follow: bool = False,
                      file_help: str | None = None, optional: bool = False) -> None:
    """FILE, ``--format``, ``--keep-going`` and (``follow``) ``--follow``."""
    p.add_argument("file", metavar="FILE", nargs="?" if optional or follow else None,
                   help=file_help or "trace: memslot JSON lines, a QEMU kvm_set_user_memory "
                   "log or an strace log (strace -ff -o PREFIX: PREFIX, or its PREFIX.* files; "
                   "'-' for standard input, read as lines arrive)")
    # a shell's PREFIX.* of strace -ff -o PREFIX: read together (nothing else is accepted)
    p.add_argument("more_files", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="input format (default: detected from the first memslot line)")
    p.add_argument("--keep-going", action="store_true",
                   help="skip malformed lines (reported) instead of refusing the whole input")
    if follow:
        p.add_argument("--follow", metavar="LOG",
                       help="read LOG as it grows, like tail -f (a VMM's live trace); stops on "
                            "Ctrl-C (exit 130), when LOG is replaced or truncated, or after "
                            "--follow-timeout")
        p.add_argument("--follow-timeout", type=float, metavar="SECONDS",
                       help="with --follow: stop after SECONDS without a new line")


class Input:
    """The trace a command reads: its operations as a stream, the malformed lines skipped
    (``--keep-going``), and what was read (for the "no operations" notice)."""

    def __init__(self, args: argparse.Namespace, validate: bool = False) -> None:
        follow_path = getattr(args, "follow", None)
        if follow_path is not None and args.file is not None:
            die("give a FILE or --follow LOG, not both")
        timeout = getattr(args, "follow_timeout", None)
        if timeout is not None and (follow_path is None or timeout <= 0):
            die("--follow-timeout needs --follow and a positive number of seconds")
        self.path: str = follow_path if follow_path is not None else args.file
        if self.path is None:
            die("a trace FILE is required ('-' for standard input, or --follow LOG)")
        self._ff: list[tuple[int, str]] | None = None
        more: list[str] = getattr(args, "more_files", None) or []
        if more:
            if follow_path is not None:
                die("--follow reads one LOG")
            try:
                self.path, self._ff = ff_group([self.path, *more])
            except ValueError as exc:
                die(str(exc))
        self.errors = ErrorSample()  # the first malformed lines, and the count of all
        self.keep_going: bool = args.keep_going
        self.stopped: str | None = None  # why --follow stopped
        self.follow = None
        if follow_path is not None:
            if follow_path == "-":
                die("--follow needs a file; standard input ('-') streams already")
            self.follow = Follow(timeout=timeout, on_stop=self._on_stop)
        self.streaming = self.path == "-" or self.follow is not None
        self._fmt: str = args.format
        if validate and not self.keep_going and not self.streaming and _regular(self.path):
            self._validate()
        try:
            self.reader = TraceReader(self.path, self._fmt,
                                      self.errors if self.keep_going else None, self.follow,
                                      self._ff)
        except TraceFormatError as exc:
            die(str(exc))

    def _on_stop(self, reason: str) -> None:
        self.stopped = reason

    def _validate(self) -> None:
        """Read every line once (holding nothing) so that a bad one stops the command before
        it prints anything."""
        try:
            for _ in TraceReader(self.path, self._fmt, ff=self._ff):
                pass
        except TraceFormatError as exc:
            die(str(exc))

    def __iter__(self) -> Iterator[TraceOp]:
        return iter(self.reader)

    def json_lines(self) -> JsonLines | None:
        """The JSON-lines parser of the input (``None`` in another format), to read it
        with instead of iterating (see :meth:`TraceReader.json_lines`)."""
        return self.reader.json_lines()

    def close(self) -> None:
        self.reader.close()

    @property
    def malformed(self) -> list[str]:
        lines = [str(e) for e in self.errors]
        if self.errors.omitted:
            lines.append(f"{self.path}: {self.errors.omitted} more malformed lines (not listed)")
        return lines

    def size(self) -> int | None:
        """Bytes of a regular file (for progress), else ``None``."""
        if self.streaming or not _regular(self.path):
            return None
        return os.path.getsize(self.path)

    def position(self) -> int:
        """Bytes read so far (for progress)."""
        return self.reader.position()

    def notice(self, operations: int) -> str | None:
        """What to say about the input once read, one line each: what it could not tell
        (:attr:`TraceReader.notes`), and when it held no operation, that; else ``None``."""
        shown = "standard input" if self.path == "-" else self.path
        notes = [f"{shown}: {note}" for note in self.reader.notes]
        empty = self._empty(operations)
        if empty is not None:
            notes.append(empty)
        return "\n".join(notes) if notes else None

    def _empty(self, operations: int) -> str | None:
        """What to say when the input held no operation (``None`` when it did)."""
        if operations:
            return None
        lines = self.reader.lines
        if lines == 0:
            what = "is empty"
        elif self.reader.format == "none":
            what = (f"has {lines} line{'' if lines == 1 else 's'} but no memslot JSON line "
                    "and no QEMU kvm_set_user_memory event")
        else:
            what = f"has no memslot operation in {lines} line{'' if lines == 1 else 's'}"
        shown = "standard input" if self.path == "-" else self.path
        return f"{shown} {what}: {NO_OPERATIONS_HINT}"


def _regular(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except OSError:
        return False


def at_or_die(text: str | None) -> At | None:
    """``--at`` parsed (``None`` when not given); the end of the trace is checked later."""
    if text is None:
        return None
    try:
        return At.parse(text)
    except ValueError as exc:
        die(str(exc))


def check_at(at: At | None) -> None:
    """After the trace was read: ``--at`` past its end is bad input."""
    if at is not None:
        problem = at.problem()
        if problem is not None:
            die(problem)


def flush_if(streaming: bool) -> None:
    if streaming:
        sys.stdout.flush()


def read_trace_or_die(path: str, fmt: str, keep_going: bool) -> tuple[list[TraceOp], list[str]]:
    """Every operation of a trace held in a list (for a command that goes over it several
    times), and (with ``keep_going``) the malformed lines that were skipped."""
    from ..tools.session import load_trace

    try:
        ops, errors = load_trace(path, fmt, keep_going)
    except TraceFormatError as exc:
        die(str(exc))
    lines = [str(e) for e in errors]
    omitted = getattr(errors, "omitted", 0)
    if omitted:
        lines.append(f"{path}: {omitted} more malformed lines (not listed)")
    return ops, lines

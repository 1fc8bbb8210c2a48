"""``strace -ff -o PREFIX``: one log file per process and thread (``PREFIX.PID``), read as the
single log ``strace -f -o`` would have written.

Every command takes the PREFIX as its FILE (``memslot replay vmm.strace`` for
``vmm.strace.4242``, ``vmm.strace.4243``, ...) when no file of that very name exists, or the
files themselves (``memslot replay vmm.strace.*``: several files are read together only so). Each
line gets its file's pid in front (the pid column ``-ff`` leaves out), so threads and
processes are told apart as in a ``-f`` log. With absolute timestamps in every file (``-t``,
``-tt``, ``-ttt``), the files' calls are interleaved by time, as they happened (a call's
continuation lines, the `` | `` dumps of ``memslot record`` and ``-k``'s `` > `` frames, stay
with it; equal times keep pid order). Without, the order across files is unknown: the files
are read one after the other in pid order, and a note says so. One ``PREFIX.PID`` file given
by its own name is read alone, as any log.
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

from .lines import TOO_LONG, Counter, bounded

#: An absolute timestamp at the start of a line: ``-t``/``-tt`` (time of day), ``-ttt``
#: (seconds since the epoch; ``-r``'s relative figure is padded with blanks and is smaller).
_ABSOLUTE = re.compile(rb"(?:(\d{1,2}):(\d{2}):(\d{2})(\.\d+)?|(\d{9,}\.\d+)) ")
_DAY = 86400.0
#: What the note says when the files cannot be interleaved.
UNORDERED = ("the strace -ff files have no absolute timestamps (-t, -tt or -ttt): their calls "
             "are read file after file in pid order, not interleaved as they happened")


def ff_files(prefix: str) -> list[tuple[int, str]]:
    """``(pid, path)`` of the files ``strace -ff -o PREFIX`` wrote, by pid (none: ``[]``)."""
    folder, base = os.path.split(prefix)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    start = base + "."
    found = [(int(name[len(start):]), os.path.join(folder, name)) for name in names
             if name.startswith(start) and name[len(start):].isdigit()]
    return sorted(f for f in found if os.path.isfile(f[1]))


def ff_group(paths: list[str]) -> tuple[str, list[tuple[int, str]]]:
    """Several files given together (a shell's ``PREFIX.*``): ``(PREFIX, [(pid, path)])`` when
    they are all ``PREFIX.PID`` of one prefix, else :class:`ValueError` saying so."""
    found = []
    for path in paths:
        m = re.fullmatch(r"(.+)\.(\d+)", path)
        if m is None:
            raise ValueError(f"{path}: several files are read together only as the PREFIX.PID "
                             "files of one strace -ff -o PREFIX")
        found.append((m.group(1), int(m.group(2)), path))
    prefixes = {prefix for prefix, _, _ in found}
    if len(prefixes) > 1:
        raise ValueError("several files are read together only as the PREFIX.PID files of one "
                         f"strace -ff -o PREFIX, not of {len(prefixes)} prefixes")
    return found[0][0], sorted({(pid, path) for _, pid, path in found})


def _timestamp(line: bytes) -> float | None:
    m = _ABSOLUTE.match(line)
    if m is None:
        return None
    if m.group(5) is not None:
        return float(m.group(5))
    seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
    return seconds + (float(m.group(4)) if m.group(4) else 0.0)


def _continues(line: bytes) -> bool:
    """A line that belongs to the call before it (a dump, a note, a stack frame)."""
    return line.startswith((b" | ", b" > "))


class MergedLog:
    """The lines of a ``-ff`` set as one log (``lines``), with the byte position read so far
    (``tell``) and ``close``; ``notes`` receives :data:`UNORDERED` when it applies."""

    def __init__(self, files: list[tuple[int, str]], notes: list[str]) -> None:
        self.files = files
        self.streams: list[BinaryIO] = []
        try:
            for _, path in files:
                self.streams.append(open(path, "rb"))  # noqa: SIM115 (closed by close())
        except OSError:
            self.close()
            raise
        self.notes = notes

    def tell(self) -> int:
        return sum(s.tell() for s in self.streams if not s.closed)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def lines(self, counter: Counter) -> Iterator[bytes]:
        """Every line, pid first, interleaved by time when the files allow it."""
        firsts = [s.readline() for s in self.streams]
        for stream in self.streams:
            stream.seek(0)
        timed = all(_timestamp(first) is not None for first in firsts if first)
        if timed:
            records = heapq.merge(*(self._records(i) for i in range(len(self.streams))),
                                  key=lambda r: r[0])
            chunks: Iterator[list[bytes]] = (lines for _, lines in records)
        else:
            if len(self.streams) > 1:
                self.notes.append(UNORDERED)
            chunks = (lines for i in range(len(self.streams))
                      for _, lines in self._records(i, 0))
        for chunk in chunks:
            for line in chunk:
                counter.n += 1
                yield line

    def _records(self, index: int, step: int = 1) -> Iterator[tuple[float, list[bytes]]]:
        """A file's calls, each with its continuation lines, keyed by time (``step`` 0: no
        time read). A time of day that goes back by more than half a day crossed midnight."""
        pid = b"%d " % self.files[index][0]
        record: list[bytes] = []
        when = last = base = 0.0
        for line in bounded(self.streams[index], Counter()):
            if line is not TOO_LONG and record and _continues(line):
                record.append(line)
                continue
            if record:
                yield when, record
            if line is TOO_LONG:
                record = [line]
                continue
            if step:
                stamp = _timestamp(line)
                if stamp is not None:
                    if stamp + base < last - _DAY / 2:
                        base += _DAY
                    when = last = stamp + base
            record = [pid + line]
        if record:
            yield when, record

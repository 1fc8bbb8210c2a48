"""Reading a trace's lines with a bound: never more than :data:`MAX_LINE` bytes of one line
held, a longer one consumed and stood for by :data:`TOO_LONG`, and every line counted. (Compiled
with mypyc: :meth:`LineSource.next_line` runs once per line of a trace.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO, Final

#: Longest line read whole; a longer one is an error (memory stays bounded per line).
MAX_LINE: Final = 1 << 20

#: Stands for a line longer than MAX_LINE (consumed, not held). Its NUL byte makes sure that
#: no parser of undecoded lines takes it for text.
TOO_LONG = b"\0(line too long)\n"

_LIMIT: Final = MAX_LINE + 1
#: The same, as the object readline() is given (not a new int boxed for every line).
_LIMIT_ARG: Final[object] = _LIMIT


class Counter:
    """Lines read so far."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def bounded(stream: BinaryIO, counter: Counter) -> Iterator[bytes]:
    """Lines of ``stream`` as they arrive (:class:`LineSource`'s), counted in ``counter``."""
    source = LineSource(stream)
    while True:
        line = source.next_line()
        if line is None:
            return
        counter.n += 1
        assert isinstance(line, bytes)
        yield line


class LineSource:
    """The lines of a trace as they arrive, counted (``n``): read from ``stream`` with the
    bound (a longer line is consumed and given as :data:`TOO_LONG`), or taken as they are
    from ``lines`` (a followed file's, a caller's list). Iterating it gives the same lines."""

    def __init__(self, stream: BinaryIO | None = None,
                 lines: Iterator[str | bytes] | None = None) -> None:
        self.n = 0
        # (untyped: compiled, an int argument would be boxed again for every call)
        self._readline: Any = stream.readline if stream is not None else None
        self._lines = lines

    def next_line(self) -> str | bytes | None:
        """The next line (with its newline, if it had one); ``None`` at the end."""
        readline = self._readline
        if readline is None:
            lines = self._lines
            if lines is None:
                return None
            got = next(lines, None)
            if got is not None:
                self.n += 1
            return got
        line: bytes = readline(_LIMIT_ARG)
        if not line:
            return None
        self.n += 1
        if len(line) == _LIMIT:
            if not line.endswith(b"\n"):
                while True:
                    rest: bytes = readline(MAX_LINE)
                    if not rest or rest.endswith(b"\n"):
                        break
            line = TOO_LONG
        return line

    def __iter__(self) -> Iterator[str | bytes]:
        return self

    def __next__(self) -> str | bytes:
        line = self.next_line()
        if line is None:
            raise StopIteration
        return line

"""Reading a trace's lines with a bound: never more than :data:`MAX_LINE` bytes of one line
held, a longer one consumed and stood for by :data:`TOO_LONG`, and every line counted. (Compiled
with mypyc: this loop runs once per line of a trace.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Final

#: Longest line read whole; a longer one is an error (memory stays bounded per line).
MAX_LINE: Final = 1 << 20


class Counter:
    """Lines read so far (the reader's ``lines``)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


#: Stands for a line longer than MAX_LINE (consumed, not held). Its NUL byte makes sure that
#: no parser of undecoded lines takes it for text.
TOO_LONG = b"\0(line too long)\n"


def bounded(stream: BinaryIO, counter: Counter) -> Iterator[bytes]:
    """Lines of ``stream`` as they arrive, never more than MAX_LINE bytes of one held; a longer
    line is consumed and yielded as :data:`TOO_LONG`."""
    readline = stream.readline
    limit = MAX_LINE + 1
    while True:
        line = readline(limit)
        if not line:
            return
        counter.n += 1
        if len(line) == limit:
            if not line.endswith(b"\n"):
                while True:
                    rest = readline(MAX_LINE)
                    if not rest or rest.endswith(b"\n"):
                        break
            line = TOO_LONG
        yield line

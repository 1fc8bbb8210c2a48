"""Terminal output for the tool commands: Rich tables and a progress bar on a terminal,
plain aligned text when piped (or with ``NO_COLOR``/``TERM=dumb``, or without rich)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from .common import table as plain_table

#: Traces longer than this get a progress bar on a terminal.
PROGRESS_MIN_OPS = 2000


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def fancy(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stdout by default) is a terminal that should get Rich output."""
    s = stream or sys.stdout
    if os.environ.get("TERM") == "dumb" or os.environ.get("MEMSLOT_PLAIN"):
        return False
    isatty = getattr(s, "isatty", None)
    return bool(isatty and isatty()) and _rich_available()


def _console(out: TextIO) -> Any:
    from rich.console import Console

    return Console(file=out, highlight=False, soft_wrap=False)


def print_table(
    rows: list[list[str]],
    headers: list[str],
    *,
    title: str | None = None,
    right: set[int] | None = None,
    out: TextIO | None = None,
) -> None:
    """A table: Rich on a terminal, ``common.table`` plain text otherwise. Columns whose
    index is in ``right`` are right-aligned (numbers)."""
    stream = out or sys.stdout
    right = right or set()
    if not fancy(stream):
        if title:
            stream.write(f"{title}\n")
        if right:
            widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
            rows = [[cell.rjust(widths[i]) if i in right else cell for i, cell in enumerate(r)]
                    for r in rows]
        plain_table(rows, headers, stream)
        return
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold", box=None,
              pad_edge=False, show_edge=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        t.add_row(*(_escape(cell) for cell in row))
    console = _console(stream)
    natural = console.measure(t, options=console.options.update_width(1 << 16)).maximum
    if natural > console.width:
        # never cut or fold an address: let a narrow terminal wrap the long lines instead
        console = _console(stream)
        console.width = natural
    console.print(t)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def heading(text: str, out: TextIO | None = None) -> None:
    """A section heading (bold on a terminal)."""
    stream = out or sys.stdout
    if fancy(stream):
        _console(stream).print(f"[bold]{_escape(text)}[/bold]")
    else:
        stream.write(f"{text}\n")


def line(text: str, style: str = "", out: TextIO | None = None) -> None:
    """One line of text; ``style`` (e.g. ``"red"``, ``"yellow"``) applies on a terminal."""
    stream = out or sys.stdout
    if style and fancy(stream):
        _console(stream).print(f"[{style}]{_escape(text)}[/{style}]")
    else:
        stream.write(f"{text}\n")


@contextmanager
def progress(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``update(done)``: a progress bar on stderr when it is a terminal and the trace
    is long (``total > PROGRESS_MIN_OPS``), a no-op otherwise."""
    if not (enabled and total > PROGRESS_MIN_OPS and fancy(sys.stderr)):
        yield lambda done: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(),
                  console=_console(sys.stderr), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)

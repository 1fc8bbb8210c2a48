"""Terminal output for the tool commands: Rich tables and a progress bar on a terminal,
plain aligned text when piped (or with ``NO_COLOR``/``TERM=dumb``, or without rich)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from .common import table as plain_table

#: Traces longer than this get a progress bar on a terminal.
PROGRESS_MIN_OPS = 2000
PROGRESS_MIN_BYTES = 1 << 20

T = TypeVar("T")


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


_CONSOLES: dict[int, Any] = {}


def _console(out: TextIO) -> Any:
    """One Rich console per stream (building one per line would be slow)."""
    console = _CONSOLES.get(id(out))
    if console is None or console.file is not out:
        from rich.console import Console

        console = Console(file=out, highlight=False, soft_wrap=False)
        _CONSOLES[id(out)] = console
    return console


def width(stream: TextIO | None = None) -> int | None:
    """Columns to fit the output into: ``COLUMNS`` when set, the terminal's width on a
    terminal, else ``None`` (no limit: piped output keeps whole lines for scripts)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) >= 20:
        return int(env)
    s = stream or sys.stdout
    isatty = getattr(s, "isatty", None)
    if isatty and isatty():
        import shutil

        return max(shutil.get_terminal_size().columns, 20)
    return None


def fit(first: str, parts: list[str], limit: int | None, indent: int = 8) -> list[str]:
    """``first`` and then ``parts`` joined by two spaces on as few lines as ``limit`` columns
    allow; a part that does not fit goes on a new line indented by ``indent``, and a part
    longer than a line is wrapped at spaces."""
    if limit is None:
        return ["  ".join([first, *parts])]
    import textwrap

    pad = " " * indent
    lines = textwrap.wrap(first, limit, subsequent_indent=pad, break_long_words=False,
                          break_on_hyphens=False) or [""]
    for part in parts:
        if len(lines[-1]) + 2 + len(part) <= limit:
            lines[-1] += "  " + part
        else:
            lines += textwrap.wrap(part, limit, initial_indent=pad, subsequent_indent=pad + "  ",
                                   break_long_words=False, break_on_hyphens=False)
    return lines


def print_table(
    rows: list[list[str]],
    headers: list[str],
    *,
    title: str | None = None,
    right: set[int] | None = None,
    out: TextIO | None = None,
    keys: int = 1,
    styles: dict[int, str] | None = None,
) -> None:
    """A table: Rich on a terminal, ``common.table`` plain text otherwise. Columns whose
    index is in ``right`` are right-aligned (numbers); ``styles`` gives a column a Rich style
    (e.g. ``"cyan"``) on a terminal. A table wider than the output
    (:func:`width`) is printed as several narrower ones, each repeating the first ``keys``
    columns; no cell is cut or folded."""
    stream = out or sys.stdout
    right = right or set()
    for n, part in enumerate(column_groups(rows, headers, width(stream), keys)):
        part_rows = [[r[i] for i in part] for r in rows]
        part_headers = [headers[i] for i in part]
        part_right = {j for j, i in enumerate(part) if i in right}
        part_styles = {j: (styles or {})[i] for j, i in enumerate(part) if i in (styles or {})}
        _print_one(part_rows, part_headers, title if n == 0 else None, part_right, stream,
                   part_styles)


def column_groups(rows: list[list[str]], headers: list[str], limit: int | None,
                  keys: int = 1) -> list[list[int]]:
    """Column indexes per table so that each fits ``limit`` columns of text (two spaces
    between columns), the first ``keys`` columns in every one."""
    every = list(range(len(headers)))
    if limit is None:
        return [every]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if sum(widths) + 2 * (len(widths) - 1) <= limit:
        return [every]
    base = every[:keys]
    used = sum(widths[i] + 2 for i in base)
    groups: list[list[int]] = []
    current: list[int] = []
    size = used
    for i in every[keys:]:
        if current and size + widths[i] > limit:
            groups.append(base + current)
            current, size = [], used
        current.append(i)
        size += widths[i] + 2
    groups.append(base + current)
    return groups


def _print_one(rows: list[list[str]], headers: list[str], title: str | None, right: set[int],
               stream: TextIO, styles: dict[int, str] | None = None) -> None:
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
        t.add_column(h, justify="right" if i in right else "left", no_wrap=True,
                     style=(styles or {}).get(i))
    for row in rows:
        t.add_row(*(_escape(cell) for cell in row))
    console = _console(stream)
    natural = console.measure(t, options=console.options.update_width(1 << 16)).maximum
    if natural > console.width:
        # a single column wider than the terminal: never cut or fold an address
        console = _console(stream)
        console.width = natural
    console.print(t)
    console.width = None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def heading(text: str, out: TextIO | None = None) -> None:
    """A section heading (bold on a terminal), wrapped to the output's width."""
    line(text, "bold", out)


def line(text: str, style: str = "", out: TextIO | None = None, indent: int = 4) -> None:
    """A line of text, wrapped at spaces to the output's width (continuation lines indented by
    ``indent``); ``style`` (e.g. ``"red"``, ``"yellow"``) applies on a terminal."""
    stream = out or sys.stdout
    limit = width(stream)
    if limit is not None and len(text) > limit and "\n" not in text:
        lead = len(text) - len(text.lstrip(" "))
        text = "\n".join(fit(text, [], limit, lead + indent))
    if style and fancy(stream):
        _console(stream).print(f"[{style}]{_escape(text)}[/{style}]", soft_wrap=True)
    else:
        stream.write(f"{text}\n")


@contextmanager
def progress(total: int, label: str, enabled: bool = True,
             unit: str = "operations") -> Iterator[Callable[[int], None]]:
    """Yield ``update(done)``: a progress bar on stderr when it is a terminal and the input is
    long (``total`` above PROGRESS_MIN_OPS operations or PROGRESS_MIN_BYTES bytes of a file),
    a no-op otherwise."""
    least = PROGRESS_MIN_BYTES if unit == "bytes" else PROGRESS_MIN_OPS
    if not (enabled and total > least and fancy(sys.stderr)):
        yield lambda done: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
    )

    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    with Progress("[progress.description]{task.description}", BarColumn(), count,
                  TimeRemainingColumn(), console=_console(sys.stderr), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


def tracked(items: Iterator[T], update: Callable[[], None], every: int = 2000) -> Iterator[T]:
    """``items`` unchanged, calling ``update()`` every ``every`` items."""
    n = 0
    for item in items:
        yield item
        n += 1
        if n == every:
            n = 0
            update()

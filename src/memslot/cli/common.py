"""Shared CLI plumbing: exit codes, one-line errors, output helpers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

from ..units import human_bytes as human_bytes  # the commands' one size formatter

EXIT_OK = 0
EXIT_MISMATCH = 1  # a recorded expectation did not hold, or a lint finding with --strict
EXIT_USAGE = 2  # bad input: missing file, malformed line, bad option

EXIT_CODES_HELP = (
    "exit status: 0 success; 1 a result differed from what the input expected "
    "(or a finding under --strict); 2 bad input (unreadable file, malformed line, bad option)"
)


class CliError(Exception):
    """Bad input: printed as one line, exit status 2."""


Handler = Callable[[argparse.Namespace], int]


class Command:
    """A subcommand: its name, help and how to add its options and run it."""

    def __init__(
        self,
        name: str,
        help: str,
        configure: Callable[[argparse.ArgumentParser], None],
        run: Handler,
    ) -> None:
        self.name = name
        self.help = help
        self.configure = configure
        self.run = run


def die(message: str) -> NoReturn:
    raise CliError(message)


def emit_json(data: Any, out: TextIO | None = None) -> None:
    json.dump(data, out or sys.stdout, indent=2, default=json_default)
    (out or sys.stdout).write("\n")


def json_default(obj: Any) -> Any:
    """What JSON output makes of values JSON has no type for."""
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    return str(obj)


def table(rows: list[list[str]], headers: list[str], out: TextIO | None = None) -> None:
    """Plain aligned columns (rich is optional; plain text always works when piped)."""
    stream = out or sys.stdout
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    stream.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    stream.write("\n")
    for row in rows:
        stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        stream.write("\n")

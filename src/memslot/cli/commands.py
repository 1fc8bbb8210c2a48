"""The registry of subcommands (one module each), imported only when needed: a command that
runs loads its own module alone (``memslot replay`` does not import the layout renderer or
the kernel lab), the full parser (``memslot --help``, shell completion) loads them all."""

from __future__ import annotations

import importlib

from .common import Command

#: (command name, module in memslot.cli, attribute holding its Command), in the help's order.
REGISTRY: tuple[tuple[str, str, str], ...] = (
    ("replay", "replay_cmd", "COMMAND"),
    ("profiles", "profiles_cmd", "COMMAND"),
    ("fuzz", "fuzz_cmd", "COMMAND"),
    ("measure-metadata", "measure_cmd", "COMMAND"),
    ("convert", "convert_cmd", "COMMAND"),
    ("explain", "explain_cmd", "COMMAND"),
    ("report", "report_cmd", "COMMAND"),
    ("layout", "layout_cmd", "COMMAND"),
    ("snapshot-info", "snapshot_cmd", "COMMAND"),
    ("compat", "compat_cmd", "COMMAND"),
    ("record", "record_cmd", "COMMAND"),
    ("lab", "lab_cmd", "COMMAND"),
    ("snapshot", "snapshot_cmd", "EXPORT_COMMAND"),
    ("completion", "completion_cmd", "COMMAND"),
)

NAMES: tuple[str, ...] = tuple(name for name, _, _ in REGISTRY)


def load(name: str) -> Command:
    """The :class:`Command` called ``name`` (its module imported now)."""
    for entry, module, attr in REGISTRY:
        if entry == name:
            command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
            assert isinstance(command, Command) and command.name == name
            return command
    raise KeyError(name)


def load_all() -> list[Command]:
    """Every command, in the help's order."""
    return [load(name) for name in NAMES]

"""The registry of subcommands (one module each)."""

from __future__ import annotations

from . import fuzz_cmd, measure_cmd, profiles_cmd, replay_cmd
from .common import Command

ALL: list[Command] = [
    replay_cmd.COMMAND,
    profiles_cmd.COMMAND,
    fuzz_cmd.COMMAND,
    measure_cmd.COMMAND,
]

"""The registry of subcommands (one module each)."""

from __future__ import annotations

from . import profiles_cmd, replay_cmd
from .common import Command

ALL: list[Command] = [
    replay_cmd.COMMAND,
    profiles_cmd.COMMAND,
]

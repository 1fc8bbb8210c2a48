"""The registry of subcommands (one module each)."""

from __future__ import annotations

from . import (
    compat_cmd,
    completion_cmd,
    convert_cmd,
    explain_cmd,
    fuzz_cmd,
    lab_cmd,
    layout_cmd,
    measure_cmd,
    profiles_cmd,
    record_cmd,
    replay_cmd,
    report_cmd,
    snapshot_cmd,
)
from .common import Command

ALL: list[Command] = [
    replay_cmd.COMMAND,
    profiles_cmd.COMMAND,
    fuzz_cmd.COMMAND,
    measure_cmd.COMMAND,
    convert_cmd.COMMAND,
    explain_cmd.COMMAND,
    report_cmd.COMMAND,
    layout_cmd.COMMAND,
    snapshot_cmd.COMMAND,
    compat_cmd.COMMAND,
    record_cmd.COMMAND,
    lab_cmd.COMMAND,
    snapshot_cmd.EXPORT_COMMAND,
    completion_cmd.COMMAND,
]

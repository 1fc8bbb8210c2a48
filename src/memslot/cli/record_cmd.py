"""``memslot record``: capture the KVM calls of any VMM under strace, as a trace every
command reads."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import TextIO

from ..harness.record import DEFAULT_HOLD_MS, Recorder, RecordError, find_strace
from ..trace.records import TraceFormatError
from ..trace.strace import parse_strace
from .common import EXIT_MISMATCH, EXIT_OK, Command, die


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="FILE",
                   help="the strace log to write (default memslot-NAME.strace in the current "
                        "directory)")
    p.add_argument("--pid", type=int, metavar="PID",
                   help="attach to a running VMM (all its threads) instead of starting one; "
                        "SIGINT/SIGTERM detaches")
    p.add_argument("--timed-hold", action="store_true",
                   help="hold every ioctl for --hold-ms under strace, as with --pid, instead "
                        "of stopping the calls whose structs are read with a seccomp filter "
                        "until they are read (the default for a COMMAND)")
    p.add_argument("--hold-ms", type=float, default=DEFAULT_HOLD_MS, metavar="MS",
                   help="with --pid or --timed-hold: how long strace holds each ioctl so that "
                        f"its struct can be read (default {DEFAULT_HOLD_MS:g}; 0: keep only "
                        "what strace decodes)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                   help="the VMM to run (SIGINT/SIGTERM stop it; the trace is complete)")


def _output_name(args: argparse.Namespace, command: list[str]) -> str:
    if args.output:
        return str(args.output)
    name = f"pid-{args.pid}" if args.pid is not None else os.path.basename(command[0])
    return f"memslot-{name}.strace"


def _create(path: str) -> TextIO:
    try:
        return open(path, "w", encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        die(f"{path}: cannot write: {exc.strerror or exc}")


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.pid is not None and command:
        die("record: give a COMMAND or --pid, not both")
    if args.pid is None and not command:
        die("record: nothing to record: give -- COMMAND [ARGS...] or --pid PID")
    if args.hold_ms < 0:
        die(f"record: --hold-ms must not be negative: {args.hold_ms:g}")
    if args.pid is not None:
        if args.pid <= 0:
            die(f"record: --pid {args.pid}: not a process id")
        try:
            os.kill(args.pid, 0)
        except ProcessLookupError:
            die(f"record: --pid {args.pid}: no such process")
        except PermissionError:
            die(f"record: --pid {args.pid}: not permitted to trace it")
    try:
        strace = find_strace()
    except RecordError as exc:
        die(str(exc))
    if command and shutil.which(command[0]) is None:
        die(f"record: {command[0]}: command not found (or not executable)")
    path = _output_name(args, command)
    if os.path.isdir(path):
        die(f"{path}: is a directory")
    with _create(path) as out:
        try:
            result = Recorder(out, hold_ms=args.hold_ms, strace=strace,
                              timed=args.timed_hold).record(
                args.pid if args.pid is not None else command)
        except RecordError as exc:
            die(str(exc))
    errors: list[TraceFormatError] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        ops = list(parse_strace(f, path, errors))
    vms = len({op.vm for op in ops})
    sets = sum(1 for op in ops if op.op == "set")
    what = f"pid {args.pid}" if args.pid is not None else command[0]
    ended = (f"stopped by {result.stopped_by}" if result.stopped_by
             else f"exit status {result.status}")
    held = {"seccomp": "calls held by seccomp until read",
            "timed": f"timed hold of {args.hold_ms:g} ms",
            "none": "no argument reads"}[result.hold]
    print(f"memslot record: {what} ({ended}): {len(ops)} memslot operation(s), {sets} "
          f"set-region, on {vms} VM(s); {result.lines} lines, {result.dumped} argument dump(s) "
          f"({held}) -> {path}", file=sys.stderr)
    if result.missed:
        shown = ", ".join(f"L{n}" for n in result.missed[:5])
        hint = "; raise --hold-ms" if result.hold == "timed" else ""
        print(f"memslot record: {len(result.missed)} call(s) whose arguments could not be "
              f"read, marked in the log ({shown}{'...' if len(result.missed) > 5 else ''})"
              f"{hint}", file=sys.stderr)
    for error in errors[:5]:
        print(f"memslot record: {error}", file=sys.stderr)
    return EXIT_MISMATCH if result.missed or errors else EXIT_OK


COMMAND = Command("record", "record the KVM memslot calls of any VMM (a command, or --pid) "
                  "under strace; the log is a trace every command reads", configure, run)

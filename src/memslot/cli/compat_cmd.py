"""``memslot compat TRACE``: which arch / kernel / VM type accept a trace, and for the others
the first refused request, its rule and the release where that rule changes."""

from __future__ import annotations

import argparse
import fnmatch

from ..harness.compat import Outcome, check, compat_profiles
from ..trace.reader import FORMATS
from .common import EXIT_MISMATCH, EXIT_OK, Command, die, emit_json, table
from .trace_input import read_trace_or_die


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="TRACE", help="trace: memslot JSON lines or a QEMU "
                   "kvm_set_user_memory log ('-' for stdin)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format")
    p.add_argument("--profile", action="append", metavar="GLOB", default=[],
                   help="only profiles matching GLOB (repeatable), e.g. 'x86_64@*' or 'arm64*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--keep-going", action="store_true",
                   help="skip malformed lines (reported) instead of refusing the whole file")


def run(args: argparse.Namespace) -> int:
    ops, bad_lines = read_trace_or_die(args.file, args.format, args.keep_going)
    profiles = compat_profiles()
    if args.profile:
        profiles = [p for p in profiles
                    if any(fnmatch.fnmatchcase(p.name, g) for g in args.profile)]
        if not profiles:
            die(f"--profile {' '.join(args.profile)}: no profile matches; profiles: "
                + ", ".join(p.name for p in compat_profiles()))
    outcomes = check(ops, profiles)
    if args.json:
        emit_json({"results": [o.as_dict() for o in outcomes]})
    else:
        _print(outcomes, len(ops), bad_lines)
    return EXIT_OK if all(o.accepted for o in outcomes) else EXIT_MISMATCH


def _print(outcomes: list[Outcome], n_ops: int, bad_lines: list[str]) -> None:
    for line in bad_lines:
        print(f"skipped: {line}")
    rows = []
    for o in outcomes:
        p = o.profile
        r = o.refusal
        if r is None:
            verdict, first = "accepted", ""
        else:
            from ..errors import errno_name

            verdict = "refused"
            first = f"L{r.line} {errno_name(r.errno)} {r.rule}: {o.summary()}"
        rows.append([p.name, p.arch, p.kernel, p.vm_type, verdict, first])
    table(rows, ["profile", "arch", "kernel", "VM type", "whole trace", "first refusal"])
    ok = sum(o.accepted for o in outcomes)
    print(f"{ok} of {len(outcomes)} profiles accept all {n_ops} operations")


COMMAND = Command("compat", "replay a trace on every kernel version and arch: which accept it, "
                  "and where the others refuse", configure, run)

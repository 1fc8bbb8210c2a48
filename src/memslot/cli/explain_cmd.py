"""``memslot explain``: what KVM did with each request of a trace, or with one request given
on the command line (against the state a trace leaves)."""

from __future__ import annotations

import argparse
from typing import Any

from ..harness.replay import Replayer
from ..profile import Profile
from ..tools.explain import explain_step, parse_request
from ..tools.session import ModelRun, replay_model
from ..trace.reader import FORMATS
from ..trace.records import SetRegion, TraceOp
from . import render
from .backends import resolve_profile
from .common import EXIT_MISMATCH, EXIT_OK, Command, die, emit_json, human_bytes
from .trace_input import at_or_die, read_trace_or_die


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", nargs="?",
                   help="trace (memslot JSON lines or QEMU log, '-' for stdin); optional with "
                        "--request, where it gives the starting state")
    p.add_argument("--at", metavar="N",
                   help="explain operation N only (1-based; 'L37' is the operation from line "
                        "37); with --request: start from the state after operation N")
    p.add_argument("--request", nargs="+", metavar="KEY=VALUE",
                   help="explain one request: slot=ID|AS:ID gpa=ADDR size=BYTES ua=ADDR "
                        "flags=N|LOG_DIRTY_PAGES|READONLY [gmem=FD gmem_offset=N]; numbers in "
                        "decimal, 0x hex or 4K/2M/1G; size=0 (default) is a DELETE")
    p.add_argument("--failed", action="store_true",
                   help="only requests that were refused or differ from the recorded result")
    p.add_argument("--profile", default="x86_64", metavar="P",
                   help="host profile (default x86_64; 'detect' for the running kernel)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME",
                   help="alternative kernel behaviour (see 'memslot replay --help')")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format")
    p.add_argument("--keep-going", action="store_true",
                   help="skip malformed lines (reported) instead of refusing the whole file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _load(args: argparse.Namespace) -> tuple[list[TraceOp], list[str]]:
    if args.file is None:
        return [], []
    return read_trace_or_die(args.file, args.format, args.keep_going)


def _split_request(args: argparse.Namespace) -> None:
    """``--request k=v ... FILE``: argparse puts FILE among the fields; take it back."""
    if args.request is None:
        return
    loose = [t for t in args.request if "=" not in t]
    if loose and args.file is None and len(loose) == 1:
        args.file = loose[0]
        args.request = [t for t in args.request if "=" in t]


def run(args: argparse.Namespace) -> int:
    _split_request(args)
    if args.file is None and args.request is None:
        die("explain needs a trace FILE, a --request, or both")
    profile = resolve_profile(args.profile)
    region = None
    if args.request is not None:
        try:
            region = parse_request(args.request)
        except ValueError as exc:
            die(f"--request: {exc}")
    ops, bad_lines = _load(args)
    at = at_or_die(args.at, ops)
    if region is not None:
        return _explain_request(args, profile, ops, at, region, bad_lines)
    return _explain_trace(args, profile, ops, at, bad_lines)


def _replay(args: argparse.Namespace, profile: Profile, ops: list[TraceOp],
            upto: int | None) -> ModelRun:
    total = len(ops) if upto is None else upto
    try:
        with render.progress(total, "replaying", not args.json) as update:
            return replay_model(ops, profile, upto, args.variant, update)
    except ValueError as exc:  # an unknown --variant
        die(str(exc))


def _explain_trace(args: argparse.Namespace, profile: Profile, ops: list[TraceOp],
                   at: int | None, bad_lines: list[str]) -> int:
    run = _replay(args, profile, ops, at)
    try:
        steps = run.steps[at - 1:] if at is not None else run.steps
        if args.failed:
            steps = [s for s in steps if s.errno or s.mismatch]
        explained = [explain_step(s, profile) for s in steps]
        mismatched = sum(1 for e in explained if e["problems"])
        if args.json:
            emit_json({"file": args.file, "profile": profile.name, "at": at,
                       "operations": len(ops), "explained": explained,
                       "mismatches": mismatched, "malformed_lines": bad_lines})
        else:
            for n, e in enumerate(explained):
                if n:
                    print()
                print_explanation(e)
            if not explained:
                print("no request to explain" + (" (none failed)" if args.failed else ""))
            for text in bad_lines:
                render.line(f"skipped malformed line: {text}", "yellow")
            if mismatched:
                render.line(f"{mismatched} result(s) differ from the trace", "red")
    finally:
        run.close()
    return EXIT_MISMATCH if mismatched else EXIT_OK


def _explain_request(args: argparse.Namespace, profile: Profile, ops: list[TraceOp],
                     at: int | None, region: Any, bad_lines: list[str]) -> int:
    run = _replay(args, profile, ops, at)
    try:
        replayer = Replayer(run.vm)
        replayer.index = len(run.steps)
        try:
            step = replayer.step(SetRegion(region))
        except (ValueError, TypeError) as exc:
            die(f"--request: {exc}")
        e = explain_step(step, profile)
        e["after"] = len(run.steps)
        if args.json:
            emit_json({"file": args.file, "profile": profile.name, "after": len(run.steps),
                       "explained": [e], "malformed_lines": bad_lines})
        else:
            if args.file is not None:
                print(f"after {len(run.steps)} operation(s) of {args.file} "
                      f"({len(run.vm.memslots(0))} slot(s) in address space 0):")
            print_explanation(e)
            for text in bad_lines:
                render.line(f"skipped malformed line: {text}", "yellow")
    finally:
        run.close()
    return EXIT_OK


def _alloc_line(sign: str, a: dict[str, Any]) -> str:
    where = a["allocator"]
    if a["vmalloc_bytes"]:
        where += f", {human_bytes(a['vmalloc_bytes'])} of vmalloc pages"
    return (f"    {sign} {a['array']:<15} slot {a['owner']:<7} {a['entries']} x "
            f"{a['entry_size']} B = {a['bytes']} B ({where})")


def print_explanation(e: dict[str, Any]) -> None:
    """The text form of one :func:`explain_step` record."""
    where = f"#{e['index']}" + (f" (line {e['line']})" if e["line"] else "")
    change = e.get("change") or ("(refused before classification)" if e["op"] == "set"
                                  else e["op"])
    render.heading(f"{where}  {change}  {e['text']}")
    if e["note"]:
        print(f"  note        {e['note']}")
    if e["errno"] is None:
        print(f"  result      not performed: {e.get('message') or 'backend cannot'}")
        return
    outcome = "ok" if e["errno"] == 0 else f"{e['errno_name']} (errno {e['errno']})"
    recorded = "" if e["expect"] is None else f"; recorded {e['expect_name']}"
    style = "red" if e["problems"] else ("yellow" if e["errno"] else "green")
    render.line(f"  result      {outcome}{recorded}", style)
    for problem in e["problems"]:
        render.line(f"  MISMATCH    {problem}", "red")
    if "steps" not in e:
        if e.get("message"):
            print(f"  kernel      {e['message']}")
        return
    rule = e["rule"]
    if rule is not None:
        print(f"  rule        {rule['code']}: {rule['text']}")
        ref = f"{rule['function']}() in {rule['file']}"
        if rule["spec"]:
            ref += f"; {rule['spec']}"
        print(f"  kernel      {ref}")
    if e["detail"]:
        print(f"  detail      {e['detail']}")
    if e["hint"]:
        print(f"  hint        {e['hint']}")
    print(f"  steps       {' -> '.join(e['steps']) if e['steps'] else '-'}")
    if e["allocated"] or e["freed"]:
        print(f"  metadata    +{human_bytes(e['bytes_allocated'])} "
              f"-{human_bytes(e['bytes_freed'])} (net {e['net_bytes']:+} B, "
              f"VmallocUsed {e['vmalloc_delta']:+} B)")
        for a in e["allocated"]:
            print(_alloc_line("+", a))
        for a in e["freed"]:
            print(_alloc_line("-", a))
    else:
        print("  metadata    none allocated or freed")
    before, after = e["generation_before"], e["generation_after"]
    if before is None:
        print("  generation  - (no such address space)")
    elif before == after:
        print(f"  generation  {before} (unchanged)")
    else:
        print(f"  generation  {before} -> {after}")


COMMAND = Command(
    "explain",
    "explain each request (or one --request): change type, kernel steps, the rule that "
    "failed with errno and kernel source, metadata allocated/freed, generations",
    configure,
    run,
)

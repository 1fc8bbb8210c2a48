"""``memslot explain``: what KVM did with each request of a trace, or with one request given
on the command line (against the state a trace leaves)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

from ..harness.replay import Replayer, ReplayStep, StepHandler
from ..profile import Profile
from ..tools.explain import explain_step, parse_request
from ..tools.session import At, ModelRun, replay_model
from ..trace.records import SetRegion, TraceOp
from ..units import plural
from . import render
from .backends import add_profile_options, resolve_profile
from .common import EXIT_MISMATCH, EXIT_OK, Command, die, emit_json, human_bytes, json_default
from .filters import StepFilter, add_filter_options
from .replay_cmd import add_output_options
from .trace_input import Input, add_input_options, at_or_die, check_at


def configure(p: argparse.ArgumentParser) -> None:
    add_input_options(p, follow=True,
                      file_help="trace (memslot JSON lines or QEMU log, '-' for standard input, "
                                "explained as lines arrive); optional with --request, where it "
                                "gives the starting state")
    p.add_argument("--at", metavar="N",
                   help="explain operation N only (1-based; 'L37' is the operation from line "
                        "37); with --request: start from the state after operation N")
    p.add_argument("--request", nargs="+", metavar="KEY=VALUE",
                   help="explain one request: slot=ID|AS:ID gpa=ADDR size=BYTES ua=ADDR "
                        "flags=N|LOG_DIRTY_PAGES|READONLY [gmem=FD gmem_offset=N]; numbers in "
                        "decimal, 0x hex or 4K/2M/1G; size=0 (default) is a DELETE")
    add_profile_options(p, backend=False)
    add_output_options(p)
    add_filter_options(p)


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
    if args.file is None and args.request is None and args.follow is None:
        die("explain needs a trace FILE, a --request, or both")
    profile = resolve_profile(args.profile)
    region = None
    if args.request is not None:
        try:
            region = parse_request(args.request)
        except ValueError as exc:
            die(f"--request: {exc}")
    at = at_or_die(args.at)
    if region is not None:
        return _explain_request(args, profile, at, region)
    return _explain_trace(args, profile, at)


class _Explained:
    """Explanations printed as they come, in the chosen form."""

    def __init__(self, args: argparse.Namespace, streaming: bool) -> None:
        self.args = args
        self.flush = streaming or args.json_lines
        self.count = 0
        self.mismatched = 0

    def begin(self, head: dict[str, Any]) -> None:
        if self.args.json:
            text = json.dumps(head, indent=2, default=json_default)
            sys.stdout.write(text[:-2] + ',\n  "explained": [')

    def add(self, e: dict[str, Any]) -> None:
        self.mismatched += bool(e["problems"])
        if self.args.quiet:
            return
        if self.args.json:
            sys.stdout.write(("\n    " if not self.count else ",\n    ")
                             + json.dumps(e, default=json_default))
        elif self.args.json_lines:
            sys.stdout.write(json.dumps({"event": "explained", **e}, default=json_default)
                             + "\n")
        else:
            if self.count:
                print()
            print_explanation(e)
        self.count += 1
        if self.flush:
            sys.stdout.flush()

    def end(self, summary: dict[str, Any]) -> None:
        if self.args.json:
            body = json.dumps(summary, indent=2, default=json_default)
            sys.stdout.write(("\n  ]" if self.count else "]") + ",\n" + body[2:] + "\n")
        elif self.args.json_lines:
            sys.stdout.write(json.dumps({"event": "summary", **summary}, default=json_default)
                             + "\n")


def _replay(args: argparse.Namespace, profile: Profile, source: Input,
            ops: Iterator[TraceOp], on_step: StepHandler | None) -> ModelRun:
    try:
        with render.progress(source.size() or 0, "replaying",
                             not (args.json or args.json_lines or source.streaming),
                             unit="bytes") as update:
            return replay_model(render.tracked(ops, lambda: update(source.position())),
                                profile, None, args.variant, on_step=on_step)
    except ValueError as exc:  # an unknown --variant
        die(str(exc))


def _explain_trace(args: argparse.Namespace, profile: Profile, at: At | None) -> int:
    source = Input(args, validate=at is None)
    show = StepFilter(args)
    out = _Explained(args, source.streaming)
    out.begin({"file": source.path, "profile": profile.name, "at": args.at})
    last: list[ReplayStep] = []

    def on_step(step: ReplayStep) -> None:
        if at is not None:
            last[:] = [step]
        elif show(step):
            out.add(explain_step(step, profile))

    ops = iter(source)
    interrupted = False
    try:
        run = _replay(args, profile, source, at.take(ops) if at is not None else ops, on_step)
    except KeyboardInterrupt:
        if not source.streaming:
            raise
        interrupted = True
        run = None
    try:
        total = run.applied if run is not None else out.count
        if at is not None:
            total += sum(1 for _ in ops) + at.overshoot  # the rest, read but not explained
            check_at(at)
            if last and show(last[0]):
                out.add(explain_step(last[0], profile))
        notice = source.notice(total)
        if args.json or args.json_lines:
            out.end({"operations": total, "mismatches": out.mismatched,
                     "malformed_lines": source.malformed, "notice": notice})
        else:
            if not out.count:
                print("no request to explain" + (" (none failed)" if args.failed else "")
                      + (" (none matched the filters)" if show.active and not args.failed
                         else ""))
            if notice:
                render.line(notice, "yellow")
            for text in source.malformed:
                render.line(f"skipped malformed line: {text}", "yellow")
            if out.mismatched:
                render.line(f"{plural(out.mismatched, 'result')} "
                            f"{'differs' if out.mismatched == 1 else 'differ'} from the trace",
                            "red")
    finally:
        if run is not None:
            run.close()
    if interrupted:
        return 130
    return EXIT_MISMATCH if out.mismatched else EXIT_OK


def _explain_request(args: argparse.Namespace, profile: Profile, at: At | None,
                     region: Any) -> int:
    source = Input(args) if args.file is not None or args.follow is not None else None
    if source is None:
        run = _empty_run(args, profile)
    else:
        ops: Iterator[TraceOp] = iter(source)
        run = _replay(args, profile, source, at.take(ops) if at is not None else ops, None)
    try:
        check_at(at)
        replayer = Replayer(run.vm)
        replayer.index = run.applied
        try:
            step = replayer.step(SetRegion(region))
        except (ValueError, TypeError) as exc:
            die(f"--request: {exc}")
        e = explain_step(step, profile)
        e["after"] = run.applied
        bad = source.malformed if source is not None else []
        if args.json or args.json_lines:
            emit_json({"file": args.file, "profile": profile.name, "after": run.applied,
                       "explained": [e], "malformed_lines": bad})
        else:
            if source is not None:
                print(f"after {plural(run.applied, 'operation')} of {source.path} "
                      f"({plural(len(run.vm.memslots(0)), 'slot')} in address space 0):")
            print_explanation(e)
            for text in bad:
                render.line(f"skipped malformed line: {text}", "yellow")
    finally:
        run.close()
    return EXIT_OK


def _empty_run(args: argparse.Namespace, profile: Profile) -> ModelRun:
    try:
        return replay_model((), profile, None, args.variant)
    except ValueError as exc:  # an unknown --variant
        die(str(exc))


def _alloc_line(sign: str, a: dict[str, Any]) -> str:
    where = a["allocator"]
    if a["vmalloc_bytes"]:
        where += f", {human_bytes(a['vmalloc_bytes'])} of vmalloc pages"
    return (f"    {sign} {a['array']:<15} slot {a['owner']:<7} {a['entries']} x "
            f"{a['entry_size']} B = {a['bytes']} B ({where})")


def _say(text: str) -> None:
    """A line of an explanation, continued under its value column when wrapped."""
    render.line(text, indent=12)


def print_explanation(e: dict[str, Any]) -> None:
    """The text form of one :func:`explain_step` record."""
    where = f"#{e['index']}" + (f" (line {e['line']})" if e["line"] else "")
    change = e.get("change") or ("(refused before classification)" if e["op"] == "set"
                                  else e["op"])
    render.heading(f"{where}  {change}  {e['text']}")
    if e["note"]:
        _say(f"  note        {e['note']}")
    if e["errno"] is None:
        _say(f"  result      not performed: {e.get('message') or 'backend cannot'}")
        return
    outcome = "ok" if e["errno"] == 0 else f"{e['errno_name']} (errno {e['errno']})"
    recorded = "" if e["expect"] is None else f"; recorded {e['expect_name']}"
    style = "red" if e["problems"] else ("yellow" if e["errno"] else "green")
    render.line(f"  result      {outcome}{recorded}", style, indent=12)
    for problem in e["problems"]:
        render.line(f"  MISMATCH    {problem}", "red", indent=12)
    if "steps" not in e:
        if e.get("message"):
            _say(f"  kernel      {e['message']}")
        return
    rule = e["rule"]
    if rule is not None:
        _say(f"  rule        {rule['code']}: {rule['text']}")
        ref = f"{rule['function']}() in {rule['file']}"
        if rule["spec"]:
            ref += f"; {rule['spec']}"
        _say(f"  kernel      {ref}")
    if e["detail"]:
        _say(f"  detail      {e['detail']}")
    if e["hint"]:
        _say(f"  hint        {e['hint']}")
    _say(f"  steps       {' -> '.join(e['steps']) if e['steps'] else '-'}")
    if e["allocated"] or e["freed"]:
        _say(f"  metadata    +{human_bytes(e['bytes_allocated'])} "
              f"-{human_bytes(e['bytes_freed'])} (net {e['net_bytes']:+} B, "
              f"VmallocUsed {e['vmalloc_delta']:+} B)")
        for a in e["allocated"]:
            _say(_alloc_line("+", a))
        for a in e["freed"]:
            _say(_alloc_line("-", a))
    else:
        _say("  metadata    none allocated or freed")
    before, after = e["generation_before"], e["generation_after"]
    if before is None:
        _say("  generation  - (no such address space)")
    elif before == after:
        _say(f"  generation  {before} (unchanged)")
    else:
        _say(f"  generation  {before} -> {after}")


COMMAND = Command(
    "explain",
    "explain each request (or one --request): change type, kernel steps, the rule that "
    "failed with errno and kernel source, metadata allocated/freed, generations",
    configure,
    run,
)

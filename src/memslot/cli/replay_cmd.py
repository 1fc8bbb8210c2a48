"""``memslot replay FILE``: replay a trace and compare each result with the recorded one.

The trace is a stream: each line is applied as it is read (from a file, from standard input as
lines arrive, or ``--follow`` a growing log) and nothing is kept but counts, so memory is the
live state's, whatever the length of the trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from ..backends.base import VM, ModelIntrospection
from ..backends.budget import KernelMemoryBudget, KernelMemoryLimitError
from ..engine.slot import MemorySlot
from ..harness.replay import Replayer, ReplayStep, Tally, describe_op
from ..trace.records import TraceOp
from ..units import human_bytes
from . import render
from .backends import add_profile_options, make_vm, resolve_backend_profile
from .common import EXIT_MISMATCH, EXIT_OK, Command, die, json_default
from .filters import StepFilter, add_filter_options
from .trace_input import Input, add_input_options

EXIT_INTERRUPTED = 130


def configure(p: argparse.ArgumentParser) -> None:
    add_input_options(p, follow=True)
    add_profile_options(p)
    add_output_options(p)
    p.add_argument("--check", action="store_true",
                   help="run the model's integrity check after every request")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 also when the input holds no operation")
    add_filter_options(p)
    p.add_argument("--kernel-memory-limit", metavar="SIZE", type=_size, default=None,
                   help="with --backend kvm/both, refuse a request whose memslot metadata the "
                        "model predicts would take the kernel past SIZE (e.g. 8G; default: an "
                        "eighth of this machine's memory)")


def _size(text: str) -> int:
    from ..backends.budget import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_output_options(p: argparse.ArgumentParser) -> None:
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="one JSON document (streamed: the steps as they happen, then the "
                          "summary)")
    out.add_argument("--json-lines", action="store_true",
                     help="events, one JSON object per line, flushed: a 'step' per request, "
                          "'malformed' per skipped line, a 'summary' at the end")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no per-request output: only the summary (text, --json or "
                        "--json-lines)")


def _model(vm: VM) -> ModelIntrospection | None:
    """The model's introspection, when the backend has it (``None`` otherwise)."""
    return vm if isinstance(vm, ModelIntrospection) else None


def _all_slots(vm: VM) -> list[MemorySlot]:
    """Every slot of ``vm``; none once the trace closed its fd (``close_vm``)."""
    if vm.closed:
        return []
    return [s for as_id in range(vm.nr_address_spaces) for s in vm.memslots(as_id)]


def slot_table_rows(vms: dict[int, VM]) -> tuple[list[list[str]], list[str]]:
    """The final slots of every VM of the trace (a ``vm`` column when there are several)."""
    from ..constants import flag_names

    several = len(vms) > 1
    headers = ["as", "id", "gpa", "size", "userspace_addr", "flags"]
    with_metadata = all(_model(vm) is not None for vm in vms.values())
    if with_metadata:
        headers += ["metadata", "vmalloc"]
    if several:
        headers.insert(0, "vm")
    rows = []
    for number, vm in sorted(vms.items()):
        model = _model(vm)
        for s in _all_slots(vm):
            row = [str(s.as_id), str(s.id), f"{s.guest_phys_addr:#x}",
                   human_bytes(s.memory_size), f"{s.userspace_addr:#x}", flag_names(s.flags)]
            if with_metadata and model is not None:
                size, vmalloc = model.slot_metadata_bytes(s)
                row += [human_bytes(size), human_bytes(vmalloc)]
            if several:
                row.insert(0, str(number))
            rows.append(row)
    return rows, headers


class _Output:
    """Where per-request results go, in the chosen form."""

    def __init__(self, args: argparse.Namespace, streaming: bool, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.flush = streaming or args.json_lines
        self.width = render.width(out)
        self.colour = render.fancy(out)
        self.steps_open = False

    def begin(self, head: dict[str, Any]) -> None:
        if self.args.json:
            text = json.dumps(head, indent=2, default=json_default)
            self.out.write(text[:-2])  # the object left open: steps and the summary follow
            if not self.args.quiet:
                self.out.write(',\n  "steps": [')
                self.steps_open = True
            self._flush()

    def step(self, step: ReplayStep, first: bool) -> None:
        if self.args.json:
            self.out.write(("\n    " if first else ",\n    ")
                           + json.dumps(step.as_dict(), default=json_default))
        elif self.args.json_lines:
            self.out.write(json.dumps({"event": "step", **step.as_dict()},
                                      default=json_default) + "\n")
        elif self.colour:
            render.line("\n".join(format_step(step, self.width)), _style(step), self.out)
        else:
            self.out.write("\n".join(format_step(step, self.width)) + "\n")
        self._flush()

    def malformed(self, text: str) -> None:
        if self.args.json_lines:
            self.out.write(json.dumps({"event": "malformed", "error": text}) + "\n")
            self._flush()

    def end(self, summary: dict[str, Any]) -> None:
        if self.args.json:
            if self.steps_open:
                self.out.write("\n  ]")
            body = json.dumps(summary, indent=2, default=json_default)
            self.out.write(",\n" + body[2:] + "\n" if summary else "\n}\n")
        elif self.args.json_lines:
            self.out.write(json.dumps({"event": "summary", **summary}, default=json_default)
                           + "\n")
        self._flush()

    def _flush(self) -> None:
        if self.flush:
            self.out.flush()


def _style(step: ReplayStep) -> str:
    if step.problems:
        return "red"
    if step.errno:
        return "yellow"
    return "" if step.errno is None else "green"


def run(args: argparse.Namespace) -> int:
    per_request = not args.quiet
    source = Input(args, validate=per_request)
    profile = resolve_backend_profile(args.backend, args.profile)
    vm = make_vm(args.backend, profile, args.variant)
    out = _Output(args, source.streaming, sys.stdout)
    show = StepFilter(args)
    tally = Tally()
    interrupted = False
    budget = None
    if args.backend != "model":
        budget = KernelMemoryBudget(profile, args.kernel_memory_limit)
    replayer = Replayer(vm, check=args.check, budget=budget)
    current: list[TraceOp | None] = [None]
    try:
        out.begin({"file": source.path, "profile": profile.name, "backend": args.backend,
                   "variants": args.variant})
        seen_errors = 0
        shown = 0

        def on_step(step: ReplayStep) -> None:
            nonlocal seen_errors, shown
            if len(source.errors) > seen_errors:
                for text in source.malformed[seen_errors:]:
                    out.malformed(text)
                seen_errors = len(source.errors)
            if show(step):
                out.step(step, shown == 0)
                shown += 1

        handler: Callable[[ReplayStep], None] | None = on_step if per_request else None
        try:
            with render.progress(source.size() or 0, "replaying",
                                 not (args.json or args.json_lines or source.streaming),
                                 unit="bytes") as update:
                # (quiet on the model: the JSON-lines parser itself, its plain requests
                # replayed without a record; the line of the request in progress is needed
                # only to name it when the kernel-memory budget refuses it)
                parser = source.json_lines() if handler is None and budget is None else None
                ops = (parser if parser is not None else iter(source) if budget is None
                       else _current(iter(source), current))
                replayer.replay(ops, handler, tally, lambda: update(source.position()))
        except KernelMemoryLimitError as exc:
            op = current[0]
            die(f"{source.path}:{op.line if op is not None else 0}: {exc}")
        except KeyboardInterrupt:
            if source.follow is None and source.path != "-":
                raise
            interrupted = True
            source.stopped = "interrupted"
        vms = dict(replayer.vms)
        problems = _check(vms)
        notice = source.notice(tally.operations)
        if args.json or args.json_lines:
            out.end(_summary(vms, tally, source, problems, notice))
        else:
            print_summary(vms, tally, source.malformed, problems, notice, out.width,
                          source.stopped if source.follow is not None else None)
    finally:
        source.close()
        replayer.close()
        vm.close()
        if budget is not None:
            budget.close()
    if interrupted:
        return EXIT_INTERRUPTED
    if tally.mismatches or problems or (args.strict and tally.operations == 0):
        return EXIT_MISMATCH
    return EXIT_OK


def _current(ops: Iterator[TraceOp], current: list[TraceOp | None]) -> Iterator[TraceOp]:
    """``ops``, keeping the one being applied in ``current[0]`` (to name its line)."""
    for op in ops:
        current[0] = op
        yield op


def _check(vms: dict[int, VM]) -> list[str]:
    """``check()`` of every model VM (problems of VM N > 0 say which)."""
    problems = []
    for number, vm in sorted(vms.items()):
        model = _model(vm)
        if model is not None and not vm.closed:
            problems += [f"vm {number}: {p}" if number else p for p in model.check()]
    return problems


_KIND = {"get_dirty_log": "GET_LOG", "clear_dirty_log": "CLEAR_LOG",
         "enable_cap": "ENABLE_CAP", "mark_dirty": "WRITE", "create_vm": "CREATE_VM",
         "check_extension": "CHECK_EXT", "create_guest_memfd": "GMEM",
         "create_vcpu": "VCPU", "close_vcpu": "CLOSE_VCPU", "close_guest_memfd": "CLOSE_GMEM",
         "fork": "FORK", "close_vm": "CLOSE_VM"}


def format_step(step: ReplayStep, limit: int | None = None) -> list[str]:
    """One request as text: where, change, outcome and the request on the first line; the
    metadata allocated and freed, the failing rule and the note after it (on further lines
    when ``limit`` columns do not hold them)."""
    op = step.op
    where = f"L{op.line}" if op.line else f"#{step.index}"
    details = describe_op(op)
    if op.op == "set":
        kind = str(step.result.change) if step.result and step.result.change else "-"
    else:
        kind = _KIND[op.op]
        details = details.split(" ", 1)[1] if " " in details else details
    status = "skipped" if step.skipped else ("ok" if not step.errno else _name(step.errno or 0))
    head = f"{where:>6}  {kind:<10} {status:<7} {details}"
    parts = []
    r = step.result
    if r is not None:
        if r.bytes_allocated or r.bytes_freed:
            parts.append(f"[+{human_bytes(r.bytes_allocated)} -{human_bytes(r.bytes_freed)}]")
        if r.errno and r.rule is not None:
            parts.append(f"<- {r.rule.function}: {r.rule.text}")
    elif step.errno and step.message:
        parts.append(f"<- {step.message}")
    if op.note:
        parts.append(f"# {op.note}")
    lines = render.fit(head, parts, limit)
    for problem in step.problems:
        lines += render.fit(f"        MISMATCH: {problem}", [], limit)
    return lines


def _name(err: int) -> str:
    from ..errors import errno_name

    return errno_name(err)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def print_summary(
    vms: dict[int, VM],
    tally: Tally,
    bad_lines: list[str],
    problems: list[str],
    notice: str | None = None,
    limit: int | None = None,
    stopped: str | None = None,
) -> None:
    """The final slots of every VM, the counts, each model VM's metadata and the problems."""
    rows, headers = slot_table_rows(vms)
    if stopped:
        render.line(f"stopped following: {stopped}", "yellow")
    if notice:
        render.line(notice, "yellow")
    print()
    several = len(vms) > 1
    title = (f"final slots of {len(vms)} VMs ({len(rows)}):" if several
             else f"final slots ({len(rows)}):")
    numbers = {"size", "metadata", "vmalloc"}
    render.print_table(rows, headers, title=title, keys=2 if several else 1,
                       right={i for i, h in enumerate(headers) if h in numbers})
    print()
    print("\n".join(render.fit(
        f"{_plural(tally.operations, 'operation')}: {tally.ok} succeeded, {tally.refused} "
        f"refused, {tally.skipped} skipped, {tally.mismatches} mismatched "
        f"{'expectation' if tally.mismatches == 1 else 'expectations'}", [], limit)))
    for number, vm in sorted(vms.items()):
        model = _model(vm)
        if vm.closed:
            print(f"vm {number}: closed by the trace" if several else "the trace closed the VM")
        elif model is not None:
            print("\n".join(render.fit(
                (f"vm {number} " if several else "")
                + f"metadata: {human_bytes(model.metadata_bytes())} live "
                f"({_plural(model.metadata_bytes(), 'byte')}), VmallocUsed "
                f"{human_bytes(model.vmalloc_bytes())}, nr_memslot_pages "
                f"{_pages(vm)}, "
                + ", ".join(f"generation[{i}] {model.generation(i)}"
                            for i in range(vm.nr_address_spaces)), [], limit)))
    for line in bad_lines:
        render.line(f"skipped malformed line: {line}", "yellow")
    if problems:
        render.line(f"check() found {_plural(len(problems), 'problem')}:", "red")
        for problem in problems:
            print(f"  - {problem}")
    for step in tally.mismatched:
        render.line(f"MISMATCH at {'line ' + str(step.op.line) if step.op.line else step.index}: "
                    + "; ".join(step.problems), "red")
    if tally.mismatches > len(tally.mismatched):
        print(f"... and {tally.mismatches - len(tally.mismatched)} more mismatches")


def _pages(vm: VM) -> int:
    """``kvm->nr_memslot_pages``: the pages of every slot."""
    return sum(s.npages for s in _all_slots(vm))


def _totals(vm: VM) -> dict[str, Any] | None:
    model = _model(vm)
    if model is None:
        return None
    return {
        "metadata_bytes": model.metadata_bytes(),
        "vmalloc_bytes": model.vmalloc_bytes(),
        "nr_memslot_pages": _pages(vm),
        "generations": [model.generation(i) for i in range(vm.nr_address_spaces)],
    }


def _summary(
    vms: dict[int, VM], tally: Tally, source: Input, problems: list[str], notice: str | None
) -> dict[str, Any]:
    """The JSON summary: ``slots`` of every VM (each names its ``vm``), ``totals`` of VM 0
    and, when the trace has several VMs, ``vms``: each one's slot count and totals."""
    slots = []
    for number, vm in sorted(vms.items()):
        model = _model(vm)
        for s in _all_slots(vm):
            entry: dict[str, Any] = {
                "vm": number, "as_id": s.as_id, "id": s.id, "base_gfn": s.base_gfn,
                "npages": s.npages, "guest_phys_addr": s.guest_phys_addr,
                "memory_size": s.memory_size, "userspace_addr": s.userspace_addr,
                "flags": s.flags,
            }
            if model is not None:
                entry["metadata"] = model.describe_metadata(s)
            slots.append(entry)
    out: dict[str, Any] = {
        "slots": slots,
        "operations": tally.operations,
        "outcomes": {"ok": tally.ok, "refused": tally.refused, "skipped": tally.skipped},
        "mismatches": tally.mismatches,
        "malformed_lines": source.malformed,
        "check": problems,
        "notice": notice,
    }
    if source.follow is not None:
        out["stopped"] = source.stopped
    totals = _totals(vms[0]) if 0 in vms and not vms[0].closed else None
    if totals is not None:
        out["totals"] = totals
    if len(vms) > 1:
        out["vms"] = [{"vm": n, "slots": sum(1 for s in slots if s["vm"] == n),
                       "totals": _totals(vm)} for n, vm in sorted(vms.items())]
    return out


COMMAND = Command("replay", "replay a memslot trace (JSON lines, QEMU or strace log) and compare "
                  "each result with the recorded one", configure, run)

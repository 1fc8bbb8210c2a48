"""``memslot replay FILE``: replay a trace and compare each result with the recorded one."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..backends.base import VM
from ..backends.budget import KernelMemoryBudget, KernelMemoryLimitError
from ..backends.model import ModelVM
from ..engine.slot import MemorySlot
from ..harness.replay import Replayer, ReplayStep, describe_op
from ..trace.reader import FORMATS
from .backends import add_profile_options, make_vm, resolve_profile
from .common import EXIT_MISMATCH, EXIT_OK, Command, die, emit_json, human_bytes, table
from .trace_input import read_trace_or_die


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="trace: memslot JSON lines or a QEMU "
                   "kvm_set_user_memory log ('-' for stdin)")
    add_profile_options(p)
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--check", action="store_true",
                   help="run the model's integrity check after every request")
    p.add_argument("--keep-going", action="store_true",
                   help="skip malformed lines (reported) instead of refusing the whole file")
    p.add_argument("-q", "--quiet", action="store_true", help="only the final table and totals")
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


def _slot_rows(vm: VM) -> list[MemorySlot]:
    return [s for as_id in range(vm.nr_address_spaces) for s in vm.memslots(as_id)]


def slot_table_rows(vm: VM) -> tuple[list[list[str]], list[str]]:
    headers = ["as", "id", "gpa", "size", "userspace_addr", "flags"]
    model = isinstance(vm, ModelVM)
    if model:
        headers += ["metadata", "vmalloc"]
    rows = []
    for s in _slot_rows(vm):
        from ..constants import flag_names

        row = [str(s.as_id), str(s.id), f"{s.guest_phys_addr:#x}", human_bytes(s.memory_size),
               f"{s.userspace_addr:#x}", flag_names(s.flags)]
        if model:
            assert isinstance(vm, ModelVM)
            d = vm.describe_metadata(s)
            row += [human_bytes(d["bytes"]), human_bytes(d["vmalloc_bytes"])]
        rows.append(row)
    return rows, headers


def _progress(done: int, total: int, start: float) -> None:
    rate = done / max(time.monotonic() - start, 1e-6)
    sys.stderr.write(f"\r  replaying {done}/{total} ({rate:,.0f} ops/s)")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    profile = resolve_profile(args.profile)
    ops, bad_lines = read_trace_or_die(args.file, args.format, args.keep_going)
    vm = make_vm(args.backend, profile, args.variant)
    steps: list[ReplayStep] = []
    show_progress = not args.json and sys.stderr.isatty() and len(ops) > 2000
    budget = None
    if args.backend != "model":
        budget = KernelMemoryBudget(profile, args.kernel_memory_limit)
    replayer = Replayer(vm, check=args.check, budget=budget)
    try:
        start = time.monotonic()
        for i, op in enumerate(ops):
            try:
                step = replayer.step(op)
            except KernelMemoryLimitError as exc:
                die(f"{args.file}:{op.line or i + 1}: {exc}")
            steps.append(step)
            if not args.json and not args.quiet:
                print(format_step(step))
            if show_progress and i % 1000 == 0:
                _progress(i, len(ops), start)
        if show_progress:
            sys.stderr.write("\r" + " " * 60 + "\r")
        variant_problems = vm.check() if isinstance(vm, ModelVM) else []
        mismatches = [s for s in steps if s.mismatch]
        if args.json:
            emit_json(_report(vm, profile.name, args, steps, mismatches, bad_lines,
                              variant_problems))
        else:
            print_summary(vm, steps, mismatches, bad_lines, variant_problems)
    finally:
        replayer.close()
        vm.close()
        if budget is not None:
            budget.close()
    return EXIT_MISMATCH if mismatches else EXIT_OK


_KIND = {"get_dirty_log": "GET_LOG", "clear_dirty_log": "CLEAR_LOG",
         "enable_cap": "ENABLE_CAP", "mark_dirty": "WRITE", "create_vm": "CREATE_VM",
         "check_extension": "CHECK_EXT", "create_guest_memfd": "GMEM"}


def format_step(step: ReplayStep) -> str:
    op = step.op
    where = f"L{op.line}" if op.line else f"#{step.index}"
    details = describe_op(op)
    if op.op == "set":
        kind = str(step.result.change) if step.result and step.result.change else "-"
    else:
        kind = _KIND[op.op]
        details = details.split(" ", 1)[1] if " " in details else details
    status = "skipped" if step.skipped else ("ok" if not step.errno else _name(step.errno or 0))
    text = f"{where:>6}  {kind:<10} {status:<7} {details}"
    r = step.result
    if r is not None:
        if r.bytes_allocated or r.bytes_freed:
            text += f"  [+{human_bytes(r.bytes_allocated)} -{human_bytes(r.bytes_freed)}]"
        if r.errno and r.rule is not None:
            text += f"  <- {r.rule.function}: {r.rule.text}"
    elif step.errno and step.message:
        text += f"  <- {step.message}"
    if op.note:
        text += f"  # {op.note}"
    for problem in step.problems:
        text += f"\n        MISMATCH: {problem}"
    return text


def _name(err: int) -> str:
    from ..errors import errno_name

    return errno_name(err)


def print_summary(
    vm: VM,
    steps: list[ReplayStep],
    mismatches: list[ReplayStep],
    bad_lines: list[str],
    variant_problems: list[str],
) -> None:
    rows, headers = slot_table_rows(vm)
    print()
    print(f"final slots ({len(rows)}):")
    table(rows, headers)
    ok = sum(1 for s in steps if s.errno == 0)
    failed = sum(1 for s in steps if s.errno)
    skipped = sum(1 for s in steps if s.skipped)
    print()
    print(f"{len(steps)} operations: {ok} succeeded, {failed} refused, {skipped} skipped, "
          f"{len(mismatches)} mismatched expectations")
    if isinstance(vm, ModelVM):
        print(f"metadata: {human_bytes(vm.metadata_bytes())} live "
              f"({vm.metadata_bytes()} bytes), VmallocUsed {human_bytes(vm.vmalloc_bytes())}, "
              f"nr_memslot_pages {vm.nr_memslot_pages}, "
              + ", ".join(f"generation[{i}] {vm.generation(i)}"
                          for i in range(vm.nr_address_spaces)))
    for line in bad_lines:
        print(f"skipped malformed line: {line}")
    if variant_problems:
        print(f"check() found {len(variant_problems)} problem(s):")
        for problem in variant_problems:
            print(f"  - {problem}")
    for step in mismatches:
        print(f"MISMATCH at {'line ' + str(step.op.line) if step.op.line else step.index}: "
              + "; ".join(step.problems))


def _report(
    vm: VM,
    profile: str,
    args: argparse.Namespace,
    steps: list[ReplayStep],
    mismatches: list[ReplayStep],
    bad_lines: list[str],
    variant_problems: list[str],
) -> dict[str, Any]:
    slots = []
    for s in _slot_rows(vm):
        entry: dict[str, Any] = {
            "as_id": s.as_id, "id": s.id, "base_gfn": s.base_gfn, "npages": s.npages,
            "guest_phys_addr": s.guest_phys_addr, "memory_size": s.memory_size,
            "userspace_addr": s.userspace_addr, "flags": s.flags,
        }
        if isinstance(vm, ModelVM):
            entry["metadata"] = vm.describe_metadata(s)
        slots.append(entry)
    out: dict[str, Any] = {
        "file": args.file,
        "profile": profile,
        "backend": args.backend,
        "variants": args.variant,
        "steps": [s.as_dict() for s in steps],
        "slots": slots,
        "mismatches": len(mismatches),
        "malformed_lines": bad_lines,
        "check": variant_problems,
    }
    if isinstance(vm, ModelVM):
        out["totals"] = {
            "metadata_bytes": vm.metadata_bytes(),
            "vmalloc_bytes": vm.vmalloc_bytes(),
            "nr_memslot_pages": vm.nr_memslot_pages,
            "generations": [vm.generation(i) for i in range(vm.nr_address_spaces)],
        }
    return out


COMMAND = Command("replay", "replay a memslot trace (JSON lines or QEMU trace) and compare "
                  "each result with the recorded one", configure, run)

"""Which requests a command shows: ``--slot``, ``--as``, ``--gpa-range``, ``--failed`` (as
kvm_stat's and perf's filters do). Every request is still applied; only the output is
filtered."""

from __future__ import annotations

import argparse

from ..harness.replay import ReplayStep
from ..tools.explain import parse_number
from ..trace.records import ClearDirtyLog, GetDirtyLog, MarkDirty, SetRegion
from .common import die


def add_filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slot", action="append", default=[], metavar="ID|AS:ID",
                   help="show only requests on these slots (repeatable, or comma-separated)")
    p.add_argument("--as", dest="address_space", action="append", type=int, default=[],
                   metavar="N", help="show only requests in address space N (repeatable)")
    p.add_argument("--gpa-range", metavar="START-END|START+SIZE",
                   help="show only requests whose guest-physical range meets [START, END) "
                        "(numbers in decimal, 0x hex or 4K/2M/1G)")
    p.add_argument("--failed", action="store_true",
                   help="show only requests that were refused or differ from the trace")


class StepFilter:
    """The filter options as a predicate on replay steps. It follows the slots the trace
    creates, moves and deletes, so a dirty-log call is placed at its slot's range."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.failed: bool = args.failed
        self.slots: set[tuple[int | None, int]] = set()
        for text in args.slot:
            for part in text.split(","):
                self.slots.add(_slot(part))
        self.spaces = set(args.address_space)
        if any(a < 0 or a > 0xFFFF for a in self.spaces):
            die("--as: an address space is a number from 0 to 65535")
        self.range = gpa_range(args.gpa_range) if args.gpa_range else None
        self.active = bool(self.failed or self.slots or self.spaces or self.range)
        self._where: dict[tuple[int, int], tuple[int, int]] = {}  # live slot -> [start, end)

    def __call__(self, step: ReplayStep) -> bool:
        """Whether to show ``step`` (call it for every step, in order)."""
        as_id, slot_id, span = self._place(step)
        if not self.active:
            return True
        if self.failed and not (step.errno or step.problems):
            return False
        if self.spaces and as_id not in self.spaces:
            return False
        if self.slots and not ({(as_id, slot_id), (None, slot_id)} & self.slots):
            return False
        if self.range is not None:
            if span is None:
                return False
            start, end = span
            lo, hi = self.range
            if not (start < hi and lo < max(end, start + 1)):
                return False
        return True

    def _place(self, step: ReplayStep) -> tuple[int | None, int | None, tuple[int, int] | None]:
        """(address space, slot id, gpa range) of a step, tracking live slots."""
        op = step.op
        if isinstance(op, SetRegion):
            r = op.region
            key = (r.as_id, r.id)
            old = self._where.get(key)
            span = (r.guest_phys_addr, r.guest_phys_addr + r.memory_size)
            if step.errno == 0:
                if r.memory_size:
                    self._where[key] = span
                else:
                    self._where.pop(key, None)
            return r.as_id, r.id, (old if r.memory_size == 0 and old else span)
        if isinstance(op, GetDirtyLog | ClearDirtyLog):
            key = (op.slot >> 16, op.slot & 0xFFFF)
            return key[0], key[1], self._where.get(key)
        if isinstance(op, MarkDirty):
            return op.as_id, None, None
        return None, None, None


def _slot(text: str) -> tuple[int | None, int]:
    raw = text.strip()
    try:
        if ":" in raw:
            a, i = raw.split(":", 1)
            return int(a, 0), int(i, 0)
        return None, int(raw, 0)
    except ValueError:
        die(f"--slot {text!r}: expected ID or AS:ID")


def gpa_range(text: str, option: str = "--gpa-range") -> tuple[int, int]:
    """``START-END`` or ``START+SIZE`` -> ``(start, end)``, end exclusive."""
    try:
        if "+" in text:
            a, size = text.split("+", 1)
            start = parse_number(a, "start")
            end = start + parse_number(size, "size")
        elif "-" in text:
            a, b = text.split("-", 1)
            start, end = parse_number(a, "start"), parse_number(b, "end")
        else:
            raise ValueError("expected START-END or START+SIZE")
    except ValueError as exc:
        die(f"{option} {text!r}: {exc}")
    if end <= start:
        die(f"{option} {text!r}: the end must be above the start")
    return start, end

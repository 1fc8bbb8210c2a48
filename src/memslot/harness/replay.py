"""Replay trace operations on any backend and compare each outcome with what was recorded."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import VM, FaultInjection
from ..backends.model import ModelVM
from ..engine.dirty import dirty_bitmap_bytes
from ..engine.result import OpResult
from ..errors import KvmError, errno_name
from ..trace.jsonl import to_object
from ..trace.records import (
    ClearDirtyLog,
    EnableCap,
    GetDirtyLog,
    MarkDirty,
    SetRegion,
    TraceOp,
)


@dataclass(slots=True)
class ReplayStep:
    """The outcome of one operation. ``errno`` is ``None`` when the backend cannot perform
    the operation (e.g. a modelled guest write on the real kernel)."""

    index: int
    op: TraceOp
    errno: int | None
    result: OpResult | None = None
    data: bytes | None = None
    problems: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def skipped(self) -> bool:
        return self.errno is None

    @property
    def mismatch(self) -> bool:
        return bool(self.problems)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "line": self.op.line,
            "op": to_object(self.op),
            "errno": self.errno,
            "errno_name": None if self.errno is None else errno_name(self.errno),
            "mismatch": self.mismatch,
        }
        if self.problems:
            out["problems"] = self.problems
        if self.message:
            out["message"] = self.message
        if self.result is not None:
            out["result"] = self.result.as_dict()
        if self.data is not None:
            out["dirty_log"] = self.data.hex()
        return out


class Replayer:
    """Apply operations one by one to ``vm``; with ``check=True`` (model only) run
    ``vm.check()`` after every operation and report violations as problems."""

    def __init__(self, vm: VM, check: bool = False) -> None:
        self.vm = vm
        self.check = check
        self.index = 0

    def run(self, ops: Iterable[TraceOp]) -> Iterator[ReplayStep]:
        for op in ops:
            yield self.step(op)

    def step(self, op: TraceOp) -> ReplayStep:
        self.index += 1
        step = self._perform(op)
        if op.expect is not None and step.errno is not None and step.errno != op.expect:
            step.problems.append(
                f"expected {errno_name(op.expect)}, got {errno_name(step.errno)}"
            )
        if self.check and isinstance(self.vm, ModelVM):
            step.problems.extend(f"check: {p}" for p in self.vm.check())
        return step

    def _perform(self, op: TraceOp) -> ReplayStep:
        vm = self.vm
        index = self.index
        if isinstance(op, SetRegion):
            if isinstance(vm, ModelVM):
                result = vm.submit(op.region)
                return ReplayStep(index, op, result.errno, result)
            return self._call(index, op, lambda: vm.apply(op.region))
        if isinstance(op, GetDirtyLog):
            step = self._call(index, op, lambda: vm.get_dirty_log(op.slot))
            if (
                step.errno == 0
                and op.expect_bitmap is not None
                and step.data != op.expect_bitmap
            ):
                got = step.data.hex() if step.data is not None else "-"
                step.problems.append(
                    f"dirty log {got} differs from the recorded {op.expect_bitmap.hex()}"
                )
            return step
        if isinstance(op, ClearDirtyLog):
            bitmap = op.bitmap
            if bitmap == b"":
                bitmap = b"\xff" * dirty_bitmap_bytes(op.num_pages)
            return self._call(
                index, op, lambda: vm.clear_dirty_log(op.slot, op.first_page, op.num_pages, bitmap)
            )
        if isinstance(op, EnableCap):
            return self._call(index, op, lambda: vm.enable_cap(op.cap, *op.args, flags=op.flags))
        if isinstance(op, MarkDirty):
            if not isinstance(vm, FaultInjection):
                return ReplayStep(index, op, None, message="guest writes need the model")
            return self._call(index, op, lambda: vm.mark_page_dirty(op.gfn, op.as_id))
        raise TypeError(f"not a trace operation: {op!r}")

    @staticmethod
    def _call(index: int, op: TraceOp, fn: Any) -> ReplayStep:
        from ..backends.dual import Divergence

        try:
            value = fn()
        except KvmError as exc:
            return ReplayStep(index, op, exc.errno or 0, message=exc.rule or str(exc))
        except Divergence as exc:
            err = exc.kernel_errno if exc.kernel_errno is not None else 0
            return ReplayStep(index, op, err, problems=[f"divergence: {exc}"], message=str(exc))
        data = value if isinstance(value, bytes) else None
        return ReplayStep(index, op, 0, data=data)


def describe_op(op: TraceOp) -> str:
    """Short text of an operation for listings."""
    if isinstance(op, SetRegion):
        return op.region.describe()
    if isinstance(op, GetDirtyLog):
        return f"GET_DIRTY_LOG slot={op.slot >> 16}:{op.slot & 0xFFFF}"
    if isinstance(op, ClearDirtyLog):
        return (f"CLEAR_DIRTY_LOG slot={op.slot >> 16}:{op.slot & 0xFFFF} "
                f"first={op.first_page} num={op.num_pages}")
    if isinstance(op, EnableCap):
        from ..constants import CAPABILITY_NAMES

        return f"ENABLE_CAP {CAPABILITY_NAMES.get(op.cap, op.cap)} args={list(op.args)}"
    return f"GUEST_WRITE gfn={op.gfn:#x} as={op.as_id}"

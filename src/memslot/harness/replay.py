"""Replay trace operations on any backend and compare each outcome with what was recorded.

A trace may act on several VMs (``op.vm``): the VM given is number 0, others are made on
first use as fresh VMs of the same backend (closed by :meth:`Replayer.close`). guest_memfd
descriptors the trace recorded (``CreateGuestMemfd.fd``) are mapped to the ones the replay
gets, per VM."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import VM, FaultInjection
from ..backends.budget import KernelMemoryBudget
from ..backends.model import ModelVM
from ..engine.dirty import dirty_bitmap_bytes
from ..engine.result import OpResult
from ..errors import KvmError, errno_name
from ..trace.jsonl import to_object
from ..trace.records import (
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVm,
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
    value: int | None = None
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
        if self.value is not None:
            out["value"] = self.value
        return out


class Replayer:
    """Apply operations one by one to ``vm``; with ``check=True`` (model only) run
    ``vm.check()`` after every operation and report violations as problems."""

    def __init__(self, vm: VM, check: bool = False,
                 budget: KernelMemoryBudget | None = None) -> None:
        self.vm = vm
        self.check = check
        self.budget = budget  # bounds what a non-model backend's kernel is asked to allocate
        self.index = 0
        self.vms: dict[int, VM] = {0: vm}
        self._gmem: dict[tuple[int, int], int] = {}

    def close(self) -> None:
        """Close the VMs this replayer made (not the one it was given)."""
        for number, vm in list(self.vms.items()):
            if number:
                vm.close()
                del self.vms[number]

    def _vm_for(self, op: TraceOp) -> VM | None:
        vm = self.vms.get(op.vm)
        if vm is None:
            from ..errors import KvmUnavailable

            try:
                vm = _sibling(self.vm, op.vm_type if isinstance(op, CreateVm) else 0)
            except KvmUnavailable:
                return None
            self.vms[op.vm] = vm
        return vm

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
        vm = self.vms.get(op.vm)
        if self.check and isinstance(vm, ModelVM):
            step.problems.extend(f"check: {p}" for p in vm.check())
        return step

    def _perform(self, op: TraceOp) -> ReplayStep:
        index = self.index
        found = self._vm_for(op)
        if found is None:
            return ReplayStep(index, op, None, message=f"cannot make VM {op.vm} of the trace")
        vm = found
        if isinstance(op, SetRegion):
            region = op.region
            if region.guest_memfd is not None:
                fd = self._gmem.get((op.vm, region.guest_memfd), region.guest_memfd)
                region = region._replace(guest_memfd=fd)
            if isinstance(vm, ModelVM):
                result = vm.submit(region)
                return ReplayStep(index, op, result.errno, result)
            if self.budget is None:
                return self._call(index, op, lambda: vm.apply(region))
            cost = self.budget.admit(region)  # raises KernelMemoryLimitError
            step = self._call(index, op, lambda: vm.apply(region))
            if step.errno == 0:
                self.budget.record(region, cost, owner=op.vm)
            return step
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
            if bitmap == b"":  # "all": as many mask bytes as the kernel can read, no more
                bitmap = b"\xff" * dirty_bitmap_bytes(_readable_pages(vm, op))
            return self._call(
                index, op, lambda: vm.clear_dirty_log(op.slot, op.first_page, op.num_pages, bitmap)
            )
        if isinstance(op, EnableCap):
            return self._call(index, op, lambda: vm.enable_cap(op.cap, *op.args, flags=op.flags))
        if isinstance(op, CreateVm):
            if op.expect:
                return ReplayStep(index, op, None, message="a failed KVM_CREATE_VM is not redone")
            return ReplayStep(index, op, 0)
        if isinstance(op, CheckExtension):
            check = vm.check_system_extension if op.system else vm.check_extension
            step = self._call(index, op, lambda: check(op.cap))
            if step.errno == 0 and op.value is not None and step.value != op.value:
                step.problems.append(f"value {step.value}, recorded {op.value}")
            return step
        if isinstance(op, CreateGuestMemfd):
            step = self._call(index, op, lambda: vm.create_guest_memfd(op.size, op.flags))
            if step.errno == 0 and op.fd is not None and step.value is not None:
                self._gmem[(op.vm, op.fd)] = step.value
            return step
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
        if isinstance(value, bytes):
            return ReplayStep(index, op, 0, data=value)
        return ReplayStep(index, op, 0, value=value if isinstance(value, int) else None)


def _readable_pages(vm: VM, op: ClearDirtyLog) -> int:
    """Pages of mask ``KVM_CLEAR_DIRTY_LOG`` can read for ``op``: the kernel validates the
    range against the slot before it copies the mask (``kvm_clear_dirty_log_protect``), so a
    request past the slot (2^32 - 1 pages...) needs no mask at all, and a memory bomb in a
    trace line allocates nothing."""
    as_id, slot_id = op.slot >> 16, op.slot & 0xFFFF
    try:
        slot = vm.memslot(slot_id, as_id) if as_id < vm.nr_address_spaces else None
    except (ValueError, KvmError):
        slot = None
    if slot is None or op.first_page > slot.npages:
        return 0
    return min(op.num_pages, slot.npages - op.first_page)


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
    if isinstance(op, CheckExtension):
        from ..constants import CAPABILITY_NAMES

        where = " (system)" if op.system else ""
        return f"CHECK_EXTENSION {CAPABILITY_NAMES.get(op.cap, op.cap)}{where} = {op.value}"
    if isinstance(op, CreateGuestMemfd):
        return f"CREATE_GUEST_MEMFD size={op.size:#x} flags={op.flags:#x} fd={op.fd}"
    if isinstance(op, CreateVm):
        return f"CREATE_VM vm={op.vm} type={op.vm_type}"
    return f"GUEST_WRITE gfn={op.gfn:#x} as={op.as_id}"


def _sibling(vm: VM, vm_type: int) -> VM:
    """A fresh VM of the same backend as ``vm`` (another VM of the trace)."""
    from ..backends.dual import DualVM
    from ..backends.kvm import KvmVM

    if isinstance(vm, ModelVM):
        return ModelVM(vm.profile, variants=vm.variants)
    if isinstance(vm, KvmVM):
        return KvmVM(vm_type=vm_type)
    if isinstance(vm, DualVM) and isinstance(vm.model, ModelVM):
        return DualVM(ModelVM(vm.model.profile, variants=vm.model.variants), KvmVM(vm_type=vm_type))
    raise TypeError(f"cannot make another VM like {vm!r}")

"""Replay trace operations on any backend and compare each outcome with what was recorded.

:meth:`Replayer.step` performs one operation and returns its :class:`ReplayStep`;
:meth:`Replayer.replay` runs a whole stream of them keeping only counts (a :class:`Tally`), so
that memory does not grow with the trace, and builds a step only for the caller's ``on_step``
or for a result that differs from the trace.

A trace may act on several VMs (``op.vm``): the VM given is number 0, others are made on
first use as fresh VMs of the same backend (closed by :meth:`Replayer.close`). guest_memfd
descriptors the trace recorded (``CreateGuestMemfd.fd``) are mapped to the ones the replay
gets, per VM; a guest_memfd the trace names without its creation (a QEMU trace) is created on
first use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import VM, FaultInjection, ModelIntrospection
from ..backends.budget import KernelMemoryBudget
from ..backends.dual import Divergence
from ..engine.dirty import dirty_bitmap_bytes
from ..engine.result import OpResult
from ..errors import KvmError, errno_name
from ..request import MemoryRegion
from ..trace.jsonl import OPERATION, REQUEST, JsonLines, operations, to_object
from ..trace.records import (
    CheckExtension,
    ClearDirtyLog,
    CloseGuestMemfd,
    CloseVcpu,
    CloseVm,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableCap,
    Fork,
    GetDirtyLog,
    MarkDirty,
    SetRegion,
    TraceOp,
)
from .lifetime import ForkFailed, fork_and_call


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


#: Steps that differ from the trace kept by a :class:`Tally` (the rest are only counted).
KEEP_MISMATCHES = 100


@dataclass
class Tally:
    """Counts of a replay: operations, their outcomes, and the first mismatched steps."""

    operations: int = 0
    ok: int = 0
    refused: int = 0
    skipped: int = 0
    mismatches: int = 0
    mismatched: list[ReplayStep] = field(default_factory=list)

    def add(self, step: ReplayStep) -> None:
        self.operations += 1
        if step.errno is None:
            self.skipped += 1
        elif step.errno:
            self.refused += 1
        else:
            self.ok += 1
        if step.problems:
            self.mismatches += 1
            if len(self.mismatched) < KEEP_MISMATCHES:
                self.mismatched.append(step)


StepHandler = Callable[[ReplayStep], None]

#: Operations between two calls of :meth:`Replayer.replay`'s ``progress``.
PROGRESS_EVERY = 2000


#: Size of a guest_memfd created for one a trace names without its creation (the trace does
#: not say its size; the file is sparse, and the model keeps no memory for it).
GMEM_REPLAY_SIZE = 1 << 46


class Replayer:
    """Apply operations one by one to ``vm``; with ``check=True`` (a VM that can check its
    own invariants: the model) run ``vm.check()`` after every operation and report violations
    as problems.

    A QEMU trace names a VMM's guest_memfd fd numbers without their creation: the first request
    naming one creates a guest_memfd in the VM (``KVM_CREATE_GUEST_MEMFD``, sparse,
    :data:`GMEM_REPLAY_SIZE` bytes; closed with the VM) and every request naming it uses that
    one instead.
    """

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
                vm = self.vm.sibling(op.vm_type if isinstance(op, CreateVm) else 0)
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
            step.problems.append(_differs(op.expect, step.errno))
        if self.check:
            model = _introspection(self.vms.get(op.vm))
            if model is not None:
                step.problems.extend(f"check: {p}" for p in model.check())
        return step

    def replay(
        self,
        ops: Iterable[TraceOp] | JsonLines,
        on_step: StepHandler | None = None,
        tally: Tally | None = None,
        progress: Callable[[], None] | None = None,
    ) -> Tally:
        """Apply every operation of ``ops`` (a stream: nothing is kept but counts), calling
        ``on_step`` with each step when given and ``progress()`` every
        :data:`PROGRESS_EVERY` operations. ``ops`` may be a JSON-lines parser: its plain
        requests then go to the model without a record (nor a step, unless the result
        differs from the trace's)."""
        tally = tally if tally is not None else Tally()
        model = _introspection(self.vm)
        if isinstance(ops, JsonLines):
            if (model is not None and on_step is None and not self.check
                    and self.budget is None):
                return self._replay_lean(ops, model, tally, progress)
            ops = operations(ops)
        if model is None or on_step is not None or self.check or self.budget is not None:
            countdown = PROGRESS_EVERY
            for op in ops:
                step = self.step(op)
                tally.add(step)
                if on_step is not None:
                    on_step(step)
                countdown -= 1
                if countdown == 0:
                    countdown = PROGRESS_EVERY
                    if progress is not None:
                        progress()
            return tally
        return self._replay_ops_lean(ops, model, tally, progress)

    def _replay_ops_lean(self, ops: Iterable[TraceOp], model: ModelIntrospection, tally: Tally,
                         progress: Callable[[], None] | None) -> Tally:
        """The lean loop over records: a v1 request on the first VM whose result is what the
        trace recorded is counted, not kept; anything else goes through :meth:`step`."""
        submit = model.submit
        index = self.index
        ok = refused = 0
        countdown = PROGRESS_EVERY
        try:
            for op in ops:
                countdown -= 1
                if countdown == 0:
                    countdown = PROGRESS_EVERY
                    if progress is not None:
                        progress()
                if type(op) is SetRegion and not op.vm:
                    region = op.region
                    if region.guest_memfd is None:
                        index += 1
                        try:
                            result = submit(region)
                        except (KvmError, Divergence) as exc:
                            tally.add(_failed(index, op, exc))
                            continue
                        err = result.errno
                        expect = op.expect
                        if expect is None or err == expect:
                            if err:
                                refused += 1
                            else:
                                ok += 1
                            continue
                        step = ReplayStep(index, op, err, result)
                        step.problems.append(_differs(expect, err))
                        tally.add(step)
                        continue
                self.index = index
                tally.add(self.step(op))
                index = self.index
        finally:
            self.index = index
            tally.operations += ok + refused
            tally.ok += ok
            tally.refused += refused
        return tally

    def _replay_lean(self, parser: JsonLines, model: ModelIntrospection, tally: Tally,
                     progress: Callable[[], None] | None) -> Tally:
        """The lean loop: a plain request whose result is what the trace recorded is counted,
        not kept; anything else goes through :meth:`step`."""
        submit = model.submit
        index = self.index
        ok = refused = 0
        countdown = PROGRESS_EVERY
        try:
            while True:
                kind = parser.advance()
                if kind == REQUEST:
                    index += 1
                    try:
                        result = submit(parser.region)
                    except (KvmError, Divergence) as exc:
                        tally.add(_failed(index, parser.operation(kind), exc))
                    else:
                        err = result.errno
                        expect = parser.expect
                        if expect is None or err == expect:
                            if err:
                                refused += 1
                            else:
                                ok += 1
                        else:
                            step = ReplayStep(index, parser.operation(kind), err, result)
                            step.problems.append(_differs(expect, err))
                            tally.add(step)
                elif kind == OPERATION:
                    self.index = index
                    tally.add(self.step(parser.operation(kind)))
                    index = self.index
                else:
                    break
                countdown -= 1
                if countdown == 0:
                    countdown = PROGRESS_EVERY
                    if progress is not None:
                        progress()
        finally:
            self.index = index
            tally.operations += ok + refused
            tally.ok += ok
            tally.refused += refused
        return tally

    def _perform(self, op: TraceOp) -> ReplayStep:
        index = self.index
        found = self._vm_for(op)
        if found is None:
            return ReplayStep(index, op, None, message=f"cannot make VM {op.vm} of the trace")
        vm = found
        if isinstance(op, SetRegion):
            region = op.region if op.region.guest_memfd is None else self._gmem_for(op, vm)
            cost = self.budget.admit(region) if self.budget is not None else 0  # may raise
            model = _introspection(vm)
            if model is not None:
                step = self._call(index, op, lambda: model.submit(region))
            else:
                step = self._call(index, op, lambda: vm.apply(region))
            if self.budget is not None and step.errno == 0:
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
            injector = _injection(vm)
            if injector is None:
                return ReplayStep(index, op, None, message="guest writes need the model")
            return self._call(index, op, lambda: injector.mark_page_dirty(op.gfn, op.as_id))
        return self._lifetime(index, op, vm)

    def _lifetime(self, index: int, op: TraceOp, vm: VM) -> ReplayStep:
        """The lifetime operations: vCPUs and guest_memfds made and closed, forks, the VM
        closed. Every backend does them (a DualVM on both halves, compared)."""
        if isinstance(op, CreateVcpu):
            return self._call(index, op, lambda: vm.create_vcpu(op.vcpu_id))
        if isinstance(op, CloseVcpu):
            return self._call(index, op, lambda: vm.close_vcpu(op.vcpu_id))
        if isinstance(op, CloseGuestMemfd):
            # The one made in the recorded fd's place (its number stays mapped: a later
            # request naming it meets a closed fd, as the recording did).
            fd = self._gmem.get((op.vm, op.fd), op.fd)
            return self._call(index, op, lambda: vm.close_guest_memfd(fd))
        if isinstance(op, Fork):
            try:
                err = fork_and_call(vm, op.how, op.call)
            except ForkFailed as exc:
                return ReplayStep(index, op, None, problems=[f"divergence: {exc}"],
                                  message=str(exc))
            return ReplayStep(index, op, err)
        if isinstance(op, CloseVm):
            if op.how == "fd":
                return self._call(index, op, vm.close_vm_fd)
            return self._call(index, op, vm.close)
        raise TypeError(f"not a trace operation: {op!r}")

    def _gmem_for(self, op: SetRegion, vm: VM) -> MemoryRegion:
        """``op.region`` with its recorded guest_memfd replaced by the VM's own: the one the
        trace created (``CreateGuestMemfd``), or one created now for a trace that names the fd
        only (when that fails the request goes as recorded, and fails as it must)."""
        region = op.region
        recorded = region.guest_memfd
        assert recorded is not None
        fd = self._gmem.get((op.vm, recorded))
        if fd is None:
            try:
                fd = vm.create_guest_memfd(GMEM_REPLAY_SIZE)
            except (KvmError, ValueError):
                return region
            self._gmem[(op.vm, recorded)] = fd
        return region._replace(guest_memfd=fd)

    @staticmethod
    def _call(index: int, op: TraceOp, fn: Any) -> ReplayStep:
        try:
            value = fn()
        except (KvmError, Divergence) as exc:
            return _failed(index, op, exc)
        if isinstance(value, OpResult):
            return ReplayStep(index, op, value.errno, value)
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


# (``object`` parameters: compiled, a VM narrowed by isinstance() to a protocol became a type
# mypyc checks as None, and the model was refused with a TypeError)
def _introspection(vm: object) -> ModelIntrospection | None:
    """The model's introspection of ``vm``, when it has one."""
    return vm if isinstance(vm, ModelIntrospection) else None


def _injection(vm: object) -> FaultInjection | None:
    """``vm``'s fault injection (guest writes), when it has one."""
    return vm if isinstance(vm, FaultInjection) else None


def _failed(index: int, op: TraceOp, exc: KvmError | Divergence) -> ReplayStep:
    """The step of an operation that raised: the kernel's refusal, or a divergence between
    model and kernel (a problem, whatever the errno)."""
    if isinstance(exc, KvmError):
        return ReplayStep(index, op, exc.errno or 0, message=exc.rule or str(exc))
    err = exc.kernel_errno if exc.kernel_errno is not None else 0
    text = describe_divergence(exc)
    return ReplayStep(index, op, err, problems=[f"divergence: {text}"], message=text)


def describe_divergence(exc: Divergence) -> str:
    """A divergence as text; two slot sets as the slots only one side has, each as
    ``as:id gfn+npages flags ua`` rather than raw tuples."""
    m, k = exc.model, exc.kernel
    if isinstance(m, list) and isinstance(k, list) and all(
            isinstance(t, tuple) and len(t) == 6 for t in m + k):
        only_m = [t for t in m if t not in k]
        only_k = [t for t in k if t not in m]

        def show(slots: list[Any]) -> str:
            return ", ".join(f"{a}:{i} gfn {g:#x}+{n:#x} flags {f:#x} ua {u:#x}"
                             for a, i, g, n, f, u in slots) or "nothing"

        return f"{exc.what}: only the model has {show(only_m)}; only the kernel has {show(only_k)}"
    return str(exc)


def _differs(expect: int, got: int) -> str:
    return f"expected {errno_name(expect)}, got {errno_name(got)}"


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
    if isinstance(op, CreateVcpu):
        return f"CREATE_VCPU id={'next' if op.vcpu_id is None else op.vcpu_id}"
    if isinstance(op, CloseVcpu):
        return f"CLOSE_VCPU id={op.vcpu_id}"
    if isinstance(op, CloseGuestMemfd):
        return f"CLOSE_GUEST_MEMFD fd={op.fd}"
    if isinstance(op, Fork):
        return f"FORK {op.how}, child calls {op.call}"
    if isinstance(op, CloseVm):
        return "CLOSE_VM fd only" if op.how == "fd" else "CLOSE_VM fds"
    return f"GUEST_WRITE gfn={op.gfn:#x} as={op.as_id}"

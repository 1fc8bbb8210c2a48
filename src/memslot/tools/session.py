"""Replay a trace (a stream of operations) on the model, the common first step of every tool,
and ``--at``: where in the trace to stop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ..backends.model import ModelVM
from ..harness.replay import Replayer, StepHandler, Tally
from ..profile import Profile
from ..trace.reader import iter_trace
from ..trace.records import CloseVm, TraceFormatError, TraceOp
from ..units import plural

Progress = Callable[[int], None]


def load_trace(
    path: str, fmt: str = "auto", keep_going: bool = False
) -> tuple[list[TraceOp], list[TraceFormatError]]:
    """Every operation of a trace, read and validated before anything is applied (held in
    memory: for a library caller's convenience; the commands stream).

    Raises :class:`TraceFormatError` on the first malformed line; with ``keep_going`` such
    lines are skipped and returned as the second item instead.
    """
    errors = ErrorSample()
    ops = list(iter_trace(path, fmt, errors if keep_going else None))
    return ops, errors


class ErrorSample(list[TraceFormatError]):
    """What ``--keep-going`` keeps of the malformed lines: the first ``limit`` errors (without
    their tracebacks, which hold the parser's frames) and the count of all, so a file of bad
    lines costs bounded memory."""

    def __init__(self, limit: int = 100) -> None:
        super().__init__()
        self.limit = limit
        self.total = 0

    def append(self, error: TraceFormatError) -> None:
        self.total += 1
        if len(self) < self.limit:
            super().append(error.with_traceback(None))

    @property
    def omitted(self) -> int:
        """Malformed lines counted but not kept."""
        return self.total - len(self)


@dataclass
class At:
    """``--at``: stop after operation ``n`` (``line=False``), or after the last operation
    read from line ``n`` of the file (``line=True``)."""

    n: int
    line: bool = False
    text: str = ""
    #: Operations taken so far, whether the point was reached, and the operations read past
    #: it (``LN`` knows it is past line N only from the next operation).
    taken: int = 0
    reached: bool = False
    overshoot: int = 0

    @classmethod
    def parse(cls, text: str) -> At:
        """``N`` (1-based) or ``LN``; ``ValueError`` with a one-line message otherwise."""
        raw = text.strip()
        is_line = raw[:1] in ("L", "l")
        try:
            n = int(raw[1:], 10) if is_line else int(raw, 0)
        except ValueError:
            raise ValueError(f"--at {text}: expected N or LN (a line number)") from None
        if n < 1:
            raise ValueError(f"--at {text}: operations and lines count from 1")
        return cls(n, is_line, text)

    def take(self, ops: Iterable[TraceOp]) -> Iterator[TraceOp]:
        """The operations up to the point (reading no further than needed)."""
        for op in ops:
            if self.line:
                if op.line > self.n and self.reached:
                    self.overshoot = 1
                    return
                if op.line == self.n:
                    self.reached = True
            yield op
            self.taken += 1
            if not self.line and self.taken == self.n:
                self.reached = True
                return

    def problem(self) -> str | None:
        """Why the trace ended before the point, once it was read (``None`` if reached)."""
        if self.reached:
            return None
        if self.line:
            return f"--at {self.text}: no operation comes from line {self.n}"
        return f"--at {self.n}: the trace has {plural(self.taken, 'operation')}"


def parse_at(text: str, ops: list[TraceOp]) -> int:
    """``--at`` over a list of operations, as a count of operations. ``ValueError`` with a
    one-line message when it is malformed or past the end."""
    at = At.parse(text)
    for _ in at.take(ops):
        pass
    problem = at.problem()
    if problem is not None:
        raise ValueError(problem)
    return at.taken


@dataclass
class ModelRun:
    """A model VM after replaying (a prefix of) a trace, and the counts of its outcomes."""

    vm: ModelVM
    profile: Profile
    tally: Tally = field(default_factory=Tally)

    @property
    def applied(self) -> int:
        return self.tally.operations

    def close(self) -> None:
        self.vm.close()


def replay_model(
    ops: Iterable[TraceOp],
    profile: Profile,
    upto: int | None = None,
    variants: Iterable[str] = (),
    progress: Progress | None = None,
    on_step: StepHandler | None = None,
) -> ModelRun:
    """Replay ``ops`` (the first ``upto`` of them when given) on a fresh :class:`ModelVM`;
    ``on_step`` sees every step, ``progress`` is called with the count now and then. The run
    ends before a ``close_vm`` of the first VM: what the tools study is the VM it closed."""
    vm = ModelVM(profile, variants=variants)
    run = ModelRun(vm, profile)
    try:
        ops = _until_closed(ops)
        if upto is not None:
            ops = At(upto).take(ops)
        if progress is not None:
            ops = _counted(ops, progress)
        Replayer(vm).replay(ops, on_step, run.tally)
    except BaseException:
        vm.close()
        raise
    if progress is not None:
        progress(run.applied)
    return run


def _until_closed(ops: Iterable[TraceOp]) -> Iterator[TraceOp]:
    """``ops`` up to (not including) the first that closes VM 0."""
    for op in ops:
        if isinstance(op, CloseVm) and op.vm == 0:
            return
        yield op


def _counted(ops: Iterable[TraceOp], progress: Progress, every: int = 500) -> Iterator[TraceOp]:
    for i, op in enumerate(ops, 1):
        if i % every == 0:
            progress(i)
        yield op

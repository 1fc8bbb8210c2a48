"""Load a trace and replay it on the model, the common first step of every tool."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..backends.model import ModelVM
from ..harness.replay import Replayer, ReplayStep
from ..profile import Profile
from ..trace.reader import iter_trace
from ..trace.records import TraceFormatError, TraceOp

Progress = Callable[[int], None]


def load_trace(
    path: str, fmt: str = "auto", keep_going: bool = False
) -> tuple[list[TraceOp], list[TraceFormatError]]:
    """Every operation of a trace, read and validated before anything is applied.

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


def parse_at(text: str, ops: list[TraceOp]) -> int:
    """``--at`` as a count of operations: ``N`` (1-based operation number) or ``LN`` (the last
    operation read from line N of the file). ``ValueError`` with a one-line message otherwise."""
    raw = text.strip()
    if raw[:1] in ("L", "l"):
        try:
            line = int(raw[1:], 10)
        except ValueError:
            raise ValueError(f"--at {text!r}: expected N or LN (a line number)") from None
        found = [i for i, op in enumerate(ops, 1) if op.line == line]
        if not found:
            raise ValueError(f"--at {text!r}: no operation comes from line {line}")
        return found[-1]
    try:
        n = int(raw, 0)
    except ValueError:
        raise ValueError(f"--at {text!r}: expected N or LN (a line number)") from None
    if not 1 <= n <= len(ops):
        raise ValueError(f"--at {n}: the trace has {len(ops)} operation(s)")
    return n


@dataclass
class ModelRun:
    """A model VM after replaying (a prefix of) a trace, and the step of each operation."""

    vm: ModelVM
    profile: Profile
    steps: list[ReplayStep] = field(default_factory=list)

    @property
    def mismatches(self) -> list[ReplayStep]:
        return [s for s in self.steps if s.mismatch]

    def close(self) -> None:
        self.vm.close()


def replay_model(
    ops: Iterable[TraceOp],
    profile: Profile,
    upto: int | None = None,
    variants: Iterable[str] = (),
    progress: Progress | None = None,
) -> ModelRun:
    """Replay ``ops`` (the first ``upto`` of them when given) on a fresh :class:`ModelVM`."""
    vm = ModelVM(profile, variants=variants)
    run = ModelRun(vm, profile)
    replayer = Replayer(vm)
    for i, op in enumerate(ops, 1):
        if upto is not None and i > upto:
            break
        run.steps.append(replayer.step(op))
        if progress is not None and i % 500 == 0:
            progress(i)
    if progress is not None:
        progress(len(run.steps))
    return run

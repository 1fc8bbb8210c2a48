"""Lifetime operations as trace records (vCPUs made and closed, guest_memfds closed, forks,
the VM closed): the JSON-lines format reads and writes them, replay performs them on every
backend, and the fuzzer's reproducers carry them, so that a reproducer re-runs the sequence
that diverged."""

from __future__ import annotations

import errno
import io
import json
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import memslot
from memslot.backends.base import VM
from memslot.backends.dual import DualVM
from memslot.cli.main import main
from memslot.errors import KvmError
from memslot.harness import fuzz
from memslot.harness.replay import Replayer
from memslot.trace.jsonl import dumps, parse_lines
from memslot.trace.records import (
    CloseGuestMemfd,
    CloseVcpu,
    CloseVm,
    CreateVcpu,
    Fork,
    TraceFormatError,
)

LIFE = """\
{"op": "create_vcpu", "vcpu_id": null, "expect": 0}
{"op": "create_guest_memfd", "size": "0x200000", "flags": 0, "fd": 9, "expect": 0}
{"slot": 1, "flags": 4, "guest_phys_addr": "0x100000000", "memory_size": "0x200000", \
"userspace_addr": "0x7f0000000000", "guest_memfd": 9, "guest_memfd_offset": "0x0", "expect": 0}
{"op": "fork", "how": "os.fork", "call": "set_user_memory_region", "expect": "EIO"}
{"op": "fork", "how": "libc", "call": "check_system_extension", "expect": 0}
{"op": "create_vcpu", "vcpu_id": 0, "expect": "EEXIST"}
{"op": "close_vcpu", "vcpu_id": 0, "expect": 0}
{"op": "close_guest_memfd", "fd": 9, "expect": 0}
{"slot": 2, "flags": 4, "guest_phys_addr": "0x200000000", "memory_size": "0x200000", \
"userspace_addr": "0x7f0000000000", "guest_memfd": 9, "guest_memfd_offset": "0x0", \
"expect": "EBADF"}
{"op": "close_vm", "how": "fd", "expect": 0}
"""


def test_lifetime_records_round_trip_and_are_checked() -> None:
    ops = list(parse_lines(LIFE.splitlines()))
    assert [op.op for op in ops] == [
        "create_vcpu", "create_guest_memfd", "set", "fork", "fork", "create_vcpu", "close_vcpu",
        "close_guest_memfd", "set", "close_vm"]
    assert ops[0] == CreateVcpu(None, 0, 1)
    assert ops[3] == Fork("os.fork", "set_user_memory_region", errno.EIO, 4)
    assert ops[6:8] == [CloseVcpu(0, 0, 7), CloseGuestMemfd(9, 0, 8)]
    assert ops[-1] == CloseVm("fd", 0, 10)
    assert list(parse_lines([dumps(op) for op in ops])) == [
        op.__class__(**{**{f: getattr(op, f) for f in op.__dataclass_fields__
                           if f != "op"}, "line": i})
        for i, op in enumerate(ops, 1)]
    for line, message in [
        ('{"op": "fork", "how": "vfork", "call": "get_dirty_log"}', "'how' must be one of"),
        ('{"op": "fork", "how": "libc", "call": "reboot"}', "'call' must be one of"),
        ('{"op": "close_vcpu"}', "missing field 'vcpu_id'"),
        ('{"op": "close_vm", "how": "vm"}', "'how' must be one of fd, all"),
        ('{"op": "close_guest_memfd", "fd": -1}', "negative"),
    ]:
        with pytest.raises(TraceFormatError, match=message):
            list(parse_lines([line]))


def _model() -> VM:
    return memslot.ModelVM(memslot.detect_profile())


def _kvm() -> VM:
    return memslot.KvmVM()


def _dual() -> VM:
    return DualVM(memslot.ModelVM(memslot.detect_profile()), memslot.KvmVM())


@pytest.mark.kvm
@pytest.mark.parametrize("make", [_model, _kvm, _dual], ids=["model", "kvm", "dual"])
def test_replay_performs_lifetime_records_on_every_backend(make: Callable[[], VM]) -> None:
    vm = make()
    replayer = Replayer(vm)
    try:
        steps = [replayer.step(op) for op in parse_lines(LIFE.splitlines())]
    finally:
        replayer.close()
        vm.close()
    assert [(s.op.line, s.problems) for s in steps if s.problems or s.skipped] == []
    assert [s.errno for s in steps] == [0, 0, 0, errno.EIO, 0, errno.EEXIST, 0, 0, errno.EBADF,
                                        0]


@pytest.mark.kvm
def test_cli_replays_lifetime_records_and_a_closed_vm(tmp_path: Path) -> None:
    trace = tmp_path / "life.jsonl"
    trace.write_text(LIFE)
    for args in (["replay", "--backend", "both", "--profile", "detect"], ["report"],
                 ["explain"]):
        out = io.StringIO()
        with redirect_stdout(out):
            assert main([*args, str(trace)]) == 0, args
    assert "the trace closed the VM" in main_text(["replay", str(trace)])
    assert "after 9 of 10 operations" in main_text(["report", str(trace)])


def main_text(args: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        main(args)
    return out.getvalue()


class _Faulty(memslot.ModelVM):
    """A model standing in for the kernel that refuses vCPU creation (ENOMEM) from its third
    on, once a guest_memfd of the VM was closed."""

    def __init__(self, profile: memslot.Profile) -> None:
        super().__init__(profile)
        self.creations = 0
        self.gmem_closed = False

    def close_guest_memfd(self, fd: int) -> None:
        self.gmem_closed = True
        super().close_guest_memfd(fd)

    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        self.creations += 1
        if self.gmem_closed and self.creations >= 3:
            raise KvmError(errno.ENOMEM, "injected", "KVM_CREATE_VCPU")
        return super().create_vcpu(vcpu_id)


def test_a_fuzzer_reproducer_replays_the_lifetime_operations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A divergence at a lifetime operation: the reproducer's records (vCPUs, closes, forks
    included) re-run the sequence, and on the same pair the last one diverges again."""
    profile = memslot.get_profile("x86_64-shadow")

    def pair(profile: memslot.Profile, backend: str) -> tuple[VM, memslot.ModelVM]:
        model = memslot.ModelVM(profile)
        return DualVM(model, _Faulty(profile)), model

    monkeypatch.setattr(fuzz, "_pair", pair)
    report = fuzz.run_fuzz(4000, seed=5, profile=profile, backend="both")
    assert report.divergences, "the injected fault was never reached"
    text, lines = report.divergences[0]
    ops = list(parse_lines(lines))
    kinds = {op.op for op in ops}
    assert {"create_vcpu", "close_vcpu", "fork", "close_guest_memfd"} <= kinds
    assert ops[-1].op == "create_vcpu" and ops[-1].expect == errno.ENOMEM
    assert not any("note" in json.loads(line) for line in lines)  # records, not notes
    with DualVM(memslot.ModelVM(profile), _Faulty(profile)) as vm:
        replayer = Replayer(vm)
        steps = [replayer.step(op) for op in ops]
    assert [s.op.line for s in steps if s.problems] == [len(ops)]
    assert steps[-1].problems[0] == text

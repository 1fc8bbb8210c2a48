"""strace logs as a trace format: decoding, VMs kept apart by fd and process, malformed lines."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from memslot import ModelVM
from memslot.constants import KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_NR_MEMSLOTS
from memslot.harness.replay import Replayer
from memslot.request import MemoryRegion
from memslot.trace.jsonl import parse_object, to_object
from memslot.trace.reader import iter_trace, read_trace, sniff_format
from memslot.trace.records import (
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVm,
    EnableCap,
    GetDirtyLog,
    SetRegion,
    TraceFormatError,
    TraceOp,
)
from memslot.trace.strace import REQUESTS, format_dump, parse_dump_line, parse_strace

DATA = Path(__file__).parent / "data"
EXAMPLE = Path(__file__).parent.parent / "examples" / "traces" / "qemu72-q35-128m-S.strace"
VMS = DATA / "strace-vms.strace"
MALFORMED = DATA / "strace-malformed.strace"


def parse(text: str, errors: list[TraceFormatError] | None = None) -> list[TraceOp]:
    return list(parse_strace(text.splitlines(keepends=True), "t.strace", errors))


def test_fixture_decodes_every_call_and_keeps_vms_apart() -> None:
    ops = read_trace(str(VMS))  # auto-detected, though the execve line quotes a QEMU event
    assert ops == [
        CheckExtension(KVM_CAP_NR_MEMSLOTS, 32764, True, 0, 3),
        CreateVm(0, 0, 5, "", 0),
        SetRegion(MemoryRegion(0, 1, 0, 128 << 20, 0x7F0000000000), 0, 6, "", 0),
        # the forked child (no CLONE_FILES) makes its own VM on its own fd 4
        CreateVm(0, 0, 11, "", 1),
        # a thread (CLONE_FILES): the parent's VM; unfinished + resumed, line of the result
        SetRegion(MemoryRegion(1, 2, 0xFFFC0000, 262145, 0x7F0000200000), errno.EINVAL, 12,
                  "", 0),
        SetRegion(MemoryRegion(0, 0, 0, 0x10000, 0x7F0000300000), 0, 13, "", 1),
        SetRegion(MemoryRegion(1, 2, 0xFFFC0000, 0x40000, 0x7F0000200000), 0, 14, "", 0),
        EnableCap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, (3,), 0, 0, 15, "", 0),
        CreateGuestMemfd(0x400000, 0, 7, 0, 23, "", 0),
        SetRegion(MemoryRegion(3, 4, 1 << 32, 2 << 20, 0x7F0000400000, 0x1000, 7), 0, 28, "",
                  0),
        GetDirtyLog(0, 0, 39, "", None, 0),
        ClearDirtyLog(0, 0, 64, bytes.fromhex("ffffffff00000000"), 0, 41, "", 0),
        # fd 4 closed and made again: a new VM
        CreateVm(0, 0, 45, "", 2),
        SetRegion(MemoryRegion(5, 0, 0x100000, 4096, 0x7F0000500000), 0, 46, "", 2),
        CheckExtension(118, 0, False, 0, 48, "", 0),
    ]


def test_fixture_replays_on_the_model_with_every_result_matched() -> None:
    with ModelVM("x86_64-shadow") as vm:
        replayer = Replayer(vm)
        steps = [replayer.step(op) for op in read_trace(str(VMS))]
        try:
            assert [s.problems for s in steps if s.problems] == []
            assert sorted(replayer.vms) == [0, 1, 2]
            assert [s.id for s in replayer.vms[2].memslots()] == [5]
            made = next(s.value for s in steps if isinstance(s.op, CreateGuestMemfd))
            assert replayer.vms[0].memslots()[2].gmem == (made, 0x1000)  # the recorded 7, mapped
        finally:
            replayer.close()
        assert sorted(replayer.vms) == [0]


def test_committed_qemu_recording_equals_qemus_trace_of_the_same_run() -> None:
    """``memslot record`` of QEMU 7.2 q35 -S (examples/traces), next to the
    ``-trace kvm_set_user_memory`` log QEMU printed in that run."""
    from memslot.trace.qemu import parse_qemu_trace

    ops = read_trace(str(EXAMPLE))
    with open(EXAMPLE.with_suffix(".qemu.log")) as f:
        traced = [(op.region, op.expect) for op in parse_qemu_trace(f)
                  if isinstance(op, SetRegion)]
    assert len(traced) == 9
    assert [(op.region, op.expect) for op in ops if isinstance(op, SetRegion)] == traced
    with ModelVM("x86_64-shadow") as vm:
        replayer = Replayer(vm)
        assert [p for op in ops for p in replayer.step(op).problems] == []


def test_every_record_round_trips_through_json_lines() -> None:
    ops = read_trace(str(VMS))
    assert [parse_object(to_object(op), op.line) for op in ops] == ops


def test_sniffing_prefers_strace_over_quoted_qemu_events() -> None:
    assert sniff_format(['1 execve("/q", ["q", "-trace", "kvm_set_user_memory"], 0x1) = 0\n']) \
        == "strace"
    assert sniff_format(["kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x0 "
                         "ret=0\n"]) == "qemu"
    assert sniff_format(['{"slot": 0}\n']) == "jsonl"


def test_raw_prefixes_timestamps_and_fd_paths() -> None:
    text = (
        "[pid  77] 1700000000.000001 ioctl(9<anon_inode:kvm-vm>, 0x4020ae46, {slot=65537, "
        "flags=0x2, guest_phys_addr=0xd0000, memory_size=65536, userspace_addr=0x7f00}) = 0 "
        "(DELAYED) <0.000020>\n"
        "77 ioctl(10</dev/kvm<char 10:232>>, 0xae03, 0x3c /* KVM_CAP_??? */) = 1\n"
        "77 ioctl(11<anon_inode:kvm-vcpu:0>, KVM_ENABLE_CAP, 0x7ffd) = 0\n"
    )
    # An fd named a VM by -y but never seen being made (an attach): a VM of its own.
    assert parse(text) == [SetRegion(MemoryRegion(65537, 2, 0xD0000, 0x10000, 0x7F00), 0, 1)]


def test_threads_without_clone_lines_use_the_one_process_holding_the_fd() -> None:
    text = (
        "10 ioctl(3, KVM_CREATE_VM, 0) = 5\n"  # fd 3 unseen: /dev/kvm opened before the log
        "11 ioctl(5, KVM_SET_USER_MEMORY_REGION, {slot=0, flags=0, guest_phys_addr=0, "
        "memory_size=4096, userspace_addr=0x1000}) = 0\n"
    )
    ops = parse(text)
    assert [op.vm for op in ops] == [0, 0] and isinstance(ops[0], CreateVm)


def test_malformed_lines_name_file_line_and_cause() -> None:
    with pytest.raises(TraceFormatError, match=r"strace-malformed.strace:3: ioctl: truncated"):
        read_trace(str(MALFORMED))
    errors: list[TraceFormatError] = []
    ops = list(iter_trace(str(MALFORMED), "auto", errors))
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (3, "ioctl"),
        (4, "KVM_SET_USER_MEMORY_REGION"),
        (5, "KVM_SET_USER_MEMORY_REGION2"),
        (7, "dump offset 0x8, expected 0x0"),
        (6, "KVM_GET_DIRTY_LOG"),
        (8, "ioctl"),
    ]
    assert "memslot record" in errors[2].message
    assert "unknown errno EWHATEVER" in errors[5].message
    # the call the process died in: recorded with an unknown result
    assert ops[-2:] == [
        SetRegion(MemoryRegion(2, 0, 0x200000, 4096, 0x7F0000001000), 0, 9),
        SetRegion(MemoryRegion(3, 0, 0x300000, 4096, 0x7F0000002000), None, 10),
    ]


def test_short_dump_and_log_ending_inside_a_call() -> None:
    short = struct.pack("<IIQ", 1, 0, 0)
    text = ("1 ioctl(3, KVM_CREATE_VM, 0) = 4\n"
            "1 ioctl(4, KVM_CLEAR_DIRTY_LOG, 0x7ffd) = 0\n" + "".join(format_dump(short))
            + "1 ioctl(4, KVM_SET_USER_MEMORY_REGION, {slot=0, flags=0, guest_phys_addr=0, "
            "memory_size=4096, userspace_addr=0x1000} <unfinished ...>\n")
    errors: list[TraceFormatError] = []
    ops = parse(text, errors)
    assert [str(e) for e in errors] == ["t.strace:2: KVM_CLEAR_DIRTY_LOG: 16 argument bytes, "
                                        "need 24"]
    assert ops[-1] == SetRegion(MemoryRegion(0, 0, 0, 4096, 0x1000), None, 4)


def test_request_numbers_are_the_uapi_ones() -> None:
    from memslot.backends import uapi

    assert {name: getattr(uapi, name) for name in REQUESTS} == REQUESTS


def test_dump_lines_round_trip() -> None:
    data = bytes(range(40))
    lines = format_dump(data)
    assert len(lines) == 3
    got = b"".join(d[1] for d in map(parse_dump_line, lines) if d is not None)
    assert got == data
    assert parse_dump_line("not a dump\n") is None


def test_replay_shows_the_final_slots_of_every_vm(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from memslot.cli.main import main

    assert main(["replay", "-q", "--profile", "x86_64-shadow", str(VMS)]) == 0
    out = capsys.readouterr().out
    assert "final slots of 3 VMs (5):" in out
    table = out.split("final slots of 3 VMs (5):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0].split()[:3] == ["vm", "as", "id"]
    assert sorted((r.split()[0], r.split()[2]) for r in table[1:]) == [
        ("0", "0"), ("0", "1"), ("0", "3"), ("1", "0"), ("2", "5")]
    assert "vm 1 metadata:" in out and "vm 2 metadata:" in out
    assert main(["replay", "-q", "--json", "--profile", "x86_64-shadow", str(VMS)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted((s["vm"], s["as_id"], s["id"]) for s in data["slots"]) == [
        (0, 0, 0), (0, 0, 1), (0, 0, 3), (1, 0, 0), (2, 0, 5)]
    assert [(v["vm"], v["slots"]) for v in data["vms"]] == [(0, 3), (1, 1), (2, 1)]

"""The quiet replay's lean path gives what the general one gives: the JSON-lines parser read
one operation at a time (plain requests replayed without a record) against the records
replayed one step at a time; and the command line loads only the command it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memslot import ModelVM
from memslot.cli import commands
from memslot.cli.main import build_parser
from memslot.harness.replay import Replayer, ReplayStep, Tally
from memslot.trace.jsonl import END, JsonLines, operations, parse_lines
from memslot.trace.lines import LineSource
from memslot.trace.reader import TraceReader, read_trace
from memslot.trace.records import TraceFormatError

LINES = [
    '{"slot": 1, "flags": 0, "guest_phys_addr": "0x0", "memory_size": "0x200000", '
    '"userspace_addr": "0x7f0000000000", "expect": 0}',
    "",
    '{"slot": 2, "flags": 1, "guest_phys_addr": 2097152, "memory_size": 4096, '
    '"userspace_addr": 140737488355328, "expect": "EEXIST", "note": "wrong on purpose"}',
    '{"slot": 3, "flags": 0, "guest_phys_addr": "0x100000", "memory_size": "0x1000", '
    '"userspace_addr": "0x7f0000400000", "expect": "EEXIST"}',
    '{"slot": 4, "as_id": 1, "flags": 0, "guest_phys_addr": "0x0", "memory_size": "0x1000", '
    '"userspace_addr": "0x7f0000800000", "line": 40}',
    '{"op": "get_dirty_log", "slot": 2}',
    '{"slot": 2, "flags": 0, "guest_phys_addr": "0x200000", "memory_size": "0x0", '
    '"userspace_addr": "0x0", "expect": 0}',
    '{"slot": 5, "flags": 0, "guest_phys_addr": "0xffffffffffffffff", "memory_size": "0x1000", '
    '"userspace_addr": "0x0"}',
    '{"slot": 6, "flags": 0, "guest_phys_addr": "0x1000", "memory_size": "0x1000", '
    '"userspace_addr": "0x7f0000900000", "vm": 1}',
    '{"slot": 1, "flags": 0, "guest_phys_addr": "0x0", "memory_size": "0x200000", '
    '"userspace_addr": "0x7f0000000000", "expect": 0}',
]


def _steps(tally: Tally) -> list[tuple[int, object, int | None, list[str]]]:
    return [(s.index, s.op, s.errno, s.problems) for s in tally.mismatched]


def _state(vm: ModelVM) -> list[object]:
    return [vm.memslots(a) for a in range(vm.nr_address_spaces)]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_parser_gives_the_records_parse_lines_gives(as_bytes: bool) -> None:
    lines: list[str | bytes] = [line.encode() if as_bytes else line for line in LINES]
    parser = JsonLines(LineSource(lines=iter(lines)), decode=bytes.decode)
    assert list(operations(parser)) == list(parse_lines(LINES))
    assert parser.advance() == END  # and stays at the end


def test_lean_replay_counts_and_mismatches_equal_the_step_by_step_replay(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(LINES * 3) + "\n")
    general_vm, lean_vm = ModelVM(), ModelVM()
    general, lean = Replayer(general_vm), Replayer(lean_vm)
    seen: list[ReplayStep] = []
    try:
        want = general.replay(read_trace(str(path)), seen.append)
        reader = TraceReader(str(path))
        parser = reader.json_lines()
        assert parser is not None
        calls: list[int] = []
        got = lean.replay(parser, progress=lambda: calls.append(1))
        reader.close()
        assert (got.operations, got.ok, got.refused, got.skipped, got.mismatches) == (
            want.operations, want.ok, want.refused, want.skipped, want.mismatches)
        assert got.mismatches == 3 and got.refused and got.skipped == 0
        assert _steps(got) == _steps(want)
        assert lean.index == general.index == len(seen)
        assert _state(lean_vm) == _state(general_vm)
        assert sorted(lean.vms) == sorted(general.vms) == [0, 1]
    finally:
        for r in (general, lean):
            r.close()
        general_vm.close()
        lean_vm.close()


def test_lean_replay_records_bad_lines_or_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + LINES[0].encode() + b"\nnot json\n\xff\xfe\n"
                     + LINES[3].encode() + b"\n")
    errors: list[TraceFormatError] = []
    reader = TraceReader(str(path), errors=errors)
    parser = reader.json_lines()
    assert parser is not None
    with ModelVM() as vm:
        tally = Replayer(vm).replay(parser)
    reader.close()
    assert (tally.operations, tally.ok, tally.refused) == (2, 1, 1)
    assert [(e.line, e.message) for e in errors] == [
        (2, "malformed JSON: Expecting value"), (3, "not UTF-8 text")]
    assert reader.lines == 4
    reader = TraceReader(str(path))
    parser = reader.json_lines()
    assert parser is not None
    with ModelVM() as vm, pytest.raises(TraceFormatError, match=":2: malformed JSON"):
        Replayer(vm).replay(parser)
    reader.close()


def test_a_non_json_lines_trace_has_no_parser() -> None:
    trace = Path(__file__).parent.parent / "examples" / "traces" / "format-qemu9.trace"
    reader = TraceReader(str(trace))
    assert reader.json_lines() is None
    assert reader.format == "qemu"
    assert list(reader)  # the lines read to decide are still parsed
    reader.close()


def test_the_registry_names_every_command_as_it_calls_itself() -> None:
    assert [c.name for c in commands.load_all()] == list(commands.NAMES)
    full = build_parser()
    one = build_parser("replay")
    argv = ["replay", "-q", "--json", "--slot", "1:3", "t.jsonl"]
    a, b = vars(full.parse_args(argv)), vars(one.parse_args(argv))
    assert a == b


def test_replay_loads_only_what_it_runs(tmp_path: Path) -> None:
    """``memslot replay`` imports neither the other commands nor what only they need (the
    layout renderer and Pillow, rich when not on a terminal, guest memory, /dev/kvm)."""
    path = tmp_path / "t.jsonl"
    path.write_text(LINES[0] + "\n")
    code = (
        "import sys\n"
        "from memslot.cli.main import main\n"
        f"status = main(['replay', '-q', {json.dumps(str(path))}])\n"
        "print(status, sorted(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()[-1]
    status, modules = out.split(" ", 1)
    assert status == "0"
    loaded = set(eval(modules))  # (a printed list of names)
    others = {f"memslot.cli.{module}" for _, module, _ in commands.REGISTRY} - {
        "memslot.cli.replay_cmd"}
    unwanted = others | {"memslot.guest", "memslot.backends.kvm", "memslot.lab",
                         "memslot.tools.layout", "rich", "PIL"}
    assert not loaded & unwanted


def test_hex_spellings_are_kept_and_the_cache_is_bounded() -> None:
    """The lean path reads each ``"0x"`` spelling once; what it keeps is bounded, and what is
    not a spelling it takes is left to the general parser."""
    from memslot.trace import jsonl

    assert jsonl._hex_value("0x10") == 16 and jsonl._hex_value("0X1f") == 31
    for bad in ("0x", "0x0x1", "10", "x10", "0xg", ""):
        assert jsonl._hex_value(bad) is None
    for n in range(jsonl._HEX_KEPT + 10):
        assert jsonl._hex_value(hex((1 << 40) + n)) == (1 << 40) + n
    assert len(jsonl._HEX) <= jsonl._HEX_KEPT

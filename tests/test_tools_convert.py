"""``memslot convert``: QEMU traces to canonical JSON lines, losslessly and all-or-nothing."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from memslot.cli.main import main
from memslot.trace.jsonl import parse_lines
from memslot.trace.reader import read_trace
from memslot.trace.records import SetRegion, TraceOp

ROOT = Path(__file__).resolve().parent.parent
TRACES = sorted((ROOT / "examples" / "traces").glob("*.trace"))
VALID = "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=0\n"


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _key(op: TraceOp) -> tuple[object, ...]:
    """An operation without its source line."""
    if isinstance(op, SetRegion):
        return (op.op, op.region, op.expect, op.note)
    return (op.op, op.slot, op.expect)  # type: ignore[union-attr]


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_round_trip(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    code, stdout, err = cli("convert", str(trace), "-o", str(out))
    assert code == 0 and err == ""
    assert f"written to {out}" in stdout
    original = read_trace(str(trace))
    converted = list(parse_lines(out.read_text().splitlines()))
    assert [_key(o) for o in converted] == [_key(o) for o in original]
    # the converted file replays exactly as the QEMU log does
    a = json.loads(cli("replay", "--json", "--profile", "x86_64", str(trace))[1])
    b = json.loads(cli("replay", "--json", "--profile", "x86_64", str(out))[1])
    assert [s["errno"] for s in a["steps"]] == [s["errno"] for s in b["steps"]]
    assert a["mismatches"] == b["mismatches"]


def test_stdout_and_json(tmp_path: Path) -> None:
    trace = str(ROOT / "examples/traces/qemu72-pc-9t-einval.trace")
    code, out, _ = cli("convert", trace)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert json.loads(lines[1])["expect"] == "EINVAL"
    code, out, _ = cli("convert", "--json", trace)
    data = json.loads(out)
    assert data["format"] == "qemu" and data["operations"] == 2 and len(data["trace"]) == 2
    code, out, _ = cli("convert", "--json", trace, "-o", str(tmp_path / "x.jsonl"))
    assert "trace" not in json.loads(out)


def test_bad_line_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "bad.trace"
    src.write_text(VALID + "kvm_set_user_memory Slot#1 flags=0x0 gpa=0xZZ size=0x1000 "
                   "ua=0x0 ret=0\n" + VALID)
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    code, stdout, err = cli("convert", str(src), "-o", str(out))
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and f"{src}:2: kvm_set_user_memory: gpa=" in err
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.trace", "out.jsonl"]
    code, stdout, err = cli("convert", str(src), "-o", str(out), "--keep-going")
    assert code == 0 and "1 malformed line skipped" in stdout
    assert f"skipped malformed line: {src}:2:" in err
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (("/nonexistent",), "/nonexistent: no such file"),
    (("{src}", "-o", "{tmp}"), "is a directory"),
    (("{src}", "-o", "/nonexistent-dir/x.jsonl"), "cannot write"),
    (("{src}", "--format", "xml"), "invalid choice"),
])
def test_bad_input(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    src = tmp_path / "ok.trace"
    src.write_text(VALID)
    argv = [a.format(src=src, tmp=tmp_path) for a in args]
    code, out, err = cli("convert", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err

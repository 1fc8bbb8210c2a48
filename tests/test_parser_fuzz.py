"""Fuzzing the trace parsers (JSON lines and QEMU logs) through ``iter_trace`` and the CLI:
malformed, truncated, huge and binary input ends in one line naming the file and line,
never a traceback, and nothing is applied past the bad line unless ``--keep-going``."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memslot.cli.main import main
from memslot.trace.reader import MAX_LINE, iter_trace
from memslot.trace.records import TraceFormatError, TraceOp

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
QEMU_LINES = [line for p in sorted((EXAMPLES / "traces").glob("*.trace"))
              for line in p.read_text().splitlines() if line and not line.startswith("#")]
JSON_LINES = (EXAMPLES / "vmm-boot.jsonl").read_text().splitlines()
FIELDS = ["op", "slot", "as_id", "flags", "guest_phys_addr", "memory_size", "userspace_addr",
          "expect", "note", "guest_memfd", "guest_memfd_offset", "first_page", "num_pages",
          "bitmap", "cap", "args", "gfn"]
TOKENS = ["0x", "-", "#", "ret=", "ret=-22", "9" * 30, " ", '"', "{", "}", "[", "\0", "\t",
          "Slot#", "AddrSpace#-1", "0xffffffffffffffffff", "flags=0x", "kvm_set_user_memory",
          "kvm_clear_dirty_log", "\x1b[31m", "\u00e9", "\ufeff", "NaN", "1e999", "null"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
    | st.text(max_size=12) | st.sampled_from(["0x10", "0x", "EEXIST", "all", "set",
                                              "get_dirty_log", "KVM_CAP_NR_MEMSLOTS"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 8))
    if kind == 0:
        text = draw(st.sampled_from(QEMU_LINES))
    elif kind == 1:
        text = draw(st.sampled_from(JSON_LINES))
    elif kind == 2:  # truncated
        text = draw(st.sampled_from(QEMU_LINES + JSON_LINES))
        text = text[:draw(st.integers(0, len(text)))]
    elif kind == 3:  # a token inserted
        text = draw(st.sampled_from(QEMU_LINES + JSON_LINES))
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
    elif kind == 4:  # a JSON object with fields of any type
        obj = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=7))
        text = json.dumps(obj)
    elif kind == 5:
        text = draw(st.text(max_size=80))
    elif kind == 6:  # huge numbers
        digits = draw(st.integers(20, 4000))
        text = draw(st.sampled_from([
            "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x{h} size=0x1000 ua=0x0 ret=0",
            '{{"slot": 0, "flags": 0, "guest_phys_addr": {d}, "memory_size": 4096, '
            '"userspace_addr": 0}}',
            '{{"slot": "0x{h}", "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, '
            '"userspace_addr": 0}}',
        ])).format(h="f" * digits, d="9" * digits)
    elif kind == 7:
        return draw(st.binary(max_size=60))
    else:
        text = ""
    return text.encode("utf-8", "surrogatepass")


traces = st.tuples(st.lists(lines(), max_size=8), st.sampled_from([b"\n", b"\r\n", b"\r"]))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d) / "trace"


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _read(path: Path, keep_going: bool) -> tuple[list[TraceOp], list[TraceFormatError]]:
    errors: list[TraceFormatError] = []
    ops = list(iter_trace(str(path), "auto", errors if keep_going else None))
    return ops, errors


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(trace=traces)
def test_iter_trace_fails_on_one_line_or_not_at_all(scratch: Path,
                                                    trace: tuple[list[bytes], bytes]) -> None:
    parts, sep = trace
    data = sep.join(parts)
    scratch.write_bytes(data)
    nlines = max(len(data.decode("utf-8", "replace").splitlines()), 1)
    try:
        strict_ops, _ = _read(scratch, keep_going=False)
        failed: TraceFormatError | None = None
    except TraceFormatError as exc:
        failed = exc
    kept, errors = _read(scratch, keep_going=True)
    lines_with_errors = [e.line for e in errors]
    assert lines_with_errors == sorted(set(lines_with_errors))
    for e in errors:
        assert "\n" not in str(e) and "\r" not in str(e)
        assert str(e).startswith(f"{scratch}:{e.line}: ") and 1 <= e.line <= nlines
    assert not {op.line for op in kept} & set(lines_with_errors)
    if failed is None:
        assert errors == [] and strict_ops == kept
    else:
        # the strict read stops at the first bad line, the same one keep-going reports first
        assert errors and str(failed) == str(errors[0])


@FUZZ
@given(trace=traces)
def test_replay_cli_one_line_error_nothing_applied(scratch: Path,
                                                   trace: tuple[list[bytes], bytes]) -> None:
    parts, sep = trace
    data = sep.join(parts)
    scratch.write_bytes(data)
    _, errors = _read(scratch, keep_going=True)
    code, out, err = cli("replay", "--json", str(scratch))
    if errors:
        assert code == 2 and out == ""  # nothing applied
        assert err == f"memslot: error: {errors[0]}\n"
    else:
        assert code in (0, 1) and err == ""
        json.loads(out)
    code, out, err = cli("replay", "--json", "--keep-going", str(scratch))
    assert code in (0, 1) and err == ""
    data_out = json.loads(out)
    assert data_out["malformed_lines"] == [str(e) for e in errors]


@pytest.mark.parametrize("command", ["replay", "explain", "report", "convert", "layout"])
@pytest.mark.parametrize("bad", [
    b"kvm_set_user_memory Slot#1 flags=0x0 gpa=0x1000 size=0x1000 ret=0",  # ua missing
    b'{"slot": 1, "flags": 0, "guest_phys_addr": 4096, "memory_size": 4096',  # truncated
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",  # binary
    b"x" * (MAX_LINE + 10),  # huge
], ids=["qemu-truncated", "json-truncated", "binary", "huge"])
def test_every_command_stops_at_the_bad_line(command: str, bad: bytes, tmp_path: Path) -> None:
    good = (b"kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 "
            b"ret=0" if bad.startswith(b"kvm") or bad[:1] in (b"\x89", b"x")
            else b'{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, '
                 b'"userspace_addr": 0}')
    trace = tmp_path / "t.trace"
    trace.write_bytes(good + b"\n" + bad + b"\n" + good.replace(b"0x0 size", b"0x2000 size")
                      .replace(b'"guest_phys_addr": 0', b'"guest_phys_addr": 8192') + b"\n")
    extra = ["-o", str(tmp_path / "out.svg")] if command == "layout" else []
    code, out, err = cli(command, str(trace), *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"memslot: error: {trace}:2: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]
    code, out, err = cli(command, "--keep-going", str(trace), *extra)
    assert code == 0 and f"{trace}:2:" in err + out


def test_keep_going_applies_what_follows(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, '
                     '"userspace_addr": 0}\nnot json\n{"slot": 1, "flags": 0, '
                     '"guest_phys_addr": 8192, "memory_size": 4096, "userspace_addr": 0}\n')
    code, out, _ = cli("replay", "--json", "--keep-going", str(trace))
    data = json.loads(out)
    assert code == 0 and [s["line"] for s in data["steps"]] == [1, 3]
    assert len(data["slots"]) == 2


def test_empty_directory_and_stdin_like_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert cli("replay", str(empty))[0] == 0
    code, _, err = cli("replay", str(tmp_path))
    assert code == 2 and err == f"memslot: error: {tmp_path}: is a directory\n"


def test_jsonl_integer_past_the_digit_limit(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"slot": ' + "9" * 5000 + ', "flags": 0, "guest_phys_addr": 0, '
                     '"memory_size": 4096, "userspace_addr": 0}\n')
    with pytest.raises(TraceFormatError):
        list(iter_trace(str(trace)))


def test_jsonl_unhashable_op(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"op": []}\n')
    with pytest.raises(TraceFormatError):
        list(iter_trace(str(trace)))


_SET_VALUES = (st.none() | st.booleans() | st.integers(-2, (1 << 64) + 1)
               | st.sampled_from(["0x1000", "0X10", "0x", "0xg", "0x1_000", "0x10 ", "4096",
                                  "EEXIST", "einval", "", "a\x1bb", 1.5, 0.0, [], {}]))


@settings(max_examples=400, deadline=None)
@example({"memory_size": "0x0x20000"}, True)  # a traceback from the lean path, once
@example({"guest_phys_addr": "0x"}, True)
@example({"line": None}, True)  # the lean path took it, the general one refuses it
@given(st.dictionaries(st.sampled_from(["slot", "flags", "guest_phys_addr", "memory_size",
                                        "userspace_addr", "expect", "note", "line", "vm",
                                        "as_id", "bogus"]),
                       _SET_VALUES, max_size=9),
       st.booleans())
def test_lean_line_parser_agrees_with_the_general_one(obj: dict[str, object],
                                                      common: bool) -> None:
    """The lean path for the common request line (``_fast_set``, from raw bytes) gives the
    operation the general path gives, or leaves the line to it: never a different operation,
    never one the general path refuses (null ``line``, unknown keys, bad hex...)."""
    from memslot.trace import jsonl

    if common:  # mostly well-formed lines, with the odd field changed
        base: dict[str, object] = {"slot": 3, "flags": 1, "guest_phys_addr": "0x2000",
                                   "memory_size": "0x1000", "userspace_addr": 4096,
                                   "expect": 0}
        obj = {**base, **dict(list(obj.items())[:1])}
    text = json.dumps(obj)
    try:
        general: object = list(jsonl.parse_lines([text]))
    except TraceFormatError as exc:
        general = ("refused", str(exc))
    try:
        lean: object = list(jsonl.parse_lines([text.encode()], decode=bytes.decode))
    except TraceFormatError as exc:
        lean = ("refused", str(exc))
    assert lean == general
    fast = jsonl._fast_set(json.loads(text), 1)
    if fast is not None:
        assert [fast] == general

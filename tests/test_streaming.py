"""Streaming: ``replay -`` and ``explain -`` act on each line as it arrives, ``--follow`` reads a
growing log like ``tail -f``, ``--json-lines`` events are flushed one by one, and the filters
choose what is shown. Every wait is bounded; every child process is ended."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOT = ROOT / "examples" / "vmm-boot.jsonl"
WAIT = 30.0  # seconds: a generous bound for a loaded machine


def request(slot: int, gpa: int, size: int = 4096, expect: str | int = 0) -> str:
    return json.dumps({"slot": slot, "flags": 0, "guest_phys_addr": gpa, "memory_size": size,
                       "userspace_addr": 0x7F0000000000 + gpa, "expect": expect}) + "\n"


@pytest.fixture
def spawn() -> Iterator[object]:
    """Start ``python -m memslot ARGS`` with pipes; every child is killed at the end."""
    children: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "memslot", *args], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        children.append(proc)
        return proc

    yield start
    for proc in children:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def read_line(proc: subprocess.Popen[bytes], timeout: float = WAIT) -> str:
    """The next line of the child's stdout, waiting at most ``timeout`` seconds for it."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no output line within {timeout} s (got {buf!r})")
        byte = os.read(fd, 1)
        if not byte:
            raise AssertionError(f"the output ended (got {buf!r})")
        buf += byte
    return buf.decode()


def send(proc: subprocess.Popen[bytes], text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text.encode())
    proc.stdin.flush()


def test_replay_stdin_acts_on_each_line_as_it_arrives(spawn) -> None:  # type: ignore[no-untyped-def]
    proc = spawn("replay", "--json-lines", "-")
    send(proc, request(0, 0))
    first = json.loads(read_line(proc))  # before stdin is closed
    assert first["event"] == "step" and first["errno"] == 0 and first["line"] == 1
    send(proc, request(1, 0, expect="EEXIST"))
    second = json.loads(read_line(proc))
    assert second["errno_name"] == "EEXIST" and second["mismatch"] is False
    assert proc.stdin is not None
    proc.stdin.close()
    summary = json.loads(read_line(proc))
    assert summary["event"] == "summary" and summary["operations"] == 2
    assert proc.wait(timeout=WAIT) == 0


def test_replay_stdin_text_lines_are_flushed(spawn) -> None:  # type: ignore[no-untyped-def]
    proc = spawn("replay", "-")
    send(proc, request(0, 0))
    assert "CREATE" in read_line(proc) and proc.poll() is None


def test_explain_stdin_explains_as_lines_arrive(spawn) -> None:  # type: ignore[no-untyped-def]
    proc = spawn("explain", "--json-lines", "-")
    send(proc, request(0, 0x1000))
    e = json.loads(read_line(proc))
    assert e["event"] == "explained" and e["change"] == "CREATE" and e["steps"]
    assert proc.poll() is None
    assert proc.stdin is not None
    proc.stdin.close()
    assert json.loads(read_line(proc))["event"] == "summary"
    assert proc.wait(timeout=WAIT) == 0


def test_follow_a_growing_log_until_interrupted(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "qemu.log"
    log.write_text("qemu-system-x86_64: starting\n")
    proc = spawn("replay", "--json-lines", "--follow", str(log))
    qemu = ("kvm_set_user_memory AddrSpace#0 Slot#{slot} flags=0x0 gpa=0x{gpa:x} "
            "size=0x1000 ua=0x7f0000000000 ret=0\n")
    with log.open("a") as f:
        f.write(qemu.format(slot=0, gpa=0))
        f.flush()
        assert json.loads(read_line(proc))["line"] == 2
        f.write(qemu.format(slot=1, gpa=0x10000)[:30])  # half a line: held until complete
        f.flush()
        time.sleep(0.5)
        f.write(qemu.format(slot=1, gpa=0x10000)[30:])
        f.flush()
        step = json.loads(read_line(proc))
        assert step["line"] == 3 and step["op"]["slot"] == 1
    proc.send_signal(signal.SIGINT)
    summary = json.loads(read_line(proc))
    assert summary["event"] == "summary" and summary["operations"] == 2
    assert summary["stopped"] == "interrupted"
    assert proc.wait(timeout=WAIT) == 130


def test_follow_stops_when_the_log_is_replaced_or_quiet(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "t.jsonl"
    log.write_text(request(0, 0))
    proc = spawn("replay", "--follow", str(log))
    assert "CREATE" in read_line(proc)  # following now
    (tmp_path / "new.jsonl").write_text(request(5, 0))
    os.replace(tmp_path / "new.jsonl", log)
    assert proc.wait(timeout=WAIT) == 0
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    assert "stopped following: the file was replaced" in out and "1 operation:" in out
    quiet = spawn("replay", "--follow", str(log), "--follow-timeout", "0.5", "--json")
    assert quiet.wait(timeout=WAIT) == 0
    assert quiet.stdout is not None
    data = json.loads(quiet.stdout.read())
    assert data["stopped"] == "no new line for 0.5 s" and data["operations"] == 1


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memslot", *args], capture_output=True,
                          text=True, input=stdin, timeout=120, cwd=ROOT)


def test_json_lines_and_quiet() -> None:
    proc = run_cli("replay", "--json-lines", str(BOOT))
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["step"] * 30 + ["summary"]
    assert events[-1]["mismatches"] == 0 and len(events[-1]["slots"]) == 10
    quiet = run_cli("replay", "--json-lines", "-q", str(BOOT))
    (summary,) = [json.loads(line) for line in quiet.stdout.splitlines()]
    assert summary["event"] == "summary" and summary["operations"] == 30
    doc = json.loads(run_cli("replay", "--json", "-q", str(BOOT)).stdout)
    assert "steps" not in doc and doc["operations"] == 30
    assert "steps" in json.loads(run_cli("replay", "--json", str(BOOT)).stdout)
    text = run_cli("replay", "-q", str(BOOT)).stdout
    assert "CREATE" not in text and "30 operations" in text


def test_filters_choose_what_is_shown() -> None:
    def lines(*args: str) -> list[dict[str, object]]:
        out = run_cli("replay", "--json-lines", *args, str(BOOT)).stdout
        return [e for e in map(json.loads, out.splitlines()) if e["event"] == "step"]

    failed = lines("--failed")
    assert failed and all(e["errno"] for e in failed)
    smm = lines("--as", "1")
    assert smm and all(e["op"].get("as_id") == 1 for e in smm)  # type: ignore[union-attr]
    slot1 = lines("--slot", "0:1")
    assert slot1 and all(e["op"]["slot"] == 1 and not e["op"].get("as_id")  # type: ignore[index]
                         for e in slot1)
    assert len(lines("--slot", "1")) > len(slot1)  # slot id 1 in both address spaces
    low = lines("--gpa-range", "0-1M")
    assert low and all(int(str(e["op"]["guest_phys_addr"]), 16) < 1 << 20  # type: ignore[index]
                       for e in low)
    assert lines("--gpa-range", "0x10000000000+1G") == []  # nothing at 1 TiB
    bad = run_cli("replay", "--gpa-range", "5-1", str(BOOT))
    assert bad.returncode == 2 and "the end must be above the start" in bad.stderr
    explained = run_cli("explain", "--json", "--failed", "--slot", "1", str(BOOT))
    data = json.loads(explained.stdout)
    assert all(e["errno"] for e in data["explained"])


def test_json_document_streams_and_stays_valid(tmp_path: Path) -> None:
    trace = tmp_path / "big.jsonl"
    with trace.open("w") as f:
        for i in range(3000):
            f.write(request(i % 100, (i % 100) << 20, 0 if (i // 100) % 2 else 4096))
    data = json.loads(run_cli("replay", "--json", str(trace)).stdout)
    assert len(data["steps"]) == 3000 and data["mismatches"] == 0
    assert data["outcomes"] == {"ok": 3000, "refused": 0, "skipped": 0}

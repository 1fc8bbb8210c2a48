"""The command line: the README's replay, exit statuses, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "vmm-boot.jsonl"


def memslot(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memslot", *args], capture_output=True, text=True, input=stdin,
        timeout=120, cwd=ROOT,
    )


def test_example_replays_cleanly() -> None:
    proc = memslot("replay", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "MOVE" in out and "EEXIST" in out and "FLAGS_ONLY" in out
    assert "final slots (10)" in out
    assert "0 mismatched expectations" in out
    assert proc.stderr == ""


def test_console_script_and_module_agree() -> None:
    script = shutil.which("memslot", path=os.path.dirname(sys.executable))
    assert script is not None, "the console script is installed next to the interpreter"
    a = subprocess.run([script, "replay", "--json", str(EXAMPLE)], capture_output=True,
                       text=True, timeout=120)
    b = memslot("replay", "--json", str(EXAMPLE))
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_json_report_is_complete() -> None:
    data = json.loads(memslot("replay", "--json", str(EXAMPLE)).stdout)
    assert data["mismatches"] == 0
    assert len(data["steps"]) == 30
    move = data["steps"][12]["result"]
    assert move["change"] == "MOVE" and move["errno"] == 0
    assert move["generation_after"] - move["generation_before"] == 4  # 2 swaps x 2 spaces
    assert data["totals"]["metadata_bytes"] == sum(s["metadata"]["bytes"] for s in data["slots"])
    eexist = data["steps"][13]
    assert eexist["errno_name"] == "EEXIST"
    assert eexist["result"]["rule"]["function"] == "kvm_check_memslot_overlap"


def test_expectation_mismatch_exits_1(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, '
        '"userspace_addr": 0, "expect": "EEXIST"}\n'
    )
    proc = memslot("replay", str(trace))
    assert proc.returncode == 1
    assert "MISMATCH" in proc.stdout and "expected EEXIST, got 0" in proc.stdout


BAD_LINES = {
    "not json": "malformed JSON",
    '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096}': "missing field",
    '{"slot": 0, "flags": 0, "guest_phys_addr": "x", "memory_size": 4096, "userspace_addr": 0}':
        "not an integer",
    '{"slot": -1, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0}':
        "negative",
    '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0, '
    '"colour": 1}': "unknown key",
    '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0, '
    '"expect": "ENOTANERRNO"}': "errno",
    '[1, 2]': "expected a JSON object",
    '{"slot": 0, "flags": 0, "guest_phys_addr": 1.5, "memory_size": 4096, "userspace_addr": 0}':
        "not an integer",
    '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 18446744073709551616, '
    '"userspace_addr": 0}': "too large",
}


@pytest.mark.parametrize("line", list(BAD_LINES))
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, line: str) -> None:
    good = '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0}'
    trace = tmp_path / "bad.jsonl"
    trace.write_text(good + "\n" + line + "\n")
    proc = memslot("replay", str(trace))
    assert proc.returncode == 2
    assert proc.stdout == "", "nothing is applied before the whole file is validated"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{trace}:2:" in lines[0] and BAD_LINES[line] in lines[0]


def test_keep_going_skips_bad_lines(tmp_path: Path) -> None:
    good = '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0}'
    trace = tmp_path / "bad.jsonl"
    trace.write_text("garbage\n" + good + "\n")
    proc = memslot("replay", "--keep-going", str(trace))
    assert proc.returncode == 0
    assert "skipped malformed line" in proc.stdout and "final slots (1)" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["replay", "/nonexistent/trace.jsonl"], "no such file"),
        (["replay", str(EXAMPLE), "--profile", "vax"], "unknown profile"),
        (["replay", str(EXAMPLE), "--variant", "bogus"], "unknown variant"),
        (["replay", str(EXAMPLE), "--variant", "ppc-realloc-rmap-on-move"], "is for ppc-hv"),
        (["frobnicate"], "invalid choice"),
        (["replay"], "required"),
        (["replay", "--format", "x", "t"],
         "memslot: error: replay: argument --format: invalid choice"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    proc = memslot(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "memslot: error: memslot" not in proc.stderr


def test_no_arguments_prints_usage() -> None:
    proc = memslot()
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: memslot")
    assert "replay" in proc.stderr and "error" not in proc.stderr


def test_binary_input_is_refused(tmp_path: Path) -> None:
    trace = tmp_path / "bin.jsonl"
    trace.write_bytes(b'{"slot": 0}\n\x00\xff\xfe garbage\n')
    proc = memslot("replay", str(trace))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_stdin(tmp_path: Path) -> None:
    proc = memslot("replay", "-", stdin=EXAMPLE.read_text())
    assert proc.returncode == 0 and "final slots (10)" in proc.stdout


def test_help_documents_exit_statuses() -> None:
    for args in (["--help"], ["replay", "--help"], ["fuzz", "--help"]):
        proc = memslot(*args)
        assert proc.returncode == 0
        assert "exit status: 0" in " ".join(proc.stdout.split())


def test_profiles_lists_presets() -> None:
    proc = memslot("profiles")
    assert proc.returncode == 0
    for name in ("x86_64", "x86_64-shadow", "ppc64-hv", "ppc64-pr", "arm64", "riscv64", "s390x"):
        assert name in proc.stdout
    data = json.loads(memslot("profiles", "--json").stdout)
    assert {p["name"] for p in data} >= {"x86_64", "s390x"}
    assert next(p for p in data if p["name"] == "s390x")["user_mem_slots"] == 32766


def test_variant_names_what_goes_wrong(tmp_path: Path) -> None:
    trace = tmp_path / "move.jsonl"
    trace.write_text(
        '{"slot": 0, "flags": 0, "guest_phys_addr": "0xc0000000", "memory_size": "0x200000", '
        '"userspace_addr": "0x7f0000000000"}\n'
        '{"slot": 0, "flags": 0, "guest_phys_addr": "0xbffff000", "memory_size": "0x200000", '
        '"userspace_addr": "0x7f0000000000"}\n'
    )
    clean = memslot("replay", "--profile", "x86_64-shadow", str(trace))
    assert clean.returncode == 0 and "check() found" not in clean.stdout
    buggy = memslot("replay", "--profile", "x86_64-shadow", "--variant",
                    "x86-reuse-arch-on-move", str(trace))
    assert "check() found" in buggy.stdout
    assert "past its end" in buggy.stdout and "stale disallow marks" in buggy.stdout
    leak = tmp_path / "ppc.jsonl"
    leak.write_text(
        '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": "0x200000", '
        '"userspace_addr": "0x7f0000000000"}\n'
        '{"slot": 0, "flags": 0, "guest_phys_addr": "0x400000", "memory_size": "0x200000", '
        '"userspace_addr": "0x7f0000000000"}\n'
    )
    out = memslot("replay", "--profile", "ppc64-hv@6.1", "--variant", "ppc-realloc-rmap-on-move",
                  str(leak)).stdout
    assert "leak: ppc_rmap" in out

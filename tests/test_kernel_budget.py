"""Bounded kernel memory for untrusted traces: before ``--backend kvm/both`` hands a request to
the kernel, the model predicts its memslot metadata and the replay refuses above a limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memslot.backends.budget import (
    KernelMemoryBudget,
    KernelMemoryLimitError,
    default_limit,
    parse_size,
)
from memslot.cli.main import main
from memslot.request import MemoryRegion

GiB = 1 << 30
TiB = 1 << 40


def test_prediction_follows_the_model() -> None:
    budget = KernelMemoryBudget("x86_64-shadow", limit=8 * GiB)
    huge = MemoryRegion(0, 0, 0, 8 * TiB - 4096, 0x1000)  # about 20 GiB of rmaps and lpage_info
    assert budget.predict(huge) > 16 * GiB
    with pytest.raises(KernelMemoryLimitError, match=r"kernel memory limit of 8\.0 GiB"):
        budget.admit(huge)
    small = MemoryRegion(0, 1, 0, GiB, 0x7F0000000000)
    cost = budget.admit(small)
    assert 2 << 20 < cost < 4 << 20  # rmaps + lpage_info + the dirty bitmap of 1 GiB
    budget.record(small, cost)
    assert budget.total == cost
    budget.record(MemoryRegion(0, 0, 0, 0, 0x7F0000000000), 0)  # deleted
    assert budget.total == 0
    assert budget.predict(MemoryRegion(0, 1 << 20, 0, GiB, 0)) == 0  # refused by the model
    budget.close()
    assert default_limit() > 0 and parse_size("8G") == 8 * GiB and parse_size("512m") == 512 << 20
    for bad in ("", "x", "1.5G", "9" * 30):
        with pytest.raises(ValueError):
            parse_size(bad)


def _trace(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "t.jsonl"
    lines = [
        {"slot": 0, "flags": 0, "guest_phys_addr": "0x0", "memory_size": hex(1 << 20),
         "userspace_addr": "0x7f0000000000", "expect": 0},
        {"slot": 1, "flags": 0, "guest_phys_addr": hex(1 << 32), "memory_size": hex(size),
         "userspace_addr": "0x1000", "note": "untrusted"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.kvm
@pytest.mark.parametrize("backend", ["kvm", "both"])
def test_replay_refuses_before_the_kernel_allocates(tmp_path: Path, backend: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = _trace(tmp_path, 8 * TiB - 4096)
    assert main(["replay", "--backend", backend, "--profile", "x86_64-shadow", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{path}:2:" in err and "kernel memory limit" in err
    # The limit is an option: a 64 GiB slot (about 160 MiB of metadata) passes 1G, not 64M.
    path = _trace(tmp_path, 64 * GiB)
    assert main(["replay", "--backend", backend, "--profile", "x86_64-shadow",
                 "--kernel-memory-limit", "64M", str(path)]) == 2
    assert "64.0 MiB" in capsys.readouterr().err
    assert main(["replay", "--backend", backend, "--profile", "x86_64-shadow", "-q",
                 "--kernel-memory-limit", "1G", str(path)]) in (0, 1)
    capsys.readouterr()
    assert main(["replay", "--kernel-memory-limit", "lots", str(path)]) == 2


# --- the model and the replay stay bounded on hostile lines ---------------------------------------


def _run_measuring_peak(argv: list[str]) -> tuple[int, int]:
    """Exit status of ``memslot ARGV`` in a child and its peak RSS growth (bytes) over a
    bare start."""
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from memslot.cli.main import main\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "code = main(sys.argv[1:])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "sys.stderr.write(f'\\nPEAK {(peak - base) * 1024}\\n')\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                          text=True, timeout=600, check=False)
    peak = int(proc.stderr.rsplit("PEAK ", 1)[1].split()[0])
    return proc.returncode, peak


def test_clear_dirty_log_of_2_32_pages_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "clear.jsonl"
    lines = [
        {"op": "enable_cap", "cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "args": [1]},
        {"slot": 0, "flags": 1, "guest_phys_addr": "0x0", "memory_size": hex(GiB),
         "userspace_addr": "0x7f0000000000"},
        {"op": "clear_dirty_log", "slot": 0, "first_page": 0, "num_pages": (1 << 32) - 1,
         "bitmap": "all", "expect": "EINVAL"},
        {"op": "clear_dirty_log", "slot": 0, "first_page": 0, "num_pages": GiB // 4096,
         "bitmap": "all", "expect": 0},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, peak = _run_measuring_peak(["replay", "-q", str(path)])
    assert code == 0
    assert peak < 64 << 20, peak  # not the 512 MiB mask of 2^32 pages


def test_keep_going_keeps_a_bounded_sample(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"slot": 0, "flags": 0, "guest_phys_addr": "0x0",
                       "memory_size": "0x1000", "userspace_addr": "0x7f0000000000"})
    bad = "".join(json.dumps({"slot": f"x{i}", "note": "y" * 200}) + "\n" for i in range(60_000))
    path.write_text(good + "\n" + bad)
    code, peak = _run_measuring_peak(["replay", "-q", "--keep-going", str(path)])
    assert code == 0
    assert peak < 40 << 20, peak  # 60,000 bad lines: no longer 1.4 KB each
    assert main(["replay", "-q", "--keep-going", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped malformed line") == 101
    assert "59900 more malformed lines" in out


def test_notes_from_input_are_printable(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.jsonl"
    region = {"slot": 0, "flags": 0, "guest_phys_addr": "0x0", "memory_size": "0x1000",
              "userspace_addr": "0x7f0000000000"}
    raw = json.dumps({**region, "note": "evil \x1b[2J\x1b]0;pwned\x07 here"})
    lone = json.dumps({**region, "slot": 1, "guest_phys_addr": "0x1000",
                       "note": "bad \udcff\udcfe surrogates"})  # JSON escapes: lone surrogates
    path.write_text(raw + "\n" + lone + "\n")
    for argv in (["replay", str(path)], ["explain", str(path)]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out
        assert "\\x1b[2J" in out and "bad \\udcff\\udcfe surrogates" in out

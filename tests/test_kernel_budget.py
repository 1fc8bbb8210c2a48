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

"""The differential fuzzer reaches every class issue 9 lists, agrees with /dev/kvm on a fast
sample, and an interrupt stops it (and ``replay --backend both``) cleanly with exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import memslot
from memslot.backends.dual import CHECKPOINT_MIN, DualVM
from memslot.harness.fuzz import run_fuzz

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
UA = 0x7F0000000000


@pytest.mark.kvm
def test_fast_sample_reaches_every_class() -> None:
    report = run_fuzz(6000, seed=21, profile=memslot.detect_profile(), backend="both")
    assert report.divergences == [] and report.check_failures == []
    assert report.requests == report.agreed == 6000
    seen = {f"{kind}/{outcome}" for kind, outcome in report.outcomes}
    kinds = {kind for kind, _ in report.outcomes}
    for wanted in ("v2 CREATE/ok", "v2 CREATE/gmem-bind", "create_guest_memfd/ok",
                   "create_guest_memfd/EINVAL", "close_guest_memfd/ok", "create_vcpu/ok",
                   "create_vcpu/EINVAL", "create_vcpu/EEXIST", "close_vcpu/ok",
                   "check_extension vm/ok", "check_extension system/ok"):
        assert wanted in seen, wanted
    assert any(k.startswith("enable_cap HALT_POLL 64-bit") for k in kinds)
    assert any(k.startswith("enable_cap DIRTY_LOG_RING") and "64-bit" in k for k in kinds)
    forks = {outcome.split()[0] for kind, outcome in report.outcomes if kind == "fork"}
    assert forks == {"os.fork", "libc"}
    teardowns = {outcome for kind, outcome in report.outcomes if kind == "teardown"}
    assert {"vm-fd-first", "files-first", "interleaved", "close"} <= teardowns


def test_model_alone_reaches_the_lifetime_classes() -> None:
    report = run_fuzz(3000, seed=3, profile=memslot.get_profile("x86_64-shadow"),
                      backend="model")
    assert report.divergences == [] and report.check_failures == []
    kinds = {kind for kind, _ in report.outcomes}
    assert {"fork", "teardown", "create_vcpu", "close_guest_memfd", "v2 CREATE"} <= kinds


# -- DualVM compares what a request touched ------------------------------------------------------
class _Counting(memslot.ModelVM):
    """A second model standing in for the kernel, counting whole-set reads."""

    whole_reads = 0

    def memslots(self, as_id: int = 0) -> list[memslot.MemorySlot]:
        type(self).whole_reads += 1
        return super().memslots(as_id)


def test_dual_compares_the_touched_slot_and_the_whole_set_at_checkpoints() -> None:
    profile = memslot.get_profile("x86_64-shadow")
    with DualVM(memslot.ModelVM(profile), _Counting(profile)) as dual:
        for i in range(2000):
            dual.set_user_memory_region(i, 0, i * PAGE, PAGE, UA)
        # 2000 requests, whole-set comparisons at most every max(256, slots) requests.
        assert _Counting.whole_reads <= 2000 // CHECKPOINT_MIN
        dual.verify()
        assert dual.memslot(1999) == dual.kernel.memslot(1999)


def test_dual_keeps_a_touched_slot_divergence() -> None:
    """A slot that differs after a request both answered alike is reported at once."""
    profile = memslot.get_profile("x86_64-shadow")

    class Moving(memslot.ModelVM):
        def apply(self, region: memslot.MemoryRegion) -> None:
            super().apply(region._replace(guest_phys_addr=region.guest_phys_addr + PAGE))

    with (DualVM(memslot.ModelVM(profile), Moving(profile)) as dual,
          pytest.raises(memslot.Divergence, match="slot 0:0 after")):
        dual.set_user_memory_region(0, 0, 0, PAGE, UA)


# -- an interrupt is never a result -----------------------------------------------------------
def test_interrupt_in_the_model_half_retires_the_dual_vm() -> None:
    profile = memslot.get_profile("x86_64-shadow")

    class Interrupted(memslot.ModelVM):
        def apply(self, region: memslot.MemoryRegion) -> None:
            raise KeyboardInterrupt

    with DualVM(Interrupted(profile), memslot.ModelVM(profile)) as dual:
        with pytest.raises(KeyboardInterrupt):
            dual.set_user_memory_region(0, 0, 0, PAGE, UA)
        with pytest.raises(memslot.ClosedError, match="interrupted"):
            dual.get_dirty_log(0)


def _interrupt(args: list[str], wait: float) -> subprocess.CompletedProcess[str]:
    """Run the CLI, SIGINT it after ``wait`` seconds, and collect it (always reaped)."""
    proc = subprocess.Popen([sys.executable, "-m", "memslot", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(wait)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.kvm
def test_ctrl_c_stops_fuzz_with_130() -> None:
    done = _interrupt(["fuzz", "--ops", "100000000", "--seed", "9"], wait=4.0)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "DIVERGENCE" not in done.stdout and "agreed" not in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.kvm
def test_ctrl_c_stops_replay_on_both_with_130(tmp_path: Path) -> None:
    trace = tmp_path / "long.jsonl"
    with trace.open("w") as f:
        for i in range(200000):
            slot = i % 64
            size = 0 if (i // 64) % 2 else PAGE
            f.write(json.dumps({"slot": slot, "flags": 0, "guest_phys_addr": hex(slot * PAGE),
                                "memory_size": hex(size), "userspace_addr": hex(UA)}) + "\n")
    done = _interrupt(["replay", "--backend", "both", "--profile", "detect", str(trace)],
                      wait=5.0)
    assert done.returncode == 130, (done.stdout[-2000:], done.stderr[-2000:])
    assert "divergence" not in done.stdout.lower() and "MISMATCH" not in done.stdout
    assert "Traceback" not in done.stderr
    assert os.path.getsize(trace) > 0

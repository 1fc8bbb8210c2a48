"""The model against the real kernel: detect_profile, DualVM, the fuzzer, replay on /dev/kvm."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import memslot
from memslot.backends.dual import Divergence, DualVM
from memslot.backends.kvm import KvmVM
from memslot.engine.caps import DERIVED
from memslot.harness.detect import CAP_SCAN_LIMIT
from memslot.harness.fuzz import run_fuzz

pytestmark = pytest.mark.kvm
ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
UA = 0x7F0000000000


def _is_pvm_host() -> bool:
    return Path("/sys/module/kvm_pvm").exists()


def test_detected_profile_agrees_with_the_kernel() -> None:
    """detect_profile() gives a ModelVM that agrees with KvmVM (a fuzz sample on top)."""
    profile = memslot.detect_profile()
    report = run_fuzz(3000, seed=11, profile=profile, backend="both")
    assert report.divergences == [] and report.check_failures == []
    assert report.requests == report.agreed == 3000
    with memslot.ModelVM(profile) as model, KvmVM() as kvm:
        for cap in [*range(CAP_SCAN_LIMIT + 64), *DERIVED, 1 << 31, 1 << 63, (1 << 64) - 1]:
            assert model.check_extension(cap) == kvm.check_extension(cap), cap
            assert model.check_system_extension(cap) == kvm.check_system_extension(cap), cap


@pytest.mark.skipif(not _is_pvm_host(), reason="the x86_64-shadow preset describes PVM hosts")
def test_detected_profile_is_the_shadow_preset_on_this_host_kind() -> None:
    detected = memslot.detect_profile()
    preset = memslot.get_profile("x86_64-shadow")
    # Host facts a preset cannot share: CPU count, RAM, the arch's other capabilities.
    ignore = {"name", "description", "kernel", "totalram_pages", "nr_vcpus", "extensions"}
    for field in dataclasses.fields(preset):
        if field.name not in ignore:
            assert getattr(detected, field.name) == getattr(preset, field.name), field.name


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_sample_agrees(seed: int) -> None:
    report = run_fuzz(4000, seed=seed, profile=memslot.detect_profile(), backend="both")
    assert report.rate == 1.0, report.divergences[:1]
    # The sample reaches the rules it is meant to: a spread of outcomes.
    kinds = {k for k, _ in report.outcomes}
    assert {"CREATE", "DELETE", "MOVE", "FLAGS_ONLY", "NOOP"} <= kinds
    rules = {v for _, v in report.outcomes}
    assert {"overlap", "x86-max-gfn", "access-ok", "gpa-wrap", "user-slot-id"} <= rules


def test_dual_vm_raises_on_divergence() -> None:
    # The x86_64 preset has SMM's second address space; this kernel has one.
    with DualVM(memslot.ModelVM("x86_64"), KvmVM()) as vm:
        vm.set_user_memory_region(0, 0, 0, PAGE, UA)
        with pytest.raises(Divergence) as info:
            vm.set_user_memory_region(1 << 16, 0, 0, PAGE, UA)
        assert info.value.kernel_errno == errno.EINVAL
        assert "model 0 != kernel EINVAL" in str(info.value)


def test_dual_vm_compares_errno_and_bytes() -> None:
    with DualVM(memslot.ModelVM(memslot.detect_profile()), KvmVM()) as vm:
        vm.set_user_memory_region(0, memslot.KVM_MEM_LOG_DIRTY_PAGES, 0, 100 * PAGE, UA)
        assert vm.get_dirty_log(0) == bytes(16)
        vm.enable_cap(memslot.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)
        vm.set_user_memory_region(1, memslot.KVM_MEM_LOG_DIRTY_PAGES, 1 << 30, 100 * PAGE, UA)
        assert vm.get_dirty_log(1) == b"\xff" * 12 + b"\x0f" + bytes(3)
        with pytest.raises(memslot.KvmError) as info:
            vm.set_user_memory_region(2, 0, 0, PAGE, UA)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(memslot.KvmError):
            vm.clear_dirty_log(1, 1, 63, None)
        assert vm.check() == []


def test_fuzz_reproducer_replays_on_both(tmp_path: Path) -> None:
    """A divergence (forced with a profile that is wrong for this host) yields a JSON-lines
    reproducer; replay refuses --backend both with that profile up front (it could only
    diverge), and with the detected profile it replays cleanly."""
    report = run_fuzz(2000, seed=5, profile=memslot.get_profile("x86_64"), backend="both")
    assert report.divergences, "the SMM address space must show up as a divergence"
    _, lines = report.divergences[0]
    trace = tmp_path / "repro.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    wrong = _cli("replay", "--backend", "both", "--profile", "x86_64", str(trace))
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert "profile x86_64 cannot match this host (" in wrong.stderr
    assert "nr_address_spaces 2 != 1" in wrong.stderr
    assert re.search(r"use --profile detect \(this host is detected \(x86_64-shadow@[0-9.]+\)\)",
                     wrong.stderr)
    right = _cli("replay", "--backend", "both", "--profile", "detect", str(trace))
    assert right.returncode == 0, right.stdout[-2000:]


def test_fuzz_cli(tmp_path: Path) -> None:
    proc = _cli("fuzz", "--ops", "1500", "--seed", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["requests"] == data["agreed"] == 1500 and data["divergences"] == []
    proc = _cli("fuzz", "--ops", "800", "--seed", "4", "--profile", "x86_64", "--out",
                str(tmp_path))
    assert proc.returncode == 1 and "DIVERGENCE" in proc.stdout
    assert list(tmp_path.glob("divergence-*.jsonl"))


def test_replay_example_on_the_kernel_reports_host_differences() -> None:
    """On /dev/kvm the example's SMM lines fail (this host has one address space): replay
    says so line by line, exit 1; the model with the same host's profile agrees."""
    example = str(ROOT / "examples" / "vmm-boot.jsonl")
    kvm = _cli("replay", "--backend", "kvm", "--json", example)
    assert kvm.returncode == 1
    steps = json.loads(kvm.stdout)["steps"]
    failed = {s["line"] for s in steps if s["mismatch"]}
    assert failed == {6, 7}  # the SMM address space's slots
    skipped = {s["line"] for s in steps if s["errno"] is None}
    assert skipped == {20, 21, 22}  # modelled guest writes need a vCPU on the kernel
    both = _cli("replay", "--backend", "both", "--profile", "detect", "--json", example)
    data = json.loads(both.stdout)
    assert not [s for s in data["steps"] if any("divergence" in p for p in s.get("problems", []))]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memslot", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)

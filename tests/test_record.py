"""``memslot record`` on real VMMs: a Python VMM (memslot's own KvmVM) and QEMU. Each
recording must replay on the model and on the kernel with every result matched; QEMU's must
also equal what QEMU's own ``-trace kvm_set_user_memory`` printed in the same run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memslot import KvmVM, ModelVM, detect_profile
from memslot.backends.base import VM
from memslot.harness.replay import Replayer
from memslot.trace.qemu import parse_qemu_trace
from memslot.trace.reader import read_trace
from memslot.trace.records import SetRegion, TraceOp

pytestmark = pytest.mark.kvm

STRACE = shutil.which("strace")
QEMU = shutil.which("qemu-system-x86_64")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace not installed (make deps-record)")

VMM = textwrap.dedent("""
    import ctypes, mmap
    from memslot import KvmVM, KvmError
    from memslot.constants import (KVM_CAP_GUEST_MEMFD, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                   KVM_CAP_NR_MEMSLOTS, KVM_MEM_GUEST_MEMFD,
                                   KVM_MEM_LOG_DIRTY_PAGES)
    ram = mmap.mmap(-1, 4 << 20)
    ua = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    with KvmVM() as vm, KvmVM() as other:
        vm.check_extension(KVM_CAP_NR_MEMSLOTS)
        vm.check_extension(KVM_CAP_GUEST_MEMFD)
        vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 << 20, ua)
        other.set_user_memory_region(0, 0, 0x100000, 1 << 20, ua)
        fd = vm.create_guest_memfd(4 << 20)
        vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, 1 << 32, 2 << 20, ua, fd, 2 << 20)
        vm.get_dirty_log(0)
        vm.clear_dirty_log(0, 64, 128, bytes([0xA5]) * 16)
        try:
            vm.set_user_memory_region(2, 0, 0x1000, 4096, ua)   # inside slot 0: EEXIST
        except KvmError:
            pass
        vm.set_user_memory_region(0, 0, 0, 0, ua)               # DELETE
        other.set_user_memory_region(0, 0, 0x200000, 1 << 20, ua)  # MOVE
    del ram
""")


def record(tmp_path: Path, command: list[str], stop_when_idle: float | None = None,
           ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``memslot record`` on ``command`` (in its own session, killed whatever happens);
    ``stop_when_idle``: SIGTERM it once the log has not grown for that many seconds."""
    out = tmp_path / "rec.strace"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memslot", "record", "-o", str(out), "--", *command],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, cwd=tmp_path,
    )
    try:
        if stop_when_idle is not None:
            size, since = -1, time.monotonic()
            while proc.poll() is None and time.monotonic() - since < stop_when_idle:
                time.sleep(0.2)
                now = out.stat().st_size if out.exists() else 0
                if now != size:
                    size, since = now, time.monotonic()
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out


def replay_all(vm: VM, ops: list[TraceOp]) -> list[str]:
    replayer = Replayer(vm)
    try:
        steps = [replayer.step(op) for op in ops]
    finally:
        replayer.close()
    problems = [f"L{s.op.line}: {p}" for s in steps for p in s.problems]
    problems += [f"L{s.op.line}: skipped ({s.message})" for s in steps if s.skipped]
    return problems


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[VM]:
    vm: VM = ModelVM(detect_profile()) if request.param == "model" else KvmVM()
    try:
        yield vm
    finally:
        vm.close()


@needs_strace
@pytest.mark.parametrize("backend", ["model", "kvm"], indirect=True)
def test_python_vmm_recording_replays(tmp_path: Path, backend: VM) -> None:
    script = tmp_path / "vmm.py"
    script.write_text(VMM)
    done, out = record(tmp_path, [sys.executable, str(script)])
    assert done.returncode == 0, done.stderr
    ops = read_trace(str(out))
    kinds = [(op.vm, op.op) for op in ops]
    assert kinds == [
        (0, "create_vm"), (0, "check_extension"),  # KvmVM() asks MULTI_ADDRESS_SPACE
        (1, "create_vm"), (1, "check_extension"),
        (0, "check_extension"), (0, "check_extension"), (0, "enable_cap"), (0, "set"),
        (1, "set"), (0, "create_guest_memfd"), (0, "set"), (0, "get_dirty_log"),
        (0, "clear_dirty_log"), (0, "set"), (0, "set"), (1, "set"),
    ], kinds
    by_op = {op.op: op for op in ops}
    gmem = by_op["create_guest_memfd"]
    v2 = [op for op in ops if isinstance(op, SetRegion) and op.region.guest_memfd is not None]
    assert len(v2) == 1 and v2[0].region.guest_memfd == getattr(gmem, "fd", None)
    assert v2[0].region.guest_memfd_offset == 2 << 20
    clear = by_op["clear_dirty_log"]
    assert (getattr(clear, "first_page", None), getattr(clear, "bitmap", None)) == \
        (64, bytes([0xA5]) * 16)
    assert [op.expect for op in ops if isinstance(op, SetRegion)] == [0, 0, 0, 17, 0, 0]
    assert replay_all(backend, ops) == []


@needs_strace
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (make deps-record)")
@pytest.mark.parametrize("backend", ["model", "kvm"], indirect=True)
def test_qemu_recording_equals_its_own_trace_and_replays(tmp_path: Path, backend: VM) -> None:
    assert QEMU is not None
    qemu_log = tmp_path / "qemu.trace"
    done, out = record(tmp_path, [
        QEMU, "-accel", "kvm", "-machine", "q35", "-m", "128M", "-nographic", "-nodefaults",
        "-S", "-trace", "kvm_set_user_memory", "-D", str(qemu_log),
    ], stop_when_idle=3.0)
    assert done.returncode == 0, done.stderr  # stopped by SIGTERM, nothing missed
    assert "stopped by SIGTERM" in done.stderr
    ops = read_trace(str(out))
    with open(qemu_log) as f:
        traced = list(parse_qemu_trace(f, str(qemu_log)))
    assert len(traced) >= 5
    recorded = [(op.region, op.expect) for op in ops if isinstance(op, SetRegion)]
    assert recorded == [(op.region, op.expect) for op in traced if isinstance(op, SetRegion)]
    assert {op.vm for op in ops} == {0}
    assert replay_all(backend, ops) == []

"""``memslot record`` on real VMMs: a Python VMM (memslot's own KvmVM) and QEMU. Each
recording must replay on the model and on the kernel with every result matched; QEMU's must
also equal what QEMU's own ``-trace kvm_set_user_memory`` printed in the same run."""

from __future__ import annotations

import ctypes
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

import qmp
from memslot import KvmVM, ModelVM, detect_profile
from memslot.backends.base import VM
from memslot.harness.replay import Replayer
from memslot.trace.qemu import parse_qemu_trace
from memslot.trace.reader import iter_trace, read_trace
from memslot.trace.records import (
    ClearDirtyLog,
    EnableCap,
    GetDirtyLog,
    SetRegion,
    TraceFormatError,
    TraceOp,
)

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


@pytest.fixture(scope="module")
def python_recording(tmp_path_factory: pytest.TempPathFactory) -> list[TraceOp]:
    """The Python VMM above, recorded once for both backends."""
    if STRACE is None:
        pytest.skip("strace not installed (make deps-record)")
    tmp_path = tmp_path_factory.mktemp("python-vmm")
    script = tmp_path / "vmm.py"
    script.write_text(VMM)
    done, out = record(tmp_path, [sys.executable, str(script)])
    assert done.returncode == 0, done.stderr
    return read_trace(str(out))


@pytest.mark.kvm
@pytest.mark.parametrize("backend", ["model", "kvm"], indirect=True)
def test_python_vmm_recording_replays(python_recording: list[TraceOp], backend: VM) -> None:
    ops = python_recording
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


@pytest.fixture(scope="module")
def qemu_recording(tmp_path_factory: pytest.TempPathFactory,
                   ) -> tuple[list[TraceOp], list[TraceOp]]:
    """QEMU q35 (stopped with -S, then by SIGTERM) recorded once: (recording, QEMU's trace)."""
    if STRACE is None or QEMU is None:
        pytest.skip("strace and qemu-system-x86_64 needed (make deps-record)")
    tmp_path = tmp_path_factory.mktemp("qemu")
    qemu_log = tmp_path / "qemu.trace"
    done, out = record(tmp_path, [
        QEMU, "-accel", "kvm", "-machine", "q35", "-m", "128M", "-nographic", "-nodefaults",
        "-S", "-trace", "kvm_set_user_memory", "-D", str(qemu_log),
    ], stop_when_idle=3.0)
    assert done.returncode == 0, done.stderr  # stopped by SIGTERM, nothing missed
    assert "stopped by SIGTERM" in done.stderr
    with open(qemu_log) as f:
        traced = list(parse_qemu_trace(f, str(qemu_log)))
    return read_trace(str(out)), traced


@pytest.mark.kvm
@pytest.mark.parametrize("backend", ["model", "kvm"], indirect=True)
def test_qemu_recording_equals_its_own_trace_and_replays(
    qemu_recording: tuple[list[TraceOp], list[TraceOp]], backend: VM
) -> None:
    ops, traced = qemu_recording
    assert len(traced) >= 5
    recorded = [(op.region, op.expect) for op in ops if isinstance(op, SetRegion)]
    assert recorded == [(op.region, op.expect) for op in traced if isinstance(op, SetRegion)]
    assert {op.vm for op in ops} == {0}
    assert replay_all(backend, ops) == []


def qmp_migrate_and_quit(path: Path, timeout: float = 120.0) -> str:
    """Over QMP: migrate to /dev/null (every slot dirty-logged, the logs fetched and cleared),
    then quit. Returns the migration's final status."""
    deadline = time.monotonic() + timeout
    with qmp.connect(path, timeout) as sock, sock.makefile("rw") as f:
        def command(name: str, **arguments: object) -> dict[str, object]:
            return qmp.command(f, name, **arguments)

        f.readline()  # the greeting
        command("qmp_capabilities")
        assert "error" not in command("migrate", uri="exec:cat > /dev/null")
        status = ""
        while status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = command("query-migrate")["return"]
            status = str(answer.get("status", "")) if isinstance(answer, dict) else ""
        command("quit")
    return status


@pytest.fixture(scope="module")
def qemu_migration(tmp_path_factory: pytest.TempPathFactory,
                   ) -> tuple[list[TraceOp], list[TraceOp], int]:
    """QEMU q35 migrated (paused) to /dev/null over QMP, then quit, recorded once:
    (recording, QEMU's kvm_set_user_memory + kvm_clear_dirty_log trace, calls missed: 0)."""
    if STRACE is None or QEMU is None:
        pytest.skip("strace and qemu-system-x86_64 needed (make deps-record)")
    tmp_path = tmp_path_factory.mktemp("qemu-migrate")
    qemu_log, qmp = tmp_path / "qemu.trace", tmp_path / "qmp.sock"
    out = tmp_path / "rec.strace"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memslot", "record", "-o", str(out), "--",
         QEMU, "-accel", "kvm", "-machine", "q35", "-m", "128M", "-nographic", "-nodefaults", "-S",
         "-qmp", f"unix:{qmp},server=on,wait=off", "-trace", "kvm_set_user_memory",
         "-trace", "kvm_clear_dirty_log", "-D", str(qemu_log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, cwd=tmp_path,
    )
    try:
        assert qmp_migrate_and_quit(qmp) == "completed"
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The seccomp hold stops each call until its struct is read: none is missed, however
    # busy the host.
    assert proc.returncode == 0, stderr
    assert "calls held by seccomp until read" in stderr
    errors: list[TraceFormatError] = []
    ops = list(iter_trace(str(out), "auto", errors))
    assert errors == [], errors[:3]
    with open(qemu_log) as f:
        traced = list(parse_qemu_trace(f, str(qemu_log)))
    return ops, traced, len(errors)


@pytest.mark.kvm
@pytest.mark.parametrize("backend", ["model", "kvm"], indirect=True)
def test_qemu_migration_recording_equals_its_trace_and_replays(
    qemu_migration: tuple[list[TraceOp], list[TraceOp], int], backend: VM
) -> None:
    """Dirty logging switched on per slot (FLAGS_ONLY), KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG
    with QEMU's bitmaps, after KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) -- all decoded from
    the argument bytes."""
    ops, traced, missed = qemu_migration

    def key(op: TraceOp) -> tuple[object, ...]:
        if isinstance(op, SetRegion):
            return ("set", op.region, op.expect)
        assert isinstance(op, ClearDirtyLog)
        return ("clear", op.slot, op.first_page, op.num_pages)

    clears = [op for op in ops if isinstance(op, ClearDirtyLog)]
    assert clears and all(op.bitmap for op in clears)
    assert any(isinstance(op, GetDirtyLog) for op in ops)
    assert any(isinstance(op, EnableCap) for op in ops)
    recorded = [key(op) for op in ops if isinstance(op, SetRegion | ClearDirtyLog)]
    assert missed == 0 and recorded == [key(op) for op in traced]
    assert replay_all(backend, ops) == []


TICKING = textwrap.dedent("""
    import sys, time
    from memslot import KvmVM
    with KvmVM() as vm:
        print("ready", flush=True)
        for i in range(600):
            vm.set_user_memory_region(i, 0, i << 20, 1 << 20, 0x7F0000000000 + (i << 20))
            time.sleep(0.1)
""")


@pytest.mark.kvm
@needs_strace
def test_attach_to_a_running_vmm_and_detach_on_sigint(tmp_path: Path) -> None:
    script = tmp_path / "ticking.py"
    script.write_text(TICKING)
    vmm = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    out = tmp_path / "attach.strace"
    rec = None
    try:
        assert vmm.stdout is not None and vmm.stdout.readline() == "ready\n"
        rec = subprocess.Popen(
            [sys.executable, "-m", "memslot", "record", "-o", str(out), "--pid", str(vmm.pid)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 30
        while not out.exists() or out.read_text().count("0x4020ae46") < 3:
            assert time.monotonic() < deadline, "nothing recorded"
            time.sleep(0.1)
        rec.send_signal(signal.SIGINT)
        _, stderr = rec.communicate(timeout=30)
        assert rec.returncode == 0, stderr
        assert "stopped by SIGINT" in stderr
        assert vmm.poll() is None  # detached, still running
    finally:
        for proc in (rec, vmm):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    ops = read_trace(str(out))
    assert len(ops) >= 3 and all(isinstance(op, SetRegion) and op.expect == 0 for op in ops)
    assert {op.vm for op in ops} == {0}  # the VM made before the attach, named by -y
    ids = [op.region.slot for op in ops if isinstance(op, SetRegion)]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    with ModelVM() as vm:
        assert replay_all(vm, ops) == []


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memslot", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_record_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    for args, message in [
        ((), "nothing to record"),
        (("--pid", "1", "--", "true"), "not both"),
        (("--pid", "999999999"), "no such process"),
        (("--hold-ms", "-1", "--", "true"), "must not be negative"),
        (("--", str(tmp_path / "no-such-vmm")), "command not found"),
    ]:
        done = run_cli("record", "-o", str(tmp_path / "x.strace"), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    env = dict(os.environ, PATH=str(tmp_path))  # no strace on it
    done = run_cli("record", "-o", str(tmp_path / "y.strace"), "--", "true", env=env)
    assert done.returncode == 2
    assert done.stderr == ("memslot: error: strace is not installed (Debian: apt-get install "
                           "strace, or `make deps-record` in the memslot sources)\n")
    assert not (tmp_path / "x.strace").exists() and not (tmp_path / "y.strace").exists()


def test_a_thread_not_held_at_the_call_is_never_read() -> None:
    """The recorder reads a struct only from a thread stopped at that very ioctl: a running
    or sleeping thread, or one in another call, gives nothing rather than a wrong value."""
    from memslot.harness.record import read_held

    data = bytearray(b"\x01" * 64)
    address = ctypes.addressof((ctypes.c_char * 64).from_buffer(data))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for tid in (os.getpid(), sleeper.pid):
            assert read_held(tid, 4, 0xC040AED4, address) is None
    finally:
        sleeper.kill()
        sleeper.wait()


LOADED = Path(__file__).resolve().parent.parent / "examples" / "vmms" / "struct_churn.py"


def cpu_hogs(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` busy loops at ordinary priority (one more than each CPU can run)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def recorded_under_load(tmp_path: Path, rounds: int, *extra: str,
                        ) -> tuple[subprocess.CompletedProcess[str], list[TraceOp],
                                   list[TraceFormatError]]:
    script = LOADED
    hogs = cpu_hogs(2 * (os.cpu_count() or 1))
    try:
        out = tmp_path / "loaded.strace"
        done = subprocess.run(
            [sys.executable, "-m", "memslot", "record", *extra, "-o", str(out), "--",
             sys.executable, str(script), str(rounds)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    errors: list[TraceFormatError] = []
    return done, list(iter_trace(str(out), "auto", errors)), errors


@pytest.mark.kvm
@needs_strace
def test_no_struct_is_missed_under_load(tmp_path: Path) -> None:
    """Hundreds of REGION2, guest_memfd and CLEAR_DIRTY_LOG calls while CPU hogs keep every
    CPU busy: the seccomp hold stops each call until its struct is read, so every one is
    decoded, and the recording replays on the kernel with every result matched."""
    rounds = 150
    done, ops, errors = recorded_under_load(tmp_path, rounds)
    assert done.returncode == 0 and errors == [], (done.stderr, errors[:3])
    assert "calls held by seccomp until read" in done.stderr
    counts = {kind: sum(1 for op in ops if op.op == kind)
              for kind in ("create_guest_memfd", "set", "clear_dirty_log", "enable_cap")}
    assert counts == {"create_guest_memfd": rounds, "set": 1 + 2 * rounds,
                      "clear_dirty_log": rounds, "enable_cap": 1}, counts
    clears = [op for op in ops if isinstance(op, ClearDirtyLog)]
    assert [(op.first_page, op.bitmap) for op in clears] == [
        (64 * (i % 8), bytes([i & 0xFF]) * 8) for i in range(rounds)]
    v2 = [op for op in ops if isinstance(op, SetRegion) and op.region.guest_memfd is not None]
    assert len(v2) == 2 * rounds and all(op.expect == 0 for op in v2)
    with KvmVM() as vm:
        assert replay_all(vm, ops) == []


def test_a_missed_struct_is_marked_in_the_log_and_named_by_the_parser() -> None:
    from memslot.trace.strace import format_missed, parse_strace

    log = ["1  ioctl(4<anon_inode:kvm-vm>, _IOC(_IOC_WRITE, 0xae, 0x49, 0xa0), 0x7ffd3000) = 0\n",
           format_missed("the timed hold (50 ms) ended before the read"),
           "1  ioctl(4<anon_inode:kvm-vm>, KVM_ENABLE_CAP, 0x7ffd2000) = 0\n",
           format_missed("the thread left the call while it was read"),
           "1  ioctl(4<anon_inode:kvm-vm>, _IOC(_IOC_WRITE, 0xae, 0x49, 0xa0), 0x7ffd3000) "
           "= ? ERESTARTSYS (To be restarted if SA_RESTART is set)\n"]
    errors: list[TraceFormatError] = []
    assert list(parse_strace(log, "t.strace", errors)) == []
    assert [(e.line, e.message) for e in errors] == [
        (1, "KVM_SET_USER_MEMORY_REGION2: memslot record: argument bytes not read: the timed "
            "hold (50 ms) ended before the read"),
        (3, "KVM_ENABLE_CAP: memslot record: argument bytes not read: the thread left the "
            "call while it was read")]


@pytest.mark.kvm
@needs_strace
def test_a_timed_hold_too_short_marks_every_missed_struct(tmp_path: Path) -> None:
    """The timed hold (as --pid uses) may end before the read: each such call is marked in
    the log, counted, and reported by the parser with the cause, never decoded wrongly."""
    script = LOADED
    out = tmp_path / "short.strace"
    done = subprocess.run(
        [sys.executable, "-m", "memslot", "record", "--timed-hold", "--hold-ms", "0.001",
         "-o", str(out), "--", sys.executable, str(script), "3"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    marked = out.read_text().count(" | memslot record: argument bytes not read: ")
    errors: list[TraceFormatError] = []
    ops = list(iter_trace(str(out), "auto", errors))
    decoded = sum(1 for op in ops if op.op in ("create_guest_memfd", "clear_dirty_log",
                                                "enable_cap")) + sum(
        1 for op in ops if isinstance(op, SetRegion) and op.region.guest_memfd is not None)
    assert marked + decoded == 1 + 4 * 3 and marked == len(errors), done.stderr
    assert all("the timed hold (0.001 ms) ended before the read" in e.message for e in errors)
    if marked:
        assert done.returncode == 1 and f"{marked} call(s) whose arguments could not be read" \
            in done.stderr and "raise --hold-ms" in done.stderr

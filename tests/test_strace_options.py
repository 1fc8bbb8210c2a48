"""strace logs made here with plain ``strace OPTIONS -o FILE VMM`` (not ``memslot record``), in
every common output option alone and combined, read by every command without ``--format``
and replayed with every result matched. Where an option leaves something out (``-Z``, ``-z``,
``-e trace=``, a log cut short), the commands say so in one line, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qmp
from memslot.cli.main import main
from memslot.constants import KVM_CAP_NR_MEMSLOTS
from memslot.request import MemoryRegion
from memslot.trace.qemu import parse_qemu_trace
from memslot.trace.reader import TraceReader, read_trace
from memslot.trace.records import (
    CheckExtension,
    CreateVm,
    SetRegion,
    TraceFormatError,
    TraceOp,
)
from memslot.trace.strace import parse_strace

STRACE = shutil.which("strace")
QEMU = shutil.which("qemu-system-x86_64")
VMM = Path(__file__).parent.parent / "examples" / "vmms" / "raw_ioctls.py"
#: What examples/vmms/raw_ioctls.py makes: 54 memslot operations (2 refused) in 4 VMs.
OPERATIONS, REFUSED, VMS = 54, 2, 4
pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(STRACE is None, reason="strace not installed (make deps-record)")]


def strace(tmp_path: Path, options: list[str], name: str = "vmm.strace") -> Path:
    """Run the VMM under ``strace OPTIONS -o LOG`` and return the log's path."""
    assert STRACE is not None
    log = tmp_path / name
    done = subprocess.run([STRACE, *options, "-o", str(log), sys.executable, str(VMM)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return log


def replay(capsys: pytest.CaptureFixture[str], path: Path | str, *extra: str,
           status: int = 0) -> dict[str, object]:
    """``memslot replay -q --json --profile detect [extra] PATH`` -> its summary."""
    code = main(["replay", "-q", "--json", "--profile", "detect", *extra, str(path)])
    out = capsys.readouterr().out
    assert code == status, out
    summary: dict[str, object] = json.loads(out)
    return summary


def assert_whole(summary: dict[str, object]) -> None:
    """Every operation of the VMM, each result as recorded."""
    assert summary["operations"] == OPERATIONS
    assert summary["outcomes"] == {"ok": OPERATIONS - REFUSED, "refused": REFUSED, "skipped": 0}
    assert summary["mismatches"] == 0 and summary["malformed_lines"] == []
    assert len(summary["vms"]) == VMS  # type: ignore[arg-type]


#: Output options that show every call: each replays whole.
WHOLE = [
    ["-f"],
    ["-f", "-t"],
    ["-f", "-tt"],
    ["-f", "-ttt"],
    ["-f", "-r"],
    ["-f", "--relative-timestamps"],
    ["-f", "-T"],
    ["-f", "-i"],
    ["-f", "-y"],
    ["-f", "-yy"],
    ["-f", "-X", "raw"],
    ["-f", "-X", "verbose"],
    ["-f", "-v"],
    ["-f", "-s", "4"],
    ["-f", "-xx"],
    ["-f", "-n"],
    ["-f", "--decode-pids=comm"],
    ["-f", "-e", "trace=%desc"],
    ["-f", "-e", "trace=ioctl,close"],
    ["-f", "-e", "trace=ioctl", "-y"],
    ["-f", "-ttt", "-T", "-i", "-yy", "-X", "verbose", "-v", "-n"],
    ["-f", "-tt", "-T", "-y", "-X", "raw", "-n", "--decode-pids=comm", "-s", "0"],
    ["-f", "-r", "-T", "-i", "-X", "abbrev"],
]


@pytest.mark.parametrize("options", WHOLE, ids=" ".join)
def test_every_output_option_replays_every_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    log = strace(tmp_path, options)
    summary = replay(capsys, log)
    assert_whole(summary)
    # a plain log has KVM_ENABLE_CAP's pointer only: said, in one line
    assert (f"{log}: 1 KVM_ENABLE_CAP call without its argument bytes (strace prints only the "
            "pointer): which capability is unknown, left out (record with `memslot record`, "
            "which saves the argument bytes strace does not decode)"
            in str(summary["notice"]).splitlines())


@pytest.mark.parametrize("options", [["-f", "-tt", "-T", "-yy", "-X", "verbose"],
                                     ["-f", "-e", "trace=ioctl"]], ids=" ".join)
def test_replays_on_the_kernel_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   options: list[str]) -> None:
    assert_whole(replay(capsys, strace(tmp_path, options), "--backend", "both"))


def test_every_command_detects_the_log(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    log = str(strace(tmp_path, ["-f", "-ttt", "-T", "-i", "-yy", "-X", "verbose", "-n",
                                "--decode-pids=comm"]))
    assert main(["convert", log]) == 0
    ops = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(ops) == OPERATIONS and {op["vm"] for op in ops if "vm" in op} == {1, 2, 3}
    assert main(["explain", "--at", "10", log]) == 0
    assert "slot" in capsys.readouterr().out
    assert main(["report", "--json", "--profile", "x86_64-shadow", log]) == 0
    assert json.loads(capsys.readouterr().out)["reports"][0]["operations"] == OPERATIONS
    svg = tmp_path / "map.svg"
    assert main(["layout", log, "-o", str(svg)]) == 0
    assert "<svg" in svg.read_text()[:400]
    capsys.readouterr()


def test_strace_writing_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No ``-o``: ``strace -f VMM 2> LOG``. The first process's lines have no pid until it
    has company, then ``[pid N]``; a line broken before its result (``clone3(...`` then
    `` => {parent_tid=[N]}, 88) = N``) is continued by the next."""
    assert STRACE is not None
    log = tmp_path / "stderr.strace"
    with open(log, "w") as f:
        done = subprocess.run([STRACE, "-f", sys.executable, str(VMM)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=f, timeout=120)
    assert done.returncode == 0
    text = log.read_text()
    assert text.startswith("execve(") and "\n[pid " in text
    assert_whole(replay(capsys, log))


def test_no_timestamps_without_f_read_the_main_thread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-r`` without ``-f``: lines begin with blanks; only the first thread is traced."""
    log = strace(tmp_path, ["-r"])
    assert log.read_text().startswith("     0.000000 execve(")
    summary = replay(capsys, log)
    assert summary["mismatches"] == 0 and summary["operations"] == OPERATIONS - 40 - 2


@pytest.mark.parametrize("timestamps", [["-tt"], ["-ttt", "-T", "-y"], []],
                         ids=lambda t: " ".join(t) or "untimed")
def test_ff_files_read_by_their_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       timestamps: list[str]) -> None:
    """``strace -ff -o PREFIX``: one file per thread and process, given as PREFIX."""
    prefix = strace(tmp_path, ["-ff", *timestamps])
    assert not prefix.exists() and len(list(tmp_path.glob("vmm.strace.*"))) == 4
    summary = replay(capsys, prefix)
    assert_whole(summary)
    unordered = "the strace -ff files have no absolute timestamps"
    assert (unordered in str(summary["notice"])) == (not timestamps)
    # the files themselves, as a shell expands vmm.strace.*: the same
    files = sorted(str(p) for p in tmp_path.glob("vmm.strace.*"))
    assert_whole(replay(capsys, files[0], *files[1:]))
    # one file by its own name: read alone, as any log
    main_file = min(tmp_path.glob("vmm.strace.*"), key=lambda p: int(p.suffix[1:]))
    alone = replay(capsys, main_file)
    assert alone["mismatches"] == 0 and alone["operations"] == OPERATIONS - 40 - 2


def test_several_files_only_as_one_ff_set(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    one, other = tmp_path / "a.strace.10", tmp_path / "b.strace.11"
    one.write_text("10 ioctl(3, KVM_CREATE_VM, 0) = 4\n")
    other.write_text("11 ioctl(3, KVM_CREATE_VM, 0) = 4\n")
    for files in ([one, other], [one, tmp_path / "plain.strace"]):
        assert main(["replay", *map(str, files)]) == 2
        assert "several files are read together only as the PREFIX.PID files of one strace " \
               "-ff -o PREFIX" in capsys.readouterr().err


ATTACHED = """
import ctypes, fcntl, mmap, os, struct, sys
ram = mmap.mmap(-1, 4 << 20)
ua = ctypes.addressof(ctypes.c_char.from_buffer(ram))
def region(vm, slot, gpa, size):
    fcntl.ioctl(vm, 0x4020AE46, struct.pack("<IIQQQ", slot, 0, gpa, size, ua))
vm = fcntl.ioctl(os.open("/dev/kvm", os.O_RDWR), 0xAE01, 0)
region(vm, 0, 0, 1 << 20)
print("ready", flush=True)
sys.stdin.readline()                 # strace -p attaches meanwhile
region(vm, 1, 1 << 20, 1 << 20)      # CREATE
region(vm, 1, 1 << 20, 0)            # DELETE
del ram
"""


def test_an_attach_says_the_vm_was_made_before_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``strace -p``: the VM and its slot 0 were made before the log began."""
    assert STRACE is not None
    log = tmp_path / "attached.strace"
    vmm = subprocess.Popen([sys.executable, "-c", ATTACHED], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, start_new_session=True)
    tracer = None
    try:
        assert vmm.stdout is not None and vmm.stdin is not None
        assert vmm.stdout.readline() == "ready\n"
        tracer = subprocess.Popen([STRACE, "-f", "-o", str(log), "-p", str(vmm.pid)],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None and "attached" in tracer.stderr.readline()
        vmm.stdin.write("go\n")
        vmm.stdin.flush()
        assert vmm.wait(timeout=60) == 0 and tracer.wait(timeout=60) == 0
    finally:
        for proc in (vmm, tracer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    summary = replay(capsys, log)
    assert summary["operations"] == 2 and summary["mismatches"] == 0
    assert "1 VM in use but not made in the log (strace -p, or a VM made before the log " \
           "began?): its earlier slots are unknown, so results are replayed from an empty VM" \
           in str(summary["notice"])


def test_failed_only_and_successful_only_logs_say_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = strace(tmp_path, ["-f", "-Z"], "failed.strace")
    summary = replay(capsys, failed, status=1)  # the refused calls, on empty VMs
    assert "every call in the log failed (strace -Z" in str(summary["notice"])
    assert summary["operations"] == REFUSED
    succeeded = strace(tmp_path, ["-f", "-z"], "ok.strace")
    summary = replay(capsys, succeeded)
    assert "no call in the log failed (strace -z" in str(summary["notice"])
    assert summary["operations"] == OPERATIONS - REFUSED and summary["mismatches"] == 0


def test_trace_filters_say_what_the_log_cannot_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    only = strace(tmp_path, ["-f", "-e", "trace=ioctl"], "ioctl.strace")
    summary = replay(capsys, only)
    assert_whole(summary)  # the reused descriptor told apart by KVM_CREATE_VM's result
    assert "the log shows no open or close call (strace -e trace=ioctl?)" in str(
        summary["notice"])
    without = strace(tmp_path, ["-f", "-e", "trace=!ioctl"], "no-ioctl.strace")
    summary = replay(capsys, without)
    assert summary["operations"] == 0
    assert "the log has no ioctl call (strace -e trace= without ioctl?)" in str(
        summary["notice"])


def test_stack_traces_after_calls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``-k``: frames (`` > lib(fn+0x..) [0x..]``) after each call (ioctls only: -k is slow)."""
    log = strace(tmp_path, ["-f", "-k", "-e", "trace=ioctl"])
    assert "\n > " in log.read_text()
    assert_whole(replay(capsys, log))


def test_crlf_bom_and_a_last_line_cut_short(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    log = strace(tmp_path, ["-f", "-tt"])
    text = log.read_text()
    windows = tmp_path / "crlf.strace"
    windows.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert_whole(replay(capsys, windows))
    # strace killed while writing: the log ends inside the last region call's line
    last = text.rindex("KVM_SET_USER_MEMORY_REGION, {slot=0")
    cut = tmp_path / "cut.strace"
    cut.write_text(text[:last + 40])
    summary = replay(capsys, cut)
    assert summary["operations"] == OPERATIONS - 1 and summary["mismatches"] == 0
    assert ", the last, is cut short (strace killed while writing it?): its call is left " \
           "out" in str(summary["notice"])


def test_strace_killed_mid_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL to strace while the VMM runs: whatever the log holds replays, no traceback."""
    assert STRACE is not None
    log = tmp_path / "killed.strace"
    proc = subprocess.Popen([STRACE, "-f", "-tt", "-o", str(log), sys.executable, str(VMM)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "KVM_SET_USER_MEMORY_REGION" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the VMM, if strace left it running
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    summary = replay(capsys, log, status=0)
    assert 1 <= int(summary["operations"]) <= OPERATIONS  # type: ignore[call-overload]
    assert summary["mismatches"] == 0


def qmp_quit(path: Path, timeout: float = 60.0) -> None:
    with qmp.connect(path, timeout) as sock, sock.makefile("rw") as f:
        f.readline()  # the greeting
        for name in ("qmp_capabilities", "quit"):
            qmp.command(f, name)


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (make deps-record)")
def test_qemu_under_plain_strace_equals_its_own_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QEMU q35 -S under ``strace -f -tt -T -yy -X verbose -n``: its set-region calls are
    those QEMU's own ``-trace kvm_set_user_memory`` printed, and replay matched on both."""
    assert STRACE is not None and QEMU is not None
    log, qemu_log, qmp = tmp_path / "qemu.strace", tmp_path / "qemu.trace", tmp_path / "q.sock"
    proc = subprocess.Popen(
        [STRACE, "-f", "-tt", "-T", "-yy", "-X", "verbose", "-n", "-o", str(log),
         QEMU, "-accel", "kvm", "-machine", "q35", "-m", "128M", "-nographic", "-nodefaults",
         "-S", "-qmp", f"unix:{qmp},server=on,wait=off", "-trace", "kvm_set_user_memory",
         "-D", str(qemu_log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True, cwd=tmp_path)
    try:
        qmp_quit(qmp)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    ops = read_trace(str(log))
    with open(qemu_log) as f:
        traced = [(op.region, op.expect) for op in parse_qemu_trace(f)]
    assert len(traced) >= 5
    assert [(op.region, op.expect) for op in ops if isinstance(op, SetRegion)] == traced
    summary = replay(capsys, log, "--backend", "both")
    assert summary["mismatches"] == 0 and summary["operations"] == len(ops)


# -- lines strace prints that this strace (6.1) does not: other versions and rare results ----


def parse(text: str, notes: list[str] | None = None) -> list[TraceOp]:
    return list(parse_strace(text.splitlines(keepends=True), "t.strace", None, notes))


REGION = ("{slot=0, flags=KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=0x100000, "
          "memory_size=1048576, userspace_addr=0x7f0000000000}")
EXPECTED = [CreateVm(0, 0, 1, "", 0),
            SetRegion(MemoryRegion(0, 1, 0x100000, 1 << 20, 0x7F0000000000), 0, 2)]


@pytest.mark.parametrize("lines", [
    # argument names (newer strace)
    ["9 ioctl(fd=3, op=KVM_CREATE_VM, argp=0) = 4\n",
     f"9 ioctl(fd=4, op=KVM_SET_USER_MEMORY_REGION, argp={REGION}) = 0\n"],
    # strace before ioctl names: _IOC(...) requests
    ["9 ioctl(3, _IOC(_IOC_NONE, 0xae, 0x1, 0), 0) = 4\n",
     f"9 ioctl(4, _IOC(_IOC_WRITE, 0xae, 0x46, 0x20), {REGION}) = 0\n"],
    # -e raw=ioctl prints the descriptor in hex too (the region then is a pointer: below)
    ["9 ioctl(0x3, 0xae01, 0) = 4\n", f"9 ioctl(0x4, 0x4020ae46, {REGION}) = 0\n"],
    # [pid N<comm>] without -o, -n, -i
    ["[pid 9<qemu>] [  16] [00007f3a1c51bd6b] ioctl(3, KVM_CREATE_VM, 0) = 4\n",
     f"[pid 9<qemu>] [  16] [00007f3a1c51bd6b] ioctl(4, KVM_SET_USER_MEMORY_REGION, {REGION})"
     " = 0\n"],
], ids=["arg-names", "ioc-requests", "raw-hex-fd", "pid-comm-n-i"])
def test_other_strace_spellings(lines: list[str]) -> None:
    assert parse("".join(lines)) == EXPECTED


def test_rare_results() -> None:
    text = (
        "9 ioctl(3, KVM_CREATE_VM, 0) = 4\n"
        f"9 ioctl(4, KVM_SET_USER_MEMORY_REGION, {REGION}) = 0\n"
        # interrupted, restarted (ERESTART_RESTARTBLOCK has an underscore): not a call
        f"9 ioctl(4, KVM_SET_USER_MEMORY_REGION, {REGION}) = ? ERESTART_RESTARTBLOCK "
        "(Interrupted by signal)\n"
        # strace could not fetch the result: unknown
        f"9 ioctl(4, KVM_SET_USER_MEMORY_REGION, {REGION}) = ? <unavailable>\n"
    )
    ops = parse(text)
    unknown = SetRegion(MemoryRegion(0, 1, 0x100000, 1 << 20, 0x7F0000000000), None, 4)
    assert ops == [*EXPECTED, unknown]


def test_a_call_line_broken_before_its_result() -> None:
    """Continued by the next line when that is no call of its own; else named."""
    clone = ("9 clone3({flags=CLONE_VM|CLONE_FILES|CLONE_THREAD, exit_signal=0, stack=0x7f00, "
             "stack_size=0x7fff00}\n")
    text = ("9 ioctl(3, KVM_CREATE_VM, 0) = 4\n"
            + clone.replace("}\n", "}/usr/bin/strace: Process 10 attached\n")
            + " => {parent_tid=[10]}, 88) = 10\n"
            "9 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|SIGCHLD\n"
            "strace: Process 11 attached\n"
            ", child_tidptr=0x7f837160ae50) = 11\n"
            + clone + " <unfinished ...>\n"
            "12 rseq(0x7fea3ee2cfe0, 0x20, 0, 0x53053053) = 0\n"
            "9 <... clone3 resumed> => {parent_tid=[12]}, 88) = 12\n"
            f"10 ioctl(4, KVM_SET_USER_MEMORY_REGION, {REGION}) = 0\n"
            "11 ioctl(4, KVM_CREATE_VM, 0) = -1 ENOTTY (Inappropriate ioctl for device)\n")
    moved = SetRegion(MemoryRegion(0, 1, 0x100000, 1 << 20, 0x7F0000000000), 0, 11)
    assert parse(text) == [EXPECTED[0], moved]
    errors: list[TraceFormatError] = []
    broken = "9 ioctl(3, KVM_CREATE_VM, 0) = 4\n" + clone + "9 close(4) = 0\n"
    assert list(parse_strace(broken.splitlines(keepends=True), "t.strace", errors)) == \
        EXPECTED[:1]
    assert [str(e) for e in errors] == ["t.strace:2: clone3: truncated or malformed call (no "
                                        "') = result')"]
    with pytest.raises(TraceFormatError, match=r"t.strace:2: clone3: truncated"):
        parse("9 ioctl(3, KVM_CREATE_VM, 0) = 4\n" + clone)


def test_a_pointer_only_region_names_the_cause() -> None:
    with pytest.raises(TraceFormatError, match=r"t.strace:2: KVM_SET_USER_MEMORY_REGION: the "
                       r"log has only the struct's address \('0x7ffd1234'\): strace -e "
                       r"raw=ioctl"):
        parse("9 ioctl(0x3, 0xae01, 0) = 4\n9 ioctl(0x4, 0x4020ae46, 0x7ffd1234) = 0\n")


def test_hex_strings_name_dev_kvm() -> None:
    """``-xx``: the path in hex (a system KVM_CHECK_EXTENSION is kept only on /dev/kvm)."""
    text = ('9 openat(AT_FDCWD, "\\x2f\\x64\\x65\\x76\\x2f\\x6b\\x76\\x6d", O_RDWR) = 3\n'
            "9 ioctl(3, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS) = 32764\n")
    assert parse(text) == [CheckExtension(KVM_CAP_NR_MEMSLOTS, 32764, True, 0, 2)]


def test_a_vm_descriptor_reused_by_dev_kvm_without_close_lines() -> None:
    """-e trace=ioctl: fd 4 was a VM, was closed (not shown) and is /dev/kvm now."""
    notes: list[str] = []
    ops = parse("9 ioctl(3, KVM_CREATE_VM, 0) = 4\n"
                "9 ioctl(4, KVM_CREATE_VM, 0) = 5\n"
                f"9 ioctl(5, KVM_SET_USER_MEMORY_REGION, {REGION}) = 0\n", notes)
    assert [(type(op).__name__, op.vm) for op in ops] == [
        ("CreateVm", 0), ("CreateVm", 1), ("SetRegion", 1)]
    assert notes == ["the log shows no open or close call (strace -e trace=ioctl?): "
                     "descriptors are followed by their ioctls alone, and a closed VM is "
                     "taken as live until its descriptor is made again"]


def test_reader_notes_are_per_input(tmp_path: Path) -> None:
    path = tmp_path / "t.strace"
    path.write_text("9 ioctl(3, KVM_CREATE_VM, 0) = 4\n"
                    f"9 ioctl(4, KVM_SET_USER_MEMORY_REGION, {REGION}")  # cut short
    reader = TraceReader(str(path))
    assert list(reader) == EXPECTED[:1]
    assert reader.notes[-1] == ("line 2, the last, is cut short (strace killed while writing "
                                "it?): its call is left out")

#!/usr/bin/env python3
"""strace-log reading speed: lines per second of ``TraceReader`` (auto-detected) over a
generated ``strace -f`` log, the way every command reads one.

    python bench/bench_strace_parse.py                      # 400,000 lines, 3 runs, median
    python bench/bench_strace_parse.py --options "-f -tt -T -y" --lines 100000 --keep log

The log is what a busy VMM's looks like: most lines are not KVM (reads, writes, futex waits
split into ``<unfinished ...>`` / ``<... resumed>`` across threads, ``KVM_RUN`` on vCPU fds,
signals), one line in 20 a ``KVM_SET_USER_MEMORY_REGION`` churning 64 slots (CREATE, then
DELETE) with its real errno, one in 400 an ``KVM_CHECK_EXTENSION``. ``--options`` picks the
strace output options the lines are written with (``-t``/``-tt``/``-ttt``/``-r``, ``-T``,
``-i``, ``-n``, ``-y``, ``--decode-pids=comm``; ``-f`` always). Each run reads the whole file
in this process; the figure is CPU time (process time), the median of the runs.

Measured 2026-11-29 on this project's 2-CPU machine, shared (the full test suite ran beside
it), pure Python, 200,000 lines, medians of 3 runs, two rounds, the old reader run from main's
sources before this work (``PYTHONPATH=/tmp/before/src``, a ``git archive`` of e7bc6c2)
alternating with the new one in the same session:

    python bench/bench_strace_parse.py --options="-f" --lines 200000
    python bench/bench_strace_parse.py --options="-f -tt -T -y" --lines 200000

                          main at e7bc6c2 (before)    after
    -f                    94,000 / 92,000 lines/s     151,000 / 165,000 lines/s  (1.6-1.8x)
    -f -tt -T -y          70,000 / 77,000 lines/s     154,000 / 156,000 lines/s  (2.0-2.2x)
    -f -ttt -n -i --decode-pids=comm   (read no call)  147,000 lines/s

What changed: a call that is not one of the few read is dropped after its name, before its result is
split out, and arguments are split by visiting only the characters that matter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from memslot.trace.reader import TraceReader


def _prefix(options: set[str], pid: int, n: int) -> str:
    parts = [f"{pid}<qemu-system-x86>" if "--decode-pids=comm" in options else f"{pid} "]
    if "-ttt" in options:
        parts.append(f"{1700000000 + n / 1e4:.6f}")
    elif "-tt" in options:
        parts.append(f"12:{(n // 600000) % 60:02d}:{(n // 10000) % 60:02d}.{n % 10000:06d}")
    elif "-t" in options:
        parts.append(f"12:{(n // 600000) % 60:02d}:{(n // 10000) % 60:02d}")
    elif "-r" in options:
        parts.append("     0.000013")
    if "-n" in options:
        parts.append("[  16]")
    if "-i" in options:
        parts.append("[00007f3a1c51bd6b]")
    return " ".join(parts) + " "


def generate(path: str, lines: int, options: set[str]) -> int:
    """Write the log; returns the number of set-region calls in it."""
    y = "-y" in options
    t = " <0.000012>" if "-T" in options else ""
    kvm, vm = ("3</dev/kvm>", "4<anon_inode:kvm-vm>") if y else ("3", "4")
    vcpu = "12<anon_inode:kvm-vcpu:0>" if y else "12"
    main, io, cpu = 1000, 1001, 1002
    out = [f"{main} execve(\"/usr/bin/qemu-system-x86_64\", [\"qemu\"], 0x7ffd /* 30 vars */) "
           f"= 0{t}\n",
           f"{main} openat(AT_FDCWD, \"/dev/kvm\", O_RDWR|O_CLOEXEC) = 3{t}\n",
           f"{main} ioctl({kvm}, KVM_CREATE_VM, 0) = 4{t}\n",
           f"{main} ioctl({vm}, KVM_CREATE_VCPU, 0) = 12{t}\n",
           f"{main} clone3({{flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|"
           f"CLONE_SYSVSEM, exit_signal=0, stack=0x7f00, stack_size=0x7fff00}}, 88) = {io}{t}\n",
           f"{main} clone3({{flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|"
           f"CLONE_SYSVSEM, exit_signal=0, stack=0x7f00, stack_size=0x7fff00}}, 88) = {cpu}{t}\n"]
    live: set[int] = set()
    regions = 0
    n = len(out)
    while n < lines:
        k = n % 20
        p = _prefix
        if k == 0:
            slot = (n // 20) % 64
            gpa = slot << 24
            if slot in live:
                size, err = 0, ""
                live.discard(slot)
            elif n % 1000 == 0:  # overlaps slot 0's range: refused
                size, err, gpa = 4096, " -1 EEXIST (File exists)", 0
            else:
                size, err = 1 << 20, ""
                live.add(slot)
            ret = err or " 0"
            out.append(f"{p(options, main, n)}ioctl({vm}, KVM_SET_USER_MEMORY_REGION, "
                       f"{{slot={slot}, flags=0, guest_phys_addr={gpa:#x}, memory_size={size}, "
                       f"userspace_addr=0x7f3a00000000}}) ={ret}{t}\n")
            regions += 1
        elif k in (1, 2):
            out.append(f"{p(options, io, n)}futex(0x5581d3a0, FUTEX_WAIT_PRIVATE, 2, NULL "
                       "<unfinished ...>\n" if k == 1 else
                       f"{p(options, io, n)}<... futex resumed>) = 0{t}\n")
        elif k in (3, 4):
            out.append(f"{p(options, cpu, n)}ioctl({vcpu}, KVM_RUN <unfinished ...>\n" if k == 3
                       else f"{p(options, cpu, n)}<... ioctl resumed>, 0) = 0{t}\n")
        elif k == 5 and n % 400 == 5:
            out.append(f"{p(options, main, n)}ioctl({vm}, KVM_CHECK_EXTENSION, "
                       f"KVM_CAP_NR_MEMSLOTS) = 32764{t}\n")
        elif k == 6:
            out.append(f"{p(options, io, n)}--- SIGUSR1 {{si_signo=SIGUSR1, si_code=SI_TKILL, "
                       "si_pid=1000, si_uid=0} ---\n")
        elif k in (7, 8, 9):
            out.append(f"{p(options, io, n)}write(9, \"\\1\\0\\0\\0\\0\\0\\0\\0\", 8) = 8{t}\n")
        else:
            out.append(f"{p(options, io, n)}ppoll([{{fd=9, events=POLLIN}}, {{fd=10, "
                       f"events=POLLIN}}], 2, {{tv_sec=0, tv_nsec=999000}}, NULL, 8) = 1 "
                       f"([{{fd=9, revents=POLLIN}}], left {{tv_sec=0, tv_nsec=998000}}){t}\n")
        n += 1
    with open(path, "w") as f:
        f.writelines(out)
    return regions


def read_once(path: str) -> tuple[float, int, int]:
    start = time.process_time()
    reader = TraceReader(path)
    ops = sum(1 for _ in reader)
    return time.process_time() - start, reader.lines, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=400_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--options", default="-f", help="strace output options to imitate")
    ap.add_argument("--keep", metavar="FILE", help="write the log here and keep it")
    args = ap.parse_args()
    options = set(args.options.split())
    path = args.keep or tempfile.mkstemp(suffix=".strace")[1]
    try:
        regions = generate(path, args.lines, options)
        times = []
        for _ in range(args.runs):
            seconds, lines, ops = read_once(path)
            if ops < regions:
                sys.exit(f"read {ops} operations, the log holds {regions} set-region calls")
            times.append(seconds)
        median = statistics.median(times)
        print(f"strace {args.options}: {lines:,} lines, {ops:,} operations; "
              f"median {median:.2f} s CPU = {lines / median:,.0f} lines/s "
              f"({median / lines * 1e6:.2f} us/line), runs {', '.join(f'{t:.2f}' for t in times)}")
    finally:
        if not args.keep:
            os.unlink(path)


if __name__ == "__main__":
    main()

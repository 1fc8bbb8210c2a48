#!/usr/bin/env python3
"""``memslot record`` under CPU load: how many argument structs each hold misses, and what a
recording costs, measured in the same run.

    python bench/bench_record.py                    # 150 rounds, 2 hogs per CPU, both holds
    python bench/bench_record.py --rounds 300 --hogs 8

A Python VMM (KvmVM) makes ``rounds`` times: KVM_CREATE_GUEST_MEMFD, a REGION2 CREATE bound
to it, KVM_CLEAR_DIRTY_LOG with a bitmap, a REGION2 DELETE -- 4 structs strace does not
decode per round -- while busy loops keep every CPU loaded. It is recorded with the seccomp
hold (the default for a command) and with the timed hold (``--timed-hold``, strace's
``delay_exit``, as ``--pid`` uses); for each: structs missed (calls marked in the log) and the
wall time. Needs strace and /dev/kvm.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memslot.trace.reader import iter_trace
from memslot.trace.records import TraceFormatError

VMM = Path(__file__).resolve().parent.parent / "examples" / "vmms" / "struct_churn.py"


def record(workdir: Path, rounds: int, hogs: int, extra: list[str]) -> tuple[int, int, float]:
    """(structs expected, structs missed, seconds) of one recording under ``hogs`` busy loops."""
    script = VMM
    out = workdir / "rec.strace"
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "memslot", "record", *extra, "-o", str(out), "--",
                        sys.executable, str(script), str(rounds)],
                       stdin=subprocess.DEVNULL, capture_output=True, check=False)
        seconds = time.monotonic() - start
    finally:
        for hog in busy:
            hog.kill()
            hog.wait()
    errors: list[TraceFormatError] = []
    list(iter_trace(str(out), "auto", errors))
    missed = sum(1 for e in errors if "argument bytes not read" in e.message)
    return 1 + 4 * rounds, missed, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--hogs", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("--hold-ms", type=float, default=50.0)
    args = parser.parse_args()
    print(f"{args.rounds} rounds, {args.hogs} CPU hogs on {os.cpu_count()} CPUs")
    for name, extra in (("seccomp hold", []),
                        (f"timed hold {args.hold_ms:g} ms",
                         ["--timed-hold", "--hold-ms", str(args.hold_ms)])):
        with tempfile.TemporaryDirectory() as tmp:
            structs, missed, seconds = record(Path(tmp), args.rounds, args.hogs, extra)
        print(f"{name:>20}: {missed} of {structs} structs missed, {seconds:.1f} s")


if __name__ == "__main__":
    main()

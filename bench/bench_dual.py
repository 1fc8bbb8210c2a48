#!/usr/bin/env python3
"""Cost of a differential request (``DualVM``: the model and /dev/kvm, compared) against the
kernel alone, at N existing slots, measured in the same run.

    python bench/bench_dual.py                       # N = 1 64 509 4096 32764
    python bench/bench_dual.py --sizes 64 4096 --ops 2000

A request is a MOVE of a random slot 2 MiB up into its gap and back (two requests), timed one
at a time; each figure is the median in microseconds. DualVM compares the slot a request
touched, and the whole set only at checkpoints (every max(256, N) requests), so its cost per
request must not grow with N: the ratio to the kernel alone stays flat. Needs /dev/kvm.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from typing import Any

import memslot

SLOT_STRIDE = 4 << 20
SLOT_SIZE = 2 << 20
UA_BASE = 0x7E0000000000


def populate(vm: Any, n: int) -> None:
    for i in range(n):
        vm.set_user_memory_region(i, 0, i * SLOT_STRIDE, SLOT_SIZE, UA_BASE + i * SLOT_STRIDE)


def median_us(vm: Any, n: int, ops: int, seed: int = 1) -> float:
    """Median microseconds of one MOVE request at ``n`` slots."""
    rnd = random.Random(seed)
    set_region = vm.set_user_memory_region
    clock = time.perf_counter_ns
    samples: list[int] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(ops):
            i = rnd.randrange(n)
            gpa, ua = i * SLOT_STRIDE, UA_BASE + i * SLOT_STRIDE
            t0 = clock()
            set_region(i, 0, gpa + SLOT_SIZE, SLOT_SIZE, ua)
            t1 = clock()
            set_region(i, 0, gpa, SLOT_SIZE, ua)
            t2 = clock()
            samples += (t1 - t0, t2 - t1)
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(samples) / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 509, 4096, 32764])
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args(argv)
    ok, why = memslot.kvm_available()
    if not ok:
        print(f"needs /dev/kvm: {why}", file=sys.stderr)
        return 2
    profile = memslot.detect_profile()
    print(f"median us per request (MOVE), {args.ops * 2} requests per cell")
    print("| N | kernel alone | DualVM | ratio |")
    print("|---|---|---|---|")
    for n in args.sizes:
        if n > profile.user_mem_slots:
            continue
        with memslot.KvmVM() as kernel:
            populate(kernel, n)
            alone = median_us(kernel, n, args.ops)
        with memslot.DualVM(memslot.ModelVM(profile), memslot.KvmVM()) as dual:
            populate(dual, n)
            both = median_us(dual, n, args.ops)
            dual.verify()
        print(f"| {n} | {alone:.2f} | {both:.2f} | {both / alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

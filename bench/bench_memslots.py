#!/usr/bin/env python3
"""Per-operation cost of memslot requests at N existing slots, on the model and (where
/dev/kvm works) on the real kernel, side by side.

    python bench/bench_memslots.py                # model and kernel, N = 1 64 509 4096 32764
    python bench/bench_memslots.py --backend model --sizes 64 32764 --ops 3000

Each figure is the median of ``--ops`` timed single requests (microseconds). CREATE and DELETE
are timed as a pair on one slot (delete it, create it again) so the slot count stays at N;
MOVE moves a slot 2 MiB up into a free gap and back; FLAGS_ONLY toggles dirty logging; LOOKUP
is ``gfn_to_memslot`` of a random gfn (model only: the kernel has no user-space lookup).
Ratios compare model and kernel measured in the same run. Run it on an installed memslot
(``make bench``), so the model is the mypyc-compiled build users get.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import memslot
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES

SLOT_STRIDE = 4 << 20  # each slot owns a 4 MiB window of gpa: 2 MiB slot + 2 MiB gap
SLOT_SIZE = 2 << 20
UA_BASE = 0x7E0000000000
OPS = ("CREATE", "DELETE", "MOVE", "FLAGS_ONLY", "LOOKUP")


def populate(vm: Any, n: int) -> None:
    for i in range(n):
        vm.set_user_memory_region(i, 0, i * SLOT_STRIDE, SLOT_SIZE, UA_BASE + i * SLOT_STRIDE)


def measure(vm: Any, n: int, ops: int, seed: int = 1) -> dict[str, float]:
    """Median microseconds per request for each operation at ``n`` existing slots."""
    rnd = random.Random(seed)
    set_region = vm.set_user_memory_region
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {op: [] for op in OPS}
    ids = [rnd.randrange(n) for _ in range(ops)]
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in ids:
            gpa, ua = i * SLOT_STRIDE, UA_BASE + i * SLOT_STRIDE
            t0 = clock()
            set_region(i, 0, gpa, 0, ua)
            t1 = clock()
            set_region(i, 0, gpa, SLOT_SIZE, ua)
            t2 = clock()
            set_region(i, 0, gpa + SLOT_SIZE, SLOT_SIZE, ua)
            t3 = clock()
            set_region(i, 0, gpa, SLOT_SIZE, ua)
            t4 = clock()
            set_region(i, KVM_MEM_LOG_DIRTY_PAGES, gpa, SLOT_SIZE, ua)
            t5 = clock()
            set_region(i, 0, gpa, SLOT_SIZE, ua)
            t6 = clock()
            samples["DELETE"].append(t1 - t0)
            samples["CREATE"].append(t2 - t1)
            samples["MOVE"].append(t3 - t2)
            samples["MOVE"].append(t4 - t3)
            samples["FLAGS_ONLY"].append(t5 - t4)
            samples["FLAGS_ONLY"].append(t6 - t5)
        lookup = getattr(vm, "gfn_to_memslot", None)
        if isinstance(vm, memslot.ModelVM) and lookup is not None:
            pages = SLOT_STRIDE >> 12
            gfns = [rnd.randrange(n * pages) for _ in range(ops)]
            for gfn in gfns:
                t0 = clock()
                lookup(gfn)
                samples["LOOKUP"].append(clock() - t0)
    finally:
        if gc_was:
            gc.enable()
    return {op: statistics.median(v) / 1000 for op, v in samples.items() if v}


def run_backend(make: Callable[[], Any], n: int, ops: int) -> dict[str, float]:
    with make() as vm:
        populate(vm, n)
        result = measure(vm, n, ops)
        if isinstance(vm, memslot.ModelVM):
            problems = vm.check()
            if problems:
                raise SystemExit(f"model check failed after the bench: {problems[:3]}")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("model", "kvm", "both"), default="both")
    parser.add_argument("--profile", default="x86_64-shadow")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 509, 4096, 32764])
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()

    profile = memslot.get_profile(args.profile)
    backends: dict[str, Callable[[], Any]] = {}
    if args.backend in ("model", "both"):
        backends["model"] = lambda: memslot.ModelVM(profile)
    if args.backend in ("kvm", "both"):
        from memslot.backends.kvm import KvmVM, kvm_available

        ok, why = kvm_available()
        if ok:
            backends["kernel"] = KvmVM
        elif args.backend == "kvm":
            raise SystemExit(f"no kernel backend: {why}")
        else:
            print(f"(kernel column skipped: {why})")
    results: dict[tuple[str, int], dict[str, float]] = {}
    for n in args.sizes:
        for name, make in backends.items():
            results[(name, n)] = run_backend(make, n, args.ops)

    compiled = memslot.engine.memslots.__file__.endswith(".so")
    print(f"median microseconds per request, profile {profile.name}, {args.ops} samples each "
          f"(python {sys.version.split()[0]}, model {'compiled (mypyc)' if compiled else 'pure'})")
    header = f"{'N':>6}  {'op':<10}" + "".join(f"{b:>10}" for b in backends)
    if len(backends) == 2:
        header += f"{'model/kernel':>14}"
    print(header)
    for n in args.sizes:
        for op in OPS:
            cells = [results[(b, n)].get(op) for b in backends]
            if all(c is None for c in cells):
                continue
            line = f"{n:>6}  {op:<10}" + "".join(
                f"{c:>10.2f}" if c is not None else f"{'-':>10}" for c in cells
            )
            if len(backends) == 2 and None not in cells:
                line += f"{cells[0] / cells[1]:>14.2f}"  # type: ignore[operator]
            print(line)
    if "model" in backends and len(args.sizes) > 1:
        lo, hi = args.sizes[1] if len(args.sizes) > 2 else args.sizes[0], args.sizes[-1]
        print(f"\nmodel growth {lo} -> {hi} slots (goal <= 2.0):")
        for op in OPS:
            a, b = results[("model", lo)].get(op), results[("model", hi)].get(op)
            if a and b:
                print(f"  {op:<10} {b / a:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

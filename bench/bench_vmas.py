#!/usr/bin/env python3
"""What telling the model this process's VMAs costs (arm64 and riscv walk them in
``kvm_arch_prepare_memory_region``; ``DualVM`` reads them for the model), measured in one run:

- the read alone over four ranges: the way it was done until this bench existed (all of
  ``/proc/self/maps``, and all of ``/proc/self/smaps`` for ``VM_PFNMAP``) against the reader
  of ``memslot.backends.procmaps`` (``PROCMAP_QUERY`` where the kernel has it, else maps read
  up to the range; smaps only for VMAs that could be ``VM_PFNMAP``), and its text fallback;
- where the running kernel's arch walks VMAs (inside a lab guest: ``memslot lab run
  --python bench/bench_vmas.py riscv64:7.2``), a ``DualVM`` request (a CREATE of a writable
  slot over guest RAM and its DELETE) with each reader as the model's source. Before, every
  request with a size read the VMAs; now only the ones the arch walks do.

    python bench/bench_vmas.py [--reads 300] [--requests 200]

Medians in microseconds."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import memslot
from memslot.backends.procmaps import MAPS, SMAPS, ProcessVmas, parse_maps, parse_smaps_flags
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES
from memslot.engine.vmas import Vma

Reader = Callable[[int, int, bool], list[Vma]]


def whole_files(start: int, end: int, pfnmap: bool) -> list[Vma]:
    """The reader as it was: the whole of maps, then the whole of smaps for VM_PFNMAP."""
    with open(MAPS, "rb") as f:
        vmas = parse_maps(f.read(), start, end)
    if not vmas or not pfnmap:
        return vmas
    with open(SMAPS, encoding="ascii", errors="replace") as f:
        exact = parse_smaps_flags(f.read(), {v.start for v in vmas})
    return [v._replace(flags=exact.get(v.start, v.flags)) for v in vmas]


def median_us(fn: Callable[[], object], n: int) -> float:
    clock = time.perf_counter_ns
    samples = []
    gc.disable()
    try:
        for _ in range(n):
            t0 = clock()
            fn()
            samples.append(clock() - t0)
    finally:
        gc.enable()
    return statistics.median(samples) / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    query, text = ProcessVmas(), ProcessVmas(query=False)
    readers: dict[str, Reader] = {
        "whole maps+smaps (before)": whole_files,
        "procmaps reader (after)": lambda s, e, p: query.vmas(s, e, pfnmap=p),
        "maps up to the range (after, no PROCMAP_QUERY)": lambda s, e, p: text.vmas(
            s, e, pfnmap=p),
    }
    query.vmas(0, 1)
    print(f"kernel {memslot.detect_profile().name}; PROCMAP_QUERY "
          f"{'used' if query._query else 'absent: the text is read'}")
    with memslot.KvmVM() as kvm:
        size = 2 << 20
        shared = kvm.map_anonymous(size)
        private = kvm.map_anonymous(size, shared=False)
        ranges = {
            "RAM": (shared.address, False),  # shared, as VMMs map it
            "RAM+pfnmap": (shared.address, True),
            "private+pfnmap": (private.address, True),
            "unmapped+pfnmap": (0x7F0000000000, True),
        }
        print(f"\nOne read of the VMAs over 2 MiB, median of {args.reads} (us, and the ratio "
              "to before); +pfnmap: VM_PFNMAP asked, as for dirty logging:")
        width = max(map(len, readers))
        print(f"  {'':<{width}}  " + "  ".join(f"{r:>14}" for r in ranges))
        base: dict[str, float] = {}
        for name, reader in readers.items():
            row = []
            for label, (addr, pf) in ranges.items():
                us = median_us(lambda r=reader, a=addr, p=pf: r(a, a + size, p), args.reads)
                base.setdefault(label, us)
                row.append(f"{us:8.1f} {us / base[label]:4.2f}x")
            print(f"  {name:<{width}}  " + "  ".join(row))
        profile = memslot.detect_profile()
        model = memslot.ModelVM(profile)
        if not model.walks_vmas:
            model.close()
            print(f"\n{profile.arch}'s kvm_arch_prepare_memory_region walks no VMAs: "
                  "no DualVM request reads them here (run it in an arm64 or riscv guest).")
            return 0
        model.close()
        print(f"\nDualVM request over guest RAM (CREATE writable, DELETE), median of "
              f"{args.requests} (us):")
        for flags, what in ((0, "no logging"), (KVM_MEM_LOG_DIRTY_PAGES, "dirty logging")):
            for name, reader in readers.items():
                with memslot.DualVM(memslot.ModelVM(profile), memslot.KvmVM()) as dual:
                    dual.model.set_vma_source(reader)  # type: ignore[attr-defined]

                    def pair(d: memslot.DualVM = dual, f: int = flags,
                             a: int = shared.address) -> None:
                        d.set_user_memory_region(0, f, 0, size, a)
                        d.set_user_memory_region(0, f, 0, 0, a)

                    us = median_us(pair, args.requests) / 2
                print(f"  {what:<14} {name:<{width}}  {us:8.1f}")
    query.close()
    text.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

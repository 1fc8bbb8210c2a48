"""Guest-memory benchmarks (medians of repeated runs):

- small accesses, the hot loop of a Python VMM: ``read(gpa, 8)``, ``write(gpa, 8 bytes)`` and a
  4 KiB write with dirty tracking on, side by side with Unicorn's ``mem_read``/``mem_write``
  (``pip install '.[bench]'``) and a slice of a raw mmap, pinned to one CPU, rounds
  interleaved so that all three see the same machine;
- ``translate_many`` over 32764 regions (one per memslot id x86 allows), against a pure-Python
  loop of ``translate``;
- harvesting a 1 TiB guest's dirty state (a 32 MiB bitmap) at 0 % and 1 % dirty pages:
  ``harvest_dirty`` end to end over ModelVM (the model's KVM_GET_DIRTY_LOG included), the
  GuestMemory share of it (kernel log + host bitmap combined and reset; the model's GET
  excluded), and turning the result into page gpas (``dirty_pages``).

    .venv/bin/python bench/bench_guest.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

import memslot
from memslot.guest import GuestMemory
from memslot.guest.dirty import DirtyTracker, bitmap_pages, popcount

PAGE = 4096
TIB = 1 << 40


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_translate(nslots: int, ngpas: int, repeat: int) -> None:
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        start = time.perf_counter()
        stride = 0x4000
        for i in range(nslots):
            gm.add_region(i * stride, 2 * PAGE)
        setup = time.perf_counter() - start
        rng = np.random.default_rng(0)
        gpas = rng.integers(0, nslots * stride, ngpas, dtype=np.uint64)  # half unmapped
        hvas = gm.translate_many(gpas)
        mapped = int((hvas < memslot.KVM_HVA_ERR_BAD).sum())
        t_vec = median_time(lambda: gm.translate_many(gpas), repeat)
        sample = gpas[:200_000].tolist()

        def loop() -> None:
            translate = gm.translate
            for g in sample:
                with contextlib.suppress(memslot.GuestAddressError):
                    translate(g)

        t_py = median_time(loop, max(1, repeat // 2))
        for g, h in zip(sample[:2000], hvas[:2000].tolist(), strict=True):  # same answers
            region = gm.find_region(g)
            assert h == (memslot.KVM_HVA_ERR_BAD if region is None else gm.translate(g))
        vec_rate = ngpas / t_vec
        py_rate = len(sample) / t_py
        print(f"translate_many, {nslots} slots, {ngpas:,} random gpas ({mapped / ngpas:.0%} "
              f"mapped): {vec_rate / 1e6:.1f} M gpas/s (median {t_vec * 1e3:.1f} ms)")
        print(f"  pure-Python loop of translate(): {py_rate / 1e6:.2f} M gpas/s "
              f"-> x{vec_rate / py_rate:.0f}   (layout of {nslots} regions built in "
              f"{setup:.1f} s)")


def _per_call(fn: Callable[[], object], calls: int) -> float:
    """CPU seconds per call of one batch of ``calls`` calls (thread CPU time: the time other
    processes take the CPU away is not counted)."""
    loop = range(calls)
    start = time.thread_time()
    for _ in loop:
        fn()
    return (time.thread_time() - start) / calls


def bench_small_access(rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """Medians (us) of ``rounds`` interleaved batches per operation and implementation."""
    with contextlib.suppress(OSError, AttributeError):  # pin: one CPU, no migration
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    size, gpa = 2 << 20, 0x100000
    d8, d4k = b"\x5a" * 8, b"\xa5" * PAGE
    cases: dict[str, dict[str, Callable[[], object]]] = {}
    vm = memslot.ModelVM()
    gm = GuestMemory(vm)
    gm.add_region(gpa, size, log_dirty=True)
    at = gpa + 0x3008
    cases["read(gpa, 8)"] = {"GuestMemory": lambda: gm.read(at, 8)}
    cases["write(gpa, 8 bytes)"] = {"GuestMemory": lambda: gm.write(at, d8)}
    cases["write(gpa, 4 KiB)"] = {"GuestMemory": lambda: gm.write(gpa + 0x4000, d4k)}
    raw = mmap.mmap(-1, size)
    off = at - gpa
    cases["read(gpa, 8)"]["raw mmap slice"] = lambda: raw[off : off + 8]
    cases["write(gpa, 8 bytes)"]["raw mmap slice"] = lambda: raw.__setitem__(
        slice(off, off + 8), d8)
    cases["write(gpa, 4 KiB)"]["raw mmap slice"] = lambda: raw.__setitem__(
        slice(0x4000, 0x4000 + PAGE), d4k)
    try:
        import unicorn

        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(gpa, size)
        cases["read(gpa, 8)"]["Unicorn"] = lambda: uc.mem_read(at, 8)
        cases["write(gpa, 8 bytes)"]["Unicorn"] = lambda: uc.mem_write(at, d8)
        cases["write(gpa, 4 KiB)"]["Unicorn"] = lambda: uc.mem_write(gpa + 0x4000, d4k)
    except ImportError:
        print("(Unicorn is not installed: pip install '.[bench]' to compare with it)")
    samples: dict[str, dict[str, list[float]]] = {
        op: {impl: [] for impl in impls} for op, impls in cases.items()}
    try:
        for _ in range(rounds):
            for op, impls in cases.items():
                for impl, fn in impls.items():
                    if impl == "GuestMemory" and op != "read(gpa, 8)":
                        gm.dirty_pages()  # a harvest between batches: the bits start clear
                    samples[op][impl].append(_per_call(fn, calls))
    finally:
        gm.close()
        vm.close()
        raw.close()
    medians = {op: {impl: statistics.median(t) * 1e6 for impl, t in impls.items()}
               for op, impls in samples.items()}
    print(f"small accesses, dirty tracking on, pinned to one CPU, medians of {rounds} batches "
          f"of {calls:,} calls (us of thread CPU time per call):")
    for op, m in medians.items():
        line = f"  {op:<20} GuestMemory {m['GuestMemory']:.3f}"
        if "Unicorn" in m:
            line += (f" | Unicorn {m['Unicorn']:.3f} | ratio GuestMemory/Unicorn "
                     f"{m['GuestMemory'] / m['Unicorn']:.2f}")
        line += (f" | raw mmap slice {m['raw mmap slice']:.3f} | GuestMemory/raw "
                 f"{m['GuestMemory'] / m['raw mmap slice']:.1f}x")
        print(line)
    return medians


def _dirty_words(npages: int, fraction: float, seed: int) -> np.ndarray:
    words = np.zeros((npages + 63) // 64, dtype=np.uint64)
    n = int(npages * fraction)
    if n:
        pages = np.random.default_rng(seed).choice(npages, n, replace=False)
        np.bitwise_or.at(words, pages >> 6, np.left_shift(np.uint64(1),
                                                          (pages & 63).astype(np.uint64)))
    return words


def _harvest_case(fraction: float, repeat: int) -> None:
    npages = TIB // PAGE
    nbytes = npages // 8
    host = _dirty_words(npages, fraction / 2, 1)  # half the dirty pages from the host
    kernel = _dirty_words(npages, fraction / 2, 2)  # and half from the kernel's log
    kernel_bytes = kernel.tobytes()
    expect = popcount(host | kernel)

    # GuestMemory's share: fold the kernel's log (bytes, as GET returns them) and the host
    # bitmap, reset the host bitmap, hand out the result.
    tracker = DirtyTracker(npages)
    core: list[float] = []
    for _ in range(repeat):
        np.frombuffer(tracker.host, dtype="<u8")[:] = host  # the writes since the last harvest
        start = time.perf_counter()
        with tracker.lock:
            tracker.collect(np.frombuffer(kernel_bytes, dtype="<u8"))
            words = tracker.take("user")
        core.append(time.perf_counter() - start)
        assert popcount(words) == expect

    # End to end over ModelVM: a 1 TiB region logging dirty pages. All the dirty pages are in
    # the host bitmap and a sample of them in the model's log too (marking 1.3 M pages one by
    # one is the model's cost, not the harvest's).
    e2e: list[float] = []
    conv: list[float] = []
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        region = gm.add_region(0, TIB, log_dirty=True)  # x86's max gfn: 1 TiB
        both = host | kernel
        sample = bitmap_pages(kernel)[:2000].tolist()
        for _ in range(repeat):
            with region._dirty.lock:
                np.frombuffer(region._dirty.host, dtype="<u8")[:] = both
            for gfn in sample:
                vm.mark_page_dirty(gfn)
            start = time.perf_counter()
            harvest = gm.harvest_dirty()
            e2e.append(time.perf_counter() - start)
            start = time.perf_counter()
            pages = harvest.pages()
            conv.append(time.perf_counter() - start)
            assert pages.size == expect
    t_core, t_e2e, t_conv = (statistics.median(t) for t in (core, e2e, conv))
    print(f"  {fraction:.0%} dirty ({expect:,} pages): harvest {nbytes / t_core / 1e9:.2f} GB/s "
          f"({t_core * 1e3:.1f} ms); end to end over ModelVM {nbytes / t_e2e / 1e9:.2f} GB/s "
          f"({t_e2e * 1e3:.1f} ms); dirty_pages() gpas {nbytes / t_conv / 1e9:.2f} GB/s "
          f"({t_conv * 1e3:.1f} ms)")


def bench_harvest(repeat: int) -> None:
    npages = TIB // PAGE
    print(f"harvest of a 1 TiB guest ({npages:,} pages, {npages // 8 >> 20} MiB bitmap; "
          "harvest = kernel log + host bitmap combined and reset, the model's GET excluded):")
    for fraction in (0.0, 0.01):
        _harvest_case(fraction, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller inputs")
    parser.add_argument("--small-only", action="store_true",
                        help="only the small-access comparison")
    args = parser.parse_args()
    repeat = 3 if args.quick else 7
    bench_small_access(31 if args.quick else 201, 1000)
    if args.small_only:
        return
    bench_translate(32764, 1 << 20 if args.quick else 1 << 22, repeat)
    bench_harvest(repeat)


if __name__ == "__main__":
    main()

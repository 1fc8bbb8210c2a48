"""Guest-memory benchmarks (medians of repeated runs):

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
        tracker.host[:] = host  # the writes since the last harvest (not timed)
        tracker._host_any = True
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
        region = gm.add_region(TIB, TIB, log_dirty=True)
        both = host | kernel
        sample = (TIB // PAGE + bitmap_pages(kernel)[:2000]).tolist()
        for _ in range(repeat):
            with region._dirty.lock:
                region._dirty.host[:] = both
                region._dirty._host_any = True
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
    args = parser.parse_args()
    repeat = 3 if args.quick else 7
    bench_translate(32764, 1 << 20 if args.quick else 1 << 22, repeat)
    bench_harvest(repeat)


if __name__ == "__main__":
    main()

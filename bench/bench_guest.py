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
import statistics
import time
from collections.abc import Callable

import numpy as np

import memslot
from memslot.guest import GuestMemory, GuestRegion
from memslot.guest.dirty import DirtyTracker, bitmap_pages

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
                try:
                    translate(g)
                except memslot.GuestAddressError:
                    pass

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


def bench_harvest(repeat: int) -> None:
    npages = TIB // PAGE
    nbytes = npages // 8
    print(f"harvest of a 1 TiB guest ({npages:,} pages, {nbytes >> 20} MiB bitmap):")
    for fraction in (0.0, 0.01):
        host = _dirty_words(npages, fraction / 2, 1)  # half the dirty pages from the host
        kernel = _dirty_words(npages, fraction / 2, 2)  # and half from the kernel's log
        kernel_bytes = kernel.tobytes()
        expect = int(np.bitwise_count(host | kernel).sum()) if hasattr(np, "bitwise_count") \
            else None

        # GuestMemory's share: fold the kernel's log (bytes, as GET returns them) and the host
        # bitmap, reset the host bitmap, hand out the result.
        tracker = DirtyTracker(npages)

        def core() -> None:
            tracker.host[:] = host  # the writes since the last harvest (untimed below)
            tracker._host_any = True
            start = time.perf_counter()
            with tracker.lock:
                tracker.collect(np.frombuffer(kernel_bytes, dtype="<u8"))
                words = tracker.take("user")
            core_times.append(time.perf_counter() - start)
            if expect is not None:
                assert int(np.bitwise_count(words).sum()) == expect

        core_times: list[float] = []
        for _ in range(repeat):
            core()
        t_core = statistics.median(core_times)

        # End to end over ModelVM: a 1 TiB region logging dirty pages.
        with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
            region = gm.add_region(TIB, TIB, log_dirty=True)
            kernel_pages = bitmap_pages(kernel)

            def refill(r: GuestRegion = region) -> None:
                with r._dirty.lock:
                    r._dirty.host[:] = host
                    r._dirty._host_any = True
                for gfn in (TIB // PAGE + kernel_pages[: 2000]).tolist():  # a sample in the
                    vm.mark_page_dirty(gfn)  # model's log (marking 1.3 M pages is the model's
                    # cost, not the harvest's)

            e2e: list[float] = []
            conv: list[float] = []
            for _ in range(repeat):
                refill()
                start = time.perf_counter()
                harvest = gm.harvest_dirty()
                e2e.append(time.perf_counter() - start)
                start = time.perf_counter()
                pages = harvest.pages()
                conv.append(time.perf_counter() - start)
            t_e2e, t_conv = statistics.median(e2e), statistics.median(conv)
        print(f"  {fraction:.0%} dirty ({pages.size:,} pages): GuestMemory share "
              f"{nbytes / t_core / 1e9:.2f} GB/s ({t_core * 1e3:.1f} ms); end to end over "
              f"ModelVM {nbytes / t_e2e / 1e9:.2f} GB/s ({t_e2e * 1e3:.1f} ms); "
              f"to gpas {nbytes / t_conv / 1e9:.2f} GB/s ({t_conv * 1e3:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller inputs")
    args = parser.parse_args()
    repeat = 3 if args.quick else 7
    bench_translate(32764, 1 << 20 if args.quick else 1 << 22, repeat)
    bench_harvest(repeat)


if __name__ == "__main__":
    main()

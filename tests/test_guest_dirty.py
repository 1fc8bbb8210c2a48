"""Dirty tracking over ModelVM: the kernel's log (GET, or GET + CLEAR with manual protect)
combined with the host bitmap, atomic harvests under concurrent writes, consumers that do not
steal from each other, and the bitmap helpers against brute force."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memslot
from guest_helpers import guest_write
from memslot.guest import GuestMemory
from memslot.guest.dirty import (
    DirtyBitmap,
    DirtyTracker,
    bitmap_pages,
    pages_to_runs,
    pages_to_words,
    popcount,
    set_range,
)

PAGE = 4096
MiB = 1 << 20


@pytest.fixture(params=[False, True], ids=["get", "get+clear"])
def gm(request: pytest.FixtureRequest, vm: memslot.ModelVM) -> Iterator[GuestMemory]:
    mem = GuestMemory(vm, manual_protect=request.param)
    try:
        yield mem
    finally:
        mem.close()


def test_kernel_log_and_host_writes_combined(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    ram = gm.add_region(0, MiB, log_dirty=True)
    plain = gm.add_region(MiB, MiB)
    guest_write(vm, ram, 0x3000, b"guest")
    guest_write(vm, ram, 0x3FFE, b"xyz")  # pages 3 and 4
    guest_write(vm, plain, MiB + 0x1000, b"unlogged")  # no LOG_DIRTY_PAGES: invisible
    gm.write(0x8000, b"device")
    gm.write(MiB + 0x5000, b"dma")
    gm.write(MiB - 1, b"ab")  # spans into the next region
    assert gm.dirty_pages().tolist() == [0x3000, 0x4000, 0x8000, MiB - PAGE, MiB, MiB + 0x5000]
    assert gm.dirty_pages().size == 0  # harvest resets
    assert vm.get_dirty_log(ram.slot) == bytes(32)  # the kernel's log was reset too


def test_manual_protect_clears_in_the_kernel(vm: memslot.ModelVM) -> None:
    with GuestMemory(vm, manual_protect=True) as gm:
        ram = gm.add_region(0, 64 * PAGE, log_dirty=True)
        guest_write(vm, ram, 5 * PAGE, b"x")
        assert vm.get_dirty_log(ram.slot) != bytes(8)  # manual protect: GET does not reset
        assert gm.dirty_pages().tolist() == [5 * PAGE]
        assert vm.get_dirty_log(ram.slot) == bytes(8)  # CLEAR did
        assert gm.dirty_pages().size == 0


def test_dirty_ranges_and_sets(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    a = gm.add_region(0, 128 * PAGE, log_dirty=True, label="a")
    b = gm.add_region(MiB, 4 * PAGE, label="b")
    for page in (1, 2, 3, 63, 64, 65, 100):
        guest_write(vm, a, page * PAGE, b"z")
    gm.write(MiB + PAGE, bytes(2 * PAGE))
    assert gm.dirty_ranges() == [(PAGE, 3 * PAGE), (63 * PAGE, 3 * PAGE), (100 * PAGE, PAGE),
                                 (MiB + PAGE, 2 * PAGE)]
    gm.write(5 * PAGE, b"q")
    gm.write(MiB, b"q")
    harvest = gm.harvest_dirty(a)
    assert len(harvest) == 1 and harvest.count() == 1
    assert harvest[0].label == "a" and harvest[0].slot == a.slot
    assert list(harvest[0]) == [5 * PAGE] and harvest[0].nbytes == PAGE
    assert gm.dirty_pages(b).tolist() == [MiB]
    assert gm.dirty_ranges(MiB) == []


def test_flag_changes_keep_pending_bits(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    ram = gm.add_region(0, 64 * PAGE, log_dirty=True)
    guest_write(vm, ram, 7 * PAGE, b"a")
    gm.set_dirty_logging(ram, False)  # the kernel frees its bitmap: bits are kept
    guest_write(vm, ram, 8 * PAGE, b"b")  # not logged now
    gm.set_dirty_logging(ram, True)
    guest_write(vm, ram, 9 * PAGE, b"c")
    gm.set_readonly(ram, True)  # delete + create: bits are kept
    gm.move_region(ram, MiB)  # the kernel keeps the bitmap on MOVE
    vm.mark_page_dirty(MiB // PAGE + 10)
    assert gm.dirty_pages().tolist() == [MiB + 7 * PAGE, MiB + 9 * PAGE, MiB + 10 * PAGE]


def test_consumers_do_not_steal(vm: memslot.ModelVM, tmp_path: Path) -> None:
    with GuestMemory(vm) as gm:
        ram = gm.add_region(0, 16 * PAGE, log_dirty=True)
        gm.snapshot(tmp_path / "full")
        guest_write(vm, ram, 3 * PAGE, b"3")
        gm.write(4 * PAGE, b"4")
        assert gm.dirty_pages().tolist() == [3 * PAGE, 4 * PAGE]  # the user's harvest...
        info = gm.snapshot(tmp_path / "inc", incremental=True)  # ...and the snapshot's
        assert info.data_pages == 2
        gm.write(5 * PAGE, b"5")
        gm.snapshot(tmp_path / "inc2", incremental=True)
        assert gm.dirty_pages().tolist() == [5 * PAGE]  # the snapshot did not steal it


class _SlowBuffer:
    """A region buffer whose stores pause half-way, so a harvest that does not exclude
    writes would land inside one."""

    def __init__(self, inner: memoryview) -> None:
        self.inner = inner

    def __getitem__(self, key: slice) -> memoryview:
        return self.inner[key]

    def __setitem__(self, key: slice, data: memoryview) -> None:
        start, stop, _ = key.indices(len(self.inner))
        half = (stop - start) // 2
        self.inner[start : start + half] = data[:half]
        time.sleep(0.0002)
        self.inner[start + half : stop] = data[half:]


@pytest.mark.parametrize("manual_protect", [False, True])
def test_harvest_is_atomic_under_concurrent_writes(vm: memslot.ModelVM,
                                                   manual_protect: bool) -> None:
    """A writer thread writes every page once through GuestMemory (each store pausing
    half-way) while the main thread harvests and copies the dirty pages into a shadow, as an
    incremental snapshot does. A write split by a harvest, or falling between harvest and
    reset, would be missing from the shadow: no later write to the page could hide it."""
    npages = 600
    with GuestMemory(vm, manual_protect=manual_protect) as gm:
        gm.add_region(0, 256 * PAGE, log_dirty=True)
        gm.add_region(256 * PAGE, (npages - 256) * PAGE)
        for placed in gm._index.placed():  # what accesses write through
            placed.buf = _SlowBuffer(placed.buf)  # type: ignore[assignment]
        shadow = bytearray(npages * PAGE)
        order = list(range(npages))
        random.Random(7).shuffle(order)
        done = threading.Event()

        def writer() -> None:
            try:
                for n, page in enumerate(order):
                    gm.write(page * PAGE + 8 * (n % 500), (n + 1).to_bytes(4, "little") * 128)
            finally:
                done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        harvests = 0
        try:
            while not done.is_set():
                for gpa in gm.dirty_pages().tolist():
                    shadow[gpa : gpa + PAGE] = gm.read(gpa, PAGE)
                harvests += 1
        finally:
            thread.join()
        for gpa in gm.dirty_pages().tolist():
            shadow[gpa : gpa + PAGE] = gm.read(gpa, PAGE)
        assert harvests > 50
        memory = gm.read(0, npages * PAGE)
        lost = [p for p in range(npages)
                if shadow[p * PAGE : (p + 1) * PAGE] != memory[p * PAGE : (p + 1) * PAGE]]
        assert lost == []


def test_tracker_basics() -> None:
    t = DirtyTracker(130)
    with t.lock:
        t.mark_range(0, 1)
        t.mark_range(62, 4)
        t.mark_pages(np.array([129, 100]))
        t.collect(None)
        words = t.take("user")
    assert bitmap_pages(words).tolist() == [0, 62, 63, 64, 65, 100, 129]
    assert popcount(t.take("user")) == 0
    with t.lock:
        t.collect(np.zeros(3, dtype=np.uint64))
        t.collect(pages_to_words(np.array([5]), 130))
        t.add_consumer("other")
        t.mark_range(6, 1)
        t.collect(None)
    assert bitmap_pages(t.take("user")).tolist() == [5, 6]
    assert bitmap_pages(t.take("other")).tolist() == [6]
    t.give_back("other", pages_to_words(np.array([1]), 130))
    t.give_back("other", pages_to_words(np.array([2]), 130))
    assert bitmap_pages(t.take("other")).tolist() == [1, 2]
    with pytest.raises(ValueError, match="words"):
        t.collect(np.ones(2, dtype=np.uint64))
    bm = DirtyBitmap(0x10000, 130, pages_to_words(np.array([0, 1, 2, 9]), 130))
    assert bm.ranges() == [(0x10000, 3 * PAGE), (0x10000 + 9 * PAGE, PAGE)]
    assert bm.pages().tolist() == [0x10000, 0x11000, 0x12000, 0x19000]


@settings(max_examples=200, deadline=None)
@given(npages=st.integers(1, 700), data=st.data())
def test_bitmap_helpers_match_brute_force(npages: int, data: st.DataObject) -> None:
    pages = sorted(data.draw(st.sets(st.integers(0, npages - 1), max_size=npages)))
    words = pages_to_words(np.array(pages, dtype=np.int64), npages)
    brute = [p for p in range(npages) if int(words[p // 64]) >> (p % 64) & 1]
    assert brute == pages
    assert bitmap_pages(words).tolist() == pages and popcount(words) == len(pages)
    firsts, lengths = pages_to_runs(np.array(pages, dtype=np.int64))
    expanded = [f + i for f, n in zip(firsts.tolist(), lengths.tolist(), strict=True)
                for i in range(n)]
    assert expanded == pages
    assert all(b > a + n for a, n, b in zip(firsts, lengths, firsts[1:], strict=False))
    first = data.draw(st.integers(0, npages - 1))
    count = data.draw(st.integers(0, npages - first))
    w = np.zeros_like(words)
    set_range(w, first, count)
    assert bitmap_pages(w).tolist() == list(range(first, first + count))


@pytest.mark.parametrize("density", [0.0, 0.0005, 0.05, 0.6])
def test_bitmap_pages_large_and_fallback(density: float) -> None:
    from memslot.guest import dirty

    rng = np.random.default_rng(3)
    nbits = (1 << 17) * 64 + 64 * 5  # more than one chunk of words, and a partial one
    bits = rng.random(nbits) < density
    words = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
    expect = np.flatnonzero(bits)
    assert np.array_equal(bitmap_pages(words), expect)
    assert np.array_equal(dirty._set_bits_unpack(words), expect)
    assert popcount(words) == expect.size

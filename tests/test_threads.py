"""Readers racing a writer. In the kernel vCPUs read memslots under SRCU while
``kvm_set_memslot`` publishes whole sets (``kvm_swap_active_memslots``), so a reader sees the
set before or after a swap, never half of one, including the INVALID state of a DELETE or
MOVE. The model publishes each swap atomically with respect to readers holding its ``srcu``
lock; every public lookup holds it for its own duration."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from memslot import KVM_HVA_ERR_BAD, ModelVM, SwapEvent
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMSLOT_INVALID
from memslot.engine.dirty import DirtyBitmap
from memslot.request import MemoryRegion

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
BIT63 = 1 << 63
LOG = KVM_MEM_LOG_DIRTY_PAGES
INVALID = KVM_MEMSLOT_INVALID
UA = 0x7F00_0000_0000
N_SLOTS = 6
STRIDE = 64 * MiB  # each slot id owns a window: its slot sits at the start or 2 MiB in
SIZE = 2 * MiB

State = tuple[tuple[int, int, int], ...]  # (id, base_gfn, flags) in gfn order


@pytest.fixture(autouse=True)
def _fast_switching() -> Iterator[None]:
    """Let the GIL switch threads often, so interleavings are dense."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def _state(vm: ModelVM, as_id: int = 0) -> State:
    return tuple((s.id, s.base_gfn, s.flags) for s in vm.memslots(as_id))


def _writer_ops(as_id: int, rounds: int) -> Iterator[MemoryRegion]:
    """MOVE back and forth, toggle dirty logging, delete and recreate, per slot id."""
    for r in range(rounds):
        i = r % N_SLOTS
        slot = (as_id << 16) | i
        gpa = i * STRIDE
        ua = UA + i * STRIDE
        yield MemoryRegion(slot, 0, gpa + SIZE, SIZE, ua)  # MOVE up
        yield MemoryRegion(slot, LOG, gpa + SIZE, SIZE, ua)  # FLAGS_ONLY
        yield MemoryRegion(slot, 0, gpa, SIZE, ua)  # MOVE down, logging off
        if r % 3 == 0:
            yield MemoryRegion(slot, 0, 0, 0, 0)  # DELETE
            yield MemoryRegion(slot, 0, gpa, SIZE, ua)  # CREATE


def _wait_for(progress: Callable[[], int], before: int, timeout: float = 2.0) -> None:
    """Let readers run: wait until ``progress()`` moves past ``before`` (compiled model code
    holds the GIL for whole requests, so a writer must hand it over explicitly)."""
    deadline = time.monotonic() + timeout
    while progress() <= before and time.monotonic() < deadline:
        time.sleep(0.0001)


def _run(writer: Callable[[], None], readers: list[Callable[[threading.Event], None]]) -> None:
    """Start readers, run the writer, stop readers; re-raise any thread's failure."""
    done = threading.Event()
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # re-raised by the caller
                errors.append(exc)
                done.set()
        return run

    threads = [threading.Thread(target=guard(lambda r=r: r(done))) for r in readers]
    for t in threads:
        t.start()
    try:
        guard(writer)()
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("profile", ["x86_64-shadow", "x86_64"])
def test_readers_see_only_published_states(profile: str) -> None:
    """Every ``memslots()`` a reader takes is one of the states published by a swap (or the
    start state); each is sorted and non-overlapping; the gfn and id indexes agree within one
    read-side section; hva lookups return slots that contain the hva."""
    vm = ModelVM(profile)
    as_ids = list(range(vm.nr_address_spaces))
    for as_id in as_ids:
        for i in range(N_SLOTS):
            vm.set_user_memory_region((as_id << 16) | i, 0, i * STRIDE, SIZE, UA + i * STRIDE)
    published: dict[int, set[State]] = {a: {_state(vm, a)} for a in as_ids}

    def record(event: SwapEvent) -> None:
        published[event.as_id].add(_state(vm, event.as_id))

    vm.add_observer(record)
    seen: dict[int, list[State]] = {a: [] for a in as_ids}
    m = vm._m  # the read side: lookups combined under one srcu section

    def snapshot_reader(done: threading.Event) -> None:
        k = 0
        while not done.is_set():
            as_id = as_ids[k % len(as_ids)]
            k += 1
            state = _state(vm, as_id)
            seen[as_id].append(state)
            for a, b in itertools.pairwise(state):
                assert a[1] < b[1]
            slots = vm.memslots(as_id)
            for a, b in itertools.pairwise(slots):
                assert a.base_gfn + a.npages <= b.base_gfn

    def gfn_reader(done: threading.Event) -> None:
        k = 0
        while not done.is_set():
            k += 1
            as_id = as_ids[k % len(as_ids)]
            i = k % N_SLOTS
            gfn = (i * STRIDE + (k % 2) * SIZE + (k % 7) * PAGE) // PAGE
            slot = vm.gfn_to_memslot(gfn, as_id)
            assert slot is None or slot.base_gfn <= gfn < slot.base_gfn + slot.npages
            assert slot is None or (slot.as_id, slot.id) == (as_id, i)
            with m.srcu:
                s = m.sets[as_id]
                found = s.find(gfn)
                assert found is None or s.by_id.get(found.id) is found
                assert found is None or s.by_base.get(found.base_gfn) is found
            hva = vm.gfn_to_hva(gfn, as_id)
            assert hva == KVM_HVA_ERR_BAD or hva == UA + i * STRIDE + (k % 7) * PAGE

    def hva_reader(done: threading.Event) -> None:
        k = 0
        while not done.is_set():
            k += 1
            hva = UA + (k % N_SLOTS) * STRIDE + (k % 512) * PAGE
            slots = vm.hva_to_memslots(hva)
            assert len(slots) <= len(as_ids)
            for s in slots:
                assert s.userspace_addr <= hva < s.userspace_addr + s.npages * PAGE
            as_id = as_ids[k % len(as_ids)]
            assert vm.generation(as_id) % len(as_ids) == as_id

    def snapshots() -> int:
        return sum(len(v) for v in seen.values())

    def writer() -> None:
        for as_id in as_ids:
            for k, region in enumerate(_writer_ops(as_id, 60)):
                if k % 4 == 0:
                    _wait_for(snapshots, snapshots())
                result = vm.submit(region)
                assert result.ok, result.summary()

    _run(writer, [snapshot_reader, gfn_reader, hva_reader])
    for as_id in as_ids:
        assert seen[as_id], "the snapshot reader never ran"
        strays = [s for s in seen[as_id] if s not in published[as_id]]
        assert not strays, strays[:3]
        # The reader interleaved with the writer: it saw several states.
        assert len(set(seen[as_id])) > 1
    assert vm.check() == []


def test_generation_seen_by_readers_never_goes_back() -> None:
    vm = ModelVM("x86_64-shadow")
    for i in range(N_SLOTS):
        vm.set_user_memory_region(i, 0, i * STRIDE, SIZE, UA + i * STRIDE)
    samples: list[list[int]] = []

    def reader(done: threading.Event) -> None:
        mine: list[int] = []
        samples.append(mine)
        while not done.is_set():
            mine.append(vm.generation())

    def writer() -> None:
        for k, region in enumerate(_writer_ops(0, 80)):
            if k % 4 == 0:
                total = sum(len(m) for m in samples)
                _wait_for(lambda: sum(len(m) for m in samples), total)
            assert vm.submit(region).ok

    _run(writer, [reader, reader])
    for mine in samples:
        stable = [g & ~BIT63 for g in mine]
        assert stable == sorted(stable)
    assert len({g for mine in samples for g in mine}) > 1
    assert not vm.generation() & BIT63


def test_other_thread_sees_invalid_slot_mid_move() -> None:
    """While a MOVE is between its INVALID swap and install, another thread's lookups find
    the slot flagged ``KVM_MEMSLOT_INVALID`` with ``KVM_HVA_ERR_BAD`` and the generation
    has bit 63 set."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(3, LOG, GiB, SIZE, UA)
    go = threading.Event()
    answered = threading.Event()
    observed: list[tuple[str, int, int, int, int]] = []

    def reader() -> None:
        go.wait(30)
        slot = vm.gfn_to_memslot(GiB // PAGE + 1)
        assert slot is not None
        observed.append(("reader", slot.flags, slot.base_gfn, vm.gfn_to_hva(GiB // PAGE + 1),
                         vm.generation()))
        answered.set()

    def observer(event: SwapEvent) -> None:
        slot = vm.memslot(3)
        assert slot is not None
        observed.append((event.phase, slot.flags, slot.base_gfn, 0, vm.generation()))
        if event.phase == "invalidate":
            go.set()
            assert answered.wait(30), "the reader thread did not answer"

    t = threading.Thread(target=reader)
    t.start()
    vm.add_observer(observer)
    vm.set_user_memory_region(3, LOG, 4 * GiB, SIZE, UA)
    t.join(30)
    (phase1, flags1, base1, _, gen1), reader_view, (phase2, flags2, base2, _, gen2) = observed
    assert (phase1, phase2) == ("invalidate", "install")
    assert flags1 == LOG | INVALID and base1 == GiB // PAGE and gen1 & BIT63
    assert reader_view == ("reader", LOG | INVALID, GiB // PAGE, KVM_HVA_ERR_BAD, gen1)
    assert flags2 == LOG and base2 == 4 * GiB // PAGE and gen2 & BIT63
    assert vm.memslot(3).flags == LOG and not vm.generation() & BIT63
    assert vm.check() == []


def test_concurrent_writers_are_serialised() -> None:
    """Two threads issuing requests on disjoint slots: slots_lock serialises them, every
    request succeeds and the end state is the union of both sequences."""
    vm = ModelVM("x86_64-shadow")
    for i in range(N_SLOTS):
        vm.set_user_memory_region(i, 0, i * STRIDE, SIZE, UA + i * STRIDE)

    def writer_for(ids: list[int]) -> Callable[[threading.Event], None]:
        def run(done: threading.Event) -> None:
            for r in range(90):
                i = ids[r % len(ids)]
                for region in (MemoryRegion(i, LOG, i * STRIDE + SIZE, SIZE, UA + i * STRIDE),
                               MemoryRegion(i, 0, i * STRIDE, SIZE, UA + i * STRIDE)):
                    result = vm.submit(region)
                    assert result.ok, result.summary()
        return run

    _run(lambda: writer_for([0, 1, 2])(threading.Event()), [writer_for([3, 4, 5])])
    assert _state(vm) == tuple((i, i * STRIDE // PAGE, 0) for i in range(N_SLOTS))
    assert vm.generation() == N_SLOTS + 2 * 2 * 90 * 2
    assert vm.check() == []


def test_dirty_marks_racing_log_toggles_and_moves() -> None:
    """vCPU-style ``mark_page_dirty`` from several threads while the writer toggles dirty
    logging and moves the slot: no error, and the bitmap state stays consistent."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, LOG, 0, SIZE, UA)

    marks = [0]

    def marker(done: threading.Event) -> None:
        k = 0
        while not done.is_set():
            k += 1
            vm.mark_page_dirty(k % 1024)
            marks[0] += 1

    def writer() -> None:
        for r in range(150):
            if r % 4 == 0:
                _wait_for(lambda: marks[0], marks[0])
            gpa = (r % 2) * SIZE
            vm.set_user_memory_region(0, LOG if r % 3 else 0, gpa, SIZE, UA)
            vm.set_user_memory_region(0, LOG, gpa, SIZE, UA)
            log = vm.get_dirty_log(0)
            assert len(log) == 512 // 8

    _run(writer, [marker, marker])
    assert vm.check() == []


def test_dirty_bitmap_loses_no_mark_to_concurrent_readers() -> None:
    """Markers set distinct bits of the same words while the log is harvested over and over
    (a thread switch after nearly every bytecode): every bit shows up in exactly one harvest
    or the final log, and no read fails (``set_bit_le`` and ``xchg`` are atomic per word)."""
    bitmap = DirtyBitmap(256, None)
    threads = 4
    seen = np.zeros(4, dtype="<u8")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def marker(t: int) -> None:
            for page in range(t, 256, threads):
                bitmap.set_bit(page)

        workers = [threading.Thread(target=marker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            harvested = np.frombuffer(bitmap.harvest(), dtype="<u8")
            assert not (seen & harvested).any()  # nothing reported twice
            seen |= harvested
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    seen |= bitmap.to_array()
    assert seen.tolist() == [(1 << 64) - 1] * 4

"""GuestMemory under concurrency: accesses racing ``move_region`` see the layout before or
after a move, never a mix (translate, read, write, numpy)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import memslot
from memslot import GuestAddressError
from memslot.guest import GuestMemory

PAGE = 4096
NPAGES = 8
BASES = (0x100000, 0x101000)  # the region moves by one page, back and forth


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as possible, so races show up within a short test."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _race(gm: GuestMemory, region: memslot.guest.GuestRegion, check: Callable[[], None],
          seconds: float = 1.0) -> list[str]:
    """Move ``region`` between BASES while ``check`` runs in two threads; the problems."""
    problems: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                check()
            except AssertionError as exc:
                problems.append(str(exc))
                stop.set()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = threading.Event()
        timer = threading.Timer(seconds, deadline.set)
        timer.start()
        n = 0
        while not deadline.is_set() and not stop.is_set():
            gm.move_region(region, BASES[n % 2 == 0])
            n += 1
        timer.cancel()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return problems


def _setup(vm: memslot.ModelVM) -> tuple[GuestMemory, memslot.guest.GuestRegion]:
    gm = GuestMemory(vm)
    region = gm.add_region(BASES[0], NPAGES * PAGE)
    for page in range(NPAGES):  # every byte names its page
        region.mapping.buffer[page * PAGE : (page + 1) * PAGE] = bytes([page + 1]) * PAGE
    return gm, region


def _offsets(gpa: int) -> set[int | None]:
    """The region offsets ``gpa`` may have: one per layout (None: not backed)."""
    out: set[int | None] = set()
    for base in BASES:
        out.add(gpa - base if base <= gpa < base + NPAGES * PAGE else None)
    return out


def test_translate_sees_one_layout(vm: memslot.ModelVM, fast_switching: None) -> None:
    gm, region = _setup(vm)
    probes = [BASES[0] + k * 0x800 + 8 for k in range(2 * NPAGES + 4)]

    def check() -> None:
        for gpa in probes:
            try:
                hva: int | None = gm.translate(gpa)
            except GuestAddressError:
                hva = None
            offset = None if hva is None else hva - region.hva
            assert offset in _offsets(gpa), f"translate({gpa:#x}) -> region offset {offset}"

    with gm:
        assert _race(gm, region, check) == []


def test_read_and_numpy_see_one_layout(vm: memslot.ModelVM, fast_switching: None) -> None:
    gm, region = _setup(vm)
    probes = [BASES[1] + k * PAGE + 16 for k in range(NPAGES - 1)]

    def expect(gpa: int) -> set[int | None]:
        return {None if off is None else off // PAGE + 1 for off in _offsets(gpa)}

    def check() -> None:
        for gpa in probes:
            for how in ("read", "numpy", "view"):
                try:
                    if how == "read":
                        data = gm.read(gpa, 8)
                    elif how == "numpy":
                        data = gm.numpy(gpa, 8).tobytes()
                    else:
                        data = bytes(gm.view(gpa, 8))
                except GuestAddressError:
                    assert None in expect(gpa), f"{how}({gpa:#x}) refused while always backed"
                    continue
                assert len(data) == 8 and len(set(data)) == 1, f"{how}({gpa:#x}) -> {data!r}"
                assert data[0] in expect(gpa), f"{how}({gpa:#x}) read page {data[0] - 1}"

    with gm:
        assert _race(gm, region, check) == []


def test_write_lands_at_one_layouts_offset(vm: memslot.ModelVM, fast_switching: None) -> None:
    gm, region = _setup(vm)
    buf = np.frombuffer(region.mapping.buffer, dtype=np.uint8)
    gpa = BASES[1] + 3 * PAGE + 100  # offset 3 pages + 100 or 2 pages + 100
    allowed = {off for off in _offsets(gpa) if off is not None}
    lock = threading.Lock()

    def check() -> None:
        with lock:  # one writer at a time, so the marker is found where it landed
            gm.write(gpa, b"\xee" * 4)
            hits = set(np.flatnonzero(buf == 0xEE).tolist())
            buf[list(hits)] = 0
            assert hits and {h - h % 4 for h in hits} <= allowed, f"wrote at {sorted(hits)}"

    with gm:
        assert _race(gm, region, check) == []

"""GuestMemory on every preset's page size (64 KiB on ppc64-hv / ppc64-pr): layout checks,
dirty bitmaps of the kernel's shape, translation, gfns, snapshots. Regions are 256 pages,
1 MiB aligned (s390 wants userspace addresses and sizes in 1 MiB segments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import memslot
from memslot.guest import GuestMemory, LayoutError, SnapshotError

PRESETS = sorted(memslot.PRESETS)
N = 256  # pages per region
MiB = 1 << 20


@pytest.fixture(params=PRESETS)
def preset_vm(request: pytest.FixtureRequest) -> memslot.ModelVM:
    vm = memslot.ModelVM(request.param)
    request.addfinalizer(vm.close)
    return vm


def test_regions_access_and_dirty_pages(preset_vm: memslot.ModelVM) -> None:
    vm = preset_vm
    page = vm.profile.page_size
    with GuestMemory(vm) as gm:
        assert gm.page_size == page
        ram = gm.add_region(0, N * page, log_dirty=True, label="ram", align=MiB)
        dev = gm.add_region(2 * N * page, N * page, backing="memfd", label="dev", align=MiB)
        assert ram.npages == N and ram.page_size == page
        assert ram.hva % page == 0  # the kernel wants a page-aligned userspace_addr
        with pytest.raises(LayoutError, match="multiple"):
            gm.add_region(8 * N * page, page // 2)
        if page > 4096:
            with pytest.raises(LayoutError, match="multiple"):
                gm.add_region(8 * N * page + 4096, page)
        gm.write(3 * page + 5, b"host")  # device emulation
        vm.mark_page_dirty(7)  # a vCPU write the kernel logged
        gm.write(2 * N * page, b"d")
        assert gm.dirty_pages().tolist() == [3 * page, 7 * page, 2 * N * page]
        assert gm.dirty_ranges() == []
        gm.write(page - 1, b"ab")  # spans pages 0 and 1
        assert gm.dirty_ranges(ram) == [(0, 2 * page)]
        gm.move_region(dev, 4 * N * page)
        assert gm.read(4 * N * page, 1) == b"d" and dev.gpa == 4 * N * page
        assert dev.gpa.gfn == 4 * N and dev.gpa.page_offset == 0
        assert (dev.gpa + 5) == 4 * N * page + 5
        assert gm.translate(4 * N * page + 9) == dev.hva + 9
        hvas = gm.translate_many(np.array([0, 4 * N * page + 3, N * page], dtype=np.uint64))
        assert hvas.tolist() == [ram.hva, dev.hva + 3, memslot.KVM_HVA_ERR_BAD]
        assert not vm.check()


def test_snapshot_restores_on_the_same_page_size(preset_vm: memslot.ModelVM,
                                                  tmp_path: Path) -> None:
    vm = preset_vm
    page = vm.profile.page_size
    with GuestMemory(vm) as gm:
        gm.add_region(0, N * page, log_dirty=True, align=MiB)
        gm.write(2 * page + 1, b"x" * 10)
        full = gm.snapshot(tmp_path / "full")
        assert full.page_size == page and full.data_pages == 1
        vm.mark_page_dirty(5)
        gm.write(5 * page, b"five")
        inc = gm.snapshot(tmp_path / "inc", incremental=True)
        assert inc.data_pages == 1
        expected = gm.read(0, N * page)
    with memslot.ModelVM(vm.profile) as other:
        again = GuestMemory.restore([tmp_path / "full", tmp_path / "inc"], other)
        with again:
            assert again.read(0, N * page) == expected
    other_size = 4096 if page != 4096 else 65536
    preset = next(n for n in PRESETS if memslot.PRESETS[n].page_size == other_size)
    with memslot.ModelVM(preset) as mismatched:
        with pytest.raises(SnapshotError, match="page size"):
            GuestMemory.restore([tmp_path / "full"], mismatched)
        assert mismatched.memslots() == []

"""GuestMemory regions and access over ModelVM: layout changes with rollback, slot ids, host
mappings and their lifetime, reads/writes/views across regions, translation (against a
brute-force reference with Hypothesis)."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memslot
from memslot import KVM_HVA_ERR_BAD, KVM_HVA_ERR_RO_BAD, GuestAddressError, KvmError
from memslot.guest import GuestAddress, GuestMemory, LayoutError
from memslot.guest.mapping import HostMapping, mapping_exists

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def gm(vm: memslot.ModelVM) -> Iterator[GuestMemory]:
    mem = GuestMemory(vm)
    try:
        yield mem
    finally:
        mem.close()


def _slots(vm: memslot.ModelVM) -> list[tuple[int, int, int, int, int]]:
    return [(s.id, s.guest_phys_addr, s.memory_size, s.userspace_addr, s.flags)
            for s in vm.memslots()]


def _map_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


# --- regions -------------------------------------------------------------------------------


def test_add_region_registers_a_slot(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    ram = gm.add_region(0, 2 * MiB, label="ram", log_dirty=True)
    rom = gm.add_region(0xFFFF0000, 64 * 1024, readonly=True, label="bios")
    assert _slots(vm) == [
        (0, 0, 2 * MiB, ram.hva, memslot.KVM_MEM_LOG_DIRTY_PAGES),
        (1, 0xFFFF0000, 0x10000, rom.hva, memslot.KVM_MEM_READONLY),
    ]
    assert gm.regions() == [ram, rom]
    assert (ram.gpa, ram.size, ram.slot, ram.label, ram.backing) == (0, 2 * MiB, 0, "ram", "anon")
    assert isinstance(ram.gpa, GuestAddress) and repr(ram.gpa) == "GuestAddress(0x0)"
    assert rom.readonly and not rom.log_dirty and ram.log_dirty
    assert gm.find_region(0xFFFF8000) is rom and gm.find_region(2 * MiB) is None
    assert gm.region_by_label("bios") is rom
    table = gm.format_layout()
    assert table.splitlines()[0].split() == ["slot", "gpa", "end", "size", "hva", "flags",
                                             "backing", "label"]
    assert "bios" in table and "READONLY" in table and "2 MiB" in table
    assert ram.as_dict()["flag_names"] == "LOG_DIRTY_PAGES"
    gm.set_label(ram, "main")
    assert "main" in repr(ram)


def test_slot_ids_lowest_free_and_reused(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    regions = [gm.add_region(i * MiB, PAGE) for i in range(5)]
    assert [r.slot for r in regions] == [0, 1, 2, 3, 4]
    gm.remove_region(regions[3])
    gm.remove_region(regions[1])
    assert gm.add_region(10 * MiB, PAGE).slot == 1
    assert gm.add_region(11 * MiB, PAGE).slot == 3
    assert gm.add_region(12 * MiB, PAGE).slot == 5
    assert sorted(s.id for s in vm.memslots()) == [0, 1, 2, 3, 4, 5]
    assert gm.add_region(13 * MiB, PAGE, slot=9).slot == 9
    with pytest.raises(LayoutError, match="in use"):
        gm.add_region(14 * MiB, PAGE, slot=9)


def test_foreign_slots_are_avoided(vm: memslot.ModelVM) -> None:
    vm.set_user_memory_region(0, 0, 100 * MiB, PAGE, 0x7F0000000000)
    with GuestMemory(vm) as gm:
        vm.set_user_memory_region(1, 0, 101 * MiB, PAGE, 0x7F0000001000)  # behind its back
        region = gm.add_region(0, PAGE)
        assert region.slot == 2
        assert [s.id for s in vm.memslots()] == [2, 0, 1]
    assert [s.id for s in vm.memslots()] == [0, 1]


def test_out_of_slots_is_a_layout_error() -> None:
    profile = memslot.get_profile("x86_64").replace(name="tiny", internal_mem_slots=32763)
    with memslot.ModelVM(profile) as vm, GuestMemory(vm) as gm:
        assert gm.nr_slots == 4
        for i in range(4):
            gm.add_region(i * MiB, PAGE)
        maps = _map_count()
        with pytest.raises(LayoutError, match="no free memslot id: all 4 ids"):
            gm.add_region(10 * MiB, PAGE)
        assert len(gm.regions()) == 4 and len(vm.memslots()) == 4
        assert _map_count() == maps  # the new mapping was released


def test_overlap_is_refused_and_layout_kept(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    gm.add_region(MiB, MiB, label="a")
    before = _slots(vm)
    for gpa, size in ((MiB, PAGE), (MiB - PAGE, 2 * PAGE), (2 * MiB - PAGE, MiB), (0, 4 * MiB)):
        with pytest.raises(LayoutError, match=r"overlaps region .* 'a'"):
            gm.add_region(gpa, size)
    assert _slots(vm) == before and len(gm.regions()) == 1
    gm.add_region(0, MiB)  # adjacent is fine
    gm.add_region(2 * MiB, MiB)


@pytest.mark.parametrize(("gpa", "size", "match"), [
    (0x800, PAGE, "gpa"), (0, 0, "size"), (0, 100, "size"), (-PAGE, PAGE, "gpa"),
    ((1 << 64) - PAGE, 2 * PAGE, "2\\*\\*64"),
])
def test_bad_values(gm: GuestMemory, gpa: int, size: int, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        gm.add_region(gpa, size)
    with pytest.raises(LayoutError, match="align"):
        gm.add_region(0, PAGE, align=3 * PAGE)
    with pytest.raises(LayoutError, match="backing"):
        gm.add_region(0, PAGE, backing=42)  # type: ignore[arg-type]


def test_kernel_errno_propagates_and_rolls_back(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    gm.add_region(0, PAGE)
    maps = _map_count()
    with pytest.raises(KvmError) as info:  # npages > KVM_MEM_MAX_NR_PAGES
        gm.add_region(1 << 40, 1 << 43)
    assert info.value.errno == errno.EINVAL
    assert len(gm.regions()) == 1 and len(vm.memslots()) == 1
    assert _map_count() == maps
    assert gm.add_region(MiB, PAGE).slot == 1  # the id was given back


def test_remove_move_flags(gm: GuestMemory, vm: memslot.ModelVM) -> None:
    bar = gm.add_region(0xE0000000, MiB, label="bar")
    gm.write(0xE0000010, b"bar data")
    gm.move_region(bar, 0xD0000000)
    assert bar.gpa == 0xD0000000 and gm.read(0xD0000010, 8) == b"bar data"
    assert _slots(vm) == [(0, 0xD0000000, MiB, bar.hva, 0)]
    with pytest.raises(GuestAddressError):
        gm.read(0xE0000010, 1)
    gm.move_region(0xD0000000, 0xD0000000)  # no-op, by gpa
    other = gm.add_region(0, MiB)
    with pytest.raises(LayoutError, match="overlaps"):
        gm.move_region(bar, MiB // 2)
    assert bar.gpa == 0xD0000000
    gm.move_region(bar, MiB)  # adjacent to `other`
    assert [r.gpa for r in gm.regions()] == [0, MiB]
    gm.set_dirty_logging(bar, True)
    assert vm.memslot(0).flags == memslot.KVM_MEM_LOG_DIRTY_PAGES
    gm.set_readonly(bar, True)
    assert vm.memslot(0).flags == memslot.KVM_MEM_LOG_DIRTY_PAGES | memslot.KVM_MEM_READONLY
    assert gm.read(MiB + 0x10, 8) == b"bar data"  # same memory after the re-create
    gm.set_readonly(bar, True)  # no-op
    gm.set_dirty_logging(bar, False)
    gm.set_readonly(bar, False)
    assert _slots(vm) == [(1, 0, MiB, other.hva, 0), (0, MiB, MiB, bar.hva, 0)]
    gm.remove_region(MiB + 5)
    assert bar.removed and _slots(vm) == [(1, 0, MiB, other.hva, 0)]
    with pytest.raises(LayoutError, match="not a region"):
        gm.remove_region(bar)
    with pytest.raises(LayoutError, match="no region contains"):
        gm.remove_region(5 * MiB)


def test_failed_delete_keeps_the_region(gm: GuestMemory, vm: memslot.ModelVM,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    region = gm.add_region(0, PAGE)

    def refuse(*args: object) -> None:
        raise KvmError(errno.EIO, "test", "refused")

    monkeypatch.setattr(vm, "set_user_memory_region", refuse)
    with pytest.raises(KvmError):
        gm.remove_region(region)
    with pytest.raises(KvmError):
        gm.move_region(region, MiB)
    monkeypatch.undo()
    assert gm.regions() == [region] and region.gpa == 0 and not region.removed


def test_mapping_released_after_delete_and_views(gm: GuestMemory) -> None:
    region = gm.add_region(0, 4 * PAGE)
    hva, size = region.hva, region.size
    view = gm.view(0, PAGE)
    arr = gm.numpy(PAGE, 16, np.uint32)
    gm.remove_region(region)
    assert mapping_exists(hva, size)  # views keep the memory mapped
    assert bytes(view[:4]) == b"\0\0\0\0"
    del view
    assert mapping_exists(hva, size)
    del arr
    gc.collect()
    assert not mapping_exists(hva, size)
    assert region.mapping.unmapped


def test_close_deletes_slots_then_unmaps(vm: memslot.ModelVM) -> None:
    gm = GuestMemory(vm)
    region = gm.add_region(0, PAGE)
    hva = region.hva
    gm.close()
    gm.close()
    assert vm.memslots() == [] and not mapping_exists(hva, PAGE)
    with pytest.raises(memslot.ClosedError):
        gm.add_region(0, PAGE)


def test_finalizer_releases_an_unclosed_guest_memory(vm: memslot.ModelVM) -> None:
    gm = GuestMemory(vm)
    hva = gm.add_region(0, PAGE).hva
    del gm
    gc.collect()
    assert vm.memslots() == [] and not mapping_exists(hva, PAGE)


@pytest.mark.parametrize("align", [2 * MiB, 1 << 30])
@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_alignment_makes_gpa_and_hva_congruent(gm: GuestMemory, align: int, backing: str) -> None:
    maps = _map_count()
    for gpa in (0, 0x1000, 0x123000, 3 * MiB + 0x5000):
        region = gm.add_region(gpa + (1 << 32), 2 * MiB, align=align, backing=backing)
        assert region.hva % align == region.gpa % align
        gm.write(region.gpa + 2 * MiB - 8, b"12345678")  # the whole mapping is usable
        gm.remove_region(region)
    assert _map_count() == maps  # reservation head and tail were trimmed


def test_memfd_is_shared_with_another_process(gm: GuestMemory) -> None:
    region = gm.add_region(0x100000, 2 * PAGE, backing="memfd", label="shared")
    assert region.fd is not None
    gm.write(0x100000, b"from parent")
    script = (
        "import mmap, os, sys\n"
        "fd = int(sys.argv[1])\n"
        "m = mmap.mmap(fd, 8192)\n"
        "sys.stdout.write(m[:11].decode())\n"
        "m[4096:4101] = b'child'\n"
        "m.close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(region.fd)], pass_fds=[region.fd],
                          capture_output=True, text=True, timeout=30, check=True)
    assert proc.stdout == "from parent"
    assert gm.read(0x101000, 5) == b"child"
    gm.mark_dirty(0x101000, 5)  # a write the host bitmap cannot see by itself
    assert list(gm.dirty_pages()) == [0x100000, 0x101000]
    fd = region.fd
    gm.remove_region(region)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_file_backing(gm: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"A" * PAGE + b"B" * PAGE)
    rw = gm.add_region(0, 2 * PAGE, backing=path)
    assert rw.backing == "file" and rw.path == str(path)
    assert gm.read(PAGE - 1, 2) == b"AB"
    gm.write(0, b"written")
    ro = gm.add_region(MiB, PAGE, backing=str(path), readonly=True)
    assert gm.read(MiB, 7) == b"written"  # same file
    gm.write(MiB, b"private")  # a read-only region maps the file privately
    gm.remove_region(rw)
    gm.remove_region(ro)
    assert path.read_bytes()[:7] == b"written"
    with pytest.raises(LayoutError, match="has 0x2000 bytes"):
        gm.add_region(0, 4 * PAGE, backing=path)
    with pytest.raises(LayoutError, match="cannot open"):
        gm.add_region(0, PAGE, backing=tmp_path / "missing")
    assert gm.regions() == []


# --- access --------------------------------------------------------------------------------


def test_read_write_span_adjacent_regions(gm: GuestMemory) -> None:
    gm.add_region(0, PAGE)
    gm.add_region(PAGE, PAGE, backing="memfd")
    gm.add_region(2 * PAGE, PAGE, readonly=True)
    data = bytes(range(256)) * 40
    gm.write(100, data)
    assert gm.read(100, len(data)) == data
    assert gm.read(0, 100) == bytes(100)
    gm.fill(PAGE - 2, 4, 0xAB)
    assert gm.read(PAGE - 3, 6) == data[PAGE - 103 : PAGE - 102] + b"\xab" * 4 + data[
        PAGE - 98 : PAGE - 97]
    assert gm.read(5, 0) == b""


def test_unmapped_access_raises_and_writes_nothing(gm: GuestMemory) -> None:
    gm.add_region(0, PAGE, label="low")
    gm.add_region(3 * PAGE, PAGE, label="high")
    before = gm.read(0, PAGE)
    with pytest.raises(GuestAddressError) as info:
        gm.write(PAGE - 4, b"12345678")
    text = str(info.value)
    assert "0x1000" in text and "'low'" in text and "'high'" in text
    assert info.value.gpa == PAGE  # type: ignore[attr-defined]
    assert gm.read(0, PAGE) == before
    assert gm.dirty_pages().size == 0
    for call in (lambda: gm.read(2 * PAGE, 1), lambda: gm.translate(5 * PAGE),
                 lambda: gm.view(PAGE, 1), lambda: gm.numpy(-8, 1),
                 lambda: gm.read((1 << 64) - 1, 2), lambda: gm.fill(PAGE, 1)):
        with pytest.raises(GuestAddressError):
            call()
    gm.remove_region(0)
    with pytest.raises(GuestAddressError, match=r"nearest below: none; above: .*'high'"):
        gm.read(0, 1)


def test_views_are_zero_copy(gm: GuestMemory) -> None:
    gm.add_region(0, 2 * PAGE)
    gm.add_region(2 * PAGE, PAGE)
    ro = gm.view(0x10, 8)
    assert ro.readonly
    gm.write(0x10, b"abcdefgh")
    assert bytes(ro) == b"abcdefgh"
    rw = gm.view(0x1000, 4, writable=True)
    rw[:] = b"WXYZ"
    assert gm.read(0x1000, 4) == b"WXYZ"
    assert list(gm.dirty_pages()) == [0, 0x1000]  # the writable view marked its page
    arr = gm.numpy(0x100, 4, np.uint32)
    gm.write(0x100, np.arange(4, dtype=np.uint32).tobytes())
    assert arr.tolist() == [0, 1, 2, 3] and not arr.flags.writeable
    warr = gm.numpy(0x2000, 512, "<u8", writable=True)
    warr[:] = 7
    assert gm.read(0x2000, 8) == (7).to_bytes(8, "little")
    with pytest.raises(GuestAddressError, match="spans 2 regions"):
        gm.view(PAGE, 2 * PAGE)
    assert len(gm.view(0x2000, 0)) == 0


class Header(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("magic", ctypes.c_uint32), ("length", ctypes.c_uint16), ("kind", ctypes.c_uint8)]


def test_typed_objects(gm: GuestMemory) -> None:
    gm.add_region(0, PAGE)
    gm.add_region(PAGE, PAGE)
    gm.write_obj(PAGE - 3, Header(0xFEEDFACE, 513, 9))  # spans the two regions
    got = gm.read_obj(PAGE - 3, Header)
    assert (got.magic, got.length, got.kind) == (0xFEEDFACE, 513, 9)
    gm.write_obj(0x20, ctypes.c_uint64(0x1122334455667788))
    assert gm.read_obj(0x20, ctypes.c_uint64).value == 0x1122334455667788
    assert gm.read(0x20, 2) == b"\x88\x77"


def test_guest_address_helpers() -> None:
    a = GuestAddress(0x1234)
    assert a.gfn == 1 and a.page_offset == 0x234 and a.align_down() == 0x1000
    assert a.checked_add(0x10) == 0x1244 and GuestAddress((1 << 64) - 1).checked_add(1) is None
    assert a.offset_from(0x1000) == 0x234
    with pytest.raises(ValueError):
        a.offset_from(0x2000)
    with pytest.raises(ValueError):
        GuestAddress(-1)


# --- translation ---------------------------------------------------------------------------


def test_translate(gm: GuestMemory) -> None:
    low = gm.add_region(0, 2 * PAGE)
    rom = gm.add_region(0x10000, PAGE, readonly=True)
    assert gm.translate(0x1234) == low.hva + 0x1234
    gpas = np.array([0, 0x1FFF, 0x2000, 0x10008, 0x11000, -1, 1 << 62], dtype=np.int64)
    hvas = gm.translate_many(gpas)
    bad = KVM_HVA_ERR_BAD
    assert hvas.tolist() == [low.hva, low.hva + 0x1FFF, bad, rom.hva + 8, bad, bad, bad]
    assert memslot.kvm_is_error_hva(int(hvas[2]))
    writes = gm.translate_many(gpas.astype(np.uint64), write=True)
    assert writes[3] == KVM_HVA_ERR_RO_BAD and writes[0] == low.hva
    with pytest.raises(TypeError):
        gm.translate_many(np.array([0.5]))
    gm.close()
    assert gm.translate_many([0, 1]).tolist() == [bad, bad]


_layouts = st.lists(
    st.tuples(st.integers(0, 63), st.integers(1, 4)), min_size=0, max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=_layouts, probes=st.lists(st.integers(-PAGE, 80 * PAGE), max_size=40),
       ops=st.lists(st.tuples(st.integers(-PAGE, 80 * PAGE), st.integers(0, 3 * PAGE)),
                    max_size=8))
def test_access_matches_brute_force(layout: list[tuple[int, int]], probes: list[int],
                                    ops: list[tuple[int, int]]) -> None:
    """Regions placed at page granularity; every translate/read/write agrees with a flat
    reference of the same address space."""
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        owner: dict[int, tuple[int, int]] = {}  # page -> (region hva, region gpa)
        for start, npages in layout:
            pages = range(start, start + npages)
            if any(p in owner for p in pages):
                continue
            region = gm.add_region(start * PAGE, npages * PAGE)
            for p in pages:
                owner[p] = (region.hva, region.gpa)
        reference = bytearray(80 * PAGE)

        def mapped(gpa: int) -> bool:
            return gpa >= 0 and (gpa // PAGE) in owner

        for gpa in probes:
            expect = (owner[gpa // PAGE][0] + gpa - owner[gpa // PAGE][1]) if mapped(gpa) \
                else None
            if expect is None:
                with pytest.raises(GuestAddressError):
                    gm.translate(gpa)
            else:
                assert gm.translate(gpa) == expect
        hvas = gm.translate_many(np.array(probes, dtype=np.int64))
        for gpa, hva in zip(probes, hvas.tolist(), strict=True):
            assert hva == (gm.translate(gpa) if mapped(gpa) else KVM_HVA_ERR_BAD)
        for n, (gpa, length) in enumerate(ops):
            ok = all(mapped(g) for g in range(gpa, gpa + length)) and gpa >= 0
            data = bytes([n + 1]) * length
            if ok:
                gm.write(gpa, data)
                reference[gpa : gpa + length] = data
                assert gm.read(gpa, length) == data
            else:
                with pytest.raises(GuestAddressError):
                    gm.write(gpa, data)
                with pytest.raises(GuestAddressError):
                    gm.read(gpa, length)
        for page in owner:
            assert gm.read(page * PAGE, PAGE) == bytes(reference[page * PAGE : (page + 1) * PAGE])


def test_host_mapping_direct() -> None:
    m = HostMapping(2 * PAGE, backing="memfd", name="x")
    assert m.kind == "memfd" and m.fd is not None and not m.closed
    m.buffer[:3] = b"abc"
    assert repr(m).startswith("HostMapping(memfd, 0x")
    m.close()
    assert m.closed and m.fd is None and "released" in repr(m)
    with pytest.raises(LayoutError):
        _ = m.buffer
    gc.collect()
    assert m.unmapped


@settings(max_examples=40, deadline=None)
@given(clusters=st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(1, 24),
                                   st.integers(1, 3)), min_size=1, max_size=4),
       seed=st.integers(0, 1000))
def test_translate_many_block_table_and_fallback(clusters: list[tuple[int, int, int]],
                                                 seed: int) -> None:
    """Sparse layouts (blocks of many GiB holding several region starts, which exercise the
    advance steps, or more than the table allows, which falls back to a binary search) agree
    with the scalar translate. (Gfns up to 2^32: a 52-bit gfn limit, not the default
    preset's MAXPHYADDR 40.)"""
    with memslot.ModelVM("x86_64-shadow") as vm, GuestMemory(vm) as gm:
        for base_page, count, npages in clusters:
            for i in range(count):
                gpa = (base_page + i * (npages + 1)) * PAGE
                if gm._index.overlapping(gpa, npages * PAGE) is None:
                    gm.add_region(gpa, npages * PAGE)
        rng = np.random.default_rng(seed)
        starts = np.array([r.gpa for r in gm.regions()], dtype=np.uint64)
        probes = np.concatenate([
            starts + rng.integers(0, 5 * PAGE, starts.size).astype(np.uint64),
            starts - np.uint64(1), rng.integers(0, 1 << 46, 64, dtype=np.uint64),
            np.array([0, (1 << 64) - 1], dtype=np.uint64),
        ])
        hvas = gm.translate_many(probes.reshape(2, -1) if probes.size % 2 == 0 else probes)
        for gpa, hva in zip(probes.tolist(), hvas.reshape(-1).tolist(), strict=True):
            region = gm.find_region(gpa)
            assert hva == (KVM_HVA_ERR_BAD if region is None else gm.translate(gpa))


def test_set_readonly_failure_restores_the_slot(gm: GuestMemory, vm: memslot.ModelVM,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    region = gm.add_region(0, 4 * PAGE, log_dirty=True)
    gm.write(0, b"keep")
    real = vm.set_user_memory_region
    calls: list[int] = []

    def create_refused(slot: int, flags: int, gpa: int, size: int, ua: int) -> None:
        calls.append(flags)
        if len(calls) == 2:  # the re-create with READONLY
            raise KvmError(errno.ENOMEM, "test", "refused")
        real(slot, flags, gpa, size, ua)

    monkeypatch.setattr(vm, "set_user_memory_region", create_refused)
    with pytest.raises(KvmError):
        gm.set_readonly(region, True)
    monkeypatch.undo()
    assert calls == [0, 3, 1]  # delete, refused create, the old slot back
    assert _slots(vm) == [(0, 0, 4 * PAGE, region.hva, memslot.KVM_MEM_LOG_DIRTY_PAGES)]
    assert not region.readonly and gm.read(0, 4) == b"keep"
    assert gm.dirty_pages().tolist() == [0]


def test_guest_memory_after_the_vm_closed(vm: memslot.ModelVM) -> None:
    gm = GuestMemory(vm)
    hva = gm.add_region(0, PAGE).hva
    vm.close()
    gm.close()  # the VM took its slots with it; the memory is still released
    assert not mapping_exists(hva, PAGE)
    with pytest.raises(memslot.ClosedError):
        GuestMemory(vm)

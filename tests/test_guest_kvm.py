"""GuestMemory on the real /dev/kvm with a real guest (the minimal real-mode vCPU): the guest
writes known pages and exactly those, plus the host's writes, are reported; harvests while the
guest keeps writing lose nothing; read-only and moved regions behave for the guest as the
layout says; a snapshot chain taken around guest writes restores byte-identical memory that a
guest on the new VM reads back."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memslot.backends.kvm import KvmVM
from memslot.backends.vcpu import IntrExit, IoExit, MmioExit, Vcpu
from memslot.guest import GuestMemory

pytestmark = pytest.mark.kvm

PAGE = 4096
MiB = 1 << 20
CODE = 0x1000  # guest code lives in the "code" region [0, 64 KiB)


@pytest.fixture
def vm(require_kvm: None) -> Iterator[KvmVM]:
    machine = KvmVM()
    try:
        yield machine
    finally:
        machine.close()


@pytest.fixture(params=[False, True], ids=["get", "get+clear"])
def gm(request: pytest.FixtureRequest, vm: KvmVM) -> Iterator[GuestMemory]:
    mem = GuestMemory(vm, manual_protect=request.param)
    try:
        mem.add_region(0, 64 * 1024, label="code")
        yield mem
    finally:
        mem.close()


# --- a tiny real-mode assembler ------------------------------------------------------------


def store(offset: int, value: int) -> bytes:
    """``mov byte [offset], value`` (DS-relative)."""
    return b"\xc6\x06" + offset.to_bytes(2, "little") + bytes([value])


def load_out(offset: int, port: int = 0x80) -> bytes:
    """``mov al, [offset]; out port, al``."""
    return b"\xa0" + offset.to_bytes(2, "little") + b"\xe6" + bytes([port])


HLT = b"\xf4"


def run(gm: GuestMemory, vcpu: Vcpu, code: bytes, ds_base: int) -> list[object]:
    """Load ``code`` at CODE and run it to HLT with DS based at ``ds_base``."""
    gm.write(CODE, code + HLT)
    gm.dirty_pages(gm.find_region(CODE))  # the loader's own write is not the guest's
    vcpu.setup_real_mode(CODE, ds_base=ds_base)
    return list(vcpu.run_until_hlt())


# --- tests ---------------------------------------------------------------------------------


def test_regions_are_registered_host_mappings(gm: GuestMemory, vm: KvmVM) -> None:
    ram = gm.add_region(MiB, MiB, log_dirty=True, backing="memfd", align=2 * MiB)
    assert (ram.hva, ram.size) in vm.host_mappings()
    assert [s.id for s in vm.memslots()] == [0, 1]
    assert vm.unowned_slots() == []
    gm.remove_region(ram)
    assert (ram.hva, MiB) not in vm.host_mappings() and len(vm.memslots()) == 1


def test_guest_writes_exactly_the_reported_pages(gm: GuestMemory, vm: KvmVM) -> None:
    ram = gm.add_region(MiB, MiB, log_dirty=True, label="ram")
    gm.add_region(4 * MiB, 256 * 1024, log_dirty=True, backing="memfd", label="ram2")
    plain = gm.add_region(8 * MiB, 64 * 1024, label="plain")  # not logged
    with Vcpu(vm) as cpu:
        run(gm, cpu, store(0x0000, 1) + store(0x3000, 2) + store(0x3FFF, 3) + store(0xF123, 4),
            ds_base=MiB)
        run(gm, cpu, store(0x1000, 5) + store(0x2FFF, 6), ds_base=4 * MiB)
        run(gm, cpu, store(0x4000, 7), ds_base=8 * MiB)
        gm.write(MiB + 0x20000, b"device")
        gm.write(8 * MiB + 0x5000, b"dma")
        assert gm.dirty_pages().tolist() == [
            MiB, MiB + 0x3000, MiB + 0xF000, MiB + 0x20000, 4 * MiB + 0x1000, 4 * MiB + 0x2000,
            8 * MiB + 0x5000,
        ]
        assert gm.read(MiB + 0x3000, 1) == b"\x02" and gm.read(MiB + 0x3FFF, 1) == b"\x03"
        assert gm.read(4 * MiB + 0x2FFF, 1) == b"\x06" and gm.read(plain.gpa + 0x4000, 1) == b"\x07"
        assert gm.dirty_pages().size == 0
        # Write protection is re-armed by the harvest: the same pages are reported again.
        run(gm, cpu, store(0x3000, 9) + store(0x0010, 9), ds_base=MiB)
        assert gm.dirty_ranges(ram) == [(MiB, PAGE), (MiB + 0x3000, PAGE)]


def test_readonly_region_write_exits_as_mmio(gm: GuestMemory, vm: KvmVM) -> None:
    rom = gm.add_region(MiB, 64 * 1024, readonly=True, log_dirty=True, label="rom")
    gm.write(MiB + 0x10, b"\xaa")  # the VMM may write a read-only region
    gm.dirty_pages()
    with Vcpu(vm) as cpu:
        exits = run(gm, cpu, store(0x10, 0x55) + load_out(0x10), ds_base=MiB)
        assert MmioExit(MiB + 0x10, b"\x55", True, 1) in exits
        assert [e.value for e in exits if isinstance(e, IoExit)] == [0xAA]
        assert gm.dirty_pages().size == 0 and gm.read(MiB + 0x10, 1) == b"\xaa"
        gm.set_readonly(rom, False)  # delete + re-create: the guest may write now
        run(gm, cpu, store(0x10, 0x55), ds_base=MiB)
        assert gm.read(MiB + 0x10, 1) == b"\x55"
        assert gm.dirty_pages().tolist() == [MiB]


def test_moved_region_is_seen_at_its_new_gpa(gm: GuestMemory, vm: KvmVM) -> None:
    bar = gm.add_region(0xE0000000, 64 * 1024, label="bar")
    gm.write(0xE0000000 + 0x40, b"\x5a")
    with Vcpu(vm) as cpu:
        assert [e.value for e in run(gm, cpu, load_out(0x40), ds_base=0xE0000000)
                if isinstance(e, IoExit)] == [0x5A]
        gm.move_region(bar, 0xD0000000)
        exits = run(gm, cpu, load_out(0x40), ds_base=0xE0000000)
        assert any(isinstance(e, MmioExit) for e in exits)  # nothing there any more
        assert [e.value for e in run(gm, cpu, load_out(0x40), ds_base=0xD0000000)
                if isinstance(e, IoExit)] == [0x5A]


def test_harvests_during_guest_writes_lose_nothing(gm: GuestMemory, vm: KvmVM) -> None:
    """The guest increments a word in each of 16 pages in an endless loop while the host
    harvests and copies dirty pages into a shadow; after the vCPU is kicked out, one last
    harvest must leave the shadow equal to memory."""
    gm.add_region(MiB, 64 * 1024, log_dirty=True, label="ram")
    body = b"".join(b"\xff\x06" + (p * PAGE + 2 * p).to_bytes(2, "little") for p in range(16))
    loop = body + b"\xe9" + (-(len(body) + 3) & 0xFFFF).to_bytes(2, "little")  # jmp to start
    gm.write(CODE, loop)
    shadow = bytearray(gm.read(MiB, 64 * 1024))
    gm.dirty_pages()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    exits: list[object] = []
    try:
        with Vcpu(vm) as cpu:
            cpu.setup_real_mode(CODE, ds_base=MiB)
            thread = threading.Thread(target=lambda: exits.append(cpu.run()))
            thread.start()
            harvests = 0
            try:
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    for gpa in gm.dirty_pages().tolist():
                        off = gpa - MiB
                        shadow[off : off + PAGE] = gm.read(gpa, PAGE)
                    harvests += 1
            finally:
                while thread.is_alive():
                    cpu.kick()
                    thread.join(0.05)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert exits == [IntrExit()] and harvests > 5
    for gpa in gm.dirty_pages().tolist():
        off = gpa - MiB
        shadow[off : off + PAGE] = gm.read(gpa, PAGE)
    memory = gm.read(MiB, 64 * 1024)
    counts = [int.from_bytes(memory[p * PAGE + 2 * p : p * PAGE + 2 * p + 2], "little")
              for p in range(16)]
    assert min(counts) > 0  # the guest did run
    assert bytes(shadow) == memory


def test_snapshot_chain_with_a_real_guest(gm: GuestMemory, vm: KvmVM, tmp_path: Path) -> None:
    gm.add_region(MiB, MiB, log_dirty=True, label="ram")
    gm.add_region(4 * MiB, 128 * 1024, log_dirty=True, backing="memfd", label="ram2")
    gm.add_region(8 * MiB, 64 * 1024, readonly=True, label="rom")
    gm.write(8 * MiB, b"firmware")
    gm.write(MiB + 0x100, b"kernel image")
    paths = [tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"]
    with Vcpu(vm) as cpu:
        gm.snapshot(paths[0])
        run(gm, cpu, store(0x0000, 0x11) + store(0x7000, 0x22) + store(0xFFFF, 0x33),
            ds_base=MiB)
        gm.write(4 * MiB + 0x8000, b"virtio ring")
        inc1 = gm.snapshot(paths[1], incremental=True)
        code = gm.regions()[0]
        run(gm, cpu, store(0x7000, 0x44) + store(0x1234, 0x55), ds_base=4 * MiB)
        run(gm, cpu, store(0x7000, 0x66), ds_base=MiB)
        inc2 = gm.snapshot(paths[2], incremental=True)
    by_label = {r.label: r for r in inc1.regions}
    assert by_label["ram"].data_pages == 3 and by_label["ram2"].data_pages == 1
    assert {r.label: r.data_pages for r in inc2.regions if not r.complete} == {
        "ram": 1, "ram2": 2, "rom": 0}
    assert [r.label for r in inc2.regions if r.complete] == [code.label]  # unlogged code
    expected = {r.label: gm.read(r.gpa, r.size) for r in gm.regions()}
    with KvmVM() as other:
        restored = GuestMemory.restore(paths, other)
        try:
            assert {r.label: restored.read(r.gpa, r.size) for r in restored.regions()} == expected
            assert [(r.gpa, r.size, r.flags) for r in restored.regions()] == [
                (r.gpa, r.size, r.flags) for r in gm.regions()]
            with Vcpu(other) as cpu:  # a guest on the restored VM reads what was saved
                restored.write(CODE, load_out(0x7000) + load_out(0xFFFF) + HLT)
                cpu.setup_real_mode(CODE, ds_base=MiB)
                exits = cpu.run_until_hlt()
                assert [e.value for e in exits if isinstance(e, IoExit)] == [0x66, 0x33]
        finally:
            restored.close()

"""Real guests on /dev/kvm: what a vCPU sees through the memslots after MOVE, DELETE, READONLY
and dirty logging, and the set_memory_region_test MOVE scenario (spec section 9).

Guest code is 16-bit real mode assembled by hand. Guest memory is always anonymous memory
this process maps for the VM. The ``test_model_*`` functions additionally check
``memslot.ModelVM``'s predictions against what the kernel did.
"""

from __future__ import annotations

import queue
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from memslot.backends.kvm import HostMemory, KvmVM, UnownedMemoryError
from memslot.backends.vcpu import (
    Exit,
    HltExit,
    InternalErrorExit,
    IntrExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    Vcpu,
    VcpuError,
)
from memslot.constants import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
)
from memslot.engine.slot import MemorySlot
from memslot.errors import ClosedError

if TYPE_CHECKING:
    from memslot import ModelVM

PAGE = 4096
MiB = 1 << 20
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
CODE_SIZE = 0x10000  # slot 0 at gpa 0: code at 0x1000
CODE_RIP = 0x1000
REPORT_PORT = 0x10
SYNC_PORT = 0x11


# --- a tiny 16-bit assembler -------------------------------------------------------------------


def _w(value: int) -> bytes:
    return struct.pack("<H", value & 0xFFFF)


def mov_al_mem(offset: int) -> bytes:
    return b"\xa0" + _w(offset)


def mov_ax_mem(offset: int) -> bytes:
    return b"\xa1" + _w(offset)


def mov_mem_al(offset: int) -> bytes:
    return b"\xa2" + _w(offset)


def mov_mem_ax(offset: int) -> bytes:
    return b"\xa3" + _w(offset)


def mov_mem_imm8(offset: int, value: int) -> bytes:
    return b"\xc6\x06" + _w(offset) + bytes([value])


def mov_ax_imm(value: int) -> bytes:
    return b"\xb8" + _w(value)


def mov_bx_imm(value: int) -> bytes:
    return b"\xbb" + _w(value)


MOV_DS_AX = b"\x8e\xd8"
MOV_BX_AX = b"\x89\xc3"
CMP_AX_BX = b"\x39\xd8"
HLT = b"\xf4"
JMP_SELF = b"\xeb\xfe"


def out_ax(port: int) -> bytes:
    return b"\xe7" + bytes([port])


def cmp_ax_imm(value: int) -> bytes:
    return b"\x3d" + _w(value)


def set_ds(gpa: int) -> bytes:
    """Load DS so that ``[0]`` is ``gpa`` (< 1 MiB, paragraph aligned)."""
    assert gpa % 16 == 0 and gpa < MiB
    return mov_ax_imm(gpa >> 4) + MOV_DS_AX


# --- harness -------------------------------------------------------------------------------


class Guest:
    """One VM with a 64 KiB code slot at gpa 0 and one vCPU."""

    def __init__(self, vm: KvmVM) -> None:
        self.vm = vm
        self.code = vm.map_anonymous(CODE_SIZE)
        vm.set_user_memory_region(0, 0, 0, CODE_SIZE, self.code.address)
        self.cpu = Vcpu(vm)
        self.mmio_value = b"\x77"
        self.mmio: list[MmioExit] = []

    def _mmio(self, exit_: MmioExit) -> bytes | None:
        self.mmio.append(exit_)
        return None if exit_.is_write else self.mmio_value[: exit_.length]

    def run(self, code: bytes, ds_base: int = 0) -> tuple[list[Exit], int]:
        """Run ``code`` (HLT appended) from ``CODE_RIP``; returns the exits and AX."""
        self.mmio = []
        self.code.write(CODE_RIP, code + HLT)
        self.cpu.setup_real_mode(CODE_RIP, ds_base=ds_base)
        exits = self.cpu.run_until_hlt(max_exits=1000, mmio_handler=self._mmio)
        return exits, int(self.cpu.get_regs().rax) & 0xFFFF

    def read_byte(self, gpa: int) -> tuple[int, bool]:
        """The byte the guest reads at ``gpa`` and whether it was MMIO."""
        exits, ax = self.run(mov_al_mem(0), ds_base=gpa)
        return ax & 0xFF, any(isinstance(e, MmioExit) for e in exits)


@pytest.fixture
def guest(require_kvm: None) -> Iterator[Guest]:
    with KvmVM() as vm:  # closes the vCPU, fds and mappings even when the test fails
        yield Guest(vm)


def new_model(guest: Guest) -> ModelVM:
    """``memslot.ModelVM`` for this host holding the guest's code slot (imported here: it is
    developed alongside)."""
    from memslot import ModelVM

    model = ModelVM("x86_64-shadow")
    model.set_user_memory_region(0, 0, 0, CODE_SIZE, guest.code.address)
    return model


# --- basics ----------------------------------------------------------------------------------


def test_hlt_and_memory_read(guest: Guest) -> None:
    guest.code.write(0x3000, b"\x5a")
    exits, ax = guest.run(mov_al_mem(0x3000) + mov_mem_al(0x3001))
    assert exits == [HltExit()]
    assert ax & 0xFF == 0x5A
    assert guest.code.read(0x3001, 1) == b"\x5a"


def test_port_io(guest: Guest) -> None:
    exits, _ = guest.run(mov_ax_imm(0x1234) + out_ax(REPORT_PORT))
    assert exits[0] == IoExit(REPORT_PORT, 1, 2, b"\x34\x12", 1)
    assert isinstance(exits[0], IoExit) and exits[0].value == 0x1234


def test_zero_memory_regions(require_kvm: None) -> None:
    """SRT test_zero_memory_regions: no memslots at all -> KVM_EXIT_INTERNAL_ERROR."""
    with KvmVM() as vm:
        vm.set_nr_mmu_pages(64)
        cpu = Vcpu(vm)
        assert isinstance(cpu.run(), InternalErrorExit)


def test_deleting_the_code_slot_stops_the_guest(guest: Guest) -> None:
    guest.vm.set_user_memory_region(0, 0, 0, 0, 0)
    guest.cpu.setup_real_mode(CODE_RIP)
    assert isinstance(guest.cpu.run(), ShutdownExit | InternalErrorExit)


# --- (a) MOVE ----------------------------------------------------------------------------------

OLD_GPA = 0x100000
NEW_GPA = 0x200000


def _move_scenario(guest: Guest, model: ModelVM | None) -> None:
    vm = guest.vm
    data = vm.map_anonymous(4 * PAGE)
    data.write(0, b"\x5a")
    data.write(PAGE, b"\x6b")
    requests = [
        (1, 0, OLD_GPA, 4 * PAGE, data.address),
        (1, 0, NEW_GPA, 4 * PAGE, data.address),  # MOVE
    ]
    vm.set_user_memory_region(*requests[0])
    assert guest.read_byte(OLD_GPA) == (0x5A, False)
    vm.set_user_memory_region(*requests[1])
    assert guest.read_byte(NEW_GPA) == (0x5A, False)
    assert guest.read_byte(NEW_GPA + PAGE) == (0x6B, False)
    assert guest.read_byte(OLD_GPA) == (0x77, True)  # the old gpa is MMIO now
    assert guest.mmio == [MmioExit(OLD_GPA, b"", False, 1)]
    data.write(0, b"\x11")  # the same host bytes, seen at the new gpa
    assert guest.read_byte(NEW_GPA) == (0x11, False)
    assert vm.gfn_to_memslot(OLD_GPA >> 12) is None
    assert vm.gfn_to_memslot(NEW_GPA >> 12) is not None
    if model is not None:
        for request in requests:
            model.set_user_memory_region(*request)
        assert model.gfn_to_memslot(OLD_GPA >> 12) is None
        moved = model.gfn_to_memslot(NEW_GPA >> 12)
        assert moved is not None and moved.id == 1
        assert model.gfn_to_hva((NEW_GPA >> 12) + 1) == data.address + PAGE
        _same_slots(vm, model)


def _same_slots(vm: KvmVM, model: ModelVM) -> None:
    def key(slots: list[MemorySlot]) -> list[tuple[int, int, int, int, int]]:
        return [
            (s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr)
            for s in slots
        ]

    assert key(model.memslots()) == key(vm.memslots())


def test_move(guest: Guest) -> None:
    _move_scenario(guest, None)


def test_model_move(guest: Guest) -> None:
    """Needs memslot.ModelVM: gfn_to_memslot is None at the old gpa after MOVE."""
    _move_scenario(guest, new_model(guest))


# --- (b) DELETE / re-CREATE --------------------------------------------------------------------


def _delete_scenario(guest: Guest, model: ModelVM | None) -> None:
    vm = guest.vm
    data = vm.map_anonymous(PAGE)
    data.write(0, b"\x42")
    create = (1, 0, OLD_GPA, PAGE, data.address)
    delete = (1, 0, OLD_GPA, 0, data.address)
    steps = [(create, (0x42, False)), (delete, (0x77, True)), (create, (0x42, False))]
    for request, expected in steps:
        vm.set_user_memory_region(*request)
        assert guest.read_byte(OLD_GPA) == expected
        if model is not None:
            model.set_user_memory_region(*request)
            predicted = model.gfn_to_memslot(OLD_GPA >> 12)
            assert (predicted is None) == expected[1]
            _same_slots(vm, model)


def test_delete_and_recreate(guest: Guest) -> None:
    _delete_scenario(guest, None)


def test_model_delete_and_recreate(guest: Guest) -> None:
    """Needs memslot.ModelVM: the model finds no slot exactly where the guest saw MMIO."""
    _delete_scenario(guest, new_model(guest))


# --- (c) READONLY ------------------------------------------------------------------------------


def test_readonly_slot(guest: Guest) -> None:
    vm = guest.vm
    data = vm.map_anonymous(PAGE)
    data.write(0, b"\x5a")
    vm.set_user_memory_region(1, RO, OLD_GPA, PAGE, data.address)
    code = (
        mov_al_mem(0)  # read: memory
        + mov_mem_imm8(0x10, 0x42)  # byte write: MMIO
        + mov_mem_al(0x20)  # write of the value read
        + mov_ax_imm(0x1234)
        + mov_mem_ax(0x30)  # word write
        + mov_al_mem(0)
    )
    exits, ax = guest.run(code, ds_base=OLD_GPA)
    assert ax == 0x125A  # AL from memory after everything
    assert guest.mmio == [
        MmioExit(OLD_GPA + 0x10, b"\x42", True, 1),
        MmioExit(OLD_GPA + 0x20, b"\x5a", True, 1),
        MmioExit(OLD_GPA + 0x30, b"\x34\x12", True, 2),
    ]
    assert exits[-1] == HltExit()
    assert data.read(0, 0x40) == b"\x5a" + bytes(0x3F)  # memory unchanged


def test_model_readonly_slot(guest: Guest) -> None:
    """Needs memslot.ModelVM: reads translate, writes give KVM_HVA_ERR_RO_BAD (MMIO)."""
    from memslot import KVM_HVA_ERR_RO_BAD, kvm_is_error_hva

    data = guest.vm.map_anonymous(PAGE)
    guest.vm.set_user_memory_region(1, RO, OLD_GPA, PAGE, data.address)
    guest.run(mov_al_mem(0) + mov_mem_imm8(0, 1), ds_base=OLD_GPA)
    assert [e.is_write for e in guest.mmio] == [True]
    model = new_model(guest)
    model.set_user_memory_region(1, RO, OLD_GPA, PAGE, data.address)
    gfn = OLD_GPA >> 12
    assert model.gfn_to_hva(gfn) == data.address
    assert model.gfn_to_hva(gfn, write=True) == KVM_HVA_ERR_RO_BAD
    assert kvm_is_error_hva(KVM_HVA_ERR_RO_BAD)


# --- (d) dirty logging -------------------------------------------------------------------------

DIRTY_GPA = 0x20000
DIRTY_PAGES = 100
MOVED_DIRTY_GPA = 0x90000  # still below 1 MiB: reachable by loading DS


def bitmap(pages: set[int], npages: int = DIRTY_PAGES) -> bytes:
    value = sum(1 << p for p in pages)
    return value.to_bytes(((npages + 63) // 64) * 8, "little")


@dataclass
class DirtyRun:
    """Runs write programs against the dirty slot; mirrors everything into ``model``."""

    guest: Guest
    model: ModelVM | None
    base: int = DIRTY_GPA
    compared: int = field(default=0)

    def create(self, flags: int = LOG) -> HostMemory:
        # Private memory: a page the guest only reads stays the host's read-only zero page.
        # In shared memory a read fault maps the page writable, and on a TDP host (the lab's
        # kvm_amd with NPT) KVM marks a page dirty as soon as it maps it writable: the read
        # pages would be dirty there (hva_to_pfn_slow, make_spte), though not on this host
        # (kvm_pvm, shadow paging). See HostMemory.
        data = self.guest.vm.map_anonymous(DIRTY_PAGES * PAGE, shared=False)
        self.data = data
        self.reconfigure(flags, self.base)
        return data

    def reconfigure(self, flags: int, gpa: int) -> None:
        request = (1, flags, gpa, DIRTY_PAGES * PAGE, self.data.address)
        self.guest.vm.set_user_memory_region(*request)
        if self.model is not None:
            self.model.set_user_memory_region(*request)
        self.base = gpa

    def enable_manual(self, args: int) -> None:
        self.guest.vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args)
        if self.model is not None:
            self.model.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args)

    def write(self, pages: set[int], reads: frozenset[int] | set[int] = frozenset()) -> None:
        code = b""
        for page in sorted(pages | reads):
            code += set_ds(self.base + page * PAGE)
            code += mov_al_mem(8) if page in reads else mov_mem_imm8(0, page + 1)
        exits, _ = self.guest.run(code)
        assert exits == [HltExit()]
        for page in pages:
            assert self.data.read(page * PAGE, 1) == bytes([page + 1])
        if self.model is not None:
            for page in pages:
                self.model.mark_page_dirty((self.base >> 12) + page)

    def get(self) -> bytes:
        log = self.guest.vm.get_dirty_log(1)
        if self.model is not None:
            assert self.model.get_dirty_log(1) == log
            self.compared += 1
        return log

    def clear(self, pages: set[int]) -> None:
        self.guest.vm.clear_dirty_log(1, 0, DIRTY_PAGES, bitmap(pages))
        if self.model is not None:
            self.model.clear_dirty_log(1, 0, DIRTY_PAGES, bitmap(pages))


def _dirty_get_protect(run: DirtyRun) -> None:
    run.create()
    assert run.get() == bitmap(set())
    first = {0, 3, 63, 64, 99}
    run.write(first, reads={5})  # a read does not dirty a page
    assert run.get() == bitmap(first)
    assert run.get() == bitmap(set())  # GET cleared the log and re-protected
    run.write({1, 64})
    assert run.get() == bitmap({1, 64})
    run.write({2, 70})
    run.reconfigure(LOG, MOVED_DIRTY_GPA)  # MOVE keeping LOG_DIRTY_PAGES keeps the bits
    assert run.get() == bitmap({2, 70})
    run.write({4, 98})  # writes at the new gpa
    assert run.get() == bitmap({4, 98})
    run.reconfigure(0, MOVED_DIRTY_GPA)  # logging off
    run.reconfigure(LOG, MOVED_DIRTY_GPA)  # on again: a fresh, empty bitmap
    run.write({9})
    assert run.get() == bitmap({9})


def _dirty_manual_protect(run: DirtyRun) -> None:
    run.enable_manual(1)
    run.create()
    first = {0, 3, 63, 64, 99}
    run.write(first)
    assert run.get() == bitmap(first)
    assert run.get() == bitmap(first)  # manual protect: GET does not clear
    run.clear({0, 3})
    assert run.get() == bitmap(first - {0, 3})
    run.write({0, 7, 64})  # 0 was re-protected by the clear
    assert run.get() == bitmap((first - {3}) | {7})
    run.reconfigure(LOG, MOVED_DIRTY_GPA)
    assert run.get() == bitmap((first - {3}) | {7})
    run.clear(set(range(DIRTY_PAGES)))
    assert run.get() == bitmap(set())
    run.write({50})
    assert run.get() == bitmap({50})


def _dirty_initially_set(run: DirtyRun) -> None:
    run.enable_manual(3)
    run.create()
    assert run.get() == bitmap(set(range(DIRTY_PAGES)))
    run.clear(set(range(DIRTY_PAGES)))
    assert run.get() == bitmap(set())
    run.write({1, 65, 99}, reads={2})
    assert run.get() == bitmap({1, 65, 99})


DIRTY_SCENARIOS: dict[str, Callable[[DirtyRun], None]] = {
    "get-protect": _dirty_get_protect,
    "manual-protect": _dirty_manual_protect,
    "initially-set": _dirty_initially_set,
}


@pytest.mark.parametrize("name", DIRTY_SCENARIOS)
def test_dirty_log(guest: Guest, name: str) -> None:
    DIRTY_SCENARIOS[name](DirtyRun(guest, None))


@pytest.mark.parametrize("name", DIRTY_SCENARIOS)
def test_model_dirty_log(guest: Guest, name: str) -> None:
    """Needs memslot.ModelVM: identical bitmaps after mark_page_dirty of the same writes."""
    run = DirtyRun(guest, new_model(guest))
    DIRTY_SCENARIOS[name](run)
    assert run.compared >= 3


# --- (e) set_memory_region_test: MOVE of an in-use 2 MiB region --------------------------------

REGION_GPA = 0xC0000000
REGION_SLOT = 10
REGION_SIZE = 2 * MiB
MMIO_VAL = 0xBEEF
STOP_VAL = 0xDEAD
THREADED_MOVES = 25


def _region(guest: Guest) -> HostMemory:
    region = guest.vm.map_anonymous(REGION_SIZE, align=2 * MiB, hugepages=True)
    region.write(0, bytes(REGION_SIZE))  # fault it in (a THP where the host allows)
    guest.vm.set_user_memory_region(REGION_SLOT, 0, REGION_GPA, REGION_SIZE, region.address)
    return region


def _put(region: HostMemory, value: int) -> None:
    region.write(0, struct.pack("<H", value))


def test_move_in_use_region_stepwise(guest: Guest) -> None:
    """Single-threaded: the vCPU runs between the moves, so every read is deterministic."""
    vm = guest.vm
    region = _region(guest)
    guest.mmio_value = struct.pack("<H", MMIO_VAL)
    probe = mov_ax_mem(0)
    good = 0
    for k in range(50):
        assert guest.run(probe, REGION_GPA)[1] == good
        vm.set_user_memory_region(REGION_SLOT, 0, REGION_GPA - PAGE, REGION_SIZE, region.address)
        bad = 0x100 + k
        _put(region, bad)
        # gpa REGION_GPA is host page 1 now (zero); never the value written to page 0
        assert guest.run(probe, REGION_GPA)[1] == 0
        assert guest.run(probe, REGION_GPA - PAGE)[1] == bad
        good = 0x1000 + k
        _put(region, good)
        vm.set_user_memory_region(REGION_SLOT, 0, REGION_GPA, REGION_SIZE, region.address)
        assert guest.run(probe, REGION_GPA)[1] == good
        assert guest.mmio == []


def _spin_code() -> bytes:
    """Report every change of the word at [0] on REPORT_PORT; HLT after STOP_VAL."""
    loop = CODE_RIP + len(out_ax(SYNC_PORT)) + len(mov_bx_imm(0))
    code = out_ax(SYNC_PORT) + mov_bx_imm(0)
    body = mov_ax_mem(0) + CMP_AX_BX
    je_at = loop + len(body) + 2
    body += b"\x74" + bytes([(loop - je_at) & 0xFF])
    body += MOV_BX_AX + out_ax(REPORT_PORT) + cmp_ax_imm(STOP_VAL)
    jne_at = loop + len(body) + 2
    body += b"\x75" + bytes([(loop - jne_at) & 0xFF])
    return code + body


def test_move_in_use_region_threaded(guest: Guest) -> None:
    """SRT test_move_memory_region with the vCPU spinning in its own thread while the host moves
    the 2 MiB slot down one page and back: the guest may see the old value, host page 1 (0) or
    MMIO while the slot is invalid, never the value written to page 0 while misaligned."""
    vm = guest.vm
    region = _region(guest)
    cpu = guest.cpu
    guest.code.write(CODE_RIP, _spin_code() + HLT)
    cpu.setup_real_mode(CODE_RIP, ds_base=REGION_GPA)
    reports: queue.Queue[tuple[str, int]] = queue.Queue()
    failure: list[BaseException] = []

    def vcpu_thread() -> None:
        try:
            while True:
                exit_ = cpu.run()
                if isinstance(exit_, IoExit):
                    kind = "sync" if exit_.port == SYNC_PORT else "value"
                    reports.put((kind, exit_.value))
                elif isinstance(exit_, MmioExit):
                    assert (exit_.addr, exit_.is_write, exit_.length) == (REGION_GPA, False, 2)
                    reports.put(("mmio", MMIO_VAL))
                    cpu.complete_mmio(struct.pack("<H", MMIO_VAL))
                elif isinstance(exit_, HltExit):
                    reports.put(("hlt", 0))
                    return
                else:
                    reports.put(("stopped", 0))
                    raise AssertionError(f"unexpected exit {exit_}")
        except BaseException as exc:  # reported to the main thread
            failure.append(exc)
            reports.put(("error", 0))

    seen: list[tuple[int, str, int]] = []

    def wait_for(kind: str, value: int | None, iteration: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                got = reports.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"guest never reported {kind} {value}; saw {seen}") from None
            seen.append((iteration, *got))
            if got[0] == "error":
                raise AssertionError(f"vCPU thread failed: {failure}")
            if got[0] == kind and (value is None or got[1] == value):
                return

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    thread = threading.Thread(target=vcpu_thread, name="vcpu0", daemon=True)
    thread.start()
    try:
        wait_for("sync", None, -1)
        good = 0
        for k in range(THREADED_MOVES):
            vm.set_user_memory_region(
                REGION_SLOT, 0, REGION_GPA - PAGE, REGION_SIZE, region.address
            )
            bad = 0x100 + k
            _put(region, bad)
            time.sleep(0.02)  # the guest spins on the misaligned region
            previous_good, good = good, 0x1000 + k
            _put(region, good)  # before the move back, else the guest could race to "bad"
            vm.set_user_memory_region(REGION_SLOT, 0, REGION_GPA, REGION_SIZE, region.address)
            wait_for("value", good, k)
            for iteration, kind, value in seen:
                if iteration == k and kind in ("value", "mmio"):
                    assert value in (previous_good, 0, MMIO_VAL, good), (k, seen)
        _put(region, STOP_VAL)
        wait_for("hlt", None, THREADED_MOVES)
    finally:
        if thread.is_alive():
            cpu.kick()
            thread.join(5)
        signal.signal(signal.SIGUSR1, previous)
    assert not thread.is_alive()
    assert not failure
    values = [v for _, kind, v in seen if kind == "value"]
    assert all(v < 0x100 or v >= 0x1000 for v in values), seen  # never a "bad" value
    mmio = sum(1 for _, kind, _ in seen if kind == "mmio")
    print(f"{THREADED_MOVES} round trips, {mmio} MMIO reads while the slot was invalid")
    goods = [v for v in values if 0x1000 <= v < 0x1000 + THREADED_MOVES]
    assert sorted(set(goods)) == [0x1000 + k for k in range(THREADED_MOVES)]
    assert goods == sorted(goods), seen  # a value, once replaced, never comes back


# --- the Vcpu itself ---------------------------------------------------------------------------


def test_vcpu_refuses_memory_it_does_not_own(require_kvm: None) -> None:
    with KvmVM() as vm:
        vm.set_user_memory_region(0, 0, 0, CODE_SIZE, 1 << 40)  # e.g. replayed from a trace
        with pytest.raises(UnownedMemoryError, match="recorded addresses"):
            Vcpu(vm)
    with KvmVM() as vm:
        code = vm.map_anonymous(CODE_SIZE)
        vm.set_user_memory_region(0, 0, 0, CODE_SIZE, code.address)
        cpu = Vcpu(vm)
        vm.set_user_memory_region(1, 0, 0x100000, PAGE, code.address - PAGE)
        with pytest.raises(UnownedMemoryError):
            cpu.run()
        vm.set_user_memory_region(1, 0, 0, 0, 0)
        code.write(CODE_RIP, HLT)
        cpu.setup_real_mode(CODE_RIP)
        assert cpu.run() == HltExit()


def test_kick_interrupts_a_spinning_guest(guest: Guest) -> None:
    guest.code.write(CODE_RIP, JMP_SELF)
    guest.cpu.setup_real_mode(CODE_RIP)
    result: list[Exit] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        thread = threading.Thread(target=lambda: result.append(guest.cpu.run()), daemon=True)
        thread.start()
        time.sleep(0.05)
        guest.cpu.kick()
        thread.join(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result == [IntrExit()]
    guest.cpu.kick()  # not running: the next run returns at once
    assert guest.cpu.run() == IntrExit()


def test_complete_mmio_misuse(guest: Guest) -> None:
    with pytest.raises(VcpuError):
        guest.cpu.complete_mmio(b"\x01")
    guest.code.write(CODE_RIP, mov_al_mem(0) + HLT)
    guest.cpu.setup_real_mode(CODE_RIP, ds_base=OLD_GPA)
    exit_ = guest.cpu.run()
    assert exit_ == MmioExit(OLD_GPA, b"", False, 1)
    with pytest.raises(ValueError):
        guest.cpu.complete_mmio(b"\x01\x02")
    guest.cpu.run()  # not completed: reads mmio_fill
    assert guest.cpu.get_regs().rax & 0xFF == 0xFF


def test_vcpu_close(require_kvm: None) -> None:
    vm = KvmVM()
    cpu = Vcpu(vm)
    vm.close()
    assert cpu.closed
    for call in (cpu.run, cpu.get_regs, lambda: cpu.kvm_run, lambda: cpu.fd):
        with pytest.raises(ClosedError):
            call()
    cpu.close()
    with KvmVM() as vm2, Vcpu(vm2) as cpu2:
        assert cpu2.get_regs().rflags & 2
    assert cpu2.closed

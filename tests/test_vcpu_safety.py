"""A Python library never crashes the interpreter and a guest never writes outside memory the
process registered for it: ``Vcpu.kvm_run`` (and its sub-structures) after close / VM close /
garbage collection raise; ``HostMemory.close()`` unregisters its range; no slot can be put on
unregistered memory while a vCPU is inside ``KVM_RUN``."""

from __future__ import annotations

import gc
import mmap
import signal
import threading
import time
from collections.abc import Callable

import pytest

from memslot.backends.kvm import KvmVM, UnownedMemoryError
from memslot.backends.vcpu import HltExit, IntrExit, Vcpu
from memslot.errors import ClosedError

pytestmark = pytest.mark.kvm

PAGE = 4096
CODE_SIZE = 0x10000
CODE_RIP = 0x1000
HLT = b"\xf4"
JMP_SELF = b"\xeb\xfe"


def _touch_all(run: object, mmio: object, data: object) -> list[Callable[[], object]]:
    return [
        lambda: run.exit_reason,  # type: ignore[attr-defined]
        lambda: setattr(run, "immediate_exit", 1),
        lambda: mmio.phys_addr,  # type: ignore[attr-defined]
        lambda: bytes(data),  # type: ignore[call-overload]
        lambda: data[0],  # type: ignore[index]
        lambda: data.__setitem__(0, 1),  # type: ignore[attr-defined]
    ]


@pytest.mark.parametrize("how", ["vcpu.close", "vm.close", "gc"])
def test_kvm_run_kept_past_its_vcpu_raises(how: str) -> None:
    vm = KvmVM()
    try:
        cpu = Vcpu(vm)
        run = cpu.kvm_run
        mmio = run.mmio
        data = mmio.data
        assert run.exit_reason == 0 and bytes(data) == bytes(8) and len(data) == 8
        if how == "vcpu.close":
            cpu.close()
        elif how == "vm.close":
            vm.close()
        else:
            del cpu
            gc.collect()
        for touch in _touch_all(run, mmio, data):
            with pytest.raises(ClosedError, match="kvm_run"):
                touch()
    finally:
        vm.close()


def _guest(vm: KvmVM) -> tuple[Vcpu, object]:
    code = vm.map_anonymous(CODE_SIZE)
    vm.set_user_memory_region(0, 0, 0, CODE_SIZE, code.address)
    code.write(CODE_RIP, HLT)
    cpu = Vcpu(vm)
    cpu.setup_real_mode(CODE_RIP)
    return cpu, code


def test_host_memory_close_unregisters() -> None:
    with KvmVM() as vm:
        cpu, _ = _guest(vm)
        extra = vm.map_anonymous(4 * PAGE)
        vm.set_user_memory_region(1, 0, 0x100000, 4 * PAGE, extra.address)
        assert (extra.address, extra.size) in vm.host_mappings()
        assert cpu.run() == HltExit()
        extra.close()
        assert (extra.address, extra.size) not in vm.host_mappings()
        # A later mapping at the same address is not guest memory: the guest may not run.
        with pytest.raises(UnownedMemoryError):
            cpu.run()
        vm.set_user_memory_region(1, 0, 0x100000, 0, extra.address)
        cpu.setup_real_mode(CODE_RIP)
        assert cpu.run() == HltExit()
        extra.close()  # idempotent


def test_no_unowned_slot_while_a_vcpu_runs() -> None:
    with KvmVM() as vm:
        cpu, code = _guest(vm)
        code.write(CODE_RIP, JMP_SELF)  # type: ignore[attr-defined]
        cpu.setup_real_mode(CODE_RIP)
        stray = mmap.mmap(-1, 4 * PAGE)  # this process's memory, never registered
        owned = vm.map_anonymous(4 * PAGE)
        addr = _address(stray)
        result: list[object] = []
        previous = signal.signal(signal.SIGUSR1, lambda *_: None)
        try:
            thread = threading.Thread(target=lambda: result.append(cpu.run()), daemon=True)
            thread.start()
            deadline = time.monotonic() + 5
            while cpu._thread is None and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.02)  # inside KVM_RUN
            with pytest.raises(UnownedMemoryError, match="KVM_RUN"):
                vm.set_user_memory_region(1, 0, 0x100000, 4 * PAGE, addr)
            assert vm.memslot(1) is None  # never reached the kernel
            with pytest.raises(UnownedMemoryError, match="KVM_RUN"):
                code.close()  # type: ignore[attr-defined]  # slot 0 lies in it
            assert not code.closed  # type: ignore[attr-defined]
            owned.close()  # no slot lies in it
        except BaseException:
            cpu.kick()
            raise
        finally:
            cpu.kick()
            thread.join(5)
            signal.signal(signal.SIGUSR1, previous)
        assert result == [IntrExit()]
        # Not running: a slot on unregistered memory is accepted, and run() refuses.
        vm.set_user_memory_region(1, 0, 0x100000, 4 * PAGE, addr)
        with pytest.raises(UnownedMemoryError):
            cpu.run()
        vm.set_user_memory_region(1, 0, 0x100000, 0, addr)
        stray.close()


def _address(buf: mmap.mmap) -> int:
    import ctypes

    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view

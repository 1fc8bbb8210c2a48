"""The arch walks of the process's VMAs in ``kvm_arch_prepare_memory_region``: riscv refuses a
writable slot over a VMA without ``VM_WRITE`` (EPERM) and, like arm64, dirty logging over a
``VM_PFNMAP`` VMA (EINVAL). The model answers from the VMAs it knows (registered host
mappings, or a real process's told by ``DualVM``); ``/proc/self/maps`` is read as the kernel
would see it. (The lab's riscv64 guests refused ua=0 because Debian's riscv64 python3.13 is
not PIE: its text is mapped r-x at 0x10000.)"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from memslot import DualVM, KvmError, KvmVM, ModelVM, detect_profile
from memslot.backends.procmaps import ProcessVmas, parse_maps, parse_smaps_flags, read_vmas
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES as LOG
from memslot.constants import KVM_MEM_READONLY as RO
from memslot.engine.vmas import ANON_RW, Vma, VmaMap, VmFlag

PAGE = 4096
MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17, every arch
TEXT = 0x10000  # where the lab's riscv64 python3.13 text starts
R = VmFlag.READ
RX = VmFlag.READ | VmFlag.EXEC

RISCV = ("riscv64@6.12", "riscv64@7.2")
ARM64 = ("arm64@5.10", "arm64@6.1", "arm64@6.12", "arm64@7.2", "arm64@7.3")


def refused(vm: ModelVM, code: str, err: int, *request: int) -> None:
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(*request)
    assert info.value.errno == err
    assert vm.last_result is not None and vm.last_result.rule is not None
    assert vm.last_result.rule.code == code


# -- the map of known VMAs ------------------------------------------------------------------
def test_vma_map_cuts_replaces_and_walks_in_order() -> None:
    m = VmaMap()
    m.map(0x1000, 0x9000, ANON_RW)
    m.map(0x3000, 0x5000, R)  # mprotect of the middle: three VMAs
    assert list(m) == [Vma(0x1000, 0x3000, ANON_RW), Vma(0x3000, 0x5000, R),
                       Vma(0x5000, 0x9000, ANON_RW)]
    assert m.intersecting(0x2fff, 0x3001) == [Vma(0x1000, 0x3000, ANON_RW),
                                              Vma(0x3000, 0x5000, R)]
    assert m.intersecting(0x9000, 0xA000) == [] and m.intersecting(0, 0x1000) == []
    m.forget(0x2000, 0x6000)
    assert list(m) == [Vma(0x1000, 0x2000, ANON_RW), Vma(0x6000, 0x9000, ANON_RW)]
    m.replace(0, 0x10000, [Vma(0x800, 0x4000, RX), Vma(0xF000, 0x20000, R)])
    assert list(m) == [Vma(0x800, 0x4000, RX), Vma(0xF000, 0x10000, R)]
    with pytest.raises(ValueError):
        m.map(0x5000, 0x5000, R)


# -- the model's rule ------------------------------------------------------------------------
@pytest.mark.parametrize("profile", RISCV)
def test_riscv_refuses_a_writable_slot_over_read_only_memory(profile: str) -> None:
    vm = ModelVM(profile)
    vm.tell_vmas(0, 1 << 47, [Vma(TEXT, 0x59C000, RX), Vma(0x59D000, 0x62B000, ANON_RW)])
    # The lab's reproducer: slot=0:8 flags=LOG_DIRTY_PAGES gpa=0xfffff000 size=0x3f000 ua=0.
    refused(vm, "riscv-vma-write", errno.EPERM, 8, LOG, 0xFFFFF000, 0x3F000, 0)
    refused(vm, "riscv-vma-write", errno.EPERM, 8, 0, 0xFFFFF000, 0x3F000, 0)
    assert "0x10000-0x59c000 r-xp" in vm.last_result.detail  # type: ignore[union-attr]
    vm.set_user_memory_region(8, RO, 0xFFFFF000, 0x3F000, 0)  # read-only slots may
    vm.set_user_memory_region(9, 0, 0, 0x10000, 0)  # a hole below the text: nothing to walk
    vm.set_user_memory_region(10, LOG, 8 << 32, 0x1000, 0x59D000)  # writable memory
    assert [s.id for s in vm.memslots()] == [9, 8, 10]
    # MOVE and FLAGS_ONLY walk again: the VMAs may have changed since the slot was made.
    vm.register_host_mapping(0x59D000, 0x1000, writable=False)
    refused(vm, "riscv-vma-write", errno.EPERM, 10, LOG, 9 << 32, 0x1000, 0x59D000)
    refused(vm, "riscv-vma-write", errno.EPERM, 10, 0, 8 << 32, 0x1000, 0x59D000)
    vm.unregister_host_mapping(0x59D000, 0x1000)  # unknown again: unmapped to the model
    vm.set_user_memory_region(10, 0, 8 << 32, 0x1000, 0x59D000)
    vm.set_user_memory_region(10, 0, 0, 0, 0x59D000)  # DELETE never walks
    assert vm.check() == []


@pytest.mark.parametrize("profile", RISCV)
def test_riscv_pfnmap_refuses_dirty_logging_and_the_first_vma_decides(profile: str) -> None:
    vm = ModelVM(profile)
    vm.register_host_mapping(0x100000, 0x2000, pfnmap=True)
    vm.register_host_mapping(0x102000, 0x2000, writable=False)
    refused(vm, "riscv-pfnmap-dirty", errno.EINVAL, 0, LOG, 0, 0x4000, 0x100000)
    refused(vm, "riscv-vma-write", errno.EPERM, 0, LOG, 0, 0x2000, 0x102000)
    vm.set_user_memory_region(0, LOG | RO, 0, 0x2000, 0x102000)
    vm.set_user_memory_region(1, 0, 1 << 32, 0x2000, 0x100000)  # IO memory, no logging
    refused(vm, "riscv-pfnmap-dirty", errno.EINVAL, 1, LOG, 1 << 32, 0x2000, 0x100000)
    assert vm.memslot(1).flags == 0  # type: ignore[union-attr]
    # a read-only VMA before the IO one decides first (EPERM), and the reverse
    vm.tell_vmas(0x200000, 0x204000, [Vma(0x200000, 0x202000, R),
                                     Vma(0x202000, 0x204000, ANON_RW | VmFlag.PFNMAP)])
    refused(vm, "riscv-vma-write", errno.EPERM, 2, LOG, 2 << 32, 0x4000, 0x200000)
    vm.tell_vmas(0x200000, 0x204000, [Vma(0x200000, 0x202000, ANON_RW | VmFlag.PFNMAP),
                                     Vma(0x202000, 0x204000, R)])
    refused(vm, "riscv-pfnmap-dirty", errno.EINVAL, 2, LOG, 2 << 32, 0x4000, 0x200000)


@pytest.mark.parametrize("profile", ARM64)
def test_arm64_walk_refuses_only_dirty_logging_over_pfnmap(profile: str) -> None:
    vm = ModelVM(profile)
    vm.tell_vmas(0, 1 << 40, [Vma(TEXT, 0x59C000, RX)])
    vm.set_user_memory_region(0, LOG, 0, 0x3F000, 0)  # arm64 never asks for VM_WRITE
    vm.register_host_mapping(0x100000, 0x2000, pfnmap=True)
    vm.set_user_memory_region(1, 0, 1 << 32, 0x2000, 0x100000)
    refused(vm, "arm64-pfnmap-dirty", errno.EINVAL, 1, LOG, 1 << 32, 0x2000, 0x100000)
    refused(vm, "arm64-pfnmap-dirty", errno.EINVAL, 2, LOG, 2 << 32, 0x3000, 0xFF000)
    assert vm.check() == []


@pytest.mark.parametrize("profile", ["x86_64", "x86_64@5.10", "ppc64-hv", "s390x"])
def test_arches_without_a_walk_ignore_the_vmas(profile: str) -> None:
    vm = ModelVM(profile)
    assert not vm.walks_vmas
    page = vm.profile.page_size
    size = max(page, 1 << 20)
    vm.register_host_mapping(1 << 30, size, writable=False, pfnmap=True)
    vm.set_user_memory_region(0, LOG, 0, size, 1 << 30)


# -- the differential backend tells the model the kernel's VMAs ------------------------------
def test_dual_vm_tells_the_model_the_kernels_vmas() -> None:
    kernel = ModelVM("riscv64@7.2")
    kernel.tell_vmas(0, 1 << 32, [Vma(TEXT, 0x59C000, RX)])
    model = ModelVM("riscv64@7.2")
    with DualVM(model, kernel) as dual:
        with pytest.raises(KvmError) as info:
            dual.set_user_memory_region(8, LOG, 0xFFFFF000, 0x3F000, 0)
        assert info.value.errno == errno.EPERM  # both: no Divergence
        assert model.process_vmas(0, 0x3F000) == [Vma(TEXT, 0x3F000, RX)]
        dual.set_user_memory_region(8, RO, 0xFFFFF000, 0x3F000, 0)
        dual.register_host_mapping(1 << 30, 0x1000, pfnmap=True)  # declared to both
        with pytest.raises(KvmError):
            dual.set_user_memory_region(9, LOG, 1 << 32, 0x1000, 1 << 30)
        dual.verify()


class CountingKernel(ModelVM):
    """A model standing in for the kernel that counts the reads of its VMAs."""

    def __init__(self, profile: str) -> None:
        super().__init__(profile)
        self.reads: list[tuple[int, int, bool]] = []

    def process_vmas(self, start: int, end: int, *, pfnmap: bool = True) -> list[Vma]:
        self.reads.append((start, end, pfnmap))
        return super().process_vmas(start, end, pfnmap=pfnmap)


def test_dual_vm_reads_the_vmas_only_where_an_arch_walk_happens() -> None:
    kernel = CountingKernel("riscv64@7.2")
    kernel.tell_vmas(0, 1 << 32, [Vma(TEXT, 0x59C000, RX)])
    with DualVM(ModelVM("riscv64@7.2"), kernel) as dual:
        dual.set_user_memory_region(0, 0, 0, 0x2000, 1 << 30)  # a writable CREATE: walked
        assert kernel.reads == [(1 << 30, (1 << 30) + 0x2000, False)]
        kernel.reads.clear()
        with pytest.raises(KvmError):
            dual.set_user_memory_region(1, 0, 0, 0x2000, 1 << 31)  # overlap: refused before
        with pytest.raises(KvmError):
            dual.set_user_memory_region(1, 0x80, 1 << 32, 0x2000, 1 << 31)  # unknown flag
        dual.set_user_memory_region(1, RO, 1 << 32, 0x2000, 1 << 31)  # nothing to refuse
        dual.set_user_memory_region(1, 0, 1 << 32, 0, 1 << 31)  # DELETE never walks
        assert kernel.reads == []
        with pytest.raises(KvmError):  # riscv's walk refuses: the reads happen, with PFNMAP
            dual.set_user_memory_region(8, LOG, 0xFFFFF000, 0x3F000, 0)
        assert kernel.reads == [(0, 0x3F000, True)]
        dual.verify()
    kernel = CountingKernel("arm64@7.2")
    with DualVM(ModelVM("arm64@7.2"), kernel) as dual:
        dual.set_user_memory_region(0, 0, 0, 0x2000, 1 << 30)  # arm64 reads only VM_PFNMAP,
        dual.set_user_memory_region(0, 0, 0x2000, 0x2000, 1 << 30)  # for dirty logging
        assert kernel.reads == []
        dual.set_user_memory_region(0, LOG, 0x2000, 0x2000, 1 << 30)  # FLAGS_ONLY walks
        assert kernel.reads == [(1 << 30, (1 << 30) + 0x2000, True)]


def test_a_closed_dual_vm_leaves_its_model_without_a_source() -> None:
    model = ModelVM("riscv64@7.2")
    with DualVM(model, ModelVM("riscv64@7.2")):
        assert model.vmas.source is not None
    assert model.vmas.source is None


# -- /proc/self/maps --------------------------------------------------------------------------
MAPS = """\
00010000-0059c000 r-xp 00000000 00:02 31                                 /usr/bin/python3.13
0059c000-0059d000 r--p 0058b000 00:02 31                                 /usr/bin/python3.13
0059d000-0062b000 rw-p 0058c000 00:02 31                                 /usr/bin/python3.13
7fff9431e000-7fff94320000 r--p 00000000 00:00 0                          [vvar]
7fff94344000-7fff94345000 rw-s 00000000 00:05 9                          /dev/zero (deleted)
"""
SMAPS = """\
0059d000-0062b000 rw-p 0058c000 00:02 31                                 /usr/bin/python3.13
Size:                568 kB
VmFlags: rd wr mr mw me ac
7fff9431e000-7fff94320000 r--p 00000000 00:00 0                          [vvar]
Size:                  8 kB
VmFlags: rd mr pf io de dd
"""


def test_maps_and_smaps_are_parsed_as_the_walk_sees_them() -> None:
    assert parse_maps(MAPS, 0, 0x3F000) == [Vma(TEXT, 0x59C000, RX)]
    assert parse_maps(MAPS.encode(), 0, 0x10000) == [] and parse_maps("", 0, 1 << 47) == []
    assert parse_maps(MAPS, 0x59C000, 0x59E000) == [Vma(0x59C000, 0x59D000, R),
                                                    Vma(0x59D000, 0x62B000, ANON_RW)]
    shared = parse_maps(MAPS, 0x7FFF94344000, 0x7FFF94345000)
    assert shared == [Vma(0x7FFF94344000, 0x7FFF94345000, ANON_RW | VmFlag.SHARED)]
    flags = parse_smaps_flags(SMAPS, {0x7FFF9431E000, 0x59D000})
    assert flags == {0x7FFF9431E000: R | VmFlag.PFNMAP, 0x59D000: ANON_RW}


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def test_this_processs_vmas_are_read_exactly() -> None:
    libc = _libc()
    size = 3 * PAGE
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.mprotect(addr + PAGE, PAGE, mmap.PROT_READ) == 0
        vmas = read_vmas(addr, addr + size)
        # (the first and last may have merged with neighbouring anonymous memory)
        assert len(vmas) == 3 and vmas[1] == Vma(addr + PAGE, addr + 2 * PAGE, R)
        assert vmas[0].end == addr + PAGE and vmas[2].start == addr + 2 * PAGE
        assert vmas[0].flags & VmFlag.WRITE and vmas[2].flags & VmFlag.WRITE
        assert not any(v.flags & VmFlag.PFNMAP for v in vmas)
        assert read_vmas(addr, addr) == []
        assert read_vmas(addr, addr + size, pfnmap=False) == vmas  # smaps adds nothing here
    finally:
        libc.munmap(addr, size)
    assert read_vmas(addr, addr + size) == []


def _readers() -> list[ProcessVmas]:
    return [ProcessVmas(), ProcessVmas(query=False)]


def test_the_query_and_the_text_read_the_same_vmas_and_see_every_change() -> None:
    """PROCMAP_QUERY (6.11) and /proc/self/maps agree, and nothing is cached: an mprotect,
    munmap or mmap between two reads is seen by the next."""
    libc = _libc()
    size = 4 * PAGE
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    readers = _readers()
    try:
        first = [r.vmas(addr, addr + size) for r in readers]
        assert first[0] == first[1] and all(v.flags & VmFlag.WRITE for v in first[0])
        assert libc.mprotect(addr + PAGE, PAGE, mmap.PROT_READ) == 0
        for r in readers:
            vmas = r.vmas(addr, addr + size)
            assert len(vmas) == 3 and vmas[1] == Vma(addr + PAGE, addr + 2 * PAGE, R)
        libc.munmap(addr + 2 * PAGE, 2 * PAGE)
        for r in readers:
            assert r.vmas(addr + 2 * PAGE, addr + size) == []
            assert r.vmas(addr + PAGE, addr + size) == [Vma(addr + PAGE, addr + 2 * PAGE, R)]
        again = libc.mmap(addr + 2 * PAGE, PAGE, mmap.PROT_READ | mmap.PROT_EXEC,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        assert again == addr + 2 * PAGE
        for r in readers:
            assert r.vmas(addr + 2 * PAGE, addr + size) == [Vma(again, again + PAGE, RX)]
        # the whole user range below the vsyscall page, which no find_vma sees
        whole = [r.vmas(0, 1 << 47) for r in readers]
        assert whole[0] == whole[1] and len(whole[0]) > 10
    finally:
        libc.munmap(addr, size)
        for r in readers:
            r.close()


def test_a_forked_child_reads_its_own_vmas() -> None:
    """/proc/self/maps names the mm of the process that opened it: a child opens its own."""
    libc = _libc()
    reader = ProcessVmas()
    assert reader.vmas(0, 1 << 47)  # the parent's descriptor is open
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            addr = libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             -1, 0)
            code = 0 if reader.vmas(addr, addr + PAGE) == [Vma(addr, addr + PAGE, R)] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    reader.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_smaps_is_read_only_for_vmas_that_could_be_pfnmap(tmp_path: object) -> None:
    """Private anonymous memory (no file, no name) is never VM_PFNMAP: its flags come from
    the query; a shared mapping has a file (shmem) and its VmFlags are read."""
    from pathlib import Path

    libc = _libc()
    private = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    shared = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                       mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0)
    # a stand-in smaps saying both are IO memory: only the shared one may be asked
    fake = Path(str(tmp_path)) / "smaps"
    fake.write_text("".join(f"{a:x}-{a + PAGE:x} rw-p 00000000 00:00 0\nVmFlags: rd wr pf\n"
                            for a in sorted((private, shared))))
    try:
        for reader in (ProcessVmas(smaps=str(fake)), ProcessVmas(query=False, smaps=str(fake))):
            [p] = [v for v in reader.vmas(private, private + PAGE) if v.start <= private]
            [s] = reader.vmas(shared, shared + PAGE)
            assert not p.flags & VmFlag.PFNMAP and s.flags & VmFlag.PFNMAP
            assert not reader.vmas(shared, shared + PAGE, pfnmap=False)[0].flags & VmFlag.PFNMAP
            reader.close()
    finally:
        libc.munmap(private, PAGE)
        libc.munmap(shared, PAGE)


# -- the kernel path on this host: x86 walks no VMAs --------------------------------------------
@pytest.mark.kvm
def test_kvm_and_model_agree_over_read_only_memory_on_x86() -> None:
    libc = _libc()
    size = 4 * PAGE
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        with DualVM(ModelVM(detect_profile()), KvmVM()) as dual:
            assert dual.kernel.process_vmas(addr, addr + size) == [  # type: ignore[attr-defined]
                Vma(addr, addr + size, R)]
            assert not dual.model.walks_vmas  # type: ignore[attr-defined]
            dual.set_user_memory_region(0, LOG, 0, size, addr)  # x86 walks no VMA: accepted
            dual.set_user_memory_region(0, 0, 0, 0, addr)
            dual.verify()
    finally:
        libc.munmap(addr, size)


@pytest.mark.kvm
def test_host_memory_is_shared_unless_asked_private() -> None:
    """A read fault maps a shared page writable (and a TDP host's dirty log then holds it);
    private memory nobody wrote stays the read-only zero page."""
    with KvmVM() as vm:
        shared = vm.map_anonymous(4 * PAGE)
        private = vm.map_anonymous(4 * PAGE, shared=False)
        [s] = vm.process_vmas(shared.address, shared.address + PAGE)
        [p] = vm.process_vmas(private.address, private.address + PAGE)
        assert s.flags & VmFlag.SHARED and s.flags & VmFlag.WRITE
        assert not p.flags & VmFlag.SHARED and p.flags & VmFlag.WRITE
        private.write(PAGE, b"x")
        assert private.read(PAGE, 1) == b"x" and private.read(0, 1) == b"\0"

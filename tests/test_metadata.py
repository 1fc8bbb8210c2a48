"""Per-slot metadata: x86 array shapes (``kvm_alloc_memslot_metadata``, ``__kvm_mmu_slot_lpages``),
the disallow-lpage marks and the huge-page ranges they leave, VmallocUsed as observed on the
6.18 shadow-paging host (spec 4.3), the cost of modelling a huge guest, and the ledger totals
through ``close()`` (``kvm_destroy_vm``)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memslot
from memslot import ModelVM
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES
from memslot.request import MemoryRegion

PAGE = 4096
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
LOG = KVM_MEM_LOG_DIRTY_PAGES
MAX_PAGES = (1 << 31) - 1
MAX_GFN_SHADOW = (1 << 40) - 1
TASK_SIZE_MAX = 0x7FFFFFFFF000


def lpages(base: int, n: int, level: int) -> int:
    """``__kvm_mmu_slot_lpages`` written out independently of the model."""
    shift = 9 * (level - 1)
    return ((base + n - 1) >> shift) - (base >> shift) + 1


def page_rounded(nbytes: int) -> int:
    """Data pages of one vmalloc, without the page-pointer array."""
    return -(-nbytes // PAGE) * PAGE


def x86_arrays(base: int, n: int) -> dict[str, tuple[int, int]]:
    """(entries, bytes) of every x86 array of a shadow-paging slot."""
    out = {}
    for level, name in ((1, "4K"), (2, "2M"), (3, "1G")):
        out[f"rmap[{name}]"] = (lpages(base, n, level), 8 * lpages(base, n, level))
    for level, name in ((2, "2M"), (3, "1G")):
        out[f"lpage_info[{name}]"] = (lpages(base, n, level), 4 * lpages(base, n, level))
    out["write_track"] = (n, 2 * n)
    return out


def described(vm: ModelVM, slot_id: int = 0) -> dict[str, tuple[int, int]]:
    return {a["array"]: (a["entries"], a["bytes"])
            for a in vm.describe_metadata(vm.memslot(slot_id))["arrays"]
            if a["array"] not in ("slot", "dirty_bitmap")}


# Sizes and bases weighted to level boundaries (512 and 512^2 pages) and the limits.
_npages = st.one_of(
    st.sampled_from([1, 2, 511, 512, 513, 262143, 262144, 262145, MAX_PAGES]),
    st.integers(1, 1 << 20),
    st.integers(1, MAX_PAGES),
)
_base = st.one_of(
    st.sampled_from([0, 1, 511, 512, 513, 262143, 262144, 262145]),
    st.integers(0, 1 << 30),
    st.integers(0, MAX_GFN_SHADOW),
)


@settings(max_examples=200, deadline=None)
@given(_base, _npages, st.integers(0, (1 << 35) - 1))
def test_x86_entry_counts_per_level(base: int, n: int, ua_page: int) -> None:
    """Rules 47, 48, 53: rmap L1..L3 and lpage_info L2, L3 per ``lpages``, write-track n."""
    base = min(base, MAX_GFN_SHADOW + 1 - n)
    ua_page = min(ua_page, TASK_SIZE_MAX // PAGE - n)
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, base * PAGE, n * PAGE, ua_page * PAGE)
    assert described(vm) == x86_arrays(base, n)
    assert vm.check() == []


@settings(max_examples=300, deadline=None)
@given(_base, st.one_of(_npages, st.integers(1, 3 * 512)), st.one_of(
    st.just(0), st.integers(0, 1 << 20), st.integers(0, (1 << 35) - 1)))
def test_disallow_marks_and_huge_ranges(base: int, n: int, ua_page: int) -> None:
    """Rules 49-52: head, tail and whole-array marks; the huge ranges left are exactly the
    whole frames inside the slot, none when gfn and hva disagree modulo the frame."""
    base = min(base, MAX_GFN_SHADOW + 1 - n)
    ua_page = min(ua_page, TASK_SIZE_MAX // PAGE - n)
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, base * PAGE, n * PAGE, ua_page * PAGE)
    slot = vm.memslot(0)
    marks = vm.describe_metadata(slot)["disallow_lpage"]
    huge = vm.huge_ranges(slot)
    for level, name in ((2, "2M"), (3, "1G")):
        frame = 512 ** (level - 1)
        assert marks[name] == {
            "head": base % frame != 0,
            "tail": (base + n) % frame != 0,
            "whole": (base ^ ua_page) % frame != 0,
        }
        first = -(-base // frame) * frame
        end = (base + n) // frame * frame
        misaligned = (base ^ ua_page) % frame != 0
        want = [] if misaligned or end <= first else [(first, end)]
        assert huge[name] == want
        info = next(i for i in slot.arch.lpage_info if i.level == level)
        for index in {0, info.entries - 1}:
            assert info.marked(index) == (
                misaligned or (index == 0 and base % frame != 0)
                or (index == info.entries - 1 and (base + n) % frame != 0))


def test_one_entry_array_marked_at_both_ends() -> None:
    """Rule 52: assignments, so both end marks on a single entry leave it at 1 (marked), and
    a later unmarking of one end would not be needed to clear an increment."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, 5 * PAGE, 10 * PAGE, 5 * PAGE)
    (l2, l3) = vm.memslot(0).arch.lpage_info
    for info in (l2, l3):
        assert info.entries == 1 and info.head and info.tail and not info.whole
        assert info.marked(0)
    assert vm.huge_ranges(vm.memslot(0)) == {"2M": [], "1G": []}


def test_huge_ranges_examples() -> None:
    vm = ModelVM("x86_64-shadow")
    ua = 0x7F00_0000_0000
    vm.set_user_memory_region(0, 0, GiB, 3 * GiB, ua + GiB)  # aligned for 2M and 1G
    assert vm.huge_ranges(vm.memslot(0)) == {
        "2M": [(GiB // PAGE, 4 * GiB // PAGE)], "1G": [(GiB // PAGE, 4 * GiB // PAGE)]}
    vm.set_user_memory_region(1, 0, 8 * GiB + PAGE, 4 * MiB, ua + PAGE)  # off by one page
    assert vm.huge_ranges(vm.memslot(1)) == {
        "2M": [((8 * GiB + 2 * MiB) // PAGE, (8 * GiB + 4 * MiB) // PAGE)], "1G": []}
    vm.set_user_memory_region(2, 0, 16 * GiB, 4 * MiB, ua + PAGE)  # hva off by one page
    assert vm.huge_ranges(vm.memslot(2)) == {"2M": [], "1G": []}


# -- VmallocUsed, observed on the 6.18 PVM host (spec 4.3) ---------------------------------

def _delta(vm: ModelVM, slot: int, flags: int, base: int, n: int, ua: int = 0) -> int:
    before = vm.vmalloc_bytes()
    vm.set_user_memory_region(slot, flags, base * PAGE, n * PAGE, ua)
    return vm.vmalloc_bytes() - before


@pytest.mark.parametrize(("n", "base", "kib"), [
    (1, 0, 24), (1, 1, 24), (513, 0, 28), (513, 1, 28), (4096, 0, 56), (4096, 1, 56),
    (32768, 0, 336), (32768, 1, 336), (1 << 18, 1, 2580),
])
def test_vmalloc_used_per_slot_observed(n: int, base: int, kib: int) -> None:
    vm = ModelVM("x86_64-shadow")
    assert _delta(vm, 0, 0, base, n) == kib * KiB


@pytest.mark.parametrize(("n", "extra_kib"), [(1 << 19, 8), (1 << 20, 16), (1 << 21, 40)])
def test_vmalloc_used_page_pointer_arrays(n: int, extra_kib: int) -> None:
    """Above 2^18 pages vmalloc's own page-pointer arrays show up: +8, +16, +40 KiB over
    the per-array page rounding (observed)."""
    vm = ModelVM("x86_64-shadow")
    rounded = sum(page_rounded(b) for _, b in x86_arrays(0, n).values())
    assert _delta(vm, 0, 0, 0, n) == rounded + extra_kib * KiB


def test_vmalloc_used_dirty_logging_on_off_and_delete() -> None:
    """Enabling dirty logging on 2^20 pages adds 256 KiB, disabling frees it; DELETE frees
    everything (observed)."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, 0, (1 << 20) * PAGE, 0)
    base = vm.vmalloc_bytes()
    assert _delta(vm, 0, LOG, 0, 1 << 20) == 256 * KiB
    assert _delta(vm, 0, 0, 0, 1 << 20) == -256 * KiB
    assert vm.vmalloc_bytes() == base
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert vm.vmalloc_bytes() == 0


def test_vmalloc_used_move_to_unaligned_base() -> None:
    """MOVE of 2^20 pages from base 0 to 2^28 + 1 adds 8 KiB (one more page for rmap L2
    and for lpage_info L2) and frees the old arrays (observed)."""
    vm = ModelVM("x86_64-shadow")
    vm.set_user_memory_region(0, 0, 0, (1 << 20) * PAGE, 0)
    old = {a.serial for a in vm.allocations() if a.kind != "slot"}
    assert _delta(vm, 0, 0, (1 << 28) + 1, 1 << 20) == 8 * KiB
    assert old.isdisjoint(a.serial for a in vm.allocations())


# -- totals, a huge guest, close ---------------------------------------------------------

def _ledger_consistent(vm: ModelVM) -> None:
    live = vm.allocations()
    assert vm.metadata_bytes() == sum(a.bytes for a in live)
    assert vm.vmalloc_bytes() == sum(a.vmalloc_bytes for a in live)
    assert [a.serial for a in live] == sorted(a.serial for a in live)
    for s in vm.memslots():
        info = vm.describe_metadata(s)
        assert info["bytes"] == sum(a.bytes for a in live if a.owner == (s.as_id, s.id))
        assert info["vmalloc_bytes"] == sum(
            a.vmalloc_bytes for a in live if a.owner == (s.as_id, s.id))
        assert vm.slot_metadata_bytes(s) == (info["bytes"], info["vmalloc_bytes"])


def test_64_tib_guest_costs_the_model_little() -> None:
    """Eight slots of 2^31 - 1 pages (64 TiB) of which half log dirty pages: the model keeps
    descriptions, not arrays, yet reports the kernel's ~170 GB of metadata."""
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        vm = ModelVM("x86_64-shadow")
        for i in range(8):
            vm.set_user_memory_region(i, LOG if i % 2 else 0, i << 43, MAX_PAGES * PAGE,
                                      i << 43)
        for i in range(1, 8, 2):
            assert vm.mark_page_dirty((i << 31) + 12345)
        used = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert vm.nr_memslot_pages == 8 * MAX_PAGES
    per_slot = sum(b for _, b in x86_arrays(0, MAX_PAGES).values())
    bitmap = 2 * ((MAX_PAGES + 63) // 64 * 8)
    struct = vm.memslot(0).struct.bytes
    assert vm.metadata_bytes() == 8 * (per_slot + struct) + 4 * bitmap
    assert vm.metadata_bytes() > 170 * 10**9
    assert used < 400 * KiB, used
    _ledger_consistent(vm)
    assert vm.check() == []


@pytest.mark.parametrize("profile", sorted(memslot.PRESETS))
def test_metadata_bytes_is_sum_of_live_allocations(profile: str) -> None:
    vm = ModelVM(profile)
    size = 4 * MiB
    for i in range(6):
        vm.set_user_memory_region(i, LOG if i % 2 else 0, i * GiB, size, i * GiB)
    _ledger_consistent(vm)
    vm.set_user_memory_region(1, 0, GiB, size, GiB)  # FLAGS_ONLY off
    vm.set_user_memory_region(2, LOG, 40 * GiB, size, 2 * GiB)  # MOVE, logging on
    vm.set_user_memory_region(3, 0, 0, 0, 0)  # DELETE
    _ledger_consistent(vm)
    assert vm.check() == []
    vm.close()
    assert vm.allocations() == [] and vm.metadata_bytes() == 0 and vm.vmalloc_bytes() == 0
    vm.close()  # idempotent
    with pytest.raises(memslot.ClosedError):
        vm.set_user_memory_region(0, 0, 0, size, 0)


def test_close_frees_every_address_space_and_guest_memfd() -> None:
    vm = ModelVM("x86_64")
    vm.first_shadow_root()
    fd = vm.create_guest_memfd(8 * MiB)
    vm.set_user_memory_region(0, LOG, 0, 4 * MiB, 0)
    vm.set_user_memory_region((1 << 16) | 0, 0, 0, 4 * MiB, 0)
    vm.set_user_memory_region2(1, 4, GiB, 4 * MiB, 0, guest_memfd=fd)
    assert {a.as_id for a in vm.allocations()} == {0, 1}
    vm.close()
    assert vm.allocations() == [] and vm.metadata_bytes() == 0
    assert vm.closed


def test_slot_struct_size() -> None:
    """``sizeof(struct kvm_memory_slot)``: 216 generic bytes, + 48 for the six x86 array
    pointers, + 16 with CONFIG_KVM_GUEST_MEMFD (docs/kernel-sources.md section 5)."""
    for profile, size in (("x86_64-shadow", 280), ("x86_64", 280), ("arm64", 232)):
        vm = ModelVM(profile)
        vm.set_user_memory_region(0, 0, 0, 2 * MiB, 0)
        assert vm.memslot(0).struct.bytes == size
        assert [a.bytes for a in vm.allocations() if a.kind == "slot"] == [size]
        assert vm.allocations()[0].allocator == "kmalloc"


def test_other_arches_hold_no_arrays_beyond_bitmap() -> None:
    for profile in ("arm64", "riscv64", "s390x", "ppc64-pr"):
        vm = ModelVM(profile)
        vm.set_user_memory_region(0, LOG, 0, 4 * MiB, 0)
        assert sorted(a.kind for a in vm.allocations()) == ["dirty_bitmap", "slot"], profile
    vm = ModelVM("ppc64-hv@6.1")
    vm.set_user_memory_region(0, 0, 0, 4 * MiB, 0)
    (rmap,) = [a for a in vm.allocations() if a.kind == "ppc_rmap"]
    assert rmap.entries == 4 * MiB // (64 * KiB) and rmap.bytes == 8 * rmap.entries


@pytest.mark.parametrize("profile", sorted(memslot.PRESETS))
def test_slot_totals_match_the_description_on_every_preset(profile: str) -> None:
    """``slot_metadata_bytes`` (what a final table of many slots asks) gives the totals of
    ``describe_metadata`` for slots of every shape: odd bases and sizes, dirty logging on and
    off, after a MOVE and a flags change, on every preset's arch hooks (a shape the arch
    refuses, e.g. s390's 1 MiB granule, is left out)."""
    vm = ModelVM(profile)
    try:
        page = vm.profile.page_size
        ua = 0x1000_0000_0000
        shapes = [(0, 1), (1, 511), (512, 512), (1025, 262145), (1 << 19, 3), (1 << 20, 256),
                  (3 << 20, 1 << 12)]
        made = []
        for i, (gfn, pages) in enumerate(shapes):
            r = vm.submit(MemoryRegion(i, LOG if i % 2 else 0, gfn * page, pages * page,
                                       ua + (i << 32) + (gfn % 7 if i < 5 else 0) * page))
            if not r.errno:
                made.append(i)
        assert len(made) >= 2
        first, other = made[0], made[1]
        s = vm.memslot(first)
        vm.set_user_memory_region(first, s.flags, (8 << 20) * page, s.memory_size,
                                  s.userspace_addr)  # MOVE
        s = vm.memslot(other)
        vm.set_user_memory_region(other, s.flags ^ LOG, s.guest_phys_addr, s.memory_size,
                                  s.userspace_addr)  # FLAGS_ONLY
        _ledger_consistent(vm)
    finally:
        vm.close()

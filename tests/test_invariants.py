"""Each structure checks itself (``SlotSet.check``, ``SortedInts.check``, ``DirtyBitmap.check``,
``Ledger.check``, the arch hooks' ``check_slot``, ``Memslots.check``), and every problem they
name is found: a healthy engine reports nothing; each test corrupts one thing the way a model
bug would and expects the named problem."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from memslot import ModelVM, get_profile
from memslot.arch import make_arch
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMSLOT_INVALID
from memslot.engine.ledger import KIND_SLOT, KMALLOC, Ledger
from memslot.engine.memslots import Memslots
from memslot.engine.slot import MemorySlot
from memslot.engine.slotset import SlotSet
from memslot.request import MemoryRegion

MiB = 1 << 20
GiB = 1 << 30
UA = 1 << 40  # below every preset's user address limit
LOG = KVM_MEM_LOG_DIRTY_PAGES


def engine(profile: str = "x86_64-shadow") -> Memslots:
    """Slot 0 (2 MiB at gpa 0, logging), slot 1 (2 MiB at 1 GiB), slot 2 (4 MiB at an
    unaligned gpa and hva) in address space 0."""
    p = get_profile(profile)
    ledger = Ledger(p.page_size)
    m = Memslots(p, make_arch(p, ledger, frozenset()), ledger)
    for r in (MemoryRegion(0, LOG, 0, 2 * MiB, UA), MemoryRegion(1, 0, GiB, 2 * MiB, UA + GiB),
              MemoryRegion(2, 0, 2 * GiB + 64 * 1024, 4 * MiB, UA + 2 * GiB + 0x30000)):
        assert m.set_memory_region(r).ok
    assert m.check() == []
    return m


def slot(m: Memslots, slot_id: int, as_id: int = 0) -> MemorySlot:
    found = m.sets[as_id].by_id[slot_id]
    return found


def put(m: Memslots, new: MemorySlot) -> None:
    """Replace the slot with ``new``'s id by ``new`` in every index (consistently)."""
    s = m.sets[new.as_id]
    s.replace(s.by_id[new.id], new)


def expect(m: Memslots, text: str) -> None:
    problems = m.check()
    assert any(text in p for p in problems), problems


def test_healthy_engines_on_every_shape_report_nothing() -> None:
    for name in ("x86_64-shadow", "x86_64", "ppc64-hv"):
        assert engine(name).check() == []


# -- SlotSet ---------------------------------------------------------------------------------
def _set(m: Memslots) -> SlotSet:
    return m.sets[0]


CORRUPT_SET: dict[str, Callable[[Memslots], None]] = {
    "in the gfn index has no slot": lambda m: _set(m).by_base.pop(slot(m, 1).base_gfn),
    "filed under address space 0": lambda m: _set(m).by_base.__setitem__(
        slot(m, 1).base_gfn, slot(m, 1)._replace(as_id=1)),
    "filed under gfn": lambda m: _set(m).by_base.__setitem__(
        slot(m, 1).base_gfn, slot(m, 1)._replace(base_gfn=7)),
    "missing from the id index": lambda m: _set(m).by_id.__setitem__(1, slot(m, 1)._replace()),
    "still INVALID outside an update": lambda m: put(
        m, slot(m, 1)._replace(flags=KVM_MEMSLOT_INVALID)),
    "has 0 pages": lambda m: put(m, slot(m, 1)._replace(npages=0)),
    "slots 1 and 2 overlap or are out of order": lambda m: put(
        m, slot(m, 1)._replace(npages=slot(m, 2).base_gfn)),
    "indexes disagree": lambda m: _set(m).by_id.pop(2),
    "sorted index out of order or with duplicates": lambda m: _set(m).bases._lists[0].reverse(),
    "sorted index length": lambda m: setattr(_set(m).bases, "_len", 99),
    "sorted index block maxima inconsistent": lambda m: _set(m).bases._maxes.__setitem__(0, 1),
    "hva index does not match the slots": lambda m: _set(m).hva.insert(0, 4095, 9),
    "left in progress": lambda m: setattr(_set(m), "generation",
                                          _set(m).generation | (1 << 63)),
}


@pytest.mark.parametrize("problem", sorted(CORRUPT_SET))
def test_slot_set_names_the_problem(problem: str) -> None:
    m = engine()
    CORRUPT_SET[problem](m)
    assert any(problem in p for p in _set(m).check(m.nr_as)), _set(m).check(m.nr_as)
    expect(m, problem)


def test_generation_out_of_its_address_space_residue() -> None:
    m = engine("x86_64")  # two address spaces: generations stay as_id mod 2
    m.sets[1].generation += 1
    expect(m, "address space 1: generation 2 not 1 mod 2")


# -- dirty bitmaps and the VM-wide counters ---------------------------------------------------
def _bitmap_npages(m: Memslots) -> None:
    b = slot(m, 0).dirty_bitmap
    assert b is not None
    b.npages = 7


def _bitmap_alloc(m: Memslots) -> None:
    b = slot(m, 0).dirty_bitmap
    assert b is not None
    b.alloc = None


def _bitmap_words(m: Memslots) -> None:
    b = slot(m, 0).dirty_bitmap
    assert b is not None
    b.words[b.nwords] = 1


CORRUPT_SLOT: dict[str, Callable[[Memslots], None]] = {
    "dirty bitmap sized for 7 pages, slot has 512": _bitmap_npages,
    "dirty bitmap allocation does not match its size": _bitmap_alloc,
    "dirty bitmap holds words outside its size": _bitmap_words,
    "slot 0:0 logs dirty pages without a bitmap": lambda m: put(
        m, slot(m, 0)._replace(dirty_bitmap=None)),
    "slot 0:0 has a dirty bitmap without LOG_DIRTY_PAGES": lambda m: put(
        m, slot(m, 0)._replace(flags=0)),
    "nr_memslot_pages 2049 != sum of slot sizes 2048": lambda m: setattr(
        m, "nr_memslot_pages", 2049),
    "nr_memslots_dirty_logging 2 != 1 slots with LOG_DIRTY_PAGES": lambda m: setattr(
        m, "nr_memslots_dirty_logging", 2),
}


@pytest.mark.parametrize("problem", sorted(CORRUPT_SLOT))
def test_slots_and_counters_name_the_problem(problem: str) -> None:
    m = engine()
    CORRUPT_SLOT[problem](m)
    expect(m, problem)


# -- the ledger ------------------------------------------------------------------------------
def _leak(m: Memslots) -> None:
    m.ledger.alloc(0, 5, m.ledger.spec(KIND_SLOT, 1, 8, KMALLOC))


CORRUPT_LEDGER: dict[str, Callable[[Memslots], None]] = {
    "slot struct #1 shared by slot 0:0 and slot 0:1": lambda m: put(
        m, slot(m, 1)._replace(struct=slot(m, 0).struct)),
    "slot 0:1 holds freed": lambda m: m.ledger.free(slot(m, 1).struct),  # type: ignore[arg-type]
    "leak: slot #": _leak,
    "ledger totals": lambda m: setattr(m.ledger, "live_bytes", m.ledger.live_bytes + 1),
}


@pytest.mark.parametrize("problem", sorted(CORRUPT_LEDGER))
def test_ledger_names_the_problem(problem: str) -> None:
    m = engine()
    CORRUPT_LEDGER[problem](m)
    expect(m, problem)


# -- arch metadata (x86: arrays and marks follow the slot's shape; ppc HV: one rmap) ----------
def _swap_arch(m: Memslots, a: int, b: int) -> None:
    """Give slots ``a`` and ``b`` each other's arch data (arrays made for another shape)."""
    sa, sb = slot(m, a), slot(m, b)
    put(m, sa._replace(arch=sb.arch))
    put(m, sb._replace(arch=sa.arch))


CORRUPT_X86: dict[str, Callable[[Memslots], None]] = {
    "slot 0:1: no x86 metadata": lambda m: put(m, slot(m, 1)._replace(arch=None)),
    # Slot 1 (aligned, 512 pages) and slot 2 (unaligned, 1024 pages) trade arrays.
    "slot 0:1: rmap[4K] has 1024 entries, slot needs 512": lambda m: _swap_arch(m, 1, 2),
    "slot 0:2: rmap[4K] has 512 entries but gfns": lambda m: _swap_arch(m, 1, 2),
    "slot 0:1 lpage_info[2M]: 3 entries, slot needs 1": lambda m: _swap_arch(m, 1, 2),
    "slot 0:2 lpage_info[2M]: 1 entries but gfns": lambda m: _swap_arch(m, 1, 2),
    "slot 0:2 lpage_info[2M]: stale disallow marks allow huge mappings": lambda m: _swap_arch(
        m, 1, 2),
    "slot 0:1 lpage_info[2M]: gfns 0x40000..0x401ff could be mapped huge but are marked "
    "disallowed": lambda m: _swap_arch(m, 1, 2),
    "slot 0:1: write-track has 1024 entries, slot has 512 pages": lambda m: _swap_arch(m, 1, 2),
    "slot 0:1: rmaps missing although the VM has rmaps": lambda m: put(
        m, slot(m, 1)._replace(arch=slot(m, 1).arch._replace(groups=()))),
    "slot 0:1: write-track array missing": lambda m: put(
        m, slot(m, 1)._replace(arch=slot(m, 1).arch._replace(groups=()))),
}


@pytest.mark.parametrize("problem", sorted(CORRUPT_X86))
def test_x86_metadata_names_the_problem(problem: str) -> None:
    m = engine()
    CORRUPT_X86[problem](m)
    expect(m, problem)


def test_ppc_rmap_names_the_problem() -> None:
    m = engine("ppc64-hv")
    put(m, slot(m, 1)._replace(arch=None))
    expect(m, "slot 0:1: no rmap")
    m = engine("ppc64-hv")
    _swap_arch(m, 0, 2)
    pages = 2 * MiB // m.profile.page_size
    expect(m, f"slot 0:0: rmap has {2 * pages} entries for {pages} pages")


def test_model_vm_check_is_the_engine_check() -> None:
    with ModelVM("x86_64-shadow") as vm:
        vm.set_user_memory_region(0, 0, 0, 2 * MiB, UA)
        assert vm.check() == []
        vm._m.nr_memslot_pages += 1
        assert vm.check() == ["nr_memslot_pages 513 != sum of slot sizes 512"]
        vm._m.nr_memslot_pages -= 1

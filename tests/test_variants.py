"""Variants: alternative kernel behaviours the model can switch on to study them.

``x86-reuse-arch-on-move`` is x86 before "KVM: x86: Allocate new rmap and large page tracking
when moving memslot" (SEAN20, v5.6/5.7): a MOVE kept the arrays sized and marked for the old
base. ``ppc-realloc-rmap-on-move`` is the mistake PPC HV must not make: reallocating the rmap
on MOVE leaks the old one, because commit never frees ``old->arch`` (book3s_hv.c).
"""

from __future__ import annotations

import pytest

import memslot
from memslot import ModelVM
from memslot.arch import ALL_VARIANTS, ARCH_HOOKS
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
LOG = KVM_MEM_LOG_DIRTY_PAGES
UA = 0x7F00_0000_0000  # 1 GiB aligned
REUSE = "x86-reuse-arch-on-move"
REALLOC = "ppc-realloc-rmap-on-move"


def lpages(base: int, n: int, level: int) -> int:
    s = 9 * (level - 1)
    return ((base + n - 1) >> s) - (base >> s) + 1


def _move_down_one_page(vm: ModelVM) -> None:
    """SRT's test_move_memory_region: a 2 MiB slot at a 2 MiB (here 1 GiB) aligned gpa
    moved to gpa - 4096, so it no longer is one large page."""
    vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA)
    vm.set_user_memory_region(0, 0, GiB - PAGE, 2 * MiB, UA)


@pytest.mark.parametrize("profile", ["x86_64-shadow", "x86_64"])
def test_reuse_arch_on_move_indexes_past_arrays_and_keeps_stale_marks(profile: str) -> None:
    vm = ModelVM(profile, variants=(REUSE,))
    assert vm.variants == frozenset({REUSE})
    _move_down_one_page(vm)
    problems = vm.check()
    text = "\n".join(problems)
    # gfns 0x40000..0x401fe now index entry 1 of arrays that have one entry.
    assert "lpage_info[2M]: 1 entries but gfns 0x40000..0x401fe index past its end" in text
    assert "lpage_info[1G]: 1 entries but gfns 0x40000..0x401fe index past its end" in text
    # The old base was 2M aligned with an aligned hva: no marks. The new base is misaligned
    # with the hva, so no frame may be huge, yet the stale marks allow the first one.
    assert ("lpage_info[2M]: stale disallow marks allow huge mappings of gfns "
            "0x3fe00..0x3ffff") in text
    if profile == "x86_64-shadow":  # rmaps exist only with shadow paging here
        for level in ("2M", "1G"):
            assert (f"rmap[{level}] has 1 entries but gfns 0x40000..0x401fe index 1..1 past "
                    "its end") in text
        assert len(problems) == 5
    else:
        assert "rmap" not in text and len(problems) == 3
    # No allocation happened for the MOVE beyond the two slot structs.
    assert sorted(a.kind for a in vm.last_result.allocated) == ["invalid_slot", "slot"]


def test_reuse_arch_on_move_back_is_consistent_again() -> None:
    """Moving back to the base the arrays were built for makes them fit again; DELETE frees
    them exactly once."""
    vm = ModelVM("x86_64-shadow", variants=(REUSE,))
    _move_down_one_page(vm)
    assert vm.check()
    vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA)
    assert vm.check() == []
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert vm.allocations() == [] and vm.check() == []


@pytest.mark.parametrize("profile", ["x86_64-shadow", "x86_64"])
def test_without_variant_move_reallocates_per_formula(profile: str) -> None:
    vm = ModelVM(profile)
    vm.set_user_memory_region(0, 0, GiB, 2 * MiB, UA)
    old = {a.serial for a in vm.allocations() if a.kind != "slot"}
    vm.set_user_memory_region(0, 0, GiB - PAGE, 2 * MiB, UA)
    assert vm.check() == []
    live = [a for a in vm.allocations() if a.kind != "slot"]
    assert old.isdisjoint(a.serial for a in live)
    assert old <= {a.serial for a in vm.last_result.freed}
    base, n = (GiB - PAGE) // PAGE, 512
    shapes = {(a.label, a.entries, a.entry_size) for a in live}
    expected = {("lpage_info[2M]", lpages(base, n, 2), 4),
                ("lpage_info[1G]", lpages(base, n, 3), 4)}
    if profile == "x86_64-shadow":
        expected |= {("rmap[4K]", n, 8), ("rmap[2M]", lpages(base, n, 2), 8),
                     ("rmap[1G]", lpages(base, n, 3), 8), ("write_track", n, 2)}
    assert shapes == expected
    assert lpages(base, n, 2) == 2 and lpages(base, n, 3) == 2
    marks = vm.describe_metadata(vm.memslot(0))["disallow_lpage"]
    assert marks["2M"] == {"head": True, "tail": True, "whole": True}
    assert vm.huge_ranges(vm.memslot(0)) == {"2M": [], "1G": []}


def test_reuse_variant_leaves_flags_only_and_create_alone() -> None:
    vm = ModelVM("x86_64-shadow", variants=(REUSE,))
    vm.set_user_memory_region(0, 0, GiB + PAGE, 2 * MiB, UA + PAGE)
    arch = vm.memslot(0).arch
    vm.set_user_memory_region(0, LOG, GiB + PAGE, 2 * MiB, UA + PAGE)
    assert vm.memslot(0).arch is arch
    assert vm.check() == []


def test_ppc_realloc_rmap_on_move_leaks() -> None:
    vm = ModelVM("ppc64-hv", variants=(REALLOC,))
    page = vm.profile.page_size
    vm.set_user_memory_region(0, 0, 0, 16 * page, 0)
    first = vm.memslot(0).arch
    vm.set_user_memory_region(0, 0, 1 << 32, 16 * page, 0)
    assert vm.memslot(0).arch is not first
    assert vm.check() == [
        f"leak: ppc_rmap #{first.serial} of slot 0:0 ({16 * 8} bytes) is allocated but no live "
        "slot owns it"]
    vm.set_user_memory_region(0, 0, 2 << 32, 16 * page, 0)
    assert len([p for p in vm.check() if p.startswith("leak: ppc_rmap")]) == 2
    # DELETE and close free what the slot holds; the leaked arrays stay leaked.
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    vm.close()
    assert [a.kind for a in vm.allocations()] == ["ppc_rmap", "ppc_rmap"]


def test_ppc_without_variant_rmap_is_shared_across_move_and_flags_only() -> None:
    vm = ModelVM("ppc64-hv")
    page = vm.profile.page_size
    vm.set_user_memory_region(0, 0, 0, 16 * page, 0)
    rmap = vm.memslot(0).arch
    for request in ((0, 0, 1 << 32, 16 * page, 0), (0, LOG, 1 << 32, 16 * page, 0),
                    (0, 0, 1 << 33, 16 * page, 0), (0, LOG, 1 << 34, 16 * page, 0)):
        vm.set_user_memory_region(*request)
        assert vm.memslot(0).arch is rmap
        assert "ppc_rmap" not in {a.kind for a in vm.last_result.allocated}
        assert vm.check() == []
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert rmap.serial in {a.serial for a in vm.last_result.freed}
    assert vm.allocations() == []


def test_unknown_variant_raises() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        ModelVM("x86_64", variants=("no-such-variant",))


@pytest.mark.parametrize("profile", sorted(memslot.PRESETS))
@pytest.mark.parametrize("variant", sorted(ALL_VARIANTS))
def test_variant_of_another_arch_raises(profile: str, variant: str) -> None:
    arch = memslot.get_profile(profile).arch
    if variant in ARCH_HOOKS[arch].VARIANTS:
        assert ModelVM(profile, variants=(variant,)).variants == {variant}
    else:
        with pytest.raises(ValueError, match=f"is for {ALL_VARIANTS[variant]}"):
            ModelVM(profile, variants=(variant,))


def test_known_variants() -> None:
    assert ALL_VARIANTS == {REUSE: "x86", REALLOC: "ppc-hv"}

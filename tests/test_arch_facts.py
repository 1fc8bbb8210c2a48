"""Arch facts live on the arch hooks classes (issue 8, issue 12): the tools ask the class of a
profile's arch, not the arch's name, so adding an arch means writing one arch module."""

from __future__ import annotations

import ast
import pathlib

import pytest

import memslot
from memslot.arch import ARCH_HOOKS, arch_class
from memslot.arch.x86 import HUGE_LEVELS, LEVEL_NAMES, hpage_shift
from memslot.engine.hooks import table_block_sizes
from memslot.profile import PRESETS
from memslot.tools.report import slot_report
from memslot.units import size_label

ROOT = pathlib.Path(memslot.__file__).parent
UA = 0x7F0000000000


@pytest.mark.parametrize("arch", sorted(ARCH_HOOKS))
@pytest.mark.parametrize("page_shift", [12, 14, 16])
def test_huge_page_sizes_are_larger_than_the_base_page_and_ascending(
        arch: str, page_shift: int) -> None:
    sizes = ARCH_HOOKS[arch].huge_page_sizes(page_shift)
    assert list(sizes) == sorted(set(sizes))
    assert all(s > 1 << page_shift and s & (s - 1) == 0 for s in sizes)


def test_huge_page_sizes_per_arch() -> None:
    assert ARCH_HOOKS["x86"].huge_page_sizes(12) == (1 << 21, 1 << 30)
    assert ARCH_HOOKS["arm64"].huge_page_sizes(12) == (1 << 21, 1 << 30)
    assert ARCH_HOOKS["arm64"].huge_page_sizes(14) == (1 << 25, 1 << 36)  # 32M, 64G
    assert ARCH_HOOKS["arm64"].huge_page_sizes(16) == (1 << 29, 1 << 42)  # 512M, 4T
    assert ARCH_HOOKS["riscv"].huge_page_sizes(12) == table_block_sizes(12)
    assert ARCH_HOOKS["ppc-hv"].huge_page_sizes(16) == (1 << 21, 1 << 30)  # radix PMD/PUD
    assert ARCH_HOOKS["ppc-pr"].huge_page_sizes(16) == ()
    assert [size_label(s) for s in ARCH_HOOKS["s390"].huge_page_sizes(12)] == ["1M", "2G"]


def test_x86_sizes_are_the_lpage_info_levels() -> None:
    """The sizes the report judges are the ones lpage_info tracks, under the same names."""
    sizes = ARCH_HOOKS["x86"].huge_page_sizes(12)
    assert [size_label(s) for s in sizes] == [LEVEL_NAMES[level] for level in HUGE_LEVELS]
    assert sizes == tuple(4096 << hpage_shift(level) for level in HUGE_LEVELS)
    with memslot.ModelVM("x86_64") as vm:
        vm.set_user_memory_region(0, 0, 0, 1 << 30, UA)
        assert list(vm.huge_ranges(vm.memslot(0))) == [size_label(s) for s in sizes]


def test_report_judges_the_arch_sizes_at_its_page_size() -> None:
    """arm64 with 16 KiB pages maps 32M and 64G blocks, not 2M and 1G."""
    with memslot.ModelVM("arm64-16k@7.3") as vm:
        vm.set_user_memory_region(0, 0, 0, 1 << 30, UA)
        huge = slot_report(vm, vm.memslot(0))["huge"]
    assert list(huge) == ["32M", "64G"]
    assert huge["32M"]["share"] == 1.0 and huge["64G"]["share"] == 0


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if "@" in n))
def test_gfn_limit_is_the_bound_prepare_enforces(name: str) -> None:
    p = PRESETS[name]
    limit = arch_class(p).gfn_limit(p)
    if limit is None or (p.arch == "x86" and not p.max_gfn_check):
        return
    page, n = p.page_size, 16
    with memslot.ModelVM(p) as vm:
        vm.set_user_memory_region(0, 0, (limit - n) * page, n * page, UA)
        with pytest.raises(memslot.KvmError):
            vm.set_user_memory_region(1, 0, (limit - n + 1) * page, n * page, UA + n * page)


def test_profiles_json_carries_the_arch_bound(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from memslot.cli.main import main
    assert main(["profiles", "--all", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["x86_64@7.3"]["max_gfn"] == PRESETS["x86_64@7.3"].max_gfn
    assert rows["arm64@7.3"]["max_gfn"] == (1 << 28) - 1
    assert rows["arm64-16k@7.3"]["huge_page_sizes"] == [1 << 25, 1 << 36]
    assert "max_gfn" not in rows["ppc64-hv@7.3"]


def _arch_name_checks(path: pathlib.Path) -> list[int]:
    """Lines comparing something's ``.arch`` with a string (``p.arch == "x86"``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) \
                and node.left.attr == "arch":
            consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant)
                      and isinstance(c.value, str)]
            if consts:
                out.append(node.lineno)
    return out


def test_no_arch_name_checks_outside_the_arch_package() -> None:
    """Tools, engine and CLI ask the arch class for facts; only the arch registry and the
    presets (which build one profile per arch) name arches."""
    found = {str(p.relative_to(ROOT)): lines for p in sorted(ROOT.rglob("*.py"))
             if (lines := _arch_name_checks(p))}
    assert found == {}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_agree_with_their_arch_class(name: str) -> None:
    """The presets (built without the arch package) state what the arch class says."""
    p = PRESETS[name]
    cls = arch_class(p)
    if not p.user_memory2:
        assert p.unknown_ioctl_errno == cls.unknown_vm_ioctl_errno
    if cls.private_mem_slots:
        assert p.internal_mem_slots == cls.private_mem_slots
    assert (p.ipa_bits is not None) == (cls.guest_addr_space is not None)
    if p.ipa_limit:
        assert memslot.constants.KVM_CAP_ARM_VM_IPA_SIZE in cls.arch_caps
    if p.vm_types:
        assert memslot.constants.KVM_CAP_VM_TYPES in cls.arch_caps

"""Versioned profiles: the presets answer as each kernel version does (issue 12), and
``memslot compat`` names the kernels that accept a trace."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

import memslot
from memslot.harness import compat
from memslot.profile import ALIASES, PRESETS, VERSIONED_PRESETS, get_profile
from memslot.request import MemoryRegion
from memslot.trace.records import SetRegion
from memslot.versions import (
    CHANGES,
    DOC_BEGIN,
    DOC_END,
    RULE_CHANGES,
    at_least,
    changes_markdown,
    since,
    version_tuple,
)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
UA = 0x7F0000000000


def memslot_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memslot", *args], capture_output=True,
                          text=True, input=stdin, timeout=120, cwd=ROOT)


# -- naming and versions ------------------------------------------------------------------
def test_versioned_names_carry_their_kernel() -> None:
    for name, p in VERSIONED_PRESETS.items():
        kind, version = name.split("@")
        assert p.kernel == version and p.name == name
        assert kind in ("x86_64", "x86_64-shadow", "arm64", "arm64-16k", "riscv64", "ppc64-hv")


def test_unversioned_names_are_the_newest_of_their_kind() -> None:
    """... except ``x86_64-shadow``, which stays this project's own proven host (6.18)."""
    for alias, target in ALIASES.items():
        a, t = PRESETS[alias], PRESETS[target]
        assert a.replace(name=t.name, description=t.description) == t
        if alias == "x86_64-shadow":
            assert t.kernel == "6.18" and t.nr_address_spaces == 1
            continue
        kin = [p for p in VERSIONED_PRESETS.values() if p.name.split("@")[0] == alias]
        assert all(version_tuple(p.kernel) <= version_tuple(t.kernel) for p in kin)


@pytest.mark.parametrize(("text", "want"), [("6.12", (6, 12)), ("6.12.117-1", (6, 12)),
                                            ("7.3~rc7", (7, 3)), ("5.10.0-32-amd64", (5, 10))])
def test_version_parsing(text: str, want: tuple[int, int]) -> None:
    assert version_tuple(text) == want


def test_malformed_kernel_version_is_refused() -> None:
    with pytest.raises(ValueError):
        get_profile("x86_64").replace(kernel="latest")


def test_every_rule_change_is_documented() -> None:
    assert set(RULE_CHANGES.values()) <= set(CHANGES)
    for change in CHANGES.values():
        version_tuple(change.since)
        assert change.function and change.title and change.confirmed


def test_docs_table_is_generated_from_the_changes() -> None:
    """docs/kernel-versions.md carries CHANGES as ``make docs`` writes it."""
    text = (ROOT / "docs" / "kernel-versions.md").read_text()
    section = text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0]
    assert section == "\n" + changes_markdown(), "stale table: run `make docs`"


#: The Debian sources read for every change (linux-source-X.Y), and this project's 6.18 host
#: (probed: its answers decide where no source between 6.12 and 7.2 was read).
READ = ("5.10", "6.1", "6.12", "6.18", "7.2", "7.3")


def test_unpinned_changes_use_the_earliest_source_read_and_say_so() -> None:
    for c in CHANGES.values():
        assert c.kind in ("upstream", "debian", "lab")
        if not c.pinned:
            assert c.since in READ, c.key
            assert "not found" in c.confirmed, c.key


@pytest.mark.parametrize(("key", "release"), [
    ("vcpu-id-ulong", "6.11"),  # 'KVM generic changes for 6.11'
    ("write-track-per-vm", "6.9"),  # 'KVM x86 MMU changes for 6.9'
    ("x86-kvmgt-move", "6.6"),  # 'KVM x86 MMU changes for 6.6'
    ("arm64-lpa2", "6.8"),  # 'KVM/arm64 updates for Linux 6.8'
    ("guest-memfd-any-vm", "6.18"), ("arm64-guest-memfd", "6.18"),
    ("gmem-bind-eexist", "7.2"), ("gmem-bind-uoff", "7.2"),  # 'KVM guest_memfd changes for 7.2'
])
def test_pinned_boundaries(key: str, release: str) -> None:
    assert CHANGES[key].since == release and CHANGES[key].pinned


@pytest.mark.parametrize("name", sorted(VERSIONED_PRESETS))
def test_presets_follow_the_changes_table(name: str) -> None:
    p = VERSIONED_PRESETS[name]
    assert p.vcpu_id_u32 == (not p.at_least(since("vcpu-id-ulong")))
    assert p.user_memory2 == p.at_least(since("region2"))
    if p.arch == "x86":
        assert p.max_gfn_check == p.at_least(since("x86-max-gfn"))
        assert p.guest_memfd_ioctl == p.at_least(since("x86-private-mem"))
        assert bool(p.memory_attributes_system) == (
            p.at_least(since("x86-private-mem")) and p.name != "x86_64-shadow@6.18")
        if p.tdp:
            assert p.external_write_tracking == (not p.at_least(since("write-track-per-vm")))


def test_vcpu_ids_past_u32_are_refused_from_6_11() -> None:
    """6.1's u32 id makes 2^32 + 1 vCPU 1 (EEXIST after vCPU 1); 6.12 refuses it (EINVAL)."""
    with memslot.ModelVM("x86_64@6.1") as old, memslot.ModelVM("x86_64@6.12") as new:
        for vm in (old, new):
            vm.create_vcpu(1)
        with pytest.raises(memslot.KvmError) as exc:
            old.create_vcpu((1 << 32) + 1)
        assert exc.value.errno == 17
        with pytest.raises(memslot.KvmError) as exc:
            new.create_vcpu((1 << 32) + 1)
        assert exc.value.errno == 22


# -- facts per version (confirmed in Debian's linux-source-X.Y and on the lab's kernels) --------
@pytest.mark.parametrize(("name", "slots"), [
    ("x86_64@5.6", 509), ("x86_64@5.10", 509), ("x86_64-shadow@5.10", 509), ("arm64@5.10", 512),
    ("x86_64@6.1", 32764), ("arm64@6.1", 32767), ("ppc64-hv@6.1", 32767), ("riscv64@6.12", 32767),
])
def test_user_slot_limits(name: str, slots: int) -> None:
    p = PRESETS[name]
    assert p.user_mem_slots == slots
    with memslot.ModelVM(p) as vm:
        assert vm.check_extension(memslot.constants.KVM_CAP_NR_MEMSLOTS) == slots
        vm.set_user_memory_region(slots - 1, 0, 0, MiB, UA)
        with pytest.raises(memslot.KvmError) as exc:
            vm.set_user_memory_region(slots, 0, 2 * MiB, MiB, UA)
        assert exc.value.errno == 22


def test_x86_write_tracking_policy_by_version() -> None:
    """5.10 and 6.1 (Debian's KVMGT config) allocate 2 bytes per page of write tracking on
    a TDP host; 6.12 and later only with shadow roots."""
    def track_bytes(name: str) -> int:
        with memslot.ModelVM(name) as vm:
            vm.set_user_memory_region(0, 0, 0, 1 << 30, UA)
            arrays = vm.describe_metadata(vm.memslot(0))["arrays"]
            return sum(a["bytes"] for a in arrays if a["array"].startswith("write_track"))
    assert track_bytes("x86_64@5.10") == 512 * 1024
    assert track_bytes("x86_64@6.1") == 512 * 1024
    assert track_bytes("x86_64@6.12") == 0
    assert track_bytes("x86_64@7.3") == 0


def test_x86_5_10_rmaps_are_not_lazy() -> None:
    with memslot.ModelVM("x86_64@5.10") as old, memslot.ModelVM("x86_64@6.1") as new:
        for vm in (old, new):
            vm.set_user_memory_region(0, 0, 0, 1 << 30, UA)
        assert old.metadata_bytes() > new.metadata_bytes() + 2 * MiB  # 2 MiB of 4K rmaps


def test_page_sizes_by_version() -> None:
    assert PRESETS["ppc64-hv@6.1"].page_size == 64 * 1024
    assert PRESETS["ppc64-hv@6.12"].page_size == 4096
    assert PRESETS["arm64-16k@7.2"].page_size == 16 * 1024


def test_capabilities_by_version() -> None:
    c = memslot.constants

    def cap(name: str, number: int) -> int:
        with memslot.ModelVM(name) as vm:
            return vm.check_extension(number)
    assert cap("x86_64@5.10", c.KVM_CAP_DIRTY_LOG_RING) == 0
    assert cap("x86_64@6.1", c.KVM_CAP_DIRTY_LOG_RING) > 0
    assert cap("arm64@6.1", c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) == 0
    assert cap("arm64@6.12", c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0
    assert cap("riscv64@6.12", c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 1
    assert cap("riscv64@7.2", c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3
    assert cap("x86_64@5.6", c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 1
    assert cap("ppc64-hv@6.12", c.KVM_CAP_READONLY_MEM) == 0
    assert cap("x86_64@6.12", c.KVM_CAP_GUEST_MEMFD) == 0
    assert cap("x86_64@7.2", c.KVM_CAP_GUEST_MEMFD) == 1


def test_guest_memfd_cap_on_dev_kvm_before_6_18() -> None:
    """``!kvm || kvm_arch_has_private_mem(kvm)`` (6.8..6.17): /dev/kvm answers 1 where the
    ioctl exists while a default VM answers 0 (the lab's amd64 6.12)."""
    c = memslot.constants

    def system(name: str) -> int:
        with memslot.ModelVM(name) as vm:
            return vm.check_system_extension(c.KVM_CAP_GUEST_MEMFD)
    assert system("x86_64@6.12") == 1
    assert system("x86_64@6.1") == 0 and system("arm64@6.12") == 0
    assert system("x86_64@7.2") == 1 and system("arm64@7.3") == 1


# -- compat ------------------------------------------------------------------------------------
def _ops(*regions: MemoryRegion) -> list[SetRegion]:
    return [SetRegion(r, line=i + 1) for i, r in enumerate(regions)]


def test_compat_slot_limit_changes_in_5_12() -> None:
    ops = _ops(MemoryRegion(0, 0, 0, 2 * MiB, UA), MemoryRegion(600, 0, 1 << 30, 2 * MiB, UA))
    by_name = {o.profile.name: o for o in compat.check(ops)}
    old = by_name["x86_64@5.10"]
    assert not old.accepted and old.refusal is not None
    assert old.refusal.line == 2 and old.refusal.rule == "user-slot-id"
    assert old.changes_in == "5.12"
    assert old.summary() == "slot 600 >= 509 user slots before 5.12"
    assert by_name["arm64@5.10"].summary() == "slot 600 >= 512 user slots before 5.12"
    assert by_name["x86_64@6.1"].accepted and by_name["arm64@7.3"].accepted


def test_compat_readonly_never_on_ppc_hv() -> None:
    ops = _ops(MemoryRegion(0, memslot.KVM_MEM_READONLY, 0, 64 * 1024, 0x100000000))
    for o in compat.check(ops, [p for p in compat.compat_profiles() if p.arch == "ppc-hv"]):
        assert o.refusal is not None and o.refusal.rule == "flags"
        assert o.changes_in is None
        assert "read-only" in o.summary()


def test_compat_names_no_release_for_a_custom_build() -> None:
    """This host's custom 6.18 (no SMM) refuses address space 1 by its config, not its
    version: Debian's 7.2 accepting it says nothing of a release (no "before 7.2")."""
    ops = _ops(MemoryRegion(1 << 16, 0, 0, 2 * MiB, UA))
    by_name = {o.profile.name: o for o in compat.check(ops)}
    host = by_name["x86_64-shadow@6.18"]
    assert host.refusal is not None and host.refusal.rule == "as-id"
    assert host.changes_in is None and "before" not in host.summary()
    assert by_name["x86_64-shadow@7.2"].accepted


def test_compat_json_has_exactly_the_documented_shape(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": "0x200000", '
        '"userspace_addr": "0x100000000"}\n'
        '{"slot": 600, "flags": 0, "guest_phys_addr": "0x40000000", "memory_size": "0x200000", '
        '"userspace_addr": "0x100400000"}\n')
    proc = memslot_cli("compat", "--json", str(trace))
    assert proc.returncode == 1, proc.stderr  # some kernels refuse
    data = json.loads(proc.stdout)
    assert set(data) == {"results"}
    names = [r["profile"] for r in data["results"]]
    assert set(VERSIONED_PRESETS) <= set(names)
    for r in data["results"]:
        assert set(r) == {"profile", "arch", "kernel", "accepted", "first_refusal"}
        f = r["first_refusal"]
        assert (f is None) == r["accepted"]
        if f is not None:
            assert set(f) == {"line", "errno", "rule", "changes_in"}
    x510 = next(r for r in data["results"] if r["profile"] == "x86_64@5.10")
    assert x510["first_refusal"] == {"line": 2, "errno": "EINVAL", "changes_in": "5.12",
                                     "rule": "user-slot-id: slot 600 >= 509 user slots"}


def test_compat_table_and_profile_filter(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": "0x10000", '
                     '"userspace_addr": "0x100000000"}\n')
    proc = memslot_cli("compat", "--profile", "arm64*", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "arm64@5.10" in proc.stdout and "x86_64" not in proc.stdout
    assert "7 of 7 profiles accept all 1 operations" in proc.stdout


def test_compat_bad_input_is_one_line(tmp_path: Path) -> None:
    missing = memslot_cli("compat", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": "0x10000", '
                     '"userspace_addr": "0x100000000"}\n')
    nomatch = memslot_cli("compat", "--profile", "vax*", str(trace))
    assert nomatch.returncode == 2 and "no profile matches" in nomatch.stderr
    assert "Traceback" not in nomatch.stderr


def test_profiles_lists_newest_and_all() -> None:
    short = memslot_cli("profiles")
    assert short.returncode == 0
    assert "x86_64@5.10" not in short.stdout and "x86_64 " in short.stdout
    full = memslot_cli("profiles", "--all", "--json")
    names = {p["name"] for p in json.loads(full.stdout)}
    assert set(VERSIONED_PRESETS) <= names


@pytest.mark.kvm
def test_detect_matches_the_host_preset() -> None:
    """On this project's machines (custom 6.18, shadow paging, no SMM)."""
    from memslot.harness.detect import differences, matching_preset

    detected = memslot.detect_profile()
    assert at_least(detected.kernel, "5.0")
    if detected.kernel == "6.18" and not detected.tdp:
        assert differences(detected, PRESETS["x86_64-shadow@6.18"]) == {}
        assert matching_preset(detected) == "x86_64-shadow@6.18"


# -- the engine and the arch hooks answer as the version ---------------------------------------
def test_x86_max_gfn_refusal_arrived_in_5_18() -> None:
    """5.10 accepts a slot at 2^63 (issue 12, amd64 5.10); 6.1 refuses past MAXPHYADDR."""
    with memslot.ModelVM("x86_64@5.10") as old, memslot.ModelVM("x86_64@6.1") as new:
        old.set_user_memory_region(0, 0, 1 << 63, MiB, UA)
        old.set_user_memory_region(1, 0, (1 << 64) - 2 * MiB, MiB, UA)  # the last MiB wraps
        with pytest.raises(memslot.KvmError) as exc:
            new.set_user_memory_region(0, 0, 1 << 63, MiB, UA)
        assert exc.value.errno == 22 and new.last_result is not None
        assert new.last_result.rule is not None and new.last_result.rule.code == "x86-max-gfn"
        assert old.check() == []


@pytest.mark.parametrize(("name", "errno_"), [("x86_64@6.1", 25), ("arm64@6.1", 22),
                                              ("ppc64-hv@6.1", 25), ("arm64@5.10", 22)])
def test_region2_is_unknown_before_6_8(name: str, errno_: int) -> None:
    with memslot.ModelVM(name) as vm:
        assert vm.check_extension(memslot.constants.KVM_CAP_USER_MEMORY2) == 0
        with pytest.raises(memslot.KvmError) as exc:
            vm.set_user_memory_region2(0, 0, 0, 1 << 16, UA, guest_memfd=0)
        assert exc.value.errno == errno_
        assert vm.last_result is not None and vm.last_result.rule is not None
        assert vm.last_result.rule.code == "region2-missing"
        with pytest.raises(memslot.KvmError) as gmem:
            vm.create_guest_memfd(1 << 16)
        assert gmem.value.errno == errno_
        vm.set_user_memory_region(0, 0, 0, 1 << 16, UA)  # v1 works


def test_guest_memfd_by_version_on_the_default_x86_vm() -> None:
    """6.12: the ioctl exists (CONFIG_KVM_PRIVATE_MEM) but the default VM refuses the flag and
    creation flags; 7.2: guest_memfd slots on every VM, mmap flags."""
    gmem = memslot.constants.KVM_MEM_GUEST_MEMFD
    with memslot.ModelVM("x86_64@6.12") as vm:
        fd = vm.create_guest_memfd(MiB)
        with pytest.raises(memslot.KvmError) as exc:
            vm.create_guest_memfd(MiB, 1)
        assert exc.value.errno == 22
        with pytest.raises(memslot.KvmError) as exc:
            vm.set_user_memory_region2(0, gmem, 0, MiB, UA, guest_memfd=fd)
        assert exc.value.errno == 22
        vm.set_user_memory_region2(0, 0, 0, MiB, UA, guest_memfd=0)  # plain v2 works
    with memslot.ModelVM("x86_64@7.2") as vm:
        fd = vm.create_guest_memfd(MiB, 1)
        vm.set_user_memory_region2(0, gmem, 0, MiB, UA, guest_memfd=fd)


def test_seed_era_5_6_keeps_the_old_arrays_on_move() -> None:
    """5.6: a MOVE to an unaligned base keeps arrays made for the aligned one: check() names
    the gfns past their end and the stale disallow marks. 5.7 allocates fresh ones."""
    def moved(name: str) -> list[str]:
        with memslot.ModelVM(name) as vm:
            vm.set_user_memory_region(0, 0, 0xC0000000, 2 * MiB, UA)
            vm.set_user_memory_region(0, 0, 0xBFFFF000, 2 * MiB, UA)  # MOVE, one page down
            assert vm.last_result is not None and str(vm.last_result.change) == "MOVE"
            return vm.check()
    problems = moved("x86_64@5.6")
    assert any("past its end" in p for p in problems)
    assert any("stale disallow marks" in p for p in problems)
    assert moved("x86_64-shadow@5.6") != []
    assert moved("x86_64@5.7") == [] and moved("x86_64@6.1") == []
    # The variant is the same behaviour on any x86 profile.
    with memslot.ModelVM("x86_64@7.3", variants={"x86-reuse-arch-on-move"}) as vm:
        vm.set_user_memory_region(0, 0, 0xC0000000, 2 * MiB, UA)
        vm.set_user_memory_region(0, 0, 0xBFFFF000, 2 * MiB, UA)
        assert any("past its end" in p for p in vm.check())


@pytest.mark.parametrize("name", ["ppc64-hv@6.1", "ppc64-hv@7.3"])
def test_ppc_realloc_alternative_is_caught_as_a_leak(name: str) -> None:
    page = PRESETS[name].page_size
    with memslot.ModelVM(name, variants={"ppc-realloc-rmap-on-move"}) as vm:
        vm.set_user_memory_region(0, 0, 0, 32 * page, 0x100000000)
        vm.set_user_memory_region(0, 0, 64 * page, 32 * page, 0x100000000)
        assert any(p.startswith("leak: ppc_rmap") for p in vm.check())
    with memslot.ModelVM(name) as vm:
        vm.set_user_memory_region(0, 0, 0, 32 * page, 0x100000000)
        vm.set_user_memory_region(0, 0, 64 * page, 32 * page, 0x100000000)
        assert vm.check() == []


def test_compat_region2_needs_6_8() -> None:
    ops = _ops(MemoryRegion(0, 0, 0, 1 << 16, 0x100000000, 0, 0))
    by_name = {o.profile.name: o for o in compat.check(ops)}
    o = by_name["x86_64@6.1"]
    assert o.refusal is not None and o.refusal.rule == "region2-missing"
    assert o.refusal.errno == 25 and o.changes_in == "6.8"
    assert o.summary() == "REGION2 needs 6.8"
    assert by_name["arm64@6.1"].refusal is not None and by_name["arm64@6.1"].refusal.errno == 22
    assert by_name["x86_64@6.12"].accepted


def test_compat_max_gfn_names_5_18() -> None:
    ops = _ops(MemoryRegion(0, 0, 1 << 62, MiB, UA))
    by_name = {o.profile.name: o for o in compat.check(ops)}
    assert by_name["x86_64@5.10"].accepted
    o = by_name["x86_64@6.1"]
    assert o.refusal is not None and o.refusal.rule == "x86-max-gfn"
    assert o.changes_in == "5.18" and o.summary().endswith("since 5.18")


# -- detect's probes, run against the model of every preset -------------------------------------
@pytest.mark.parametrize("name", sorted(VERSIONED_PRESETS))
def test_detect_probes_recover_each_presets_facts(name: str) -> None:
    """The probes detect_profile() runs on /dev/kvm, run on the model instead, find the
    facts the preset carries: the access_ok limit, the x86 max-gfn refusal and MAXPHYADDR,
    the arm64 IPA / riscv G-stage size, REGION2's errno, the guest_memfd ioctl and flags."""
    from memslot.harness import detect

    p = VERSIONED_PRESETS[name]
    page = p.page_size

    def make_vm() -> memslot.ModelVM:
        return memslot.ModelVM(p)

    limit = detect._user_addr_limit(make_vm, page)
    assert limit == p.user_addr_limit
    if limit is not None:
        assert detect._access_ok_mask(make_vm, page, limit) == p.access_ok_mask
    if p.arch == "x86":
        check, bits = detect._x86_gpa_limit(make_vm, page)
        assert check == p.max_gfn_check
        if check:
            assert bits == (p.phys_bits if p.tdp else 52)
    if p.arch in ("arm64", "riscv"):
        assert detect._guest_addr_bits(make_vm, page) == p.ipa_bits
    if not p.user_memory2:
        assert detect._unknown_ioctl_errno(make_vm, page) == p.unknown_ioctl_errno
    assert detect._guest_memfd_ioctl(make_vm, page) == (p.guest_memfd_ioctl,
                                                         p.guest_memfd_flags)


def test_ppc64_access_ok_masks_address_and_size_from_7_2() -> None:
    """Lab ppc64el 7.2 accepts ua=0x3ffffffff000 size=0x1ff000 (ending past 2^46): powerpc64's
    access_ok checks address and size each against TASK_SIZE_MAX; 6.12's generic one, the sum."""
    with memslot.ModelVM("ppc64-hv@7.2") as new, memslot.ModelVM("ppc64-hv@6.12") as old:
        new.set_user_memory_region(9, 0, 0xF58000, 0x1FF000, 0x3FFFFFFFF000)
        with pytest.raises(memslot.KvmError) as exc:
            old.set_user_memory_region(9, 0, 0xF58000, 0x1FF000, 0x3FFFFFFFF000)
        assert exc.value.errno == 22
        with pytest.raises(memslot.KvmError):
            new.set_user_memory_region(1, 0, 0, 0x1000, 1 << 46)  # the address itself


@pytest.mark.parametrize("profile", ["x86_64@5.10", "x86_64@6.1", "x86_64@6.12", "x86_64@7.2"])
def test_split_irqchip_takes_up_to_kvm_max_irq_routes_everywhere(profile: str) -> None:
    """MAX_NR_RESERVED_IOAPIC_PINS is KVM_MAX_IRQ_ROUTES (4096) in every source read."""
    from memslot import ModelVM
    from memslot.constants import KVM_CAP_SPLIT_IRQCHIP

    with ModelVM(profile) as vm:
        with pytest.raises(OSError) as info:
            vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, 4097)
        assert info.value.errno == errno.EINVAL
        vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, 4096)


def test_x86_cap_boundaries_follow_the_changes_table() -> None:
    """The suppress-EOI-broadcast flags of X2APIC_API: refused by 6.12, taken by 7.2, at the
    release CHANGES names (not pinned upstream: the doc says so)."""
    from memslot import ModelVM
    from memslot.constants import KVM_CAP_X2APIC_API
    from memslot.versions import CHANGES

    change = CHANGES["x86-x2apic-suppress-eoi"]
    assert not change.pinned and "Not pinned" in change.confirmed
    with ModelVM("x86_64@6.12") as old, ModelVM("x86_64@7.2") as new:
        with pytest.raises(OSError) as info:
            old.enable_cap(KVM_CAP_X2APIC_API, 8)
        assert info.value.errno == errno.EINVAL
        new.enable_cap(KVM_CAP_X2APIC_API, 8)

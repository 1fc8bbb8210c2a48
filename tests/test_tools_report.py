"""``memslot report``: large-page eligibility and the misalignment that prevents it, metadata
per slot and in total, dirty bitmaps, limits, several profiles side by side, ``--strict``."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memslot import ModelVM
from memslot.arch.x86 import huge_eligible
from memslot.cli import render
from memslot.cli.main import main
from memslot.constants import KVM_MEM_MAX_NR_PAGES
from memslot.profile import PRESETS
from memslot.tools.report import aligned_ua, huge_window, run_report, slot_report
from memslot.tools.session import ModelRun, replay_model
from memslot.trace.jsonl import parse_lines

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "examples" / "traces"
PC4G = str(TRACES / "qemu72-pc-4g.trace")
PC128 = str(TRACES / "qemu72-pc-128m.trace")
MIGRATE = str(TRACES / "qemu72-pc-migrate.trace")
GIB, MIB = 1 << 30, 1 << 20


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def report_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli("report", "--json", *args)
    assert err == "", err
    return code, json.loads(out)


def write(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def region(slot: int, gpa: int, size: int, ua: int, flags: int = 0) -> str:
    return json.dumps({"slot": slot, "flags": flags, "guest_phys_addr": hex(gpa),
                       "memory_size": hex(size), "userspace_addr": hex(ua)})


def test_qemu_4g_layout() -> None:
    code, data = report_json(PC4G, "--profile", "x86_64-shadow")
    assert code == 0
    (r,) = data["reports"]
    slots = {(s["as_id"], s["id"]): s for s in r["slots"]}
    high = next(s for s in slots.values() if s["guest_phys_addr"] == 4 * GIB)
    assert high["memory_size"] == GIB
    assert high["huge"]["2M"]["share"] == 1.0 and high["huge"]["2M"]["source"] == "lpage_info"
    # QEMU aligns RAM to 2 MiB only: 1 GiB pages would need ua = gpa mod 1 GiB
    one_g = high["huge"]["1G"]
    assert one_g["misaligned"] and one_g["eligible_bytes"] == 0 and one_g["lost_bytes"] == GIB
    assert one_g["fix_userspace_addr"] % GIB == 0
    assert high["userspace_addr"] <= one_g["fix_userspace_addr"] < high["userspace_addr"] + GIB
    t = r["totals"]
    assert t["metadata_bytes"] == sum(s["metadata_bytes"] for s in r["slots"])
    assert t["guest_bytes"] == sum(s["memory_size"] for s in r["slots"]) > 4 * GIB
    assert t["dirty_bitmap_if_logging_bytes"] == sum(
        2 * ((s["npages"] + 63) // 64 * 8) for s in r["slots"])
    assert [f["code"] for f in r["findings"]] == ["huge-misaligned-1g"] * 2
    assert all(f["severity"] == "note" for f in r["findings"])
    assert r["address_spaces"] == [{"as_id": 0, "slots": 10, "limit": 32764,
                                    "headroom": 32754, "headroom_share": 32754 / 32764}]


def test_strict_on_recorded_traces() -> None:
    """QEMU's RAM is 2 MiB aligned; the OVMF code flash is not: its gpa is 0x84000 into a
    2 MiB frame, its host mapping 2 MiB aligned, so none of its 3.5 MiB maps with 2M pages."""
    for trace in sorted(TRACES.glob("qemu72-*.trace")):
        code, data = report_json("--strict", "--profile", "x86_64-shadow", str(trace))
        warned = [f for f in data["reports"][0]["findings"] if f["severity"] == "warning"]
        if trace.name != "qemu72-q35-ovmf-pflash.trace":
            assert code == 0 and not warned, trace
            continue
        assert code == 1
        (f,) = warned
        assert f["code"] == "huge-misaligned" and "at 0xffc84000" in f["text"]


def test_misaligned_slot_is_a_finding(tmp_path: Path) -> None:
    # RAM at 1 GiB whose host mapping is off by 4 KiB: no 2M or 1G page at all.
    path = write(tmp_path, region(0, GIB, 2 * GIB, 0x7F0000001000))
    code, out, err = cli("report", path, "--profile", "x86_64-shadow")
    assert code == 0 and err == ""
    assert "MISALIGNED" in out and "[huge-misaligned]" in out
    assert "userspace_addr 0x7f0000200000 (gpa mod 2M) would allow 2.0 GiB" in out
    code, out, _err = cli("report", path, "--strict")
    assert code == 1
    code, data = report_json(path, "--profile", "x86_64-shadow")
    (s,) = data["reports"][0]["slots"]
    assert s["huge"]["2M"]["share"] == 0 and s["huge"]["1G"]["share"] == 0
    assert s["huge"]["2M"]["fix_userspace_addr"] == 0x7F0000200000
    assert s["huge"]["1G"]["fix_userspace_addr"] == 0x7F0040000000


def test_near_max_pages(tmp_path: Path) -> None:
    path = write(tmp_path, region(0, 0, KVM_MEM_MAX_NR_PAGES << 12, 0x10000000000))
    code, data = report_json(path, "--profile", "x86_64-shadow", "--strict")
    assert code == 1
    r = data["reports"][0]
    assert r["slots"][0]["max_pages_share"] == 1.0
    assert [f["code"] for f in r["findings"]] == ["near-max-pages"]


def test_headroom_finding() -> None:
    profile = PRESETS["x86_64-shadow"].replace(name="tiny", internal_mem_slots=32767 - 10)
    ops = list(parse_lines([region(i, i * MIB, MIB, 0x7F0000000000 + i * MIB)
                            for i in range(10)]))
    run = replay_model(ops, profile)
    r = run_report(run, len(ops))
    assert r["address_spaces"][0]["headroom"] == 0
    assert [f["code"] for f in r["findings"]] == ["slot-headroom"]


def test_compare_profiles_side_by_side() -> None:
    code, data = report_json(PC4G, "--compare")
    assert code == 0  # findings count only with --strict
    names = [r["profile"] for r in data["reports"]]
    assert names == ["x86_64", "x86_64-shadow", "ppc64-hv", "arm64"]
    by = {r["profile"]: r for r in data["reports"]}
    assert by["x86_64"]["outcomes"]["mismatches"] == 0
    # shadow paging allocates rmaps and write tracking: far more metadata than lazy TDP
    assert by["x86_64-shadow"]["totals"]["metadata_bytes"] > \
        50 * by["x86_64"]["totals"]["metadata_bytes"]
    # 64 KiB pages refuse QEMU's 4 KiB-granular ROM slots
    assert by["ppc64-hv"]["outcomes"]["mismatches"] > 0
    assert "replay-mismatch" in [f["code"] for f in by["ppc64-hv"]["findings"]]
    assert by["arm64"]["totals"]["huge_source"] == "estimate"
    assert by["x86_64"]["totals"]["huge_source"] == "lpage_info"
    _code, out, _ = cli("report", PC4G, "--compare")
    assert "profiles side by side" in out and "metadata per slot" in out
    assert "(est.)" in out


def test_at_and_dirty_logging() -> None:
    code, data = report_json(PC128, "--at", "1")
    assert code == 0
    r = data["reports"][0]
    assert r["applied"] == 1 and len(r["slots"]) == 1
    _code, data = report_json(MIGRATE, "--profile", "x86_64-shadow", "--at", "L40")
    r = data["reports"][0]
    logging = [s for s in r["slots"] if s["dirty_logging"]]
    assert logging
    for s in logging:
        assert s["dirty_bitmap_bytes"] == s["dirty_bitmap_if_logging_bytes"]
        assert any(a["array"] == "dirty_bitmap" for a in s["arrays"])


def test_text_output_and_arrays() -> None:
    code, out, err = cli("report", PC128, "--profile", "x86_64-shadow", "--arrays")
    assert code == 0 and err == ""
    for word in ("slot", "2M", "1G", "metadata", "vmalloc", "of max pages", "headroom",
                 "KVM_MEM_MAX_NR_PAGES", "findings: none", "rmap[4K]"):
        assert word in out
    assert "\x1b[" not in out


@pytest.mark.parametrize("args, message", [
    (("/nonexistent",), "no such file"),
    ((PC128, "--profile", "vax"), "unknown profile"),
    ((PC128, "--at", "0"), "--at 0"),
])
def test_bad_input(args: tuple[str, ...], message: str) -> None:
    code, out, err = cli("report", *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


frames = st.sampled_from([1 << 21, 1 << 30])


@settings(max_examples=200, deadline=None)
@given(base=st.integers(0, 1 << 22), npages=st.integers(1, 1 << 19),
       ua_pages=st.integers(0, 1 << 24))
def test_lpage_info_equals_the_alignment_rule(base: int, npages: int, ua_pages: int) -> None:
    """The report's x86 eligibility (the model's lpage_info marks) is the gpa/hva rule the
    other arches get as an estimate, and huge_eligible of arch.x86."""
    gpa, size, ua = base << 12, npages << 12, 0x7F0000000000 + (ua_pages << 12)
    with ModelVM("x86_64-shadow") as vm:
        vm.set_user_memory_region(0, 0, gpa, size, ua)
        s = slot_report(vm, vm.memslots()[0])
    for name, frame, level in (("2M", 1 << 21, 2), ("1G", 1 << 30, 3)):
        window = huge_window(gpa, size, ua, frame)
        assert s["huge"][name]["eligible_bytes"] == (window[1] - window[0] if window else 0)
        gfns = huge_eligible(base, npages, ua, level)
        assert (window is None) == (gfns is None)
        if window and gfns:
            assert window == (gfns[0] << 12, gfns[1] << 12)


@given(gpa=st.integers(0, 1 << 50), ua=st.integers(0, 1 << 47), frame=frames)
def test_aligned_ua(gpa: int, ua: int, frame: int) -> None:
    fixed = aligned_ua(gpa, ua, frame)
    assert ua <= fixed < ua + frame and (fixed - gpa) % frame == 0


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rich_on_a_terminal_plain_when_piped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSLOT_PLAIN", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    tty, pipe = _Tty(), io.StringIO()
    assert render.fancy(tty) and not render.fancy(pipe)
    for stream in (tty, pipe):
        render.print_table([["0:1", "2.0 GiB"]], ["slot", "size"], title="t", right={1},
                           out=stream)
        assert "slot" in stream.getvalue() and "2.0 GiB" in stream.getvalue()
    monkeypatch.setenv("TERM", "dumb")
    assert not render.fancy(tty)


def test_report_library_closes_its_vm() -> None:
    ops = list(parse_lines([region(0, 0, MIB, 0)]))
    run: ModelRun = replay_model(ops, PRESETS["arm64"])
    r = run_report(run, 1)
    run.close()
    assert run.vm.closed and r["slots"][0]["huge"]["2M"]["source"] == "estimate"

"""``memslot explain``: per request the change, steps, failing rule with errno and kernel
source, metadata allocated and freed, generations; ``--request`` against a starting trace."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from memslot.cli.main import main
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from memslot.profile import PRESETS
from memslot.tools.explain import kernel_reference, parse_flags, parse_number, parse_request
from memslot.tools.rules import all_rules

ROOT = Path(__file__).resolve().parent.parent
BOOT = str(ROOT / "examples" / "vmm-boot.jsonl")
PC128 = str(ROOT / "examples" / "traces" / "qemu72-pc-128m.trace")
EINVAL9T = str(ROOT / "examples" / "traces" / "qemu72-pc-9t-einval.trace")


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def explain_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli("explain", "--json", *args)
    assert err == ""
    return code, json.loads(out)


def test_every_request_of_a_trace() -> None:
    code, data = explain_json(BOOT)
    assert code == 0 and data["mismatches"] == 0
    assert len(data["explained"]) == data["operations"] == 30
    for e in data["explained"]:
        if e["op"] != "set":
            continue
        assert e["generation_before"] is not None
        assert e["bytes_allocated"] == sum(a["bytes"] for a in e["allocated"])
        assert e["bytes_freed"] == sum(a["bytes"] for a in e["freed"])
        assert (e["rule"] is None) == (e["errno"] == 0)


def test_move_at_n() -> None:
    _code, data = explain_json(BOOT, "--at", "13")
    (move,) = data["explained"]
    assert move["index"] == 13 and move["change"] == "MOVE" and move["errno"] == 0
    assert "swap: install" in move["steps"] and "free old slot" in move["steps"]
    assert move["generation_after"] - move["generation_before"] == 4  # 2 swaps x 2 spaces
    assert move["allocated"] and move["freed"]


def test_eexist_names_rule_function_file_and_spec() -> None:
    _code, data = explain_json(BOOT, "--failed")
    eexist = next(e for e in data["explained"] if e["errno_name"] == "EEXIST")
    assert eexist["rule"] == {
        "code": "overlap", "text": eexist["rule"]["text"],
        "function": "kvm_check_memslot_overlap", "file": "virt/kvm/kvm_main.c",
        "spec": "docs/rules.md overlap",
    }
    assert "slot 0:1" in eexist["detail"]
    assert "File exists" in eexist["hint"]
    assert eexist["steps"] == ["validate"]
    assert eexist["generation_before"] == eexist["generation_after"]
    assert all(e["errno"] for e in data["explained"])


def test_text_output() -> None:
    code, out, err = cli("explain", EINVAL9T)
    assert code == 0 and err == ""
    assert "#2 (line 2)" in out
    assert "EINVAL (errno 22); recorded EINVAL" in out
    assert "max-pages: npages > KVM_MEM_MAX_NR_PAGES" in out
    assert "kvm_set_memory_region() in virt/kvm/kvm_main.c" in out
    assert "2^31 - 1 pages" in out  # the hint
    assert "generation  2 (unchanged)" in out
    assert "\x1b[" not in out  # plain when piped


def test_metadata_lines_with_shadow_paging() -> None:
    code, out, _ = cli("explain", PC128, "--at", "L7", "--profile", "x86_64-shadow")
    assert code == 0
    assert "CREATE" in out and "rmap[4K]" in out and "write_track" in out
    assert "+ lpage_info[2M]" in out


def test_at_line_number() -> None:
    _code, data = explain_json(PC128, "--at", "L4")
    (e,) = data["explained"]
    assert e["line"] == 4 and e["index"] == 4 and e["change"] == "CREATE"


def test_request_alone_on_an_empty_vm() -> None:
    code, data = explain_json("--profile", "x86_64-shadow", "--request", "slot=0", "gpa=0",
                              "size=2M", "ua=0x7f0000200000", "flags=LOG_DIRTY_PAGES")
    assert code == 0
    (e,) = data["explained"]
    assert e["change"] == "CREATE" and e["errno"] == 0
    arrays = {a["array"] for a in e["allocated"]}
    assert {"slot", "rmap[4K]", "lpage_info[2M]", "write_track", "dirty_bitmap"} <= arrays
    assert e["request"]["flags"] == KVM_MEM_LOG_DIRTY_PAGES


def test_request_against_a_trace_file_exists() -> None:
    # QEMU's "KVM_SET_USER_MEMORY_REGION failed: File exists", reproduced and explained.
    code, out, err = cli("explain", PC128, "--request", "slot=20", "gpa=0x1000",
                         "size=4K", "ua=0x7f0000000000")
    assert code == 0, err
    assert "after 37 operations" in out
    assert "EEXIST (errno 17)" in out and "kvm_check_memslot_overlap" in out
    # FILE after the fields, and --at: the state after operation 1 (slot 0 covers gpa 0)
    code, data = explain_json("--request", "slot=0", "size=0", PC128, "--at", "1")
    (e,) = data["explained"]
    assert data["after"] == 1 and e["change"] == "DELETE" and e["errno"] == 0


def test_request_in_another_address_space() -> None:
    code, data = explain_json("--request", "slot=1:3", "gpa=0", "size=4K", "ua=0")
    assert code == 0
    (e,) = data["explained"]
    assert e["request"]["as_id"] == 1 and e["request"]["id"] == 3 and e["errno"] == 0
    _code, data = explain_json("--profile", "x86_64-shadow", "--request", "slot=1:3", "size=4K")
    assert data["explained"][0]["rule"]["code"] == "as-id"


def test_arch_rule_names_the_arch_source() -> None:
    _code, data = explain_json("--profile", "arm64", "--request", "slot=0",
                              "gpa=0x10000000000", "size=4K")
    rule = data["explained"][0]["rule"]
    assert rule["code"] == "arm64-ipa" and rule["file"] == "arch/arm64/kvm/mmu.c"


def test_mismatch_exits_1(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, '
                     '"userspace_addr": 0, "expect": "EEXIST"}\n')
    code, out, _ = cli("explain", str(trace))
    assert code == 1
    assert "MISMATCH    expected EEXIST, got 0" in out


@pytest.mark.parametrize("args, message", [
    ((), "needs a trace FILE, a --request, or both"),
    (("--request", "gpa=0"), "needs slot="),
    (("--request", "slot=x"), "slot='x' is not a number"),
    (("--request", "slot=0", "colour=red"), "bad request field 'colour=red'"),
    (("--request", "slot=0", "slot=1"), "given twice"),
    (("--request", "slot=0", "flags=SHINY"), "unknown flag 'SHINY'"),
    (("--request", "slot=0", "gpa=-1"), "is negative"),
    (("--request", "slot=0", "gpa=0x1ffffffffffffffff"), "too large"),
    (("--request", "slot=70000:1"), "below 65536"),
    ((BOOT, "--at", "31"), "--at 31: the trace has 30 operations"),
    ((BOOT, "--at", "L999"), "no operation comes from line 999"),
    ((BOOT, "--at", "x"), "expected N or LN"),
    (("/nonexistent.jsonl",), "/nonexistent.jsonl: no such file"),
    ((BOOT, "--profile", "vax"), "unknown profile 'vax'"),
    ((BOOT, "--variant", "nope"), "nope"),
])
def test_bad_input_is_one_line_exit_2(args: tuple[str, ...], message: str) -> None:
    code, out, err = cli("explain", *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("memslot: error: ")
    assert message in err


def test_parse_request_forms() -> None:
    r = parse_request(["slot=1:5", "gpa=1G", "size=2MiB", "ua=0x7f0000000000",
                       "flags=LOG_DIRTY_PAGES|READONLY", "gmem=3", "gmem_offset=4K"])
    assert (r.as_id, r.id, r.guest_phys_addr, r.memory_size) == (1, 5, 1 << 30, 2 << 20)
    assert r.flags == KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
    assert (r.guest_memfd, r.guest_memfd_offset) == (3, 4096)
    assert parse_request(["slot=2"]).memory_size == 0  # a DELETE
    assert parse_flags("ro,dirty") == 3 and parse_flags("0x2") == 2
    assert parse_number("1_024", "x") == 1024 and parse_number("4k", "x") == 4096


def test_every_rule_has_a_kernel_reference() -> None:
    rules = [rule for _, rule in all_rules()]
    assert len(rules) > 40
    for rule in rules:
        for profile in PRESETS.values():
            ref = kernel_reference(rule, profile)
            assert ref["file"].endswith(".c") and ref["spec"], (rule, profile.name)

"""QEMU trace logs -> trace operations (memslot.trace.qemu)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memslot.constants import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from memslot.request import MemoryRegion
from memslot.trace.qemu import MAX_LINE, parse_qemu_trace
from memslot.trace.reader import read_trace, sniff_format
from memslot.trace.records import ClearDirtyLog, SetRegion, TraceFormatError, TraceOp

TRACES = Path(__file__).resolve().parent.parent / "examples" / "traces"

# file -> (SetRegion records, of which DELETEs, ClearDirtyLog records)
COMMITTED = {
    "qemu72-pc-128m.trace": (37, 14, 0),
    "qemu72-q35-128m.trace": (39, 15, 0),
    "qemu72-pc-4g.trace": (38, 14, 0),
    "qemu72-q35-4g.trace": (40, 15, 0),
    "qemu72-pc-nic-roms.trace": (36, 14, 0),
    "qemu72-pc-dimm-hotplug.trace": (39, 14, 0),
    "qemu72-pc-migrate.trace": (45, 14, 16),
    "qemu72-pc-9t-einval.trace": (2, 0, 0),
    "qemu72-q35-ovmf-pflash.trace": (12, 3, 0),
    "format-qemu62.trace": (11, 2, 2),
    "format-qemu9.trace": (9, 1, 1),
}

V1 = (
    "kvm_set_user_memory Slot#{slot} flags={flags:#x} gpa={gpa:#x} size={size:#x} ua={ua:#x} "
    "ret={ret}"
)
V91 = (
    "kvm_set_user_memory AddrSpace#{as_id} Slot#{slot} flags={flags:#x} gpa={gpa:#x} "
    "size={size:#x} ua={ua:#x} guest_memfd={fd} guest_memfd_offset={off:#x} ret={ret}"
)


def parse(lines: list[str] | str, path: str = "<t>") -> list[TraceOp]:
    if isinstance(lines, str):
        lines = lines.splitlines(keepends=True)
    return list(parse_qemu_trace(lines, path))


def sets(ops: list[TraceOp]) -> list[SetRegion]:
    return [op for op in ops if isinstance(op, SetRegion)]


def v1(slot: int = 0, flags: int = 0, gpa: int = 0, size: int = 0x100000,
       ua: int = 0x7F0000000000, ret: int = 0) -> str:
    return V1.format(slot=slot, flags=flags, gpa=gpa, size=size, ua=ua, ret=ret)


def assert_one_line_error(exc: TraceFormatError, path: str, line: int) -> None:
    text = str(exc)
    assert "\n" not in text and "\r" not in text
    assert text.startswith(f"{path}:{line}: "), text
    assert exc.line == line and exc.path == path


# --- committed traces ---------------------------------------------------------------------

def test_every_committed_trace_is_listed() -> None:
    assert sorted(p.name for p in TRACES.glob("*.trace")) == sorted(COMMITTED)


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_trace_parses(name: str) -> None:
    path = TRACES / name
    with open(path, encoding="utf-8") as f:
        ops = list(parse_qemu_trace(f, str(path)))
    n_set, n_delete, n_clear = COMMITTED[name]
    regions = sets(ops)
    clears = [op for op in ops if isinstance(op, ClearDirtyLog)]
    assert (len(regions), sum(r.region.memory_size == 0 for r in regions), len(clears)) == (
        n_set, n_delete, n_clear)
    text = path.read_text(encoding="utf-8").splitlines()
    last = 0
    for op in ops:
        assert op.line >= last  # in file order
        last = op.line
        event = "kvm_set_user_memory" if isinstance(op, SetRegion) else "kvm_clear_dirty_log"
        assert event in text[op.line - 1]
    assert read_trace(str(path)) == ops  # auto-detected as a QEMU log


@pytest.mark.parametrize("name", [n for n in COMMITTED if n.startswith("qemu72-")])
def test_recorded_traces_are_address_space_0_and_succeed(name: str) -> None:
    ops = parse((TRACES / name).read_text(encoding="utf-8"))
    for op in sets(ops):
        assert op.region.as_id == 0 and op.region.id < 32
        assert op.region.guest_memfd is None  # QEMU 7.2 issues v1 only
        assert op.note == ""  # no one-line READONLY toggle in real 7.2 logs
        if name != "qemu72-pc-9t-einval.trace":
            assert op.expect == 0


def test_pc_boot_trace_content() -> None:
    ops = sets(parse((TRACES / "qemu72-pc-128m.trace").read_text(encoding="utf-8")))
    first = ops[0].region
    assert (first.slot, first.flags, first.guest_phys_addr, first.memory_size) == (
        0, 0, 0, 128 << 20)
    bios = ops[1].region
    assert (bios.guest_phys_addr, bios.memory_size, bios.flags) == (
        0xFFFC0000, 0x40000, KVM_MEM_READONLY)
    vram = [r.region for r in ops if r.region.guest_phys_addr == 0xFD000000]
    assert vram and vram[0].flags == KVM_MEM_LOG_DIRTY_PAGES


def test_migration_trace_flags_and_clears() -> None:
    lines = (TRACES / "qemu72-pc-migrate.trace").read_text(encoding="utf-8").splitlines()
    assert all("@" in line.split(":", 1)[0] for line in lines)  # TID@SEC.USEC: prefixes
    ops = parse(lines)
    flags = [r.region.flags for r in sets(ops)]
    assert KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES in flags  # the BIOS ROM, logged
    clears = [op for op in ops if isinstance(op, ClearDirtyLog)]
    assert {c.slot for c in clears} == {0, 1, 2, 3, 4, 5, 6, 7, 8}
    assert all(c.bitmap == b"" and c.expect is None and c.first_page == 0 for c in clears)
    assert clears[0].num_pages == 0xA0


def test_einval_trace() -> None:
    ops = sets(parse((TRACES / "qemu72-pc-9t-einval.trace").read_text(encoding="utf-8")))
    assert [op.expect for op in ops] == [0, errno.EINVAL]
    assert ops[1].region.memory_size == (9 << 40) - (3 << 30)
    assert ops[1].region.npages > (1 << 31) - 1


# --- the three formats ---------------------------------------------------------------------

PREFIXES = [
    "",
    "12345@1700000000.123456:",
    "2024-01-01T00:00:00.000000Z ",
    "Jan  1 00:00:01 host qemu-system-x86_64[12345]: ",
    "[  12.345678] ",
    "   ",
]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_format_up_to_9_0(prefix: str) -> None:
    line = prefix + v1(slot=65537, flags=2, gpa=0xFFFC0000, size=0x40000, ua=0x7F00DEAD0000,
                       ret=-17)
    [op] = parse([line + "\n"])
    assert isinstance(op, SetRegion)
    assert op.region == MemoryRegion(65537, 2, 0xFFFC0000, 0x40000, 0x7F00DEAD0000)
    assert (op.region.as_id, op.region.id) == (1, 1)
    assert op.expect == errno.EEXIST and op.line == 1


@pytest.mark.parametrize("prefix", PREFIXES)
def test_format_addrspace_without_guest_memfd(prefix: str) -> None:
    line = (prefix + "kvm_set_user_memory AddrSpace#1 Slot#3 flags=0x1 gpa=0xfd000000 "
            "size=0x1000000 ua=0x7f1600000000 ret=0")
    [op] = parse([line])
    assert isinstance(op, SetRegion)
    assert op.region == MemoryRegion((1 << 16) | 3, 1, 0xFD000000, 0x1000000, 0x7F1600000000)
    assert op.expect == 0


@pytest.mark.parametrize("prefix", PREFIXES)
def test_format_9_1_guest_memfd(prefix: str) -> None:
    plain = prefix + V91.format(as_id=0, slot=1, flags=0, gpa=1 << 32, size=1 << 31, ua=1 << 44,
                                fd=-1, off=0x80000000, ret=0)
    gmem = prefix + V91.format(as_id=0, slot=2, flags=KVM_MEM_GUEST_MEMFD, gpa=0, size=1 << 31,
                               ua=1 << 45, fd=27, off=0x1000, ret=-22)
    one, two = sets(parse([plain, gmem]))
    assert one.region == MemoryRegion(1, 0, 1 << 32, 1 << 31, 1 << 44)  # v1 semantics
    assert not one.region.v2
    assert two.region == MemoryRegion(2, KVM_MEM_GUEST_MEMFD, 0, 1 << 31, 1 << 45, 0x1000, 27)
    assert two.region.v2 and two.expect == errno.EINVAL and two.line == 2


def test_guest_memfd_minus_one_with_the_flag_is_fd_0xffffffff() -> None:
    line = V91.format(as_id=0, slot=0, flags=KVM_MEM_GUEST_MEMFD, gpa=0, size=0x1000,
                      ua=0x1000, fd=-1, off=0, ret=-9)
    [op] = sets(parse([line]))
    assert op.region.guest_memfd == 0xFFFFFFFF and op.expect == errno.EBADF


def test_ret_to_expect() -> None:
    rets = [0, -1, -12, -14, -17, -22]
    ops = sets(parse([v1(slot=i, gpa=i << 30, ret=r) for i, r in enumerate(rets)]))
    assert [op.expect for op in ops] == [-r for r in rets]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_clear_dirty_log(prefix: str) -> None:
    [op] = parse([prefix + "kvm_clear_dirty_log slot#65538 start 0x40 size 0x7ffc0\n"])
    assert op == ClearDirtyLog(65538, 64, 0x7FFC0, b"", None, 1)


def test_upper_case_hex_and_crlf_are_accepted() -> None:
    [op] = sets(parse(["kvm_set_user_memory Slot#0 flags=0x0 gpa=0xFEBE0000 size=0x10000 "
                       "ua=0x7F00AB000000 ret=0\r\n"]))
    assert op.region.guest_phys_addr == 0xFEBE0000


def test_noise_lines_are_ignored_and_lines_counted() -> None:
    text = [
        "qemu-system-x86_64: warning: host doesn't support requested feature\n",
        "\n",
        "qemu-system-x86_64: kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, "
        "slot=1, start=0x100000000, size=0x8ff40000000: Invalid argument\n",
        "kvm_set_phys_mem: error registering slot: Invalid argument\n",
        "+ qemu-system-x86_64 -trace kvm_set_user_memory -trace kvm_clear_dirty_log -D x\n",
        "-trace enable=kvm_set_user_memory,file=trace.log\n",
        "12345@1700000000.1:kvm_set_ioeventfd_pio fd: 11 @0x0 val=0x0 assign: 1 size: 2\n",
        "12345@1700000000.2:migration_bitmap_sync_end dirty_pages 4\n",
        "SeaBIOS (version 1.16.2-debian-1.16.2-1) \u00e9\u2603\n",
        "grep kvm_set_user_memory qemu.log | wc -l\n",
        v1(slot=0) + "\n",
        "Booting from ROM..\n",
        "kvm_clear_dirty_log slot#0 start 0x0 size 0x100\n",
    ]
    ops = parse(text)
    assert [op.line for op in ops] == [11, 13]


# --- READONLY toggles ----------------------------------------------------------------------

def test_readonly_toggle_is_two_records() -> None:
    ro = v1(slot=3, flags=KVM_MEM_READONLY, gpa=0xFE000000, size=0x20000)
    rw = v1(slot=3, flags=KVM_MEM_LOG_DIRTY_PAGES, gpa=0xFE000000, size=0x20000)
    ops = sets(parse([ro, rw, ro]))
    assert [(op.line, op.region.memory_size, op.region.flags, op.expect) for op in ops] == [
        (1, 0x20000, KVM_MEM_READONLY, 0),
        (2, 0, KVM_MEM_LOG_DIRTY_PAGES, 0),  # the implicit DELETE
        (2, 0x20000, KVM_MEM_LOG_DIRTY_PAGES, 0),
        (3, 0, KVM_MEM_READONLY, 0),
        (3, 0x20000, KVM_MEM_READONLY, 0),
    ]
    assert "delete" in ops[1].note and "re-create" in ops[2].note
    for op in ops[1:]:
        assert op.region._replace(memory_size=0x20000, flags=0) == MemoryRegion(
            3, 0, 0xFE000000, 0x20000, 0x7F0000000000)


def test_readonly_toggle_in_address_space_1_and_split_format() -> None:
    line = ("kvm_set_user_memory AddrSpace#1 Slot#2 flags={f:#x} gpa=0xc0000 size=0x20000 "
            "ua=0x7f0000000000 guest_memfd=-1 guest_memfd_offset=0xc0000 ret=0")
    ops = sets(parse([line.format(f=2), line.format(f=0)]))
    assert [op.region.memory_size for op in ops] == [0x20000, 0, 0x20000]
    assert {op.region.slot for op in ops} == {(1 << 16) | 2}


def test_not_toggles() -> None:
    ops = sets(parse([
        v1(slot=1, flags=2, size=0x40000),
        v1(slot=1, flags=3, size=0x40000),  # flags-only: dirty logging on a READONLY slot
        v1(slot=1, flags=0, size=0),  # DELETE
        v1(slot=1, flags=0, size=0x40000),  # CREATE, not a toggle: the slot is gone
        v1(slot=2, flags=2, size=0x1000, gpa=1 << 30),
        v1(slot=(1 << 16) | 2, flags=0, size=0x1000, gpa=1 << 30),  # another address space
    ]))
    assert len(ops) == 6 and not any(op.note for op in ops)


def test_toggle_with_failures() -> None:
    ops = sets(parse([
        v1(slot=4, flags=2, size=0x2000),
        v1(slot=4, flags=0, size=0, ret=-22),  # the first (delete) ioctl failed: traced as is
        v1(slot=4, flags=0, size=0x2000, ret=-12),  # delete went through, re-create failed
        v1(slot=4, flags=2, size=0x2000),  # slot 4 is gone now: a plain CREATE
    ]))
    assert [(op.line, op.region.memory_size, op.expect) for op in ops] == [
        (1, 0x2000, 0), (2, 0, errno.EINVAL), (3, 0, 0), (3, 0x2000, errno.ENOMEM), (4, 0x2000, 0)]


def test_committed_toggle_sample() -> None:
    ops = sets(parse((TRACES / "format-qemu62.trace").read_text(encoding="utf-8")))
    toggled = [op for op in ops if op.note]
    assert [op.region.memory_size for op in toggled] == [0, 0x20000]
    assert toggled[0].line == toggled[1].line


# --- errors ---------------------------------------------------------------------------------

MALFORMED = [
    "kvm_set_user_memory",
    "kvm_set_user_memory ",
    "kvm_set_user_memory Sl",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0xzz size=0x1000 ua=0x1000 ret=0",
    "kvm_set_user_memory Slot#0 flags=0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
    "kvm_set_user_memory Slot#x flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0 extra",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x10000000000000000 ua=0x1000 ret=0",
    "kvm_set_user_memory Slot#0 flags=0x100000000 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=5",
    "kvm_set_user_memory Slot#99999999999 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
    "kvm_set_user_memory AddrSpace#65536 Slot#0 flags=0x0 gpa=0x0 size=0x1 ua=0x1 ret=0",
    "kvm_set_user_memory AddrSpace#0 Slot#-1 flags=0x0 gpa=0x0 size=0x1 ua=0x1 ret=0",
    "kvm_set_user_memory AddrSpace#0 Slot#0 flags=0x0 gpa=0x0 size=0x1 ua=0x1 guest_memfd=-1 ret=0",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1 ua=0x1 guest_memfd=-1 "
    "guest_memfd_offset=0x0 ret=0",
    "12345@1700000000.123456:kvm_set_user_memory Slot#0 flags=0x0 gp",
    "2024-01-01T00:00:00Z kvm_set_user_memory \udcff\udcfe",
    "kvm_clear_dirty_log slot#0 start 0x0",
    "kvm_clear_dirty_log slot#0 start 0 size 0x10",
    "kvm_clear_dirty_log slot#0 start 0x0 size 0x100000000",
    "kvm_clear_dirty_log slot#0 begin 0x0 size 0x10",
    "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0\0",
    "random text \udc80 with a bad byte",
    "\0\0\0\0",
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_line_is_a_one_line_error_naming_it(bad: str) -> None:
    lines = ["noise\n", v1() + "\n", bad + "\n", v1(slot=1, gpa=1 << 30) + "\n"]
    with pytest.raises(TraceFormatError) as info:
        parse(lines, "trace.log")
    assert_one_line_error(info.value, "trace.log", 3)


def test_errors_list_collects_and_skips() -> None:
    errors: list[TraceFormatError] = []
    lines = [v1(slot=0), MALFORMED[3], v1(slot=1, gpa=1 << 30), MALFORMED[5], MALFORMED[-1]]
    ops = list(parse_qemu_trace(lines, "t", errors))
    assert [op.line for op in ops] == [1, 3]
    assert [e.line for e in errors] == [2, 4, 5]


def test_over_long_line() -> None:
    with pytest.raises(TraceFormatError, match="longer than") as info:
        parse([v1(), "x" * (MAX_LINE + 1)])
    assert_one_line_error(info.value, "<t>", 2)


def test_message_shows_untrusted_text_on_one_line() -> None:
    bad = "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x\u2028\x0b\x85zz" + "q" * 500
    with pytest.raises(TraceFormatError) as info:
        parse([bad])
    assert_one_line_error(info.value, "<t>", 1)
    assert len(str(info.value)) < 200 and "\u2028" not in str(info.value)


def write(data: bytes) -> str:
    fd, name = tempfile.mkstemp(suffix=".trace")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return name


@pytest.mark.parametrize("data, line", [
    (v1().encode() + b"\n" + b"\x00\x01\x02binary\n", 2),
    (b"noise\n" + v1().encode() + b"\n\xff\xfe\xfa not utf-8\n", 3),
    (b"noise\n" + v1().encode().replace(b"gpa", b"g\xc3pa") + b"\n", 2),
    (b"\x00" * 64, 1),
])
def test_binary_files_give_trace_format_error(data: bytes, line: int) -> None:
    name = write(data)
    try:
        with pytest.raises(TraceFormatError) as info:
            read_trace(name)
        assert_one_line_error(info.value, name, line)
    finally:
        os.unlink(name)


def test_sniff_format() -> None:
    assert sniff_format(['{"slot": 0, "flags": 0}\n']) == "jsonl"
    assert sniff_format(["\n", '  {"op": "set"}']) == "jsonl"
    assert sniff_format([]) == "none"
    assert sniff_format(["qemu-system-x86_64: warning: x\n", v1()]) == "qemu"
    assert sniff_format(["12@1.0:" + v1()]) == "qemu"
    clear = "kvm_clear_dirty_log slot#0 start 0x0 size 0x1\n"
    assert sniff_format(["# comment\n", clear]) == "qemu"
    assert sniff_format(["hello\n", "world\n"]) == "none"  # neither: no operation at all


def test_gpa_wider_than_64_bits_is_too_large() -> None:
    line = v1().replace("gpa=0x", "gpa=0x1" + "0" * 16 + "", 1)
    with pytest.raises(TraceFormatError, match=r"gpa='0x10000000000000000.* is too large"):
        parse([line])
    with pytest.raises(TraceFormatError, match="is not 0x<hex>"):
        parse([v1().replace("gpa=0x", "gpa=0xg", 1)])


def test_read_trace_jsonl_and_qemu_agree(tmp_path: Path) -> None:
    from memslot.trace.jsonl import dumps

    ops = sets(parse((TRACES / "qemu72-pc-128m.trace").read_text(encoding="utf-8")))
    out = tmp_path / "t.jsonl"
    out.write_text("".join(dumps(op) + "\n" for op in ops), encoding="utf-8")
    assert [op.region for op in sets(read_trace(str(out)))] == [op.region for op in ops]


# --- fuzz -----------------------------------------------------------------------------------

_VALID = [
    v1(slot=65537, flags=3, gpa=0xFFFC0000, size=0x40000, ret=-17),
    "4242@1700000000.1:" + v1(slot=2, flags=2, gpa=0xC0000, size=0x20000),
    V91.format(as_id=1, slot=5, flags=4, gpa=1 << 32, size=1 << 30, ua=1 << 40, fd=27, off=0x1000,
               ret=0),
    "2024-01-01T00:00:00.000000Z kvm_clear_dirty_log slot#3 start 0x40 size 0x1000",
]


@st.composite
def mutated_line(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(_VALID))
    kind = draw(st.sampled_from(["truncate", "replace", "insert", "huge", "garbage", "keep"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base)))]
    if kind == "replace":
        i = draw(st.integers(0, len(base) - 1))
        return base[:i] + draw(st.characters()) + base[i + 1:]
    if kind == "insert":
        i = draw(st.integers(0, len(base)))
        return base[:i] + draw(st.text(max_size=8)) + base[i:]
    if kind == "huge":
        digits = draw(st.sampled_from(["9" * 40, "f" * 40, "1" + "0" * 30]))
        return base.replace("0x1", "0x" + digits, 1).replace("#5", "#" + digits, 1)
    if kind == "garbage":
        return draw(st.binary(max_size=120)).decode("utf-8", "surrogateescape")
    return base


@settings(max_examples=400, deadline=None)
@given(st.lists(mutated_line(), min_size=1, max_size=8))
def test_fuzz_parser_only_raises_trace_format_error(lines: list[str]) -> None:
    try:
        ops = parse([line + "\n" for line in lines], "fuzz.log")
    except TraceFormatError as exc:
        text = str(exc)
        assert "\n" not in text and "\r" not in text
        assert 1 <= exc.line <= len(lines) and text.startswith(f"fuzz.log:{exc.line}: ")
        return
    for op in ops:
        assert 1 <= op.line <= len(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(mutated_line().map(lambda s: s.encode("utf-8", "surrogateescape")),
                          st.binary(max_size=200)), min_size=1, max_size=6))
def test_fuzz_files_only_raise_trace_format_error(chunks: list[bytes]) -> None:
    name = write(b"\n".join(chunks))
    try:
        try:
            read_trace(name)
        except TraceFormatError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(name)
    finally:
        os.unlink(name)

"""ELF64 core export of a live GuestMemory and of a snapshot chain, read back with a real ELF
reader (pyelftools): one PT_LOAD per region, p_paddr = gpa, the region's bytes at its gpa."""

from __future__ import annotations

from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import memslot
from memslot.cli.main import main
from memslot.guest import GuestMemory

PAGE = 4096
MiB = 1 << 20


def _segments(path: Path) -> tuple[dict[str, object], dict[int, bytes]]:
    """The header facts and ``{p_paddr: bytes}`` of every PT_LOAD."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        head = {"class": elf.elfclass, "type": elf["e_type"], "machine": elf["e_machine"],
                "little": elf.little_endian}
        loads = {}
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                assert seg["p_filesz"] == seg["p_memsz"]
                loads[seg["p_paddr"]] = seg.data()
        return head, loads


def _guest(gm: GuestMemory, vm: memslot.ModelVM) -> dict[int, bytes]:
    gm.add_region(0, 2 * MiB, log_dirty=True, label="ram")
    gm.add_region(0xFFFF0000, 64 * 1024, readonly=True, label="bios")
    gm.add_region(0xE0000000, 16 * PAGE, backing="memfd", label="bar")
    gm.write(0x1234, b"kernel")
    gm.write(0xFFFFFFF0, b"\xea\x5b\xe0\x00\xf0")
    gm.write(0xE0000000 + 3 * PAGE, b"bar3" * 10)
    return {r.gpa: gm.read(r.gpa, r.size) for r in gm.regions()}


def test_live_export_is_read_back_by_pyelftools(vm: memslot.ModelVM, tmp_path: Path) -> None:
    out = tmp_path / "guest.core"
    with GuestMemory(vm) as gm:
        expected = _guest(gm, vm)
        gm.export_elf(out)
    head, loads = _segments(out)
    assert head == {"class": 64, "type": "ET_CORE", "machine": "EM_X86_64", "little": True}
    assert loads == expected
    # Zero pages are holes: the 2 MiB region costs about one page of disk.
    assert out.stat().st_blocks * 512 < 256 * 1024


def test_cli_exports_a_snapshot_chain(vm: memslot.ModelVM, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with GuestMemory(vm) as gm:
        _guest(gm, vm)
        gm.snapshot(tmp_path / "s0")
        gm.write(0x5000, b"later")
        gm.move_region(gm.region_by_label("bar"), 0xD0000000)
        gm.snapshot(tmp_path / "s1", incremental=True)
        expected = {r.gpa: gm.read(r.gpa, r.size) for r in gm.regions()}
    out = tmp_path / "chain.core"
    assert main(["snapshot", "export", "--elf", str(out), str(tmp_path / "s0"),
                 str(tmp_path / "s1")]) == 0
    assert "3 PT_LOAD segments" in capsys.readouterr().out
    head, loads = _segments(out)
    assert head["machine"] == "EM_X86_64" and loads == expected
    assert main(["snapshot", "export", "--elf", str(out), "--machine", "arm64",
                 str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    assert _segments(out)[0]["machine"] == "EM_AARCH64"
    capsys.readouterr()
    assert main(["snapshot", "export", "--elf", str(out), str(tmp_path / "s1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "starts with a full snapshot" in err and "\n" not in err


def test_export_on_64k_pages(tmp_path: Path) -> None:
    with memslot.ModelVM("ppc64-pr") as vm, GuestMemory(vm) as gm:
        gm.add_region(0, 16 * 65536, align=MiB)
        gm.write(5 * 65536 + 3, b"ppc")
        gm.snapshot(tmp_path / "s")
        expected = gm.read(0, 16 * 65536)
    out = tmp_path / "ppc.core"
    assert main(["snapshot", "export", "--elf", str(out), str(tmp_path / "s")]) == 0
    head, loads = _segments(out)
    assert head["machine"] == "EM_PPC64" and loads == {0: expected}

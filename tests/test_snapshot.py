"""Snapshots over ModelVM: full + incremental chains restore byte-identical memory and the
same layout (random host and simulated guest writes, layout changes between snapshots);
truncated, corrupted, oversized and mismatched files are refused and nothing is left half
restored; the ``snapshot-info`` command."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import pytest

import memslot
from guest_helpers import guest_write
from memslot.cli.main import main
from memslot.guest import GuestMemory, SnapshotError, read_info, verify_chain
from memslot.guest import snapshot as fmt

PAGE = 4096
MiB = 1 << 20


Image = dict[int, tuple[int, int, str, bytes]]  # uid -> (gpa, flags, label, contents)


def image(gm: GuestMemory) -> Image:
    return {r.uid: (r.gpa, r.flags, r.label, gm.read(r.gpa, r.size)) for r in gm.regions()}


def restored_image(paths: list[Path]) -> Image:
    with memslot.ModelVM() as other:
        gm = GuestMemory.restore(paths, other)
        try:
            assert not other.check()
            return image(gm)
        finally:
            gm.close()


def _random_writes(rng: random.Random, gm: GuestMemory, vm: memslot.ModelVM) -> None:
    regions = gm.regions()
    for _ in range(rng.randrange(1, 30)):
        region = rng.choice(regions)
        off = rng.randrange(region.size)
        n = min(rng.choice((1, 8, 100, PAGE, 3 * PAGE)), region.size - off)
        data = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)
        if region.log_dirty and not region.readonly and rng.random() < 0.5:
            guest_write(vm, region, region.gpa + off, data)  # a vCPU's write
        elif not region.log_dirty and not region.readonly and rng.random() < 0.3:
            region.mapping.buffer[off : off + n] = data  # unlogged guest write
        else:
            gm.write(region.gpa + off, data)  # device emulation


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_chain_restores_byte_identical(vm: memslot.ModelVM, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with GuestMemory(vm, manual_protect=seed % 2 == 0) as gm:
        gm.add_region(0, 64 * PAGE, log_dirty=True, label="ram")
        gm.add_region(MiB, 16 * PAGE, readonly=True, label="rom")
        gm.add_region(2 * MiB, 8 * PAGE, label="unlogged")
        gm.add_region(3 * MiB, 32 * PAGE, log_dirty=True, backing="memfd", label="shared")
        paths: list[Path] = []
        expected: list[Image] = []
        for step in range(7):
            _random_writes(rng, gm, vm)
            if step == 2:
                gm.add_region(8 * MiB, 4 * PAGE, log_dirty=True, label="hotplug")
                gm.write(8 * MiB + 5, b"new")
            if step == 3:
                gm.move_region(gm.region_by_label("shared"), 16 * MiB)
                gm.set_dirty_logging(gm.region_by_label("ram"), False)
            if step == 4:
                gm.set_dirty_logging(gm.region_by_label("ram"), True)
                gm.remove_region(gm.region_by_label("rom"))
            if step == 5:
                gm.set_readonly(gm.region_by_label("hotplug"), True)
            path = tmp_path / f"snap{step}"
            info = gm.snapshot(path, incremental=step > 0)
            assert info.kind == ("incremental" if step else "full") and info.sequence == step
            paths.append(path)
            expected.append(image(gm))
        for n in (1, 2, 4, 7):
            assert restored_image(paths[:n]) == expected[n - 1]
        # A restored GuestMemory continues the chain.
        with memslot.ModelVM() as other:
            again = GuestMemory.restore(paths, other)
            try:
                ram = again.region_by_label("ram")
                guest_write(other, ram, 0x2000, b"after restore")
                again.write(16 * MiB, b"dev")
                info = again.snapshot(tmp_path / "cont", incremental=True)
                tracked = [r for r in info.regions if not r.complete]
                assert [r.label for r in info.regions if r.complete] == ["unlogged"]
                assert sum(r.data_pages for r in tracked) == 2 and info.sequence == 7
                assert restored_image([*paths, tmp_path / "cont"]) == image(again)
            finally:
                again.close()


def test_incremental_writes_only_dirty_pages(vm: memslot.ModelVM, tmp_path: Path) -> None:
    with GuestMemory(vm) as gm:
        ram = gm.add_region(0, 4 * MiB, log_dirty=True, label="ram")
        gm.add_region(8 * MiB, 16 * PAGE, readonly=True, label="rom")  # guest cannot write
        for page in range(0, 1024, 3):
            gm.write(page * PAGE, b"base")
        full = gm.snapshot(tmp_path / "full")
        assert full.data_pages == 342 and full.zero_pages == 0
        assert full.regions[0].runs == 342 and full.regions[0].complete
        guest_write(vm, ram, 10 * PAGE, b"one")
        guest_write(vm, ram, 11 * PAGE, b"two")
        gm.write(3 * PAGE, bytes(4))  # back to a zero page
        inc = gm.snapshot(tmp_path / "inc", incremental=True)
        assert (inc.data_pages, inc.zero_pages) == (2, 1)
        assert inc.regions[0].runs == 2 and not inc.regions[0].complete
        assert not inc.regions[1].complete  # read-only: tracked through host writes alone
        assert inc.file_size < 4 * PAGE
        empty = gm.snapshot(tmp_path / "empty", incremental=True)
        assert empty.data_pages == empty.zero_pages == 0
        assert restored_image([tmp_path / "full", tmp_path / "inc", tmp_path / "empty"]) == \
            image(gm)


def test_incremental_needs_a_full_snapshot(vm: memslot.ModelVM, tmp_path: Path) -> None:
    with GuestMemory(vm) as gm:
        gm.add_region(0, PAGE)
        with pytest.raises(SnapshotError, match="full"):
            gm.snapshot(tmp_path / "x", incremental=True)


def test_failed_write_gives_bits_back(vm: memslot.ModelVM, tmp_path: Path) -> None:
    with GuestMemory(vm) as gm:
        ram = gm.add_region(0, 16 * PAGE, log_dirty=True)
        gm.snapshot(tmp_path / "full")
        guest_write(vm, ram, 5 * PAGE, b"5")
        with pytest.raises(SnapshotError, match="cannot write the snapshot: No such file"):
            gm.snapshot(tmp_path / "missing-dir" / "inc", incremental=True)
        assert list(tmp_path.iterdir()) == [tmp_path / "full"]  # no temporary file left
        inc = gm.snapshot(tmp_path / "inc", incremental=True)
        assert inc.data_pages == 1
        assert restored_image([tmp_path / "full", tmp_path / "inc"]) == image(gm)


# --- refusing bad files ----------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:
        ram = gm.add_region(0, 64 * PAGE, log_dirty=True, label="ram")
        gm.add_region(MiB, 4 * PAGE, log_dirty=True, label="dev")
        gm.write(0x1000, b"hello" * 100)
        gm.write(MiB, b"dev")
        gm.snapshot(tmp_path / "s0")
        guest_write(vm, ram, 0x5000, b"guest")
        gm.snapshot(tmp_path / "s1", incremental=True)
        gm.write(0x9000, b"x")
        gm.snapshot(tmp_path / "s2", incremental=True)
    return [tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"]


def _refused(paths: list[Path], match: str | None = None) -> SnapshotError:
    with memslot.ModelVM() as vm:
        with pytest.raises(SnapshotError, match=match) as info:
            GuestMemory.restore(paths, vm)
        assert vm.memslots() == []  # nothing half-restored
    return info.value


def _chunk_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(type, offset, payload length) of every chunk."""
    data = path.read_bytes()
    out = []
    pos = fmt.HEADER_SIZE
    while pos < len(data):
        kind, _, length, _ = fmt._CHUNK.unpack_from(data, pos)
        out.append((kind, pos, length))
        pos += fmt.CHUNK_HEADER_SIZE + length
    return out


#: The snapshot id of the headers the tests reuse: chunk CRCs are seeded with it.
_SEED = {"id": bytes(16)}


def _chunk(kind: int, payload: bytes, length: int | None = None) -> bytes:
    seed = zlib.crc32(_SEED["id"])
    head = fmt._CHUNK.pack(kind, 0, len(payload) if length is None else length,
                           zlib.crc32(payload, seed))
    return head + struct.pack("<I", zlib.crc32(head, seed)) + payload


def _header_of(path: Path) -> bytes:
    """The file's header; later ``_chunk`` calls belong to that file."""
    header = path.read_bytes()[: fmt.HEADER_SIZE]
    _SEED["id"] = fmt._HEADER.unpack_from(header)[4]
    return header


def test_truncated_files_are_refused(chain: list[Path], tmp_path: Path) -> None:
    data = chain[1].read_bytes()
    cuts = sorted({0, 7, 63, 64, 70, 87, 88, 100, len(data) // 2, len(data) - 25, len(data) - 1}
                  | {off + d for _, off, _ in _chunk_offsets(chain[1]) for d in (0, 5, 24, 30)})
    for cut in cuts:
        if cut >= len(data):
            continue
        bad = tmp_path / "cut"
        bad.write_bytes(data[:cut])
        err = _refused([chain[0], bad])
        assert "truncated" in str(err) or "magic" in str(err), (cut, err)


def test_corrupted_bytes_are_refused(chain: list[Path], tmp_path: Path) -> None:
    data = chain[0].read_bytes()
    rng = random.Random(5)
    offsets = set(range(0, 100)) | {rng.randrange(len(data)) for _ in range(150)}
    for _, off, length in _chunk_offsets(chain[0]):
        offsets |= set(range(off, off + 24)) | {off + 24 + length // 2, off + 24 + length - 1}
    for off in sorted(o for o in offsets if o < len(data)):
        bad = tmp_path / "flip"
        bad.write_bytes(data[:off] + bytes([data[off] ^ 0x40]) + data[off + 1 :])
        err = _refused([bad])
        assert any(w in str(err) for w in ("checksum", "magic", "truncated", "chunk")), (off, err)


def test_trailing_bytes_and_missing_end(chain: list[Path], tmp_path: Path) -> None:
    data = chain[0].read_bytes()
    _header_of(chain[0])
    bad = tmp_path / "trail"
    bad.write_bytes(data + b"\0")
    _refused([bad], "after the END chunk")
    end = _chunk_offsets(chain[0])[-1][1]
    bad.write_bytes(data[:end] + _chunk(fmt.CHUNK_END, fmt._END.pack(0, 0, 0)))
    _refused([bad], "END counts")


def test_other_versions_and_kinds(chain: list[Path], tmp_path: Path) -> None:
    data = bytearray(chain[0].read_bytes())
    for field, value, match in ((1, 3, "format version 3"), (2, 7, "unknown snapshot kind"),
                                (3, 65536, "size=16384"), (3, 6000, "page size")):
        fields = list(fmt._HEADER.unpack_from(data))
        fields[field] = value
        head = fmt._HEADER.pack(*fields)
        bad = tmp_path / "hdr"
        bad.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + data[fmt.HEADER_SIZE :])
        _refused([bad], match)
    bad.write_bytes(b"NOTASNAP" + bytes(100))
    _refused([bad], "bad magic")


def test_allocation_bombs_are_refused(chain: list[Path], tmp_path: Path) -> None:
    header = _header_of(chain[0])
    bad = tmp_path / "bomb"
    bad.write_bytes(header + _chunk(fmt.CHUNK_LAYOUT, b"{}", length=1 << 60))
    _refused([bad], "more than the format allows")
    bad.write_bytes(header + _chunk(fmt.CHUNK_DATA, b"", length=1 << 40))
    _refused([bad], "more than the format allows")

    def layout(**changes: object) -> bytes:
        region = {"uid": 0, "slot": 0, "gpa": 0, "size": PAGE, "flags": 0, "label": "",
                  "backing": "anon", "complete": True, "hva": 0, "align": None, "path": None}
        region.update(changes)
        return _chunk(fmt.CHUNK_LAYOUT, json.dumps({"next_uid": 1, "regions": [region]}).encode())

    end = _chunk(fmt.CHUNK_END, fmt._END.pack(1, 0, 0))
    for changes, match in (({"size": 1 << 50}, "size="), ({"gpa": 1 << 64}, "gpa="),
                           ({"size": 100}, "size="), ({"backing": "x"}, "backing"),
                           ({"slot": 40000}, "slot="), ({"align": 3 * PAGE}, "power of two"),
                           ({"complete": 1}, "complete")):
        bad.write_bytes(header + layout(**changes) + end)
        _refused([bad], match)
    # A DATA chunk for pages past its region, or whose bitmap and count disagree.
    good_layout = layout()
    for first, span, count, match in ((0, 2, 0, "outside region"), (1, 1, 0, "outside region"),
                                      (0, 1, 1, "payload length"), (0, 1, 5, "payload length")):
        body = fmt._PAGES.pack(0, 0, first, span, count) + bytes(8)
        bad.write_bytes(header + good_layout + _chunk(fmt.CHUNK_DATA, body) + end)
        _refused([bad], match)
    body = fmt._PAGES.pack(0, 0, 0, 1, 0) + (1).to_bytes(8, "little")
    bad.write_bytes(header + good_layout + _chunk(fmt.CHUNK_ZERO, body) + end)
    _refused([bad], "bitmap has 1 pages")
    bad.write_bytes(header + _chunk(fmt.CHUNK_DATA, bytes(40)) + end)
    _refused([bad], "before the layout")
    bad.write_bytes(header + good_layout + good_layout + end)
    _refused([bad], "second layout")
    bad.write_bytes(header + _chunk(fmt.CHUNK_LAYOUT, b"\xff") + end)
    _refused([bad], "JSON")


def test_mismatched_chains_are_refused(chain: list[Path], tmp_path: Path) -> None:
    s0, s1, s2 = chain
    _refused([s1], "starts with a full snapshot")
    _refused([s0, s2], "wrong order or a file from another chain")
    _refused([s0, s2, s1], "wrong order")
    _refused([s0, s1, s0], "a full snapshot inside a chain")
    _refused([], "no snapshot")
    _refused([tmp_path / "absent"], "cannot open")
    with memslot.ModelVM() as vm, GuestMemory(vm) as gm:  # another chain
        gm.add_region(0, PAGE)
        gm.snapshot(tmp_path / "other0")
        gm.snapshot(tmp_path / "other1", incremental=True)
    _refused([s0, tmp_path / "other1"], "another chain")
    verify_chain([read_info(p) for p in chain])


def test_region_without_base_is_refused(chain: list[Path]) -> None:
    infos = [read_info(p) for p in chain]
    infos[1].regions[0].uid = 99  # a region that first appears without complete contents
    with pytest.raises(SnapshotError, match="missing base"):
        verify_chain(infos)


def test_failed_restore_removes_what_it_built(chain: list[Path]) -> None:
    with memslot.ModelVM() as vm:
        vm.set_user_memory_region(5, 0, MiB, PAGE, 0x7F0000000000)  # where "dev" goes
        with pytest.raises(memslot.KvmError):
            GuestMemory.restore(chain, vm)
        assert [s.id for s in vm.memslots()] == [5]


# --- the command line ------------------------------------------------------------------------


def test_snapshot_info_cli(chain: list[Path], capsys: pytest.CaptureFixture[str],
                           tmp_path: Path) -> None:
    assert main(["snapshot-info", str(chain[1])]) == 0
    out = capsys.readouterr().out
    assert "incremental #1" in out and "ram" in out and "LOG_DIRTY_PAGES" in out
    assert "dirty only" in out and "1 data pages" in out
    assert main(["snapshot-info", "--json", *map(str, chain)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chain"] == {"ok": True, "error": None}
    assert [s["kind"] for s in report["snapshots"]] == ["full", "incremental", "incremental"]
    assert report["snapshots"][0]["regions"][0]["label"] == "ram"
    assert report["snapshots"][2]["data_pages"] == 1
    assert main(["snapshot-info", str(chain[0]), str(chain[2])]) == 2
    captured = capsys.readouterr()
    assert "chain: BROKEN" in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    bad.write_bytes(chain[0].read_bytes()[:-3])
    assert main(["snapshot-info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memslot: error:") and "truncated" in err and "\n" not in err

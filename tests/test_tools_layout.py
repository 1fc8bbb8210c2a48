"""``memslot layout``: the address map as SVG and PNG, readable for 1 slot and 30,000."""

from __future__ import annotations

import io
import itertools
import json
import xml.etree.ElementTree as ET
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from memslot.cli.main import main
from memslot.profile import PRESETS
from memslot.tools.layout import (
    FOUR_GIB,
    MAX_ROWS,
    Segment,
    address_map,
    condense,
    layout,
    to_svg,
)
from memslot.tools.session import load_trace, replay_model

ROOT = Path(__file__).resolve().parent.parent
PC4G = str(ROOT / "examples" / "traces" / "qemu72-pc-4g.trace")
SVG = "{http://www.w3.org/2000/svg}"


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def layout_json(*args: str) -> dict[str, Any]:
    code, out, err = cli("layout", "--json", *args)
    assert code == 0 and err == "", err
    data: dict[str, Any] = json.loads(out)
    return data


def svg_texts(path: Path) -> tuple[ET.Element, list[str]]:
    root = ET.parse(path).getroot()
    return root, [t.text or "" for t in root.iter(f"{SVG}text")]


def write_trace(path: Path, n: int) -> None:
    """n slots: 2 GiB of RAM at 0, then n-1 small slots above 4 GiB, some read-only or
    dirty-logged, 4 or 8 KiB each every 16 KiB."""
    lines = []
    for i in range(n):
        gpa = 0 if i == 0 else FOUR_GIB + i * 0x4000
        size = 0x80000000 if i == 0 else 0x1000 * (1 + (i % 3 == 0))
        flags = 2 if i % 997 == 5 else (1 if i % 1500 == 7 else 0)
        lines.append(json.dumps({"slot": i, "flags": flags, "guest_phys_addr": hex(gpa),
                                 "memory_size": hex(size),
                                 "userspace_addr": hex(0x7F0000000000 + gpa)}))
    path.write_text("\n".join(lines) + "\n")


def test_one_slot_svg_and_png(tmp_path: Path) -> None:
    trace = tmp_path / "one.jsonl"
    write_trace(trace, 1)
    data = layout_json(str(trace), "-o", str(tmp_path / "one.svg"), "--profile",
                       "x86_64-shadow")
    (rows,) = data["address_spaces"]
    assert [r["kind"] for r in rows] == ["slot"] and rows[0]["size"] == 0x80000000
    root, texts = svg_texts(tmp_path / "one.svg")
    assert root.get("width") == str(data["width"]) and root.get("height") == str(data["height"])
    assert "slot 0  2.0 GiB  RW" in texts
    assert any("all below 4 GiB" in t for t in texts)
    code, out, _ = cli("layout", str(trace), "-o", str(tmp_path / "one.png"), "--profile",
                       "x86_64-shadow")
    assert code == 0 and "1 slot in 1 row" in out
    with Image.open(tmp_path / "one.png") as im:
        im.load()
        assert im.format == "PNG" and im.size == (data["width"], data["height"])
        # the slot band is drawn in the slot colour
        y = int(rows[0]["y"] + rows[0]["height"] / 2)
        assert im.getpixel((250, y)) == (0x4C, 0x78, 0xA8)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("layout30k")
    trace = tmp / "30k.jsonl"
    write_trace(trace, 30000)
    png = tmp / "30k.png"
    data = layout_json(str(trace), "-o", str(png), "--profile", "x86_64-shadow")
    return {"trace": trace, "png": png, "data": data, "tmp": tmp}


def test_30000_slots_png(big: dict[str, Any]) -> None:
    data = big["data"]
    (rows,) = data["address_spaces"]
    assert len(rows) <= MAX_ROWS + 2
    assert sum(1 if r["kind"] == "slot" else r.get("slots", 0) for r in rows) == 30000
    assert sum(r.get("readonly", 0) for r in rows) == sum(
        1 for i in range(30000) if i % 997 == 5)
    # rows tile the address range in order, each tall enough for its label
    for a, b in itertools.pairwise(rows):
        assert a["end"] == b["start"] and b["y"] == pytest.approx(a["y"] + a["height"])
    assert min(r["height"] for r in rows) >= 14
    with Image.open(big["png"]) as im:
        im.load()
        assert im.size == (data["width"], data["height"])
        assert im.size[0] >= 900 and im.size[1] < 8000


def test_30000_slots_svg(big: dict[str, Any]) -> None:
    ops, _ = load_trace(str(big["trace"]))
    run = replay_model(ops, PRESETS["x86_64-shadow"])
    scene = layout(run.vm, "30k")
    run.close()
    path = big["tmp"] / "30k.svg"
    path.write_text(to_svg(scene))
    root, texts = svg_texts(path)
    assert root.get("height") == str(scene.height) == str(big["data"]["height"])
    assert "4 GiB" in texts
    assert any(t.startswith("484 slots (ids 1-484)") for t in texts)


def test_4gib_boundary_holes_and_flags(tmp_path: Path) -> None:
    data = layout_json(PC4G, "-o", str(tmp_path / "m.svg"))
    rows = data["address_spaces"][0]
    kinds = [r["kind"] for r in rows]
    assert "hole" in kinds
    # slot 4 (VGA VRAM) logs dirty pages, slot 2 (BIOS) is read-only
    assert any(r.get("flag_names") == "LOG_DIRTY_PAGES" for r in rows)
    assert any(r.get("flag_names") == "READONLY" for r in rows)
    assert data["address_spaces"][1] == []  # x86_64: SMM address space, empty
    _, texts = svg_texts(tmp_path / "m.svg")
    assert "4 GiB" in texts and "address space 1: no slots" in texts
    # the empty address space takes no column: the picture is one column wide
    assert data["width"] < 1000
    assert any("LOG_DIRTY" in t for t in texts) and any("READONLY" in t for t in texts)
    assert "0x100000000" in texts


def test_at_draws_an_intermediate_layout() -> None:
    data = layout_json(PC4G, "--at", "1")
    assert data["after"] == 1 and len(data["address_spaces"][0]) == 1


def test_condense_keeps_order_and_the_largest() -> None:
    rows = [Segment("slot", i * 0x2000, i * 0x2000 + 0x1000, (0, i)) for i in range(1000)]
    big_slot = Segment("slot", 1000 * 0x2000, 1000 * 0x2000 + (1 << 30), (0, 1000))
    rows.append(big_slot)
    out = condense(rows, 32)
    assert len(out) <= 34 and big_slot in out
    assert out[0].start == 0 and out[-1].end == big_slot.end
    assert sum(1 if s.kind == "slot" else s.slots for s in out) == 1001
    assert all(0 <= c <= 1 for s in out for c in s.coverage)


def test_address_map_holes() -> None:
    ops, _ = load_trace(PC4G)
    run = replay_model(ops, PRESETS["x86_64"])
    (space0, space1) = address_map(run.vm)
    run.close()
    assert space1 == []
    for a, b in itertools.pairwise(space0):
        assert a.end == b.start and not (a.kind == b.kind == "hole")


@pytest.mark.parametrize("args, message", [
    ((PC4G,), "needs -o OUT.svg or -o OUT.png"),
    ((PC4G, "-o", "map.gif"), "must end in .svg or .png"),
    ((PC4G, "-o", "x.svg", "--max-rows", "2"), "--max-rows"),
    (("/nonexistent", "-o", "x.svg"), "no such file"),
    ((PC4G, "-o", "x.svg", "--at", "99"), "--at 99"),
])
def test_bad_input(args: tuple[str, ...], message: str, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("layout", *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []  # nothing written

"""The guest-physical address map of a VM, per address space, as a picture.

:func:`address_map` lists slots and the holes between them in gpa order; :func:`condense`
keeps the map readable for any number of slots (the largest slots stay single rows, runs of
the others become groups of slots drawn with their coverage); :func:`build_scene` lays rows
out log-scaled (a row's height grows with log2 of its size, so a 4 KiB slot and an 8 TiB one
are both legible) and returns drawing primitives that :func:`to_svg` and :func:`to_png`
render identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from ..backends.model import ModelVM
from ..constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, flag_names
from ..units import human_bytes, plural

FOUR_GIB = 1 << 32
#: At most this many rows per address space; more segments are condensed into groups.
MAX_ROWS = 64
#: The most rows per address space a caller may ask for (taller pictures are not readable).
MAX_ROWS_LIMIT = 2048

# Geometry (pixels).
MARGIN = 20
TITLE_H = 78
COL_W = 720
EMPTY_COL_W = 280
AXIS_W = 150
BAND_W = 170
BOTTOM = 40
FONT = 12
SMALL = 11

# Colours.
RAM = "#4c78a8"
READONLY = "#f58518"
LOGGING = "#2ca02c"
GROUP = "#d8c4e6"
GROUP_FILL = "#7b4f9d"
HOLE = "#f2f2f2"
HATCH = "#c8c8c8"
BOUNDARY = "#d62728"
INK = "#222222"
MUTED = "#666666"
OUTLINE = "#ffffff"


@dataclass
class Segment:
    """A row of the map: one slot, one hole, or a group of consecutive slots and holes."""

    kind: str  # "slot", "hole" or "group"
    start: int  # gpa, bytes
    end: int  # first gpa past it
    slot: tuple[int, int] | None = None  # (as_id, id) of a slot
    flags: int = 0
    userspace_addr: int = 0
    slots: int = 0  # slots in a group
    first_id: int = 0
    last_id: int = 0
    covered: int = 0  # bytes of a group inside slots
    readonly: int = 0  # read-only slots in a group
    logging: int = 0  # dirty-logged slots in a group
    coverage: list[float] = field(default_factory=list)  # per bin, for groups

    @property
    def size(self) -> int:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "start": self.start, "end": self.end,
                               "size": self.size}
        if self.kind == "slot":
            assert self.slot is not None
            out |= {"as_id": self.slot[0], "id": self.slot[1], "flags": self.flags,
                    "flag_names": flag_names(self.flags),
                    "userspace_addr": self.userspace_addr}
        elif self.kind == "group":
            out |= {"slots": self.slots, "first_id": self.first_id, "last_id": self.last_id,
                    "covered": self.covered, "readonly": self.readonly,
                    "logging": self.logging}
        return out


def clip(rows: list[Segment], start: int, end: int) -> list[Segment]:
    """The segments that meet ``[start, end)``; holes are cut to it, slots and groups stay
    whole (their labels name them whole)."""
    out = []
    for seg in rows:
        if seg.end <= start or seg.start >= end:
            continue
        if seg.kind == "hole":
            seg = Segment("hole", max(seg.start, start), min(seg.end, end))
        out.append(seg)
    return out


def address_map(vm: ModelVM) -> list[list[Segment]]:
    """Per address space, slots and holes in gpa order (a hole from 0 when the first slot
    starts above 0; none after the last slot)."""
    shift = vm.profile.page_shift
    out = []
    for as_id in range(vm.nr_address_spaces):
        rows: list[Segment] = []
        pos = 0
        for s in vm.memslots(as_id):
            start, end = s.base_gfn << shift, (s.base_gfn + s.npages) << shift
            if start > pos:
                rows.append(Segment("hole", pos, start))
            rows.append(Segment("slot", start, end, (s.as_id, s.id), s.flags, s.userspace_addr))
            pos = end
        out.append(rows)
    return out


def _group(segs: list[Segment], bins: int = 48) -> Segment:
    start, end = segs[0].start, segs[-1].end
    slots = [s for s in segs if s.kind == "slot"]
    g = Segment("group", start, end, slots=len(slots),
                first_id=min((s.slot[1] for s in slots if s.slot), default=0),
                last_id=max((s.slot[1] for s in slots if s.slot), default=0),
                covered=sum(s.size for s in slots),
                readonly=sum(1 for s in slots if s.flags & KVM_MEM_READONLY),
                logging=sum(1 for s in slots if s.flags & KVM_MEM_LOG_DIRTY_PAGES))
    span = end - start
    cover = [0.0] * bins
    for s in slots:
        a = (s.start - start) * bins / span
        b = (s.end - start) * bins / span
        i = int(a)
        while i < bins and i < b:
            cover[i] += min(b, i + 1) - max(a, i)
            i += 1
    g.coverage = [min(c, 1.0) for c in cover]
    return g


def condense(rows: list[Segment], max_rows: int = MAX_ROWS) -> list[Segment]:
    """At most about ``max_rows`` rows: the largest slots (those strictly larger than the
    rest) and the segment holding the 4 GiB boundary stay; runs between them become groups of
    equal slot counts."""
    if len(rows) <= max_rows:
        return rows
    sizes = sorted((s.size for s in rows if s.kind == "slot"), reverse=True)
    budget = max_rows // 4
    cut = sizes[budget] if len(sizes) > budget else -1
    keep = {i for i, s in enumerate(rows) if s.kind == "slot" and s.size > cut}
    keep |= {i for i, s in enumerate(rows) if s.start < FOUR_GIB < s.end}
    runs: list[tuple[bool, list[Segment]]] = []
    for i, s in enumerate(rows):
        kept = i in keep
        if runs and not kept and not runs[-1][0]:
            runs[-1][1].append(s)
        else:
            runs.append((kept, [s]))
    loose = sum(len(r) for k, r in runs if not k)
    room = max(len(runs), max_rows - len(keep))
    out: list[Segment] = []
    for kept, run in runs:
        if kept or len(run) <= 2:
            out.extend(run)
            continue
        chunks = max(1, min(len(run) // 2, round(room * len(run) / loose)))
        step = -(-len(run) // chunks)
        for k in range(0, len(run), step):
            part = run[k:k + step]
            out.extend(part if len(part) <= 2 and part[0].kind == "hole" else [_group(part)])
    return out


# -- the scene ---------------------------------------------------------------------------------

@dataclass
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str
    stroke: str | None = None


@dataclass
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    color: str
    width: float = 1.0
    dash: bool = False


@dataclass
class Text:
    x: float
    y: float  # baseline
    text: str
    size: int = FONT
    color: str = INK
    anchor: str = "start"  # "start" or "end"
    bold: bool = False


Shape = Rect | Line | Text


@dataclass
class Scene:
    width: int
    height: int
    shapes: list[Shape]
    rows: list[list[dict[str, Any]]]  # per address space: row dicts with y and height


def row_height(seg: Segment, page_size: int) -> float:
    """Log-scaled: 22 px for one page, +2.5 px per doubling; holes at 60%, groups >= 40."""
    pages = max(seg.size // page_size, 1)
    h = 22 + 2.5 * math.log2(pages)
    if seg.kind == "hole":
        return max(14.0, round(h * 0.6))
    if seg.kind == "group":
        return max(40.0, round(h))
    return float(round(h))


def _hatch(x: float, y: float, w: float, h: float, step: float = 9) -> list[Line]:
    """45-degree hatch lines clipped to the rectangle."""
    lines = []
    k = -h
    while k < w:
        # the line x' = x + k + t, y' = y + h - t for t in [0, h], clipped to [x, x + w]
        t0 = max(0.0, -k)
        t1 = min(h, w - k)
        if t1 > t0:
            lines.append(Line(x + k + t0, y + h - t0, x + k + t1, y + h - t1, HATCH, 1.0))
        k += step
    return lines


def _flags_text(flags: int) -> str:
    parts = ["READONLY" if flags & KVM_MEM_READONLY else "RW"]
    if flags & KVM_MEM_LOG_DIRTY_PAGES:
        parts.append("LOG_DIRTY")
    return " ".join(parts)


def build_scene(
    maps: list[list[Segment]], page_size: int, title: str, subtitle: str = ""
) -> Scene:
    """Lay the condensed maps out, one column per address space."""
    shapes: list[Shape] = []
    # An address space without slots gets no column, only a word under the title.
    columns = [col for col, segs in enumerate(maps) if segs] or [0]
    empty = [col for col, segs in enumerate(maps) if not segs and col not in columns]
    widths = [COL_W if maps and maps[col] else EMPTY_COL_W for col in columns]
    width = max(MARGIN * 2 + sum(widths), 900)
    shapes.append(Text(MARGIN, 26, title, 16, INK, bold=True))
    if subtitle:
        shapes.append(Text(MARGIN, 46, subtitle, FONT, MUTED))
    lx = MARGIN
    for fill, label in ((RAM, "slot"), (READONLY, "read-only slot"), (GROUP, "group of slots"),
                        (HOLE, "hole (no slot)")):
        shapes.append(Rect(lx, 56, 14, 12, fill, "#999999"))
        if fill == GROUP:  # as drawn: the group's band with its slots' coverage in it
            shapes.append(Rect(lx + 2, 58, 7, 8, GROUP_FILL))
        shapes.append(Text(lx + 18, 66, label, SMALL, INK))
        lx += 30 + 7 * len(label)
    shapes.append(Rect(lx, 56, 5, 12, LOGGING))
    shapes.append(Text(lx + 10, 66, "dirty logging", SMALL, INK))
    lx += 110
    shapes.append(Line(lx, 62, lx + 24, 62, BOUNDARY, 1.5, True))
    shapes.append(Text(lx + 30, 66, "4 GiB boundary", SMALL, INK))

    if empty:
        lx += 120
        names = ", ".join(str(col) for col in empty)
        shapes.append(Text(lx, 66, f"address space {names}: no slots", SMALL, MUTED))
    all_rows: list[list[dict[str, Any]]] = [[] for _ in maps]
    bottom = TITLE_H
    for n, col in enumerate(columns):
        segs = maps[col] if maps else []
        x0 = MARGIN + sum(widths[:n])
        bx = x0 + AXIS_W
        y = TITLE_H + 24.0
        nslots = sum(1 if s.kind == "slot" else s.slots for s in segs)
        where = ""
        first = next((s.start for s in segs if s.kind != "hole"), 0)
        if segs and segs[-1].end < FOUR_GIB:
            where = ", all below 4 GiB"
        elif segs and first >= FOUR_GIB:
            where = ", all above 4 GiB"
        shapes.append(Text(x0, TITLE_H + 10,
                           f"address space {col}: {plural(nslots, 'slot')}{where}",
                           13, INK, bold=True))
        rows: list[dict[str, Any]] = []
        if not segs:
            shapes.append(Text(bx, y + 14, "(no slots)", FONT, MUTED))
            y += 24
        for seg in segs:
            h = row_height(seg, page_size)
            rows.append({**seg.as_dict(), "y": y, "height": h})
            shapes.extend(_draw_row(seg, x0, bx, y, h))
            y += h
        if segs:
            shapes.append(Text(bx - 8, y + 4, f"{segs[-1].end:#x}", SMALL, MUTED, "end"))
            shapes.extend(_boundary(segs, rows, x0, bx))
        if maps:
            all_rows[col] = rows
        bottom = max(bottom, int(y))
    height = bottom + BOTTOM
    return Scene(width, height, shapes, all_rows)


def _draw_row(seg: Segment, x0: float, bx: float, y: float, h: float) -> list[Shape]:
    out: list[Shape] = []
    lx = bx + BAND_W + 10
    out.append(Text(bx - 8, y + 4, f"{seg.start:#x}", SMALL, MUTED, "end"))
    out.append(Line(bx - 4, y, bx, y, MUTED))
    two = h >= 36
    first = y + (h / 2 - 2 if two else h / 2 + 4)
    if seg.kind == "hole":
        out.append(Rect(bx, y, BAND_W, h, HOLE))
        out.extend(_hatch(bx, y, BAND_W, h))
        out.append(Text(lx, y + h / 2 + 4, f"hole  {human_bytes(seg.size)}", SMALL, MUTED))
        return out
    if seg.kind == "slot":
        assert seg.slot is not None
        fill = READONLY if seg.flags & KVM_MEM_READONLY else RAM
        out.append(Rect(bx, y, BAND_W, h, fill, OUTLINE))
        if seg.flags & KVM_MEM_LOG_DIRTY_PAGES:
            out.append(Rect(bx, y + 1, 8, h - 2, LOGGING))
        slot_id = seg.slot[1]
        out.append(Text(lx, first, f"slot {slot_id}  {human_bytes(seg.size)}  "
                        f"{_flags_text(seg.flags)}", FONT, INK, bold=True))
        if two:
            out.append(Text(lx, first + 16, f"{seg.start:#x}-{seg.end - 1:#x}  "
                            f"ua {seg.userspace_addr:#x}", SMALL, MUTED))
        return out
    # a group
    out.append(Rect(bx, y, BAND_W, h, GROUP, OUTLINE))
    bins = len(seg.coverage)
    inner = h - 4
    for i, c in enumerate(seg.coverage):
        if c > 0:
            out.append(Rect(bx + 2, y + 2 + inner * i / bins, max(1.0, (BAND_W - 4) * c),
                            max(inner / bins, 0.5), GROUP_FILL))
    extra = []
    if seg.readonly:
        extra.append(f"{seg.readonly} read-only")
    if seg.logging:
        extra.append(f"{seg.logging} dirty-logged")
    out.append(Text(lx, first, f"{seg.slots} slots (ids {seg.first_id}-{seg.last_id}), "
                    f"{human_bytes(seg.covered)} in {human_bytes(seg.size)}", FONT, INK, bold=True))
    out.append(Text(lx, first + 16, f"{seg.start:#x}-{seg.end - 1:#x}"
                    + (f"  {', '.join(extra)}" if extra else ""), SMALL, MUTED))
    return out


def _boundary(segs: list[Segment], rows: list[dict[str, Any]], x0: float,
              bx: float) -> list[Shape]:
    """The 4 GiB line, where the map reaches it (at a row edge, or inside a row in
    proportion to the address)."""
    for seg, row in zip(segs, rows, strict=True):
        if seg.start <= FOUR_GIB < seg.end or (seg.end == FOUR_GIB and seg is segs[-1]):
            frac = (FOUR_GIB - seg.start) / seg.size
            y = row["y"] + row["height"] * frac
            right = x0 + COL_W - 30
            return [Line(bx - 2, y, right, y, BOUNDARY, 1.5, True),
                    Text(right, y - 3, "4 GiB", SMALL, BOUNDARY, "end", bold=True)]
    return []


# -- renderers ---------------------------------------------------------------------------------

def to_svg(scene: Scene) -> str:
    """The scene as a standalone SVG document."""
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{scene.width}" '
        f'height="{scene.height}" viewBox="0 0 {scene.width} {scene.height}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
        f'<rect x="0" y="0" width="{scene.width}" height="{scene.height}" fill="#ffffff"/>',
    ]
    for s in scene.shapes:
        if isinstance(s, Rect):
            stroke = f' stroke="{s.stroke}" stroke-width="0.5"' if s.stroke else ""
            out.append(f'<rect x="{s.x:.1f}" y="{s.y:.1f}" width="{s.w:.1f}" '
                       f'height="{s.h:.2f}" fill="{s.fill}"{stroke}/>')
        elif isinstance(s, Line):
            dash = ' stroke-dasharray="6 4"' if s.dash else ""
            out.append(f'<line x1="{s.x1:.1f}" y1="{s.y1:.1f}" x2="{s.x2:.1f}" '
                       f'y2="{s.y2:.1f}" stroke="{s.color}" stroke-width="{s.width}"{dash}/>')
        else:
            weight = ' font-weight="bold"' if s.bold else ""
            anchor = ' text-anchor="end"' if s.anchor == "end" else ""
            out.append(f'<text x="{s.x:.1f}" y="{s.y:.1f}" font-size="{s.size}" '
                       f'fill="{s.color}"{anchor}{weight}>{escape(s.text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _font(size: int, bold: bool) -> Any:
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for path in (name, f"/usr/share/fonts/truetype/dejavu/{name}"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def to_png(scene: Scene, path: str) -> None:
    """Render the scene with Pillow and write a PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.width, scene.height), "#ffffff")
    draw = ImageDraw.Draw(image)
    fonts: dict[tuple[int, bool], Any] = {}
    for s in scene.shapes:
        if isinstance(s, Rect):
            x1, y1 = s.x + max(s.w, 1) - 1, s.y + max(s.h, 1) - 1
            draw.rectangle((s.x, s.y, x1, y1), fill=s.fill,
                           outline=s.stroke if s.stroke and s.h >= 3 else None)
        elif isinstance(s, Line):
            if s.dash:
                _dashed(draw, s)
            else:
                draw.line((s.x1, s.y1, s.x2, s.y2), fill=s.color, width=max(1, round(s.width)))
        else:
            key = (s.size, s.bold)
            if key not in fonts:
                fonts[key] = _font(s.size, s.bold)
            anchor = "rs" if s.anchor == "end" else "ls"
            draw.text((s.x, s.y), s.text, fill=s.color, font=fonts[key], anchor=anchor)
    image.save(path, "PNG", optimize=True)


def _dashed(draw: Any, s: Line, on: float = 6, off: float = 4) -> None:
    length = math.hypot(s.x2 - s.x1, s.y2 - s.y1)
    if length == 0:
        return
    dx, dy = (s.x2 - s.x1) / length, (s.y2 - s.y1) / length
    pos = 0.0
    while pos < length:
        end = min(pos + on, length)
        draw.line((s.x1 + dx * pos, s.y1 + dy * pos, s.x1 + dx * end, s.y1 + dy * end),
                  fill=s.color, width=max(1, round(s.width)))
        pos = end + off


def layout(vm: ModelVM, title: str, subtitle: str = "", max_rows: int = MAX_ROWS,
           gpa_range: tuple[int, int] | None = None) -> Scene:
    """The scene of ``vm``'s current address map (only ``[start, end)`` of it when
    ``gpa_range`` is given)."""
    maps = address_map(vm)
    if gpa_range is not None:
        maps = [clip(rows, *gpa_range) for rows in maps]
    maps = [condense(rows, max_rows) for rows in maps]
    return build_scene(maps, vm.profile.page_size, title, subtitle)

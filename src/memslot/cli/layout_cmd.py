"""``memslot layout FILE -o map.svg|map.png``: draw the guest-physical address map that a
trace leaves (or reaches at ``--at N``), one column per address space."""

from __future__ import annotations

import argparse
import os

from ..tools.layout import MAX_ROWS, MAX_ROWS_LIMIT, Scene, layout, to_png, to_svg
from ..tools.session import replay_model
from ..units import plural
from . import render
from .backends import profile_label, resolve_profile
from .common import EXIT_OK, Command, die, emit_json
from .filters import gpa_range
from .outfile import write_atomic
from .trace_input import Input, add_input_options, at_or_die, check_at


def configure(p: argparse.ArgumentParser) -> None:
    add_input_options(p)
    p.add_argument("-o", "--output", metavar="OUT",
                   help="picture to write: OUT.svg or OUT.png (required unless --json)")
    p.add_argument("--profile", default="x86_64", metavar="P",
                   help="host profile (default x86_64; 'detect' for the running kernel)")
    p.add_argument("--at", metavar="N",
                   help="draw the layout after operation N (1-based; 'L37': after line 37)")
    p.add_argument("--gpa-range", metavar="START-END|START+SIZE",
                   help="draw only this guest-physical range (zoom; numbers in decimal, 0x hex "
                        "or 4K/2M/1G)")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, metavar="N",
                   help=f"rows per address space before slots are grouped (default {MAX_ROWS}, "
                        f"at most {MAX_ROWS_LIMIT})")
    p.add_argument("--title", help="picture title (default: the file name)")
    p.add_argument("--json", action="store_true",
                   help="print the rows drawn (kind, addresses, position) as JSON")


def _write(scene: Scene, path: str) -> None:
    kind = os.path.splitext(path)[1].lower()

    def fill(tmp: str) -> None:
        if kind == ".svg":
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(to_svg(scene))
        else:
            to_png(scene, tmp)

    try:
        write_atomic(path, fill, kind)
    except ImportError:
        die("PNG output needs Pillow (pip install pillow); SVG works without it")


def run(args: argparse.Namespace) -> int:
    if args.output is None and not args.json:
        die("layout needs -o OUT.svg or -o OUT.png (or --json)")
    if args.output is not None:
        if os.path.splitext(args.output)[1].lower() not in (".svg", ".png"):
            die(f"{args.output}: the picture must end in .svg or .png")
        if os.path.isdir(args.output):
            die(f"{args.output}: is a directory")
    if not 4 <= args.max_rows <= MAX_ROWS_LIMIT:
        die(f"--max-rows {args.max_rows}: from 4 to {MAX_ROWS_LIMIT} rows per address space "
            "(more is not readable; zoom with --gpa-range instead)")
    zoom = gpa_range(args.gpa_range, "--gpa-range") if args.gpa_range else None
    profile = resolve_profile(args.profile)
    at = at_or_die(args.at)
    source = Input(args)
    ops = iter(source)
    with render.progress(source.size() or 0, "replaying", not (args.json or source.streaming),
                         unit="bytes") as update:
        run_ = replay_model(render.tracked(at.take(ops) if at is not None else ops,
                                           lambda: update(source.position())), profile)
    try:
        applied = run_.applied
        total = applied + (sum(1 for _ in ops) + at.overshoot if at is not None else 0)
        check_at(at)
        slots = sum(len(run_.vm.memslots(i)) for i in range(run_.vm.nr_address_spaces))
        title = args.title or ("guest-physical address map: "
                               + ("standard input" if source.path == "-"
                                  else os.path.basename(source.path)))
        shown = "" if zoom is None else f", {zoom[0]:#x}-{zoom[1]:#x}"
        subtitle = (f"profile {profile_label(profile)}, after {applied} of "
                    f"{plural(total, 'operation')}, {plural(slots, 'slot')}{shown}; row height "
                    "log-scaled by size")
        scene = layout(run_.vm, title, subtitle, args.max_rows, zoom)
    finally:
        run_.close()
    if args.output is not None:
        _write(scene, args.output)
    notice = source.notice(total)
    if args.json:
        emit_json({"file": source.path, "profile": profile.name, "after": applied,
                   "output": args.output, "width": scene.width, "height": scene.height,
                   "address_spaces": scene.rows, "malformed_lines": source.malformed,
                   "notice": notice})
    else:
        rows = sum(len(r) for r in scene.rows)
        print(f"{args.output}: {scene.width}x{scene.height}, {plural(slots, 'slot')} in "
              f"{plural(rows, 'row')}")
        if notice:
            render.line(notice, "yellow")
        for e in source.malformed:
            render.line(f"skipped malformed line: {e}", "yellow")
    return EXIT_OK


COMMAND = Command("layout", "draw the guest-physical address map (slots, holes, flags, the "
                  "4 GiB boundary) as SVG or PNG", configure, run)

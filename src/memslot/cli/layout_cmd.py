"""``memslot layout FILE -o map.svg|map.png``: draw the guest-physical address map that a
trace leaves (or reaches at ``--at N``), one column per address space."""

from __future__ import annotations

import argparse
import os
import tempfile

from ..tools.layout import MAX_ROWS, Scene, layout, to_png, to_svg
from ..tools.session import replay_model
from ..trace.reader import FORMATS
from . import render
from .backends import resolve_profile
from .common import EXIT_OK, Command, die, emit_json
from .trace_input import at_or_die, read_trace_or_die


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="trace (JSON lines or QEMU log, '-' for stdin)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="picture to write: OUT.svg or OUT.png (required unless --json)")
    p.add_argument("--profile", default="x86_64", metavar="P",
                   help="host profile (default x86_64; 'detect' for the running kernel)")
    p.add_argument("--at", metavar="N",
                   help="draw the layout after operation N (1-based; 'L37': after line 37)")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, metavar="N",
                   help=f"rows per address space before slots are grouped (default {MAX_ROWS})")
    p.add_argument("--title", help="picture title (default: the file name)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format")
    p.add_argument("--keep-going", action="store_true",
                   help="skip malformed lines (reported) instead of refusing the whole file")
    p.add_argument("--json", action="store_true",
                   help="print the rows drawn (kind, addresses, position) as JSON")


def _write(scene: Scene, path: str) -> None:
    kind = os.path.splitext(path)[1].lower()
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".memslot-layout-", suffix=kind, dir=directory)
    except OSError as exc:
        die(f"{path}: cannot write: {exc.strerror or exc}")
    try:
        os.close(fd)
        if kind == ".svg":
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(to_svg(scene))
        else:
            to_png(scene, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        die(f"{path}: cannot write: {exc.strerror or exc}")
    except ImportError:
        os.unlink(tmp)
        die("PNG output needs Pillow (pip install pillow); SVG works without it")


def run(args: argparse.Namespace) -> int:
    if args.output is None and not args.json:
        die("layout needs -o OUT.svg or -o OUT.png (or --json)")
    if args.output is not None:
        if os.path.splitext(args.output)[1].lower() not in (".svg", ".png"):
            die(f"{args.output}: the picture must end in .svg or .png")
        if os.path.isdir(args.output):
            die(f"{args.output}: is a directory")
    if args.max_rows < 4:
        die("--max-rows must be at least 4")
    profile = resolve_profile(args.profile)
    ops, errors = read_trace_or_die(args.file, args.format, args.keep_going)
    at = at_or_die(args.at, ops)
    with render.progress(len(ops) if at is None else at, "replaying", not args.json) as update:
        run_ = replay_model(ops, profile, at, progress=update)
    try:
        applied = len(run_.steps)
        slots = sum(len(run_.vm.memslots(i)) for i in range(run_.vm.nr_address_spaces))
        title = args.title or f"guest-physical address map: {os.path.basename(args.file)}"
        subtitle = (f"profile {profile.name}, after {applied} of {len(ops)} operation(s), "
                    f"{slots} slot(s); row height log-scaled by size")
        scene = layout(run_.vm, title, subtitle, args.max_rows)
    finally:
        run_.close()
    if args.output is not None:
        _write(scene, args.output)
    if args.json:
        emit_json({"file": args.file, "profile": profile.name, "after": applied,
                   "output": args.output, "width": scene.width, "height": scene.height,
                   "address_spaces": scene.rows,
                   "malformed_lines": errors})
    else:
        rows = sum(len(r) for r in scene.rows)
        print(f"{args.output}: {scene.width}x{scene.height}, {slots} slot(s) in {rows} row(s)")
        for e in errors:
            render.line(f"skipped malformed line: {e}", "yellow")
    return EXIT_OK


COMMAND = Command("layout", "draw the guest-physical address map (slots, holes, flags, the "
                  "4 GiB boundary) as SVG or PNG", configure, run)

"""``memslot convert``: a trace (QEMU log or JSON lines) -> memslot's canonical JSON lines."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from ..trace.jsonl import dumps, to_object
from ..trace.reader import FORMATS, sniff_format
from . import render
from .common import EXIT_OK, Command, die, emit_json
from .trace_input import read_trace_or_die


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE",
                   help="trace: a QEMU -trace kvm_set_user_memory log or JSON lines ('-' for "
                        "stdin)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write the JSON lines to OUT (written whole, only when every line was "
                        "read; default stdout)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format")
    p.add_argument("--keep-going", action="store_true",
                   help="skip malformed lines (reported on stderr) instead of refusing the file")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (with the operations themselves when there is no "
                        "-o)")


def _detect(path: str, fmt: str) -> str:
    if fmt != "auto" or path == "-":
        return fmt
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = [f.readline(1 << 20) for _ in range(1000)]
    except OSError:
        return fmt
    return sniff_format(head)


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".memslot-convert-", dir=directory)
    except OSError as exc:
        die(f"{path}: cannot write: {exc.strerror or exc}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        die(f"{path}: cannot write: {exc.strerror or exc}")


def run(args: argparse.Namespace) -> int:
    fmt = _detect(args.file, args.format)
    ops, errors = read_trace_or_die(args.file, args.format, args.keep_going)
    if args.output is not None and os.path.isdir(args.output):
        die(f"{args.output}: is a directory")
    lines = [dumps(op) for op in ops]
    if args.output is not None:
        _write_atomic(args.output, "".join(line + "\n" for line in lines))
    for e in errors:
        render.line(f"memslot: skipped malformed line: {e}", "yellow", out=sys.stderr)
    if args.json:
        out: dict[str, Any] = {"input": args.file, "format": fmt, "output": args.output,
                               "operations": len(ops),
                               "malformed_lines": errors}
        if args.output is None:
            out["trace"] = [to_object(op) for op in ops]
        emit_json(out)
    elif args.output is None:
        sys.stdout.write("".join(line + "\n" for line in lines))
    else:
        print(f"{args.file} ({fmt}): {len(ops)} operation(s) written to {args.output}"
              + (f", {len(errors)} malformed line(s) skipped" if errors else ""))
    return EXIT_OK


COMMAND = Command("convert", "convert a QEMU trace (or JSON lines) to memslot's canonical "
                  "JSON-lines trace format", configure, run)

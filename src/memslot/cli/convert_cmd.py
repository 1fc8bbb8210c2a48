"""``memslot convert``: a trace (QEMU log or JSON lines) -> memslot's canonical JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TextIO

from ..trace.jsonl import dumps, to_object
from ..units import plural
from . import render
from .common import EXIT_OK, Command, die, emit_json
from .outfile import write_atomic
from .trace_input import Input, add_input_options


def configure(p: argparse.ArgumentParser) -> None:
    add_input_options(p, file_help="trace: a QEMU -trace kvm_set_user_memory log, an strace log "
                                   "or JSON lines ('-' for standard input, converted as lines "
                                   "arrive)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write the JSON lines to OUT (written whole, only when every line was "
                        "read; default stdout)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (with the operations themselves when there is no "
                        "-o)")


def run(args: argparse.Namespace) -> int:
    if args.output is not None and os.path.isdir(args.output):
        die(f"{args.output}: is a directory")
    source = Input(args, validate=args.output is None)
    count = 0

    def convert(out: TextIO) -> None:
        nonlocal count
        first = True
        for op in source:
            if args.json:
                out.write(("\n    " if first else ",\n    ")
                          + json.dumps(to_object(op, keep_line=True)))
            else:
                out.write(dumps(op, keep_line=True) + "\n")
            if source.streaming:
                out.flush()
            first = False
            count += 1

    if args.output is not None:
        def fill(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                saved, args.json = args.json, False
                try:
                    convert(f)
                finally:
                    args.json = saved

        write_atomic(args.output, fill)
    elif args.json:
        sys.stdout.write(f'{{\n  "input": {json.dumps(source.path)},\n  "trace": [')
        convert(sys.stdout)
        sys.stdout.write("\n  ]" if count else "]")
    else:
        convert(sys.stdout)
    for e in source.malformed:
        render.line(f"memslot: skipped malformed line: {e}", "yellow", out=sys.stderr)
    fmt = source.reader.format
    notice = source.notice(count)
    if args.json:
        summary = {"input": source.path, "format": fmt, "output": args.output,
                   "operations": count, "malformed_lines": source.malformed, "notice": notice}
        if args.output is None:
            del summary["input"]
            body = json.dumps(summary, indent=2)
            sys.stdout.write(",\n" + body[2:] + "\n")
        else:
            emit_json(summary)
    else:
        if notice is not None:
            render.line(f"memslot: {notice}", "yellow", out=sys.stderr)
        if args.output is not None:
            print(f"{source.path} ({fmt}): {plural(count, 'operation')} written to "
                  f"{args.output}"
                  + (f", {plural(len(source.errors), 'malformed line')} skipped"
                     if source.errors else ""))
    return EXIT_OK


COMMAND = Command("convert", "convert a QEMU trace (or JSON lines) to memslot's canonical "
                  "JSON-lines trace format", configure, run)

"""``memslot snapshot-info FILE...``: a guest-memory snapshot's header, layout and dirty
statistics, every checksum verified (several files are also checked as one chain)."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from ..constants import flag_names
from ..guest.snapshot import SnapshotError, SnapshotInfo, read_info, verify_chain
from .common import EXIT_OK, Command, die, emit_json, human_bytes, table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", metavar="FILE", nargs="+",
                   help="snapshot file(s); several are checked as a chain: the full snapshot "
                        "first, then its incremental ones in order")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _load(path: str) -> SnapshotInfo:
    try:
        return read_info(path)
    except SnapshotError as exc:
        die(str(exc))


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def print_info(info: SnapshotInfo) -> None:
    created = datetime.datetime.fromtimestamp(info.created_ns / 1e9, datetime.UTC)
    print(f"{info.path}: memslot snapshot v{info.version}, {info.kind}"
          + (f" #{info.sequence}" if info.kind == "incremental" else ""))
    print(f"  id {info.snapshot_id.hex()}"
          + (f", parent {info.parent_id.hex()}" if info.kind == "incremental" else ""))
    print(f"  created {created:%Y-%m-%d %H:%M:%S} UTC, {human_bytes(info.file_size)} in "
          f"{info.chunks + 1} chunks, page size {info.page_size}")
    rows = []
    for r in info.regions:
        written = r.data_pages + r.zero_pages
        rows.append([
            str(r.slot), f"{r.gpa:#x}", human_bytes(r.size), flag_names(r.flags), r.backing,
            r.label, "complete" if r.complete else "dirty only", str(r.data_pages),
            str(r.zero_pages), str(r.runs), _percent(written, r.npages),
        ])
    print()
    table(rows, ["slot", "gpa", "size", "flags", "backing", "label", "content", "data pages",
                 "zero pages", "runs", "of region"])
    total = info.guest_pages
    written = info.data_pages + info.zero_pages
    print()
    size = human_bytes(total * info.page_size)
    print(f"{len(info.regions)} regions, {total} guest pages ({size}); "
          f"{info.data_pages} data pages and {info.zero_pages} zero pages recorded "
          f"({_percent(written, total)} of the guest)")


def run(args: argparse.Namespace) -> int:
    infos = [_load(path) for path in args.files]
    chain: dict[str, Any] | None = None
    if len(infos) > 1:
        try:
            verify_chain(infos)
            chain = {"ok": True, "error": None}
        except SnapshotError as exc:
            chain = {"ok": False, "error": str(exc)}
    if args.json:
        out: dict[str, Any] = {"snapshots": [i.as_dict() for i in infos]}
        if chain is not None:
            out["chain"] = chain
        emit_json(out)
    else:
        for n, info in enumerate(infos):
            if n:
                print()
            print_info(info)
        if chain is not None:
            print()
            print("chain: ok" if chain["ok"] else f"chain: BROKEN: {chain['error']}")
    if chain is not None and not chain["ok"]:
        die(chain["error"])
    return EXIT_OK


COMMAND = Command("snapshot-info", "print a guest-memory snapshot's layout and dirty statistics "
                  "(verifying its checksums)", configure, run)

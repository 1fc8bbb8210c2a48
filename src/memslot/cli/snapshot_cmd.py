"""``memslot snapshot-info FILE...``: a guest-memory snapshot's header, layout and dirty
statistics, every checksum verified (several files are also checked as one chain).
``memslot snapshot export --elf OUT FILE...``: a snapshot chain as an ELF64 core file (one
``PT_LOAD`` per region at its gpa), the format QEMU's ``dump-guest-memory`` writes."""

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


def printable(text: str) -> str:
    """``text`` from a file, safe for a terminal: control characters (escape sequences) and
    lone surrogates are shown escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _created(ns: int) -> str:
    try:
        when = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"at {ns} ns since the epoch"
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"


def print_info(info: SnapshotInfo) -> None:
    print(f"{printable(info.path)}: memslot snapshot v{info.version}, {info.kind}"
          + (f" #{info.sequence}" if info.kind == "incremental" else ""))
    print(f"  id {info.snapshot_id.hex()}"
          + (f", parent {info.parent_id.hex()}" if info.kind == "incremental" else ""))
    print(f"  created {_created(info.created_ns)}, {human_bytes(info.file_size)} in "
          f"{info.chunks + 1} chunks, page size {info.page_size}")
    rows = []
    for r in info.regions:
        written = r.data_pages + r.zero_pages
        rows.append([
            str(r.slot), f"{r.gpa:#x}", human_bytes(r.size), flag_names(r.flags), r.backing,
            printable(r.label), "complete" if r.complete else "dirty only", str(r.data_pages),
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
            print("chain: ok" if chain["ok"] else f"chain: BROKEN: {printable(chain['error'])}")
    if chain is not None and not chain["ok"]:
        die(printable(chain["error"]))
    return EXIT_OK


COMMAND = Command("snapshot-info", "print a guest-memory snapshot's layout and dirty statistics "
                  "(verifying its checksums)", configure, run)


# --- memslot snapshot export ---------------------------------------------------------------

_MACHINES = ("x86_64", "ppc64", "arm64", "riscv64", "s390x")
#: The default --machine by page size (the arch whose profiles have it).
_MACHINE_BY_PAGE_SIZE = {4096: "x86_64", 16384: "arm64", 65536: "ppc64"}


def _profile_for(page_size: int) -> str | None:
    """A model profile with this page size to rebuild a chain on (x86_64 for 4 KiB)."""
    from ..profile import PRESETS

    if page_size == PRESETS["x86_64"].page_size:
        return "x86_64"
    return next((name for name, p in PRESETS.items() if p.page_size == page_size), None)


def configure_snapshot(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = sub.add_parser("export", help="write a snapshot chain as another format",
                            description="Write the guest memory a snapshot chain holds as an "
                            "ELF64 core file: one PT_LOAD per region with p_paddr = its gpa "
                            "(QEMU dump-guest-memory's format; Volatility, crash, drgn read "
                            "it). Zero pages stay holes of a sparse file.")
    export.add_argument("--elf", metavar="OUT", required=True, help="the core file to write")
    export.add_argument("files", metavar="SNAPSHOT", nargs="+",
                        help="a full snapshot, then its incremental ones in order")
    export.add_argument("--machine", choices=_MACHINES, default=None,
                        help="e_machine of the core file (default by page size: x86_64 for "
                             "4 KiB, arm64 for 16 KiB, ppc64 for 64 KiB)")


def run_snapshot(args: argparse.Namespace) -> int:
    from ..backends.model import ModelVM
    from ..guest.elfcore import MACHINES
    from ..guest.memory import GuestMemory

    infos = [_load(path) for path in args.files]
    try:
        verify_chain(infos)
    except SnapshotError as exc:
        die(printable(str(exc)))
    page_size = infos[-1].page_size
    profile = _profile_for(page_size)
    if profile is None:
        die(f"no profile with a {page_size}-byte page to rebuild the snapshot on")
    machine = args.machine or _MACHINE_BY_PAGE_SIZE.get(page_size, "x86_64")
    try:
        with ModelVM(profile) as vm, GuestMemory.restore(args.files, vm) as gm:
            gm.export_elf(args.elf, machine=MACHINES[machine])
            regions = len(gm)
    except SnapshotError as exc:
        die(printable(str(exc)))
    except OSError as exc:
        die(f"{printable(args.elf)}: cannot write the core file: {exc.strerror or exc}")
    print(f"{printable(args.elf)}: ELF64 core, {regions} PT_LOAD segments "
          f"({human_bytes(sum(r.size for r in infos[-1].regions))} of guest memory)")
    return EXIT_OK


EXPORT_COMMAND = Command("snapshot", "export a guest-memory snapshot chain (snapshot export "
                         "--elf OUT FILE...)", configure_snapshot, run_snapshot)

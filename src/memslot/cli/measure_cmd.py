"""``memslot measure-metadata``: the kernel's VmallocUsed per request beside the model's."""

from __future__ import annotations

import argparse
import sys

from ..errors import KvmUnavailable
from ..harness.measure import DEFAULT_SIZES, measure
from .backends import resolve_profile
from .common import EXIT_MISMATCH, EXIT_OK, Command, die, emit_json, table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), metavar="PAGES",
                   help="slot sizes in pages (default: 1 512 513 4096 32768 2^18 2^19 2^20)")
    p.add_argument("--repeats", type=int, default=5,
                   help="passes per shape, more while the host is noisy; the value most "
                        "passes agree on counts (default 5)")
    p.add_argument("--profile", default="detect", help="model profile (default: detect)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or any(n < 1 or n >= 1 << 31 for n in args.sizes):
        die("--repeats must be positive and --sizes between 1 and 2^31-1 pages")
    if any(n > 1 << 22 for n in args.sizes):
        die("sizes above 2^22 pages would cost the host gigabytes of vmalloc; refused")
    profile = resolve_profile(args.profile)
    try:
        results = measure(profile, tuple(args.sizes), args.repeats,
                          progress=None if args.json else _progress)
    except KvmUnavailable as exc:
        die(str(exc))
    if not args.json and sys.stderr.isatty():  # clear the progress line; no CR in a log
        sys.stderr.write("\r" + " " * 50 + "\r")
    mismatches = [m for m in results if not m.match]
    if args.json:
        emit_json({"profile": profile.name, "measurements": [m.as_dict() for m in results],
                   "mismatches": len(mismatches)})
    else:
        rows = [[m.shape, m.step, f"{m.kernel_bytes // 1024:+d}", f"{m.model_bytes // 1024:+d}",
                 "yes" if m.match else "NO"] for m in results]
        table(rows, ["slot shape", "request", "kernel KiB", "model KiB", "match"])
        print(f"\n{len(results) - len(mismatches)}/{len(results)} steps match to the page "
              f"(VmallocUsed deltas, mode of {args.repeats} passes; profile {profile.name})")
    return EXIT_MISMATCH if mismatches else EXIT_OK


def _progress(shape: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  measuring {shape:<40}")
        sys.stderr.flush()


COMMAND = Command(
    "measure-metadata",
    "measure the kernel's memslot metadata (VmallocUsed around each request on /dev/kvm) "
    "beside the model's page-rounded prediction",
    configure,
    run,
)

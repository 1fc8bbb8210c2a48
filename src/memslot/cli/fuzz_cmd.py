"""``memslot fuzz``: random requests on the model and /dev/kvm side by side."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..harness.fuzz import run_fuzz
from .backends import resolve_profile
from .common import EXIT_MISMATCH, EXIT_OK, Command, emit_json


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", type=int, default=10000, help="requests in total (default 10000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--profile", default="detect",
                   help="profile for the model (default 'detect': the running kernel's)")
    p.add_argument("--backend", choices=("both", "model"), default="both",
                   help="both: compare with /dev/kvm (default); model: model alone, with its "
                        "integrity check after every request")
    p.add_argument("--sequence", type=int, default=400, metavar="N",
                   help="requests per VM (a fresh VM pair every N requests)")
    p.add_argument("--out", metavar="DIR", help="write each reproducer to DIR/divergence-K.jsonl")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.ops < 1 or args.sequence < 1:
        from .common import die

        die("--ops and --sequence must be positive")
    profile = resolve_profile(args.profile)
    start = time.monotonic()
    tty = sys.stderr.isatty() and not args.json

    def progress(done: int) -> None:
        if tty:
            sys.stderr.write(f"\r  {done}/{args.ops} requests")
            sys.stderr.flush()

    report = run_fuzz(args.ops, args.seed, profile, args.backend, args.sequence, progress)
    if tty:
        sys.stderr.write("\r" + " " * 40 + "\r")
    elapsed = time.monotonic() - start
    failures = report.divergences + report.check_failures
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for k, (_, lines) in enumerate(failures, 1):
            with open(os.path.join(args.out, f"divergence-{k}.jsonl"), "w") as f:
                f.write("\n".join(lines) + "\n")
    if args.json:
        emit_json({
            "profile": profile.name, "backend": args.backend, "seed": args.seed,
            "requests": report.requests, "agreed": report.agreed, "rate": report.rate,
            "sequences": report.sequences, "seconds": round(elapsed, 3),
            "divergences": [{"what": w, "reproducer": lines} for w, lines in report.divergences],
            "check_failures": [{"what": w, "reproducer": lines}
                               for w, lines in report.check_failures],
            "outcomes": [{"change": k[0], "outcome": k[1], "count": v}
                         for k, v in report.outcomes.most_common()],
        })
    else:
        what = "model vs /dev/kvm" if args.backend == "both" else "model with check()"
        print(f"{report.requests} requests ({what}, profile {profile.name}, seed {args.seed}, "
              f"{report.sequences} VMs, {elapsed:.1f} s): {report.agreed} agreed "
              f"({100 * report.rate:.3f}%)")
        print("outcomes: " + ", ".join(f"{k[0]}/{k[1]} {v}"
                                        for k, v in report.outcomes.most_common()))
        for what_failed, lines in failures:
            print(f"\nDIVERGENCE: {what_failed}\nreproducer ({len(lines)} lines, replay with "
                  f"'memslot replay --backend both FILE'):")
            for line in lines:
                print(f"  {line}")
    return EXIT_MISMATCH if failures else EXIT_OK


COMMAND = Command(
    "fuzz",
    "random requests weighted to every rule's edges, on the model and /dev/kvm side by side; "
    "prints the agreement rate and reproducers",
    configure,
    run,
)

#!/usr/bin/env python3
"""Instructions per request of the model alone, counted by callgrind (deterministic, so it
holds on a shared machine): ``ModelVM.submit`` of the first N requests of a bench_replay
trace, minus the same process that only parses them.

    python bench/bench_replay.py --requests 50000 --runs 1 --modes=-q --keep /tmp/t.jsonl
    python bench/bench_model_instructions.py /tmp/t.jsonl                    # 10,000 requests
    python bench/bench_model_instructions.py /tmp/t.jsonl --static-slots 32000

``--static-slots`` first fills the address space with that many other slots (1 MiB each,
above the trace's range), for the check that a request's cost does not grow with the number
of slots. Run it on an installed (compiled) memslot; valgrind must be installed (``make
deps-bench``). Figures are in bench_replay.py's notes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys
from memslot import ModelVM
from memslot.request import MemoryRegion
path, n, submit, static = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
regions = []
with open(path) as f:
    for i, line in enumerate(f):
        if i >= n:
            break
        o = json.loads(line)
        regions.append(MemoryRegion(o["slot"], o["flags"], int(o["guest_phys_addr"], 16),
                                    int(o["memory_size"], 16), int(o["userspace_addr"], 16)))
vm = ModelVM()
for i in range(static):
    assert not vm.submit(MemoryRegion(300 + i, 0, (1 << 35) + (i << 21), 1 << 20,
                                      0x100000000000 + (i << 21))).errno
if submit:
    for r in regions:
        vm.submit(r)
"""


def instructions(trace: str, n: int, submit: bool, static: int) -> int:
    """Instructions callgrind counted for one run of the child."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             "-c", _CHILD, trace, str(n), "1" if submit else "0", str(static)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode or not found:
        sys.exit(f"callgrind run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return int(found[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="a JSON-lines trace (bench_replay.py --keep)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--static-slots", type=int, default=0)
    args = ap.parse_args()
    with open(args.trace, encoding="utf-8") as f:
        n = min(args.requests, sum(1 for _ in f))
    parse = instructions(args.trace, n, False, args.static_slots)
    both = instructions(args.trace, n, True, args.static_slots)
    print(f"{(both - parse) / n:,.0f} instructions per request (ModelVM.submit of {n:,} "
          f"requests, {args.static_slots:,} other slots)")


if __name__ == "__main__":
    main()

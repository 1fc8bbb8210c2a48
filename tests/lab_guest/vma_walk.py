"""Run inside a lab guest (``memslot lab run TARGET --python THIS``): the arch's VMA walk on the
guest kernel against the model told this process's VMAs by DualVM. Prints one JSON line per
case, ``{"case", "errno"}``; any disagreement raises Divergence (exit status 1). With an
argument N, then fuzzes N requests (seed 1) against the detected profile."""

from __future__ import annotations

import ctypes
import json
import mmap
import sys

from memslot import DualVM, KvmError, KvmVM, ModelVM, detect_profile
from memslot.backends.procmaps import read_vmas
from memslot.constants import KVM_MEM_LOG_DIRTY_PAGES as LOG
from memslot.constants import KVM_MEM_READONLY as RO

PAGE = mmap.PAGESIZE


def attempt(dual: DualVM, case: str, *request: int) -> int:
    try:
        dual.set_user_memory_region(*request)
        err = 0
        dual.set_user_memory_region(request[0], request[1], request[2], 0, request[4])
    except KvmError as exc:
        err = exc.errno or 0
    print(json.dumps({"case": case, "errno": err}), flush=True)
    return err


def vma_named(name: str) -> tuple[int, int] | None:
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(name):
                lo, hi = line.split()[0].split("-")
                return int(lo, 16), int(hi, 16)
    return None


def main() -> int:
    profile = detect_profile()
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    size = 16 * PAGE
    ro = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    with DualVM(ModelVM(profile), KvmVM()) as dual:
        print(json.dumps({"profile": profile.name, "walks_vmas": dual.model.walks_vmas,
                          "vmas_at_0": [v.describe() for v in read_vmas(0, 0x3F000)]}))
        # the fuzzer's reproducer: ua=0 over the program's text where it is mapped low
        attempt(dual, "ua0-log", 8, LOG, 0xFFFFF000, 0x3F000, 0)
        attempt(dual, "ua0-readonly", 8, RO, 0xFFFFF000, 0x3F000, 0)
        attempt(dual, "prot-read", 1, 0, 1 << 32, size, ro)
        attempt(dual, "prot-read-readonly", 1, RO, 1 << 32, size, ro)
        attempt(dual, "prot-read-log", 1, LOG, 1 << 32, size, ro)
        vvar = vma_named("[vvar]")
        if vvar is not None:
            print(json.dumps({"vvar": [v.describe() for v in read_vmas(*vvar)]}))
            n = vvar[1] - vvar[0]
            attempt(dual, "vvar-readonly", 2, RO, 2 << 32, n, vvar[0])
            attempt(dual, "vvar-readonly-log", 2, RO | LOG, 2 << 32, n, vvar[0])
            attempt(dual, "vvar-log", 2, LOG, 2 << 32, n, vvar[0])
        dual.verify()
    if len(sys.argv) > 1:  # then the fuzzer, as the matrix runs it (seed 1)
        from memslot.harness.fuzz import run_fuzz

        report = run_fuzz(int(sys.argv[1]), 1, profile)
        print(json.dumps({"fuzz": report.requests, "agreed": report.agreed,
                          "divergences": [w for w, _ in report.divergences]}), flush=True)
        return 1 if report.divergences else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

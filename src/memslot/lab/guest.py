"""The guest side of the lab: what runs inside a booted target (``python3 -m memslot.lab.guest``
from the init script, see :mod:`.overlay`), driven by ``/lab/job.json``.

Jobs: ``cli`` (``memslot ARGS...``, output streamed), ``python`` (a Python file with its
arguments) and ``matrix`` (detect_profile(), the fuzzer against the detected profile and against
a preset, VmallocUsed beside the model's metadata; one ``@@RESULT`` JSON line per part). This
module imports nothing heavy at load time so it also runs where memslot would not import.
"""

from __future__ import annotations

import json
import os
import platform
import runpy
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

JOB = "/lab/job.json"
RESULT = "@@RESULT "


def refresh_vmstat() -> None:
    """Fold the per-CPU vmstat deltas into the global counters, so VmallocUsed is current
    (7.x reads it from a vmstat counter; writing stat_refresh flushes them)."""
    try:
        with open("/proc/sys/vm/stat_refresh", "w") as f:
            f.write("1\n")
    except OSError:
        pass


def emit(kind: str, data: dict[str, Any]) -> None:
    sys.stdout.write(RESULT + json.dumps({"kind": kind, **data}, default=str) + "\n")
    sys.stdout.flush()


def run_cli(argv: list[str]) -> int:
    """``memslot ARGS...``, as ``python -m memslot`` runs it (the command line sits above the
    lab's layer, so it is started, not imported)."""
    sys.argv = ["memslot", *argv]
    return _exit_code(lambda: runpy.run_module("memslot", run_name="__main__", alter_sys=True))


def run_python(path: str, argv: list[str]) -> int:
    sys.argv = [path, *argv]
    return _exit_code(lambda: runpy.run_path(path, run_name="__main__"))


def _exit_code(fn: Callable[[], object]) -> int:
    try:
        fn()
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


def run_matrix(params: dict[str, Any]) -> int:
    """The matrix's checks on this kernel; returns 0 when everything agreed."""
    from memslot.harness.detect import detect_profile
    from memslot.harness.fuzz import run_fuzz
    from memslot.profile import get_profile

    failures = 0
    start = time.monotonic()
    profile = detect_profile()
    emit("detect", {"profile": profile.as_dict(), "seconds": round(time.monotonic() - start, 2),
                    "machine": platform.machine(), "release": platform.release()})
    runs: list[tuple[str, Any]] = [("detected", profile)]
    candidates = list(params.get("presets", []))
    for name in candidates:
        try:
            runs.append((f"preset {name}", get_profile(name)))
            break
        except (KeyError, ValueError):
            continue
    else:
        if candidates:
            emit("error", {"what": "preset", "error": f"none of {candidates} is a preset"})
            failures += 1
    for label, prof in runs:
        start = time.monotonic()
        try:
            report = run_fuzz(int(params.get("ops", 5000)), int(params.get("seed", 1)), prof,
                              "both", int(params.get("sequence", 400)))
        except Exception as exc:  # a crash is a result to record, not the end of the run
            emit("error", {"what": f"fuzz {label}", "error": traceback.format_exc(limit=4)})
            del exc
            failures += 1
            continue
        emit("fuzz", {
            "label": label, "profile": prof.name, "requests": report.requests,
            "agreed": report.agreed, "sequences": report.sequences,
            "seconds": round(time.monotonic() - start, 2),
            "divergences": [{"what": w, "reproducer": lines} for w, lines in report.divergences],
            "check_failures": [{"what": w, "reproducer": lines}
                               for w, lines in report.check_failures],
        })
        failures += bool(report.divergences or report.check_failures)
    if params.get("measure", True):
        failures += _measure(profile, params)
    if params.get("pytest"):
        failures += _pytest(list(params["pytest"]))
    return 1 if failures else 0


def _pytest(files: list[str]) -> int:
    """Run test files with pytest (the real-guest checks) and report the counts."""
    try:
        import pytest
    except ImportError:
        emit("error", {"what": "real-guest checks", "error": "pytest is not in the image"})
        return 1

    class Counter:
        def __init__(self) -> None:
            self.counts = {"passed": 0, "failed": 0, "skipped": 0}

        def pytest_runtest_logreport(self, report: Any) -> None:
            if report.when == "call" or report.outcome != "passed":
                key = report.outcome if report.outcome in self.counts else "failed"
                if report.when == "call" or report.outcome != "passed":
                    self.counts[key] += 1

    counter = Counter()
    start = time.monotonic()
    status = int(pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfs", *files],
                             plugins=[counter]))
    emit("pytest", {"files": files, "status": status, **counter.counts,
                    "seconds": round(time.monotonic() - start, 2)})
    return 1 if status else 0


def _measure(profile: Any, params: dict[str, Any]) -> int:
    from memslot.harness import measure as m

    # The guest runs nothing else, so VmallocUsed is exact once the per-CPU vmstat deltas are
    # folded in; /proc/vmallocinfo names kvmalloc's wrapper, not KVM, as the caller on some
    # kernels, so it is not used here.
    original_used, original_reader, original_reading = (m.vmalloc_used, m.vmalloc_reader,
                                                        m.vmalloc_reading)

    def refreshed() -> int:
        refresh_vmstat()
        return original_used()

    m.vmalloc_used = refreshed
    m.vmalloc_reader = lambda: refreshed
    m.vmalloc_reading = lambda: m.Reading(lambda: b"%d" % refreshed(), int)
    start = time.monotonic()
    sizes = tuple(int(s) for s in params.get("sizes", m.DEFAULT_SIZES))
    try:
        results = m.measure(profile, sizes, int(params.get("repeats", 3)))
    except Exception:
        emit("error", {"what": "measure", "error": traceback.format_exc(limit=4)})
        return 1
    finally:
        m.vmalloc_used, m.vmalloc_reader = original_used, original_reader
        m.vmalloc_reading = original_reading
    emit("measure", {"measurements": [r.as_dict() for r in results],
                     "seconds": round(time.monotonic() - start, 2)})
    return 0 if all(r.match for r in results) else 1


def main() -> int:
    with open(JOB) as f:
        job = json.load(f)
    os.environ.setdefault("COLUMNS", "100")
    refresh_vmstat()
    kind = job.get("kind")
    if kind == "cli":
        return run_cli(list(job["argv"]))
    if kind == "python":
        return run_python(job["path"], list(job.get("argv", [])))
    if kind == "matrix":
        return run_matrix(job)
    print(f"memslot lab guest: unknown job kind {kind!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

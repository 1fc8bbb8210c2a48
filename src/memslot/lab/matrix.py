"""The matrix: on each bootable target, one boot that runs detect_profile(), the fuzzer against
the detected profile and against the matching preset (errno for errno), VmallocUsed beside the
model's metadata for every measured shape and, on amd64, the real-guest checks; then the table
(docs/kernel-matrix.md) and the raw results per target."""

from __future__ import annotations

import dataclasses
import json
import platform
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArchiveUnreachable, Cancelled, GuestHang, LabError, PackageMissing
from .guest import RESULT
from .overlay import memslot_dir
from .session import RunResult, run_job
from .targets import Target

Log = Callable[[str], None]

#: The preset each machine is compared with; a versioned preset (``NAME@X.Y``) is preferred
#: where the profile registry has one for the target's kernel.
PRESETS = {"amd64": "x86_64", "arm64": "arm64", "arm64-16k": "arm64", "riscv64": "riscv64",
           "ppc64el": "ppc64-hv"}
MEASURE_SIZES = (1, 512, 513, 4096, 32768, 1 << 18, 1 << 19, 1 << 20)
GUEST_TESTS = ("tests/test_vcpu_guest.py",)


@dataclass
class MatrixOptions:
    ops: int = 5000
    ops_amd64: int = 20000
    seed: int = 1
    measure: bool = True
    guest_checks: bool = True
    preset: bool = True
    results_dir: Path | None = None
    skip_unavailable: bool = False
    repeats: int = 3
    verbose: bool = False  # pass the guest's console output to the log as it arrives

    def ops_for(self, target: Target) -> int:
        return self.ops_amd64 if target.machine.name == "amd64" else self.ops


@dataclass
class Row:
    """One target's line of the matrix."""

    target: str
    state: str  # ok, DIVERGES, hang, unavailable, impossible, error
    kernel: str = "-"
    fuzz: list[dict[str, Any]] = field(default_factory=list)
    measure: dict[str, Any] | None = None
    guest_checks: dict[str, Any] | None = None
    detected: dict[str, Any] | None = None
    seconds: float = 0.0
    boot_seconds: float = 0.0
    hangs: list[str] = field(default_factory=list)
    note: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.state not in ("ok", "impossible", "skipped")

    def fuzz_cell(self, label: str) -> tuple[str, str]:
        for f in self.fuzz:
            if f["label"] == label or f["label"].startswith(label):
                rate = 100 * f["agreed"] / f["requests"] if f["requests"] else 100.0
                name = f["profile"]
                return f"{f['requests']:,}", f"{rate:.3f}% ({name})"
        return "-", "-"

    def measure_cell(self) -> str:
        if not self.measure:
            return "-"
        shapes: dict[str, bool] = {}
        for m in self.measure["measurements"]:
            shapes[m["shape"]] = shapes.get(m["shape"], True) and m["match"]
        return f"{sum(shapes.values())}/{len(shapes)}"

    def guest_cell(self) -> str:
        g = self.guest_checks
        if not g:
            return "-"
        return f"{g['passed']}/{g['passed'] + g['failed']}" + (" (pytest failed)"
                                                                if g["status"] else "")

    def summary(self) -> str:
        det = self.fuzz_cell("detected")
        pre = self.fuzz_cell("preset")
        return (f"{self.target:<14} {self.state:<11} {self.kernel:<26} detected {det[1]:<30} "
                f"preset {pre[1]:<32} metadata {self.measure_cell():<6} "
                f"guest {self.guest_cell():<6} {self.seconds:6.0f} s"
                + (f"  {self.note}" if self.note else ""))

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "state": self.state, "kernel": self.kernel,
                "fuzz": [{k: v for k, v in f.items() if k not in ("divergences",
                                                                   "check_failures")}
                         | {"divergences": [d["what"] for d in f["divergences"]]}
                         for f in self.fuzz],
                "metadata": self.measure_cell(), "guest_checks": self.guest_checks,
                "seconds": round(self.seconds, 1), "boot_seconds": round(self.boot_seconds, 1),
                "hangs": self.hangs, "note": self.note, "errors": self.errors}


def preset_candidates(target: Target) -> list[str]:
    base = PRESETS.get(target.machine.name, "")
    if target.machine.name == "arm64-16k":
        return [f"arm64-16k@{target.version}", "arm64-16k", f"{base}@{target.version}", base]
    return [f"{base}@{target.version}", base]


def guest_test_files() -> dict[str, bytes]:
    """The real-guest test files and their conftest, from the source tree (the working
    directory's, else the one memslot runs from; empty where there is none)."""
    roots = [r for r in (Path.cwd(), memslot_dir().parent.parent)
             if (r / GUEST_TESTS[0]).is_file()]
    if not roots:
        return {}
    root = roots[0]
    out: dict[str, bytes] = {}
    for rel in (*GUEST_TESTS, "tests/conftest.py", "tests/guest_helpers.py"):
        path = root / rel
        if path.is_file():
            out[f"/lab/{rel}"] = path.read_bytes()
    return out if any(f"/lab/{t}" in out for t in GUEST_TESTS) else {}


def run_target(target: Target, opts: MatrixOptions, log: Log | None = None,
               cancel: threading.Event | None = None) -> Row:
    """One target's row (its guest ended, whatever happened). Setting ``cancel`` ends the
    guest and raises :class:`~memslot.lab.errors.Cancelled`."""
    say = log or (lambda _m: None)
    if not target.bootable:
        return Row(target.name, "impossible", note=target.machine.impossible or "")
    ops = opts.ops_for(target)
    extra = guest_test_files() if opts.guest_checks and target.machine.name == "amd64" else {}
    job: dict[str, Any] = {
        "kind": "matrix", "ops": ops, "seed": opts.seed,
        "presets": preset_candidates(target) if opts.preset else [],
        "measure": opts.measure, "sizes": list(MEASURE_SIZES), "repeats": opts.repeats,
        "pytest": sorted(f"/lab/{t}" for t in GUEST_TESTS if f"/lab/{t}" in extra),
    }
    console: list[str] = []

    def take(line: str) -> None:
        console.append(line)
        if opts.verbose and not line.startswith(RESULT):
            say(f"  | {target.name}: {line}")

    start = time.monotonic()
    # Generous: TCG under a shared host; a hang is caught by this limit and retried once.
    timeout = target.machine.slowness * (900 + 0.03 * ops + (600 if opts.measure else 0))
    try:
        result = run_job(target, job, on_output=take, timeout=timeout, retries=1,
                         log=say, extra_files=extra, cancel=cancel)
    except (ArchiveUnreachable, PackageMissing) as exc:
        row = Row(target.name, "unavailable", note=str(exc))
        _save(row, console, opts, None)
        return row
    except GuestHang as exc:
        row = Row(target.name, "hang", note=str(exc), seconds=time.monotonic() - start,
                  hangs=[str(exc)])
        console.extend(["", "-- console tail --", *exc.log_tail])
        _save(row, console, opts, None)
        return row
    except LabError as exc:
        row = Row(target.name, "error", note=str(exc))
        _save(row, console, opts, None)
        return row
    row = rows_from(target, result, console)
    row.seconds = time.monotonic() - start
    _save(row, console, opts, result)
    return row


def rows_from(target: Target, result: RunResult, console: list[str]) -> Row:
    """A row from the guest's ``@@RESULT`` records."""
    row = Row(target.name, "ok", seconds=result.seconds, boot_seconds=result.boot_seconds,
              hangs=list(result.hangs))
    for rec in result.results:
        kind = rec.get("kind")
        if kind == "detect":
            row.detected = rec["profile"]
            row.kernel = rec.get("release", "-")
        elif kind == "fuzz":
            row.fuzz.append(rec)
        elif kind == "measure":
            row.measure = rec
        elif kind == "pytest":
            row.guest_checks = rec
        elif kind == "error":
            lines = str(rec.get("error", "")).strip().splitlines() or [""]
            row.errors.append(f"{rec.get('what')}: {lines[-1]}")
    diverging = [f for f in row.fuzz if f["divergences"] or f["check_failures"]]
    metadata_off = row.measure is not None and not all(
        m["match"] for m in row.measure["measurements"])
    guest_off = row.guest_checks is not None and bool(row.guest_checks["status"])
    if row.detected is None:
        row.state = "error"
        row.note = "detect_profile() did not report" + (
            f": {row.errors[0]}" if row.errors else f" (exit status {result.status})")
    elif diverging or metadata_off or guest_off or row.errors:
        row.state = "DIVERGES"
        notes = [f"{f['label']}: {(f['divergences'] or f['check_failures'])[0]['what']}"
                 for f in diverging]
        if metadata_off:
            notes.append(f"metadata {row.measure_cell()} shapes")
        if guest_off:
            notes.append(f"real-guest checks {row.guest_cell()}")
        notes.extend(row.errors)
        row.note = "; ".join(notes)
    if result.hangs:
        row.note = (row.note + "; " if row.note else "") + f"{len(result.hangs)} hang(s), retried"
    return row


def _save(row: Row, console: list[str], opts: MatrixOptions, result: RunResult | None) -> None:
    if opts.results_dir is None:
        return
    out = opts.results_dir / row.target.replace(":", "-")
    out.mkdir(parents=True, exist_ok=True)
    (out / "console.log").write_text("\n".join(console) + "\n")
    (out / "summary.json").write_text(json.dumps(row.as_dict(), indent=1) + "\n")
    (out / "row.json").write_text(json.dumps(dataclasses.asdict(row)) + "\n")
    if row.detected is not None:
        (out / "detect.json").write_text(json.dumps(row.detected, indent=1) + "\n")
    for f in row.fuzz:
        name = "fuzz-detected" if f["label"] == "detected" else "fuzz-preset"
        (out / f"{name}.json").write_text(json.dumps(f, indent=1) + "\n")
        lines = []
        for d in f["divergences"] + f["check_failures"]:
            lines.append(f"DIVERGENCE ({f['label']}, profile {f['profile']}): {d['what']}")
            lines.extend("  " + r for r in d["reproducer"])
        (out / f"{name}-divergences.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    if row.measure is not None:
        (out / "measure.json").write_text(json.dumps(row.measure, indent=1) + "\n")
    if row.guest_checks is not None:
        (out / "guest-checks.json").write_text(json.dumps(row.guest_checks, indent=1) + "\n")


def load_rows(results: Path) -> list[Row]:
    """The rows saved under a results directory (one per target, newest run), in the lab's
    target order: a matrix assembled from several runs."""
    from .targets import TARGET_NAMES

    rows = []
    for path in results.glob("*/row.json"):
        try:
            rows.append(Row(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    order = {name: i for i, name in enumerate(TARGET_NAMES)}
    return sorted(rows, key=lambda r: order.get(r.target, len(order)))


def run_matrix(targets: list[Target], opts: MatrixOptions, log: Log | None = None,
               on_row: Callable[[Row], None] | None = None, jobs: int = 1) -> list[Row]:
    """Every target, up to ``jobs`` at once, each in its own QEMU (1 by default: the host's
    CPUs are shared, and the times are quoted). ``on_row`` sees each row as it finishes, in
    the calling thread; the rows come back in target order. An exception here (Ctrl-C's
    KeyboardInterrupt above all) ends every running guest, and starts no other, before it
    propagates."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    say = log or (lambda _m: None)
    rows: dict[int, Row] = {}

    def finished(index: int, row: Row) -> None:
        if opts.skip_unavailable and row.state in ("unavailable", "hang"):
            say(f"matrix: WARNING: {row.target} SKIPPED ({row.state}): {row.note}")
            row.state = "skipped"
        say(f"matrix: {row.summary()}")
        rows[index] = row
        if on_row is not None:
            on_row(row)

    if jobs == 1:
        for index, target in enumerate(targets):
            say(f"matrix: {target.name}")
            finished(index, run_target(target, opts, say))
        return [rows[i] for i in range(len(targets))]

    cancel = threading.Event()

    def one(target: Target) -> Row:
        if cancel.is_set():
            raise Cancelled(f"{target.name}: cancelled before it started")
        say(f"matrix: {target.name} (started)")
        return run_target(target, opts, say, cancel)

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="memslot-lab")
    futures: dict[Future[Row], int] = {}
    try:
        for index, target in enumerate(targets):
            futures[pool.submit(one, target)] = index
        running = set(futures)
        while running:
            done, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=futures.__getitem__):
                finished(futures[future], future.result())
    except BaseException:
        cancel.set()  # every running guest is ended within a second
        for future in futures:
            future.cancel()  # and the queued ones never start
        raise
    finally:
        pool.shutdown(wait=True)
    return [rows[i] for i in range(len(targets))]


def write_markdown(rows: list[Row], path: Path, opts: MatrixOptions,
                   total_seconds: float | None = None, pending: tuple[str, ...] = ()) -> None:
    """docs/kernel-matrix.md: the table, then every divergence and hang; ``pending`` targets
    are listed as not run (yet)."""
    total = total_seconds if total_seconds is not None else sum(r.seconds for r in rows)
    rows = rows + [Row(name, "not run") for name in pending]
    lines = [
        "# Kernel matrix",
        "",
        "Written by `make matrix` (`memslot lab matrix`): every target booted under QEMU (TCG) "
        "with KVM inside, one vCPU. Per target: `memslot fuzz` against the profile "
        "`detect_profile()` returns there and against the matching preset (errno for errno, "
        f"seed {opts.seed}; {opts.ops_amd64:,} requests per profile on amd64, {opts.ops:,} "
        "elsewhere), VmallocUsed deltas against the model's `vmalloc_bytes()` for each slot "
        "shape (create, dirty logging on and off, move, delete; size x alignment x dirty "
        "logging), and on amd64 the real-guest checks (`tests/test_vcpu_guest.py` run inside "
        "the guest). Time is the whole boot and run.",
        "",
        f"Host: {platform.machine()}, {_host_cpus()}; total time {total / 60:.1f} min.",
        "",
        "| target | kernel | requests | agreement (detected) | agreement (preset) "
        "| metadata shapes matched | real-guest checks | time | state |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        det_n, det = r.fuzz_cell("detected")
        _, pre = r.fuzz_cell("preset")
        state = f"impossible: {r.note}" if r.state == "impossible" else r.state
        lines.append(f"| {r.target} | {r.kernel} | {det_n} | {det} | {pre} | "
                     f"{r.measure_cell()} | {r.guest_cell()} | "
                     f"{_minutes(r.seconds) if r.seconds else '-'} | {state} |")
    notes = [r for r in rows if r.note and r.state != "impossible"]
    if notes:
        lines += ["", "## Divergences, hangs and skipped targets", ""]
        for r in notes:
            lines.append(f"- **{r.target}** ({r.state}): {r.note}")
    lines += ["", "Raw results (detected profiles, reproducers, VmallocUsed samples): "
              "`memslot lab matrix --results DIR`.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _host_cpus() -> str:
    import os

    return f"{os.cpu_count()} CPUs"

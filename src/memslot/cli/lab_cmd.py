"""``memslot lab``: real kernels under QEMU, KVM inside (list, build, run, matrix)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .common import EXIT_MISMATCH, EXIT_OK, Command, die, emit_json, table

if TYPE_CHECKING:
    from ..lab.targets import Target


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lab_command", metavar="ACTION", parser_class=type(p))
    sub.required = True
    ls = sub.add_parser("list", help="the targets (ARCH:VERSION) and which are built")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(_lab=_list)

    build = sub.add_parser("build", help="download a target's Debian packages and build its "
                                         "boot image (cached)")
    build.add_argument("targets", nargs="+", metavar="TARGET",
                       help="ARCH:VERSION, or 'all' for every bootable target")
    build.add_argument("--force", action="store_true", help="build again even if cached")
    build.set_defaults(_lab=_build)

    run = sub.add_parser(
        "run", help="boot a target and run 'memslot ARGS...' (or a Python file) inside on the "
                    "guest kernel's /dev/kvm; exits with its status",
        description="Boot TARGET and run 'memslot ARGS...' inside, e.g. "
                    "'memslot lab run arm64:6.1 -- fuzz --ops 20000 --seed 3'. "
                    "Exit status: the command's; 2 when the lab could not run it.")
    run.add_argument("target", metavar="TARGET")
    run.add_argument("--python", metavar="FILE",
                     help="run this Python file (with ARGS as its arguments) instead of memslot")
    run.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="seconds the command may run (default 900, scaled for slower "
                          "emulated machines)")
    run.add_argument("--retries", type=int, default=1,
                     help="boots again after a hang (default 1); a hang is reported as such")
    run.add_argument("--append", action="append", default=[], metavar="ARG",
                     help="extra kernel command-line argument (e.g. kvm-arm.mode=nvhe)")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                     help="arguments of 'memslot' (or of the Python file)")
    run.set_defaults(_lab=_run)

    matrix = sub.add_parser(
        "matrix", help="the proof on every bootable target: the fuzzer (detected profile and "
                       "preset), VmallocUsed beside the model, the real-guest checks; writes "
                       "the table",)
    matrix.add_argument("--targets", nargs="+", metavar="TARGET",
                        help="targets to run (default: every bootable one)")
    matrix.add_argument("--ops", type=int, default=5000,
                        help="fuzz requests per profile on non-amd64 targets (default 5000)")
    matrix.add_argument("--ops-amd64", type=int, default=20000,
                        help="fuzz requests per profile on amd64 targets (default 20000)")
    matrix.add_argument("--seed", type=int, default=1, help="fuzz seed (default 1)")
    matrix.add_argument("--no-preset", action="store_true",
                        help="fuzz against the detected profile only, not the matching preset")
    matrix.add_argument("--no-measure", action="store_true",
                        help="skip the VmallocUsed measurements")
    matrix.add_argument("--no-guest-checks", action="store_true",
                        help="skip the real-guest checks on amd64")
    matrix.add_argument("--out", metavar="FILE",
                        help="write the markdown table to FILE (rewritten after each target)")
    matrix.add_argument("--from-results", metavar="DIR",
                        help="run nothing: write the table from the rows saved in DIR by "
                             "earlier runs (--results DIR)")
    matrix.add_argument("--results", metavar="DIR",
                        help="raw results per target into DIR/TARGET/ (JSON)")
    matrix.add_argument("--skip-unavailable", action="store_true",
                        help="a target the archive cannot serve, or that hangs twice, is "
                             "reported loudly and skipped instead of failing the run (CI)")
    matrix.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                        help="run up to N targets at once, each in its own QEMU (default 1; "
                             "the table stays in target order)")
    matrix.add_argument("-v", "--verbose", action="store_true",
                        help="show the guests' output as it arrives")
    matrix.add_argument("--json", action="store_true", help="machine-readable summary")
    matrix.set_defaults(_lab=_matrix)


def run(args: argparse.Namespace) -> int:
    from ..lab.errors import LabError

    # A terminated lab ends its guests first (their QEMU is killed in a finally).
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        status: int = args._lab(args)
    except LabError as exc:
        die(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _log(message: str) -> None:
    sys.stderr.write(f"  {message}\n")
    sys.stderr.flush()


def _list(args: argparse.Namespace) -> int:
    from ..lab import image
    from ..lab.targets import all_targets

    rows: list[dict[str, str]] = []
    for t in all_targets():
        if not t.bootable:
            state = f"impossible: {t.machine.impossible}"
            release = "-"
        else:
            img = image.built(t)
            state = "built" if img else "not built"
            release = img.release if img else "-"
        rows.append({"target": t.name, "suite": t.suite, "state": state, "kernel": release})
    if args.json:
        emit_json({"targets": rows})
    else:
        table([[r["target"], r["suite"], r["kernel"], r["state"]] for r in rows],
              ["target", "suite", "kernel", "state"])
    return EXIT_OK


def _targets(names: list[str]) -> list[Target]:
    from ..lab.targets import all_targets, get_target

    if names == ["all"]:
        return [t for t in all_targets() if t.bootable]
    return [get_target(n) for n in names]


def _build(args: argparse.Namespace) -> int:
    from ..lab import image
    from ..lab.errors import ImageError

    targets = _targets(args.targets)
    for t in targets:
        if not t.bootable:
            raise ImageError(f"{t.name} cannot be booted: {t.machine.impossible}")
    for t in targets:
        start = time.monotonic()
        img = image.build(t, log=_log, force=args.force)
        print(f"{t.name}: Linux {img.release} ({time.monotonic() - start:.0f} s; "
              f"{img.kernel.parent})")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from ..lab.session import run_job
    from ..lab.targets import get_target

    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    target = get_target(args.target)
    if args.retries < 0 or (args.timeout is not None and args.timeout <= 0):
        die("--retries must be >= 0 and --timeout positive")
    extra: dict[str, bytes] = {}
    if args.python:
        try:
            extra["/lab/user.py"] = Path(args.python).read_bytes()
        except OSError as exc:
            die(f"cannot read {args.python}: {exc.strerror}")
        job = {"kind": "python", "path": "/lab/user.py", "argv": rest}
    else:
        if not rest:
            die("nothing to run: give 'memslot' arguments after '--' (or --python FILE)")
        job = {"kind": "cli", "argv": rest}

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    result = run_job(target, job, on_output=out, timeout=args.timeout, retries=args.retries,
                     log=_log, extra_files=extra, cmdline_extra=tuple(args.append))
    hang = f", after {len(result.hangs)} hang(s)" if result.hangs else ""
    _log(f"lab: {target.name}: exit status {result.status} ({result.seconds:.1f} s, boot "
         f"{result.boot_seconds:.1f} s{hang})")
    return result.status


def _matrix(args: argparse.Namespace) -> int:
    from ..lab.matrix import MatrixOptions, Row, load_rows, run_matrix, write_markdown
    from ..lab.targets import all_targets

    targets = all_targets() if not args.targets else _targets(args.targets)
    opts = MatrixOptions(ops=args.ops, ops_amd64=args.ops_amd64, seed=args.seed,
                         measure=not args.no_measure, guest_checks=not args.no_guest_checks,
                         preset=not args.no_preset,
                         results_dir=Path(args.results) if args.results else None,
                         skip_unavailable=args.skip_unavailable, verbose=args.verbose)
    if min(args.ops, args.ops_amd64) < 1:
        die("--ops and --ops-amd64 must be positive")
    if args.jobs < 1:
        die("--jobs must be positive")
    if args.from_results:
        rows = load_rows(Path(args.from_results))
        if not rows:
            die(f"no saved matrix rows in {args.from_results}")
        names = {r.target for r in rows}
        rows += [Row(t.name, "impossible", note=t.machine.impossible or "")
                 for t in targets if not t.bootable and t.name not in names]
        pending = tuple(t.name for t in targets if t.bootable and t.name not in names)
        if args.out:
            write_markdown(rows, Path(args.out), opts, pending=pending)
        for r in rows:
            print(r.summary())
        return EXIT_OK
    start = time.monotonic()
    done: dict[str, Row] = {}

    def progress(row: Row) -> None:
        done[row.target] = row
        if args.out:  # in target order, whichever finished first; the rest not run yet
            table = [done.get(t.name) or Row(t.name, "not run") for t in targets]
            write_markdown(table, Path(args.out), opts, time.monotonic() - start)

    rows = run_matrix(targets, opts, log=_log, on_row=progress, jobs=args.jobs)
    if args.json:
        emit_json({"rows": [r.as_dict() for r in rows]})
    else:
        for r in rows:
            print(r.summary())
    failed = [r for r in rows if r.failed]
    if failed:
        print(f"\n{len(failed)} target(s) disagree with the model or could not run: "
              + ", ".join(r.target for r in failed), file=sys.stderr)
    return EXIT_MISMATCH if failed else EXIT_OK


COMMAND = Command(
    "lab",
    "the kernel lab: boot Debian's kernels (5.10 to 7.3; amd64, arm64, riscv64, ppc64el) "
    "under QEMU and run memslot inside on their /dev/kvm",
    configure,
    run,
)

"""``memslot`` command line. Each subcommand lives in its own module and registers a
:class:`~memslot.cli.common.Command`; ``python -m memslot`` runs the same entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..trace.records import TraceFormatError
from .common import EXIT_CODES_HELP, EXIT_USAGE, CliError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage and exits 2; keep it to one line like every other error,
        # naming the subcommand (``memslot: error: replay: ...``).
        command = self.prog.removeprefix("memslot").strip()
        raise CliError(f"{command}: {message}" if command else message)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only`` a command's name, that command's options
    alone are added (its module alone imported: the others' names stay known, for argparse's
    choices, without their options or help)."""
    from . import commands

    if only not in commands.NAMES:
        only = None
    parser = _Parser(
        prog="memslot",
        description="Model, drive and inspect Linux KVM memory slots.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"memslot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in commands.NAMES:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        command = commands.load(name)
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           epilog=EXIT_CODES_HELP)
        command.configure(p)
        p.set_defaults(_run=command.run)
    return parser


def _command_named(args: list[str]) -> str | None:
    """The subcommand ``args`` names (the first word that is not an option), if any."""
    for arg in args:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 mismatch, 2 bad input)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_named(args_list))
    if not args_list:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(args_list)
        status: int = args._run(args)
        return status
    except TraceFormatError as exc:  # a bad line met while streaming
        print(f"memslot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"memslot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("memslot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, and let the exit not flush again
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

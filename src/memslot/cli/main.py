"""``memslot`` command line. Each subcommand lives in its own module and registers a
:class:`~memslot.cli.common.Command`; ``python -m memslot`` runs the same entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .common import EXIT_CODES_HELP, EXIT_USAGE, CliError, Command


def _commands() -> list[Command]:
    from . import commands

    return commands.ALL


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage and exits 2; keep it to one line like every other error.
        raise CliError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memslot",
        description="Model, drive and inspect Linux KVM memory slots.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"memslot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in _commands():
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           epilog=EXIT_CODES_HELP)
        command.configure(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 mismatch, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
        status: int = args._run(args)
        return status
    except CliError as exc:
        print(f"memslot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("memslot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

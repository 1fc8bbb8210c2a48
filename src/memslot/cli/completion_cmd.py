"""``memslot completion bash|zsh|...``: the shell completion script for every command and
option, generated from the parser itself by shtab (so it never falls behind the options).

    eval "$(memslot completion bash)"            # this shell; or, for every new one:
    memslot completion bash > ~/.local/share/bash-completion/completions/memslot
    memslot completion zsh > "${fpath[1]}/_memslot"
"""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_OK, Command, die

SHELLS = ("bash", "zsh", "tcsh", "fish")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")


def run(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        die("shell completion needs shtab (pip install shtab)")
    from .main import build_parser

    parser = build_parser()
    _mark_files(parser, shtab.FILE)
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return EXIT_OK


def _mark_files(parser: argparse.ArgumentParser, file: object) -> None:
    """Complete file names for the arguments that name files (traces, outputs)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_files(sub, file)
        elif action.dest in ("file", "follow", "output", "out", "files"):
            action.complete = file  # type: ignore[attr-defined]


COMMAND = Command("completion", "print the shell completion script (bash, zsh, tcsh, fish) for "
                  "every command and option", configure, run)

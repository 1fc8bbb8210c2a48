"""``memslot profiles``: the host profiles the model can imitate."""

from __future__ import annotations

import argparse

from ..profile import PRESETS, Profile
from .common import EXIT_OK, Command, emit_json, table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--detect", action="store_true",
                   help="also probe /dev/kvm and show the running kernel's profile")


def run(args: argparse.Namespace) -> int:
    profiles: list[Profile] = list(PRESETS.values())
    if args.detect:
        from .backends import resolve_profile

        profiles.append(resolve_profile("detect"))
    if args.json:
        emit_json([p.as_dict() for p in profiles])
        return EXIT_OK
    rows = []
    for p in profiles:
        rows.append([
            p.name, p.arch, str(p.nr_address_spaces), str(p.user_mem_slots),
            "yes" if p.readonly_mem else "no", str(p.page_size // 1024) + "K",
            _limit(p), p.description,
        ])
    table(rows, ["profile", "arch", "AS", "slots", "RO", "page", "gpa limit", "description"])
    return EXIT_OK


def _limit(p: Profile) -> str:
    if p.arch == "x86":
        return f"gfn<={p.max_gfn:#x}"
    if p.ipa_bits:
        return f"{p.ipa_bits}-bit"
    if p.mem_limit is not None:
        return f"{p.mem_limit:#x}"
    return "-"


COMMAND = Command("profiles", "list the host profiles (presets) the model can imitate",
                  configure, run)

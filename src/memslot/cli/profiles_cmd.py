"""``memslot profiles``: the host profiles the model can imitate.

On a terminal the table is coloured as explain's and report's are (``NO_COLOR`` and
``TERM=dumb`` respected); with a known width (a terminal, or ``COLUMNS``) the descriptions
leave the table and follow it, wrapped, so that every line fits; piped output keeps one
whole-line table for scripts."""

from __future__ import annotations

import argparse

from ..arch import arch_class
from ..profile import PRESETS, Profile
from . import render
from .common import EXIT_OK, Command, emit_json


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--detect", action="store_true",
                   help="also probe /dev/kvm and show the running kernel's profile")
    p.add_argument("--all", action="store_true",
                   help="every versioned preset, not only the newest of each kind")


def run(args: argparse.Namespace) -> int:
    profiles: list[Profile] = [p for name, p in PRESETS.items() if args.all or "@" not in name]
    matched = None
    if args.detect:
        from ..harness.detect import matching_preset
        from .backends import resolve_profile

        detected = resolve_profile("detect")
        profiles.append(detected)
        matched = matching_preset(detected)
    if args.json:
        emit_json([_as_dict(p) for p in profiles])
        return EXIT_OK
    limit = render.width()
    headers = ["profile", "arch", "kernel", "AS", "slots", "RO", "page", "gpa limit",
               "features"]
    rows = []
    for p in profiles:
        rows.append([
            p.name, p.arch, p.kernel, str(p.nr_address_spaces), str(p.user_mem_slots),
            "yes" if p.readonly_mem else "no", str(p.page_size // 1024) + "K",
            _limit(p), _features(p),
        ])
    if limit is None:  # piped: one table, whole lines
        for row, p in zip(rows, profiles, strict=True):
            row.append(p.description)
        headers.append("description")
    render.print_table(rows, headers, right={3, 4}, styles={0: "bold cyan", 8: "green"})
    if limit is not None:
        render.line("")
        render.heading("descriptions")
        for p in profiles:
            render.line(f"  {p.name}: {p.description}", indent=4)
    if not args.all:
        n = sum("@" in name for name in PRESETS)
        render.line(f"(names without @X.Y are the newest of their kind; --all lists the {n} "
                    "versioned presets)", "dim")
    if args.detect:
        render.line(f"detected: {'= ' + matched if matched else 'matches no preset exactly'}",
                    "green" if matched else "yellow")
    return EXIT_OK


def _features(p: Profile) -> str:
    """The version-dependent features: REGION2, guest_memfd, the dirty ring kinds."""
    out = []
    if p.user_memory2:
        out.append("region2")
    if p.guest_memfd:
        out.append("gmem")
    elif p.guest_memfd_ioctl:
        out.append("gmem-ioctl")
    if p.dirty_ring_tso:
        out.append("ring")
    if p.dirty_ring_acq_rel:
        out.append("ring-acqrel")
    if p.dirty_ring_with_bitmap:
        out.append("ring+bitmap")
    return ",".join(out) or "-"


def _limit(p: Profile) -> str:
    return arch_class(p).gpa_limit_text(p)


def _as_dict(p: Profile) -> dict[str, object]:
    """The profile's fields plus the arch's derived bound (``max_gfn``: the last gfn a slot
    may cover) and large-page sizes."""
    cls = arch_class(p)
    out: dict[str, object] = p.as_dict()
    limit = cls.gfn_limit(p)
    if limit is not None:
        out["max_gfn"] = limit - 1
    out["huge_page_sizes"] = list(cls.huge_page_sizes(p.page_shift))
    return out


COMMAND = Command("profiles", "list the host profiles (presets) the model can imitate",
                  configure, run)

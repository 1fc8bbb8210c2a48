"""``memslot profiles``: the host profiles the model can imitate."""

from __future__ import annotations

import argparse

from ..profile import PRESETS, Profile
from .common import EXIT_OK, Command, emit_json, table


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
        emit_json([p.as_dict() for p in profiles])
        return EXIT_OK
    rows = []
    for p in profiles:
        rows.append([
            p.name, p.arch, p.kernel, str(p.nr_address_spaces), str(p.user_mem_slots),
            "yes" if p.readonly_mem else "no", str(p.page_size // 1024) + "K",
            _limit(p), _features(p), p.description,
        ])
    table(rows, ["profile", "arch", "kernel", "AS", "slots", "RO", "page", "gpa limit",
                 "features", "description"])
    if not args.all:
        n = sum("@" in name for name in PRESETS)
        print(f"(names without @X.Y are the newest of their kind; --all lists the {n} "
              "versioned presets)")
    if args.detect:
        print(f"detected: {'= ' + matched if matched else 'matches no preset exactly'}")
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
    if p.arch == "x86":
        if not p.max_gfn_check:
            return "none"
        return f"gfn<={p.max_gfn:#x}"
    if p.ipa_bits:
        return f"{p.ipa_bits}-bit"
    if p.mem_limit is not None:
        return f"{p.mem_limit:#x}"
    return "-"


COMMAND = Command("profiles", "list the host profiles (presets) the model can imitate",
                  configure, run)

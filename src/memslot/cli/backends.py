"""Choosing a profile and a backend from command-line options."""

from __future__ import annotations

import argparse

from ..backends.base import VM
from ..backends.model import ModelVM
from ..errors import KvmUnavailable
from ..profile import PRESETS, Profile, get_profile
from .common import die

BACKENDS = ("model", "kvm", "both")


def add_profile_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("--profile", default="x86_64", metavar="P",
                   help=f"host profile: {', '.join(PRESETS)}, or 'detect' for the running "
                        "kernel (default x86_64)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME",
                   help="run an alternative kernel behaviour (x86-reuse-arch-on-move, "
                        "ppc-realloc-rmap-on-move); repeatable")
    if backend:
        p.add_argument("--backend", choices=BACKENDS, default="model",
                       help="model (default), kvm (/dev/kvm), or both (differential)")


def resolve_profile(name: str) -> Profile:
    if name == "detect":
        from ..harness.detect import detect_profile

        try:
            return detect_profile()
        except KvmUnavailable as exc:
            die(f"--profile detect: {exc}")
    try:
        return get_profile(name)
    except KeyError as exc:
        die(str(exc.args[0]))


def make_vm(backend: str, profile: Profile, variants: list[str]) -> VM:
    """A fresh VM of the chosen backend (exits with a one-line error if unavailable)."""
    try:
        if backend == "model":
            return ModelVM(profile, variants=variants)
        if variants:
            die("--variant applies to the model backend only")
        from ..backends.kvm import KvmVM

        if backend == "kvm":
            return KvmVM()
        from ..backends.dual import DualVM

        return DualVM(ModelVM(profile), KvmVM())
    except KvmUnavailable as exc:
        die(f"--backend {backend}: {exc}")
    except ValueError as exc:
        die(str(exc))

"""Choosing a profile and a backend from command-line options."""

from __future__ import annotations

import argparse

from ..arch import ALL_VARIANTS
from ..backends.base import VM
from ..backends.model import ModelVM
from ..errors import KvmUnavailable
from ..profile import PRESETS, Profile, get_profile
from .common import die

BACKENDS = ("model", "kvm", "both")


def variant_help() -> str:
    """The ``--variant`` help, listing the variants the arch hooks declare."""
    names = ", ".join(f"{v} ({arch})" for v, arch in sorted(ALL_VARIANTS.items()))
    return f"run an alternative kernel behaviour: {names}; repeatable"


def add_profile_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("--profile", default=None, metavar="P",
                   help=f"host profile: {', '.join(PRESETS)}, or 'detect' for the running "
                        "kernel (default x86_64 on the model, detect with --backend kvm/both)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME",
                   help=variant_help())
    if backend:
        p.add_argument("--backend", choices=BACKENDS, default="model",
                       help="model (default), kvm (/dev/kvm), or both (differential)")


def resolve_profile(name: str | None) -> Profile:
    if name is None:
        name = "x86_64"
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


def resolve_backend_profile(backend: str, name: str | None) -> Profile:
    """The profile for ``backend``: with the real kernel involved, the running kernel's, and
    a named one only when it describes this host (else the model could never agree)."""
    if backend == "model":
        return resolve_profile(name)
    if name is None or name == "detect":
        return resolve_profile("detect")
    wanted = resolve_profile(name)
    if backend == "kvm":
        return wanted  # the model is not involved: the profile only labels the output
    host = resolve_profile("detect")
    differs = profile_differences(wanted, host)
    if differs:
        shown = ", ".join(differs[:4]) + (f" and {len(differs) - 4} more" if len(differs) > 4
                                         else "")
        die(f"--backend both: profile {wanted.name} cannot match this host ({shown}); use "
            f"--profile detect (this host is {profile_label(host)})")
    return wanted


def profile_label(profile: Profile) -> str:
    """A profile's name, and for a detected one the preset it equals (``detected
    (x86_64-shadow@6.18)``)."""
    if profile.name in PRESETS:
        return profile.name
    from ..harness.detect import matching_preset

    same = matching_preset(profile)
    return f"{profile.name} ({same})" if same else profile.name


def profile_differences(a: Profile, b: Profile) -> list[str]:
    """The kernel facts on which two profiles differ, as ``field a != b`` texts (the host's
    RAM size and other machine facts do not count)."""
    from ..harness.detect import differences

    return [f"{name} {_show(x)} != {_show(y)}" for name, (x, y) in differences(a, b).items()]


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 4096:
        return f"{value:#x}"
    return str(value)


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

"""Per-arch memslot hooks, chosen by ``Profile.arch``."""

from __future__ import annotations

from ..engine.hooks import ArchHooks, PrepareError
from ..engine.ledger import Ledger
from ..profile import Profile
from .arm64 import Arm64Arch
from .ppc import PpcHvArch, PpcPrArch
from .riscv import RiscvArch
from .s390 import S390Arch
from .x86 import X86Arch

ARCH_HOOKS: dict[str, type[ArchHooks]] = {
    "x86": X86Arch,
    "ppc-hv": PpcHvArch,
    "ppc-pr": PpcPrArch,
    "arm64": Arm64Arch,
    "riscv": RiscvArch,
    "s390": S390Arch,
}

ALL_VARIANTS: dict[str, str] = {
    variant: arch for arch, cls in ARCH_HOOKS.items() for variant in cls.VARIANTS
}


def arch_class(profile: Profile) -> type[ArchHooks]:
    """The hooks class of ``profile.arch``: its class attributes and class methods are the
    arch's facts (``ValueError`` for an unknown arch)."""
    try:
        return ARCH_HOOKS[profile.arch]
    except KeyError:
        raise ValueError(f"unknown arch {profile.arch!r}") from None


def make_arch(profile: Profile, ledger: Ledger, variants: frozenset[str]) -> ArchHooks:
    """The hooks for ``profile.arch``; unknown variants (or ones for another arch) raise."""
    cls = arch_class(profile)
    for variant in variants:
        if variant not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(ALL_VARIANTS)}")
        if variant not in cls.VARIANTS:
            raise ValueError(f"variant {variant!r} is for {ALL_VARIANTS[variant]}, "
                             f"not {profile.arch} (profile {profile.name})")
    return cls(profile, ledger, variants)


__all__ = ["ALL_VARIANTS", "ARCH_HOOKS", "ArchHooks", "PrepareError", "arch_class", "make_arch"]

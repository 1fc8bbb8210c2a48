"""The lab's targets: an emulated machine (ARCH) and a Debian kernel series (VERSION).

Facts found by booting them on a 2-core x86-64 host with QEMU's TCG: amd64 guests get AMD SVM
with nested paging from ``-cpu max`` (kvm_amd is then a TDP host with SMM); arm64 needs EL2
(``virtualization=on``) and is three times faster with ``pauth-impdef``; riscv64 needs the H
extension; ppc64el runs nested KVM-HV (Debian builds no KVM-PR). s390x cannot run KVM under
TCG (no SIE), so it is listed as impossible. One vCPU: with two, amd64 7.2 hit an int3 oops in
the scheduler under TCG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownTarget

#: Debian suite that carries each kernel series.
SUITES: dict[str, str] = {
    "5.10": "bullseye",
    "6.1": "bookworm",
    "6.12": "trixie",
    "7.2": "sid",
    "7.3": "experimental",
}
#: Suite of every guest's userland (busybox, Python 3.13, numpy): one for all kernels.
USERLAND_SUITE = "trixie"
#: Where a userland package comes from when the pool does not serve its trixie version.
USERLAND_FALLBACKS = ("sid",)


@dataclass(frozen=True)
class Machine:
    """How to emulate one architecture and which kernel flavour runs on it."""

    name: str
    debian_arch: str
    flavour: str  # Debian kernel flavour: linux-image-<flavour>
    qemu: str
    qemu_args: tuple[str, ...]
    console: str
    #: KVM modules to load (with their modinfo dependencies); built-in ones are skipped.
    kvm_modules: tuple[str, ...]
    #: Default seconds from QEMU's start to the guest's command (TCG on a shared host).
    boot_timeout: float
    #: How much slower than amd64 the guest runs the same work (scales run timeouts).
    slowness: float
    extra_cmdline: tuple[str, ...] = ()
    impossible: str | None = None


MACHINES: dict[str, Machine] = {m.name: m for m in (
    Machine("amd64", "amd64", "amd64", "qemu-system-x86_64",
            ("-accel", "tcg", "-machine", "q35", "-cpu", "max"),
            "ttyS0", ("kvm_amd",), 180.0, 1.0),
    Machine("arm64", "arm64", "arm64", "qemu-system-aarch64",
            ("-accel", "tcg", "-machine", "virt,virtualization=on,gic-version=3",
             "-cpu", "max,pauth-impdef=on"),
            "ttyAMA0", ("kvm",), 300.0, 2.5),
    Machine("arm64-16k", "arm64", "arm64-16k", "qemu-system-aarch64",
            ("-accel", "tcg", "-machine", "virt,virtualization=on,gic-version=3",
             "-cpu", "max,pauth-impdef=on"),
            "ttyAMA0", ("kvm",), 300.0, 2.5),
    Machine("riscv64", "riscv64", "riscv64", "qemu-system-riscv64",
            ("-accel", "tcg", "-machine", "virt", "-cpu", "rv64,h=true"),
            "ttyS0", ("kvm",), 400.0, 3.0),
    Machine("ppc64el", "ppc64el", "powerpc64le", "qemu-system-ppc64",
            ("-accel", "tcg", "-machine",
             "pseries,cap-nested-hv=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,"
             "cap-ccf-assist=off,cap-large-decr=off",
             "-cpu", "POWER9"),
            "hvc0", ("kvm_hv",), 400.0, 3.0),
    Machine("s390x", "s390x", "s390x", "qemu-system-s390x", ("-accel", "tcg"), "ttysclp0",
            ("kvm",), 0.0, 1.0,
            impossible="KVM needs the SIE instruction, which QEMU's TCG does not emulate"),
)}

#: Every target in the lab, oldest kernel first per machine.
TARGET_NAMES: tuple[str, ...] = (
    "amd64:5.10", "amd64:6.1", "amd64:6.12", "amd64:7.2", "amd64:7.3",
    "arm64:5.10", "arm64:6.1", "arm64:6.12", "arm64:7.2", "arm64:7.3",
    "arm64-16k:7.2", "arm64-16k:7.3",
    "riscv64:6.12", "riscv64:7.2",
    "ppc64el:6.1", "ppc64el:6.12", "ppc64el:7.2", "ppc64el:7.3",
    "s390x:6.12",
)


@dataclass(frozen=True)
class Target:
    """One bootable (or listed-as-impossible) machine and kernel series."""

    machine: Machine
    version: str

    @property
    def name(self) -> str:
        return f"{self.machine.name}:{self.version}"

    @property
    def suite(self) -> str:
        return SUITES[self.version]

    @property
    def slug(self) -> str:
        """The name as a file name (``amd64-7.2``)."""
        return self.name.replace(":", "-")

    @property
    def bootable(self) -> bool:
        return self.machine.impossible is None

    def image_dir(self, cache: Path | None = None) -> Path:
        return (cache or cache_dir()) / "images" / self.slug


def all_targets() -> list[Target]:
    return [get_target(name) for name in TARGET_NAMES]


def get_target(name: str) -> Target:
    """``"arm64:6.1"`` -> its :class:`Target`; :class:`UnknownTarget` otherwise."""
    arch, sep, version = name.partition(":")
    if not sep or arch not in MACHINES or version not in SUITES:
        raise UnknownTarget(
            f"unknown target {name!r}: use ARCH:VERSION, one of {', '.join(TARGET_NAMES)}")
    target = Target(MACHINES[arch], version)
    if target.name not in TARGET_NAMES:
        raise UnknownTarget(f"Debian has no {version} kernel for {arch} in the lab "
                            f"(targets: {', '.join(TARGET_NAMES)})")
    return target


def newest(arch: str) -> Target:
    """The newest bootable target of a machine (``newest("amd64")`` -> amd64:7.3)."""
    return [t for t in all_targets() if t.machine.name == arch][-1]


def cache_dir() -> Path:
    """Where packages and images are kept: $MEMSLOT_LAB_CACHE, else ~/.cache/memslot/lab
    (outside any clone, so CI runs share it)."""
    env = os.environ.get("MEMSLOT_LAB_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memslot" / "lab"

"""Which Debian packages a target needs, with the fallbacks the archive calls for.

The kernel: the flavour's meta package (``linux-image-<flavour>``) of the target's suite names
the image package; its dependencies built from the kernel's own sources (``linux``,
``linux-signed-*``) complete it. Up to 6.12 that is one package; from 7.x Debian splits it into
linux-image / linux-binary / linux-base / linux-modules. When the pool does not serve a listed
version (404), the other listed image packages of the same series are tried, newest first.

The userland (busybox, Python 3.13, numpy): the closure of a few roots' dependencies, less
the packages a guest running one Python program never reads, from one suite for every
target.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .archive import Archive, Package, PackageIndex, PoolLag
from .debversion import compare, in_series
from .errors import PackageMissing
from .targets import Target

#: pytest runs the real-guest checks (tests/test_vcpu_guest.py) inside amd64 guests.
USERLAND_ROOTS = ("busybox-static", "python3.13-minimal", "libpython3.13-stdlib",
                  "python3-numpy", "python3-pytest")
#: Dependencies of the roots that a guest running one Python program does not need.
USERLAND_SKIP = frozenset({"python3", "python3-minimal", "python3.13", "dpkg", "debconf",
                           "tzdata", "media-types", "mime-support", "netbase", "readline-common",
                           "gcc-14-base", "gcc-15-base", "python3-numpy-dev", "libc-bin",
                           "perl-base", "install-info", "sensible-utils",
                           # loaded only by stdlib modules memslot never imports (dbm, sqlite3,
                           # readline, curses, ssl/_hashlib: hashlib falls back to its own)
                           "libdb5.3t64", "libsqlite3-0", "libreadline8t64", "libncursesw6",
                           "libtinfo6", "libssl3t64", "openssl-provider-legacy"})


@dataclass(frozen=True)
class Resolved:
    """The packages to download and the index they came from."""

    packages: tuple[Package, ...]

    @property
    def total_size(self) -> int:
        return sum(p.size for p in self.packages)


def kernel_candidates(index: PackageIndex, flavour: str, series: str) -> list[Package]:
    """Image packages of a series, in the order to try them: the meta package's choice first,
    then every other listed one, newest first."""
    pattern = re.compile(rf"^linux-image-(\d[^-]*)(-\d+)?(\+[a-z0-9.]+)?-{re.escape(flavour)}$")
    picked: list[Package] = []
    for meta in index.versions(f"linux-image-{flavour}"):
        if not in_series(meta.version, series):
            continue
        for alts in meta.depends:
            for name in alts:
                if pattern.match(name):
                    picked.extend(p for p in index.versions(name)
                                  if p.version == meta.version or in_series(p.version, series))
    others = [p for name in index.names() if pattern.match(name)
              for p in index.versions(name) if in_series(p.version, series)]
    others.sort(key=functools.cmp_to_key(lambda a, b: compare(a.version, b.version)),
                reverse=True)
    out: list[Package] = []
    for p in picked + others:
        if p not in out:
            out.append(p)
    return out


def kernel_closure(index: PackageIndex, image: Package) -> list[Package]:
    """The image package and its dependencies built from the kernel's sources, each at the
    image's version where listed."""
    out = [image]
    todo = [image]
    while todo:
        pkg = todo.pop()
        for alts in pkg.depends:
            for name in alts:
                versions = index.versions(name)
                if not versions or not _kernel_source(versions[0].source):
                    continue
                same = [p for p in versions if p.version == image.version]
                dep = (same or versions)[0]
                if dep.name not in {p.name for p in out}:
                    out.append(dep)
                    todo.append(dep)
                break
    return out


def _kernel_source(source: str) -> bool:
    return source == "linux" or source.startswith("linux-signed")


def userland_closure(index: PackageIndex, roots: tuple[str, ...] | None = None
                     ) -> list[Package]:
    """The roots and, recursively, their dependencies outside :data:`USERLAND_SKIP` (first
    alternative the index has, a virtual name through its first provider)."""
    roots = USERLAND_ROOTS if roots is None else roots
    out: dict[str, Package] = {}
    todo = list(roots)
    while todo:
        name = todo.pop(0)
        if name in out:
            continue
        versions = index.versions(name)
        if not versions:
            raise PackageMissing(f"the userland package {name} is not in the index")
        pkg = versions[0]
        out[name] = pkg
        for alts in pkg.depends:
            chosen = _choose(index, alts)
            if chosen is None:
                if any(a in USERLAND_SKIP for a in alts):
                    continue
                raise PackageMissing(f"no package satisfies {' | '.join(alts)} "
                                     f"(needed by {name})")
            if chosen not in USERLAND_SKIP and chosen not in out:
                todo.append(chosen)
    return list(out.values())


def _choose(index: PackageIndex, alts: tuple[str, ...]) -> str | None:
    for name in alts:
        if name in USERLAND_SKIP:
            return name
        if index.versions(name):
            return name
        providers = index.providers.get(name)
        if providers:
            return sorted(providers)[0]
    return None


def fetch_kernel(archive: Archive, target: Target) -> list[tuple[Package, Path]]:
    """Download the target's kernel packages, falling back past versions the pool lacks.
    Returns (package, path) pairs."""
    index = archive.index()
    candidates = kernel_candidates(index, target.machine.flavour, target.version)
    if not candidates:
        raise PackageMissing(f"{target.suite} lists no {target.version} kernel "
                             f"(linux-image-{target.machine.flavour}) for "
                             f"{target.machine.debian_arch}")
    lagging = []
    for image in candidates:
        closure = kernel_closure(index, image)
        try:
            return [(p, archive.download(p)) for p in closure]
        except PoolLag as exc:
            archive.log(f"apt: {exc}; trying another listed version")
            lagging.append(f"{image.name} {image.version}")
    raise PackageMissing(f"the pool serves none of the listed {target.name} kernels "
                         f"({', '.join(lagging)}: 404)")


def fetch_userland(archive: Archive, fallbacks: Sequence[Archive] = ()
                   ) -> list[tuple[Package, Path]]:
    """Download the userland closure. A package whose listed versions the pool does not serve
    (404) is taken from the first fallback suite that serves it (a newer suite: its libraries
    stay compatible with what was built against the older ones)."""
    index = archive.index()
    out = []
    for pkg in userland_closure(index):
        out.append(_download_any(archive, pkg, fallbacks))
    return out


def _download_any(archive: Archive, pkg: Package, fallbacks: Sequence[Archive]
                  ) -> tuple[Package, Path]:
    tried = []
    for source in (archive, *fallbacks):
        for candidate in source.index().versions(pkg.name):
            try:
                return candidate, source.download(candidate)
            except PoolLag:
                tried.append(f"{candidate.version} ({source.suite})")
                archive.log(f"apt: {pkg.name} {candidate.version} is not in the "
                            f"{source.suite} pool (404); trying another version")
    raise PackageMissing(f"the pool serves no listed version of {pkg.name} for "
                         f"{archive.arch}: tried {', '.join(tried)}")

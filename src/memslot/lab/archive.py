"""Debian's archive through a private apt configuration: one configuration per (suite,
architecture) under the lab's cache, with its own lists, status and sources, so foreign
architectures and old or experimental suites never touch the host's dpkg or apt state.

apt does the network work and the verification (the Release signature against Debian's
archive keyring, every file's hash); this module reads the verified ``Packages`` index and
asks apt to download exact versions, telling a pool that lags its index (404: try another
listed version) from an archive that cannot be reached.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .debversion import compare
from .errors import ArchiveUnreachable, PackageMissing, ToolMissing

HOST_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: Indices older than this are fetched again (seconds; MEMSLOT_LAB_REFRESH overrides).
INDEX_MAX_AGE = 24 * 3600.0

_UNREACHABLE = ("Could not resolve", "Temporary failure", "Connection failed", "Unable to connect",
                "Could not connect", "Network is unreachable", "Connection timed out",
                "No route to host", "Connection refused")
_SIGNATURE = ("NO_PUBKEY", "is not signed", "EXPKEYSIG", "BADSIG",
              "The following signatures were invalid", "Signed-By", "not valid yet")
_LAG = (" 404 ", "404  Not Found", "404 Not Found", "File not found")

Log = Callable[[str], None]


class PoolLag(PackageMissing):
    """The index lists a version that the pool does not serve (yet, or any more)."""


@dataclass(frozen=True)
class Package:
    """One stanza of a Packages index (the fields the lab uses)."""

    name: str
    version: str
    arch: str
    source: str
    depends: tuple[tuple[str, ...], ...]  # each a list of alternatives (names only)
    filename: str
    size: int
    provides: tuple[str, ...] = ()

    @property
    def deb_name(self) -> str:
        """The file name ``apt-get download`` gives it."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def parse_depends(text: str) -> tuple[tuple[str, ...], ...]:
    """``"a (>= 1) | b:any, c [amd64]"`` -> ``(("a", "b"), ("c",))`` (names only)."""
    out = []
    for clause in text.split(","):
        names = []
        for alt in clause.split("|"):
            name = alt.strip().split(" ", 1)[0].split("(", 1)[0].split(":", 1)[0]
            if name:
                names.append(name)
        if names:
            out.append(tuple(names))
    return tuple(out)


_FIELDS = ("Package", "Version", "Architecture", "Source", "Depends", "Pre-Depends", "Filename",
           "Size", "Provides")


def parse_packages(lines: Iterator[str]) -> Iterator[Package]:
    """Stanzas of a Packages file (deb822; folded lines continue their field)."""
    fields: dict[str, str] = {}
    key = ""
    for raw in lines:
        line = raw.rstrip("\n")
        if not line:
            if fields:
                yield _package(fields)
                fields = {}
            continue
        if line[0] in " \t":
            if key in fields:  # a folded field continues
                fields[key] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep and key in _FIELDS:
            fields[key] = value.strip()
    if fields:
        yield _package(fields)


def _package(f: dict[str, str]) -> Package:
    name = f.get("Package", "")
    version = f.get("Version", "")
    source = f.get("Source", name).split(" ", 1)[0]
    depends = parse_depends(", ".join(x for x in (f.get("Pre-Depends"), f.get("Depends")) if x))
    provides = tuple(p[0] for p in parse_depends(f.get("Provides", "")))
    return Package(name, version, f.get("Architecture", ""), source, depends,
                   f.get("Filename", ""), int(f.get("Size", "0") or 0), provides)


@dataclass
class PackageIndex:
    """A suite's packages by name (every listed version) and by what they provide."""

    by_name: dict[str, list[Package]] = field(default_factory=dict)
    providers: dict[str, list[str]] = field(default_factory=dict)

    def add(self, pkg: Package) -> None:
        self.by_name.setdefault(pkg.name, []).append(pkg)
        for virtual in pkg.provides:
            self.providers.setdefault(virtual, []).append(pkg.name)

    def versions(self, name: str) -> list[Package]:
        """Every listed version of ``name``, newest first."""
        def order(a: Package, b: Package) -> int:
            return compare(a.version, b.version)

        return sorted(self.by_name.get(name, []), key=functools.cmp_to_key(order), reverse=True)

    def names(self) -> Iterator[str]:
        return iter(self.by_name)


def find_mirror(sources: tuple[Path, ...] = (Path("/etc/apt/sources.list"),
                                             Path("/etc/apt/sources.list.d"))) -> str:
    """The Debian mirror the host's apt uses (MEMSLOT_LAB_MIRROR overrides): the URI of the
    first entry, one-line or deb822, that serves a non-security suite's ``main``."""
    env = os.environ.get("MEMSLOT_LAB_MIRROR")
    if env:
        return env.rstrip("/")
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files.extend(sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources")))
        elif src.is_file():
            files.append(src)
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        uri = mirror_in(text, deb822=path.suffix == ".sources")
        if uri:
            return uri
    raise ArchiveUnreachable("no Debian mirror in the host's apt sources "
                             "(set MEMSLOT_LAB_MIRROR to the archive's URL)")


def mirror_in(text: str, deb822: bool) -> str | None:
    """The first Debian mirror URI in one sources file's text (None if it has none)."""
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            f: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0] in " \t":
                    continue
                k, _, v = line.partition(":")
                f[k.strip().lower()] = v.strip()
            if f.get("enabled", "yes").lower() == "no" or "deb" not in f.get("types", "").split():
                continue
            suites = f.get("suites", "").split()
            if ("main" in f.get("components", "").split() and _debian_suite(suites)
                    and f.get("uris")):
                return f["uris"].split()[0].rstrip("/")
        return None
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 4 and words[0] == "deb" and "main" in words[3:] \
                and _debian_suite([words[2]]):
            return words[1].rstrip("/")
    return None


def _debian_suite(suites: list[str]) -> bool:
    known = ("bullseye", "bookworm", "trixie", "forky", "sid", "unstable", "testing", "stable",
             "oldstable", "experimental")
    return any(s in known or (s.split("-")[0] in known and not s.endswith("-security"))
               for s in suites)


def apt_config(root: Path, arch: str) -> str:
    """The private apt.conf of one (suite, arch) directory ``root``: its own state, cache,
    sources and (empty) parts, no host configuration, one foreign architecture."""
    return "\n".join((
        f'Dir::State "{root}";',
        f'Dir::State::Lists "{root}/lists";',
        f'Dir::State::status "{root}/status";',
        f'Dir::Cache "{root}/cache";',
        f'Dir::Cache::archives "{root}/cache/archives";',
        'Dir::Cache::pkgcache "";',
        'Dir::Cache::srcpkgcache "";',
        f'Dir::Etc::SourceList "{root}/sources.list";',
        f'Dir::Etc::SourceParts "{root}/empty";',
        f'Dir::Etc::Parts "{root}/empty";',
        f'Dir::Etc::Preferences "{root}/empty/preferences";',
        f'Dir::Etc::PreferencesParts "{root}/empty";',
        f'APT::Architecture "{arch}";',
        f'APT::Architectures {{ "{arch}"; }};',
        'APT::Sandbox::User "root";',
        'APT::Get::AllowUnauthenticated "false";',
        # sid and experimental Release files carry a short Valid-Until; a mirror's snapshot
        # outlives it.
        'Acquire::Check-Valid-Until "false";',
        'Acquire::Languages "none";',
        'Acquire::GzipIndexes "false";',
        'Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";',
        'Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";',
        'Acquire::Retries "2";',
        'Acquire::http::Timeout "30";',
        "",
    ))


def sources_list(mirror: str, suite: str, arch: str, keyrings: tuple[Path, ...]) -> str:
    signed = ",".join(str(k) for k in keyrings)
    return f"deb [arch={arch} signed-by={signed}] {mirror} {suite} main\n"


class Archive:
    """One suite of Debian's archive for one architecture, in a private apt configuration."""

    def __init__(self, suite: str, arch: str, cache: Path, mirror: str | None = None,
                 log: Log | None = None) -> None:
        self.suite = suite
        self.arch = arch
        self.cache = cache
        self.root = cache / "apt" / f"{suite}_{arch}"
        self.debs = cache / "debs"
        self._mirror = mirror
        self.log = log or (lambda _msg: None)
        self._index: PackageIndex | None = None

    @property
    def mirror(self) -> str:
        if self._mirror is None:
            self._mirror = find_mirror()
        return self._mirror

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "APT_CONFIG": str(self.root / "apt.conf"), "LC_ALL": "C"}

    def keyrings(self) -> tuple[Path, ...]:
        """Debian's archive keyring: the host's, plus a newer one the lab installed."""
        extra = self.cache / "keyrings" / "debian-archive-keyring.gpg"
        found = tuple(k for k in (HOST_KEYRING, extra) if k.is_file())
        if not found:
            raise ToolMissing(f"no Debian archive keyring at {HOST_KEYRING} "
                              "(run 'make lab-deps')")
        return found

    def configure(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "empty"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        (self.root / "apt.conf").write_text(apt_config(self.root, self.arch))
        (self.root / "sources.list").write_text(
            sources_list(self.mirror, self.suite, self.arch, self.keyrings()))

    def packages_file(self) -> Path | None:
        found = sorted((self.root / "lists").glob(
            f"*_dists_{self.suite}_main_binary-{self.arch}_Packages"))
        return found[0] if found else None

    def update(self, force: bool = False) -> None:
        """Fetch (and verify) the suite's index unless a fresh one is there."""
        max_age = float(os.environ.get("MEMSLOT_LAB_REFRESH", INDEX_MAX_AGE))
        current = self.packages_file()
        if not force and current is not None and time.time() - current.stat().st_mtime < max_age:
            return
        _need("apt-get")
        self.configure()
        self.log(f"apt: fetching the {self.suite} index for {self.arch}")
        proc = subprocess.run(["apt-get", "-q", "update"], env=self.env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
        fresh = self.packages_file()
        if proc.returncode == 0 and fresh is not None and "E: " not in output:
            self._index = None
            return
        problem = classify_apt_failure(output)
        if current is not None and problem == "unreachable":
            self.log(f"apt: archive unreachable, using the {self.suite} index already cached")
            return
        detail = _first_error(output)
        if problem == "signature":
            raise ArchiveUnreachable(
                f"the {self.suite} Release file does not verify with Debian's archive keyring "
                f"({detail}); a newer debian-archive-keyring may be needed")
        if problem == "unreachable":
            raise ArchiveUnreachable(f"Debian's archive is unreachable at {self.mirror} "
                                     f"({detail})")
        raise ArchiveUnreachable(f"apt could not fetch the {self.suite} index for "
                                 f"{self.arch}: {detail}")

    def index(self) -> PackageIndex:
        if self._index is None:
            self.update()
            path = self.packages_file()
            if path is None:  # pragma: no cover - update() raises first
                raise ArchiveUnreachable(f"no {self.suite} index for {self.arch}")
            idx = PackageIndex()
            with open(path, encoding="utf-8", errors="replace") as f:
                for pkg in parse_packages(f):
                    idx.add(pkg)
            self._index = idx
        return self._index

    def download(self, pkg: Package) -> Path:
        """The package's .deb in the lab's cache, fetched (and hash-checked) by apt if it is
        not there yet. :class:`PoolLag` when the pool answers 404."""
        self.debs.mkdir(parents=True, exist_ok=True)
        path = self.debs / pkg.deb_name
        if path.is_file() and path.stat().st_size == pkg.size:
            return path
        _need("apt-get")
        self.configure()
        self.log(f"apt: downloading {pkg.name} {pkg.version} ({pkg.size / 1e6:.1f} MB)")
        proc = subprocess.run(["apt-get", "-q", "download", f"{pkg.name}:{pkg.arch}={pkg.version}"],
                              cwd=self.debs, env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 and path.is_file():
            return path
        problem = classify_apt_failure(output)
        if problem == "lag":
            raise PoolLag(f"the pool does not serve {pkg.name} {pkg.version} (404)")
        if problem == "unreachable":
            raise ArchiveUnreachable(f"Debian's archive is unreachable at {self.mirror} "
                                     f"({_first_error(output)})")
        raise PackageMissing(f"apt could not download {pkg.name} {pkg.version}: "
                             f"{_first_error(output)}")


def classify_apt_failure(output: str) -> str:
    """'lag' (404), 'signature', 'unreachable' or 'other' for apt's error output."""
    if any(s in output for s in _LAG):
        return "lag"
    if any(s in output for s in _SIGNATURE):
        return "signature"
    if any(s in output for s in _UNREACHABLE):
        return "unreachable"
    return "other"


def _first_error(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("E:", "Err:", "W:")):
            return line.split(":", 1)[1].strip()[:200]
    return (output.strip().splitlines() or ["no output"])[-1][:200]


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise ToolMissing(f"{tool} is not installed (run 'make lab-deps')")

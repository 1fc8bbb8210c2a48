"""Boot images, built from Debian packages without emulation (``dpkg-deb -x``).

A target's initramfs is three concatenated archives: the userland of its architecture
(busybox, Python 3.13 and numpy; built once per architecture), its kernel's KVM modules (the
closure of their modinfo ``depends``; Debian ships no modules.dep), and a small per-run archive
with the init script, the memslot package and the job (see :mod:`.session`). The kernel image is
unpacked where QEMU cannot boot Debian's packaging of it (gzip, EFI zboot).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .archive import Archive, Package
from .bytecode import compile_tree, host_python
from .cpio import CpioWriter
from .errors import ImageError, ToolMissing
from .resolve import USERLAND_ROOTS, USERLAND_SKIP, fetch_kernel, fetch_userland
from .targets import USERLAND_FALLBACKS, USERLAND_SUITE, Target, cache_dir
from .unpack import extract, need

Log = Callable[[str], None]

#: Paths of the userland packages a guest never reads.
USERLAND_EXCLUDE = (
    "usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/locale/",
    "usr/share/lintian/", "usr/share/bug/", "usr/share/bash-completion/", "usr/include/",
    "usr/share/gdb/", "usr/share/pixmaps/", "usr/share/applications/", "etc/",
    "usr/lib/python3.13/test/", "usr/lib/python3.13/idlelib/", "usr/lib/python3.13/tkinter/",
    "usr/lib/python3.13/turtledemo/", "usr/lib/python3.13/ensurepip/",
    "usr/lib/python3.13/lib2to3/", "usr/lib/python3.13/pydoc_data/",
    "usr/lib/python3.13/config-", "usr/share/python3/", "usr/share/binfmts/",
    "usr/lib/python3.13/lib-dynload/_test", "usr/lib/python3.13/lib-dynload/_ctypes_test",
)
_EXCLUDE_PARTS = ("/gconv/", "/tests/", "/numpy/f2py/", "/numpy/_pyinstaller/",
                  "/numpy/typing/tests/", "/numpy/doc/")
_MERGED = ("bin", "sbin", "lib", "lib32", "lib64")


@dataclass(frozen=True)
class KernelImage:
    """A built target: what QEMU boots."""

    kernel: Path
    modules: Path  # gzip'd cpio with /lab/modules/*.ko and /lab/modules.order
    release: str
    packages: tuple[str, ...]


def userland_path(arch: str, cache: Path | None = None) -> Path:
    """The architecture's userland archive; its name changes with what goes into it, so a
    changed recipe builds a new one."""
    recipe = repr((USERLAND_ROOTS, sorted(USERLAND_SKIP), USERLAND_EXCLUDE, _EXCLUDE_PARTS,
                   _MERGED, USERLAND_SUITE)).encode()
    tag = hashlib.sha256(recipe).hexdigest()[:10]
    return (cache or cache_dir()) / "images" / f"userland-{arch}-{tag}.cpio"


def built(target: Target, cache: Path | None = None) -> KernelImage | None:
    """The target's image if it is built and complete, else None."""
    root = target.image_dir(cache)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = KernelImage(root / manifest["kernel"], root / "modules.cpio.gz",
                        manifest["release"], tuple(manifest["packages"]))
    userland = userland_path(target.machine.debian_arch, cache)
    if not (image.kernel.is_file() and image.modules.is_file() and userland.is_file()):
        return None
    return image


def build(target: Target, cache: Path | None = None, log: Log | None = None,
          force: bool = False) -> KernelImage:
    """Download the target's packages (cached) and build its image (cached)."""
    cache = cache or cache_dir()
    say = log or (lambda _m: None)
    if not force:
        done = built(target, cache)
        if done is not None:
            return done
    need("dpkg-deb")
    arch = target.machine.debian_arch
    userland = userland_path(arch, cache)
    if force or not userland.is_file():
        debs = fetch_userland(Archive(USERLAND_SUITE, arch, cache, log=say),
                              [Archive(s, arch, cache, log=say) for s in USERLAND_FALLBACKS])
        python = host_python(cache, say)
        say(f"image: building the {arch} userland ({len(debs)} packages"
            f"{', byte-compiled on the host' if python else ''})")
        build_userland(debs, userland, python)
    debs = fetch_kernel(Archive(target.suite, arch, cache, log=say), target)
    say(f"image: building {target.name} from {', '.join(p.name for p, _ in debs)}")
    return build_kernel(target, debs, target.image_dir(cache))


# -- userland -------------------------------------------------------------------------------
def userland_entries(root: Path) -> list[tuple[str, Path]]:
    """(path in the image, path on disk) of every kept file, directory and symlink of an
    unpacked userland, paths merged into /usr as on a current Debian system."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            disk = Path(dirpath) / name
            rel = disk.relative_to(root).as_posix()
            top = rel.split("/", 1)[0]
            if top in _MERGED:
                rel = "usr/" + rel
            if _excluded(rel + ("/" if disk.is_dir() and not disk.is_symlink() else "")):
                continue
            out.append((rel, disk))
    return out


def _excluded(rel: str) -> bool:
    return rel.startswith(USERLAND_EXCLUDE) or any(p in "/" + rel for p in _EXCLUDE_PARTS)


def build_userland(debs: list[tuple[Package, Path]], out: Path,
                   python: list[str] | None = None) -> None:
    """The userland archive (uncompressed: unpacking gzip under TCG costs more boot time than
    loading the larger file), byte-compiled with ``python`` when given."""
    with tempfile.TemporaryDirectory(prefix="memslot-lab-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        extract(debs, root)
        if python:
            compile_tree(python, [root / "usr/lib/python3.13", root / "usr/lib/python3"])
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        with open(partial, "wb") as raw:
            w = CpioWriter(raw)
            for d in ("dev", "proc", "sys", "tmp", "run", "root", "lab", "etc", "usr",
                      "usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
                w.directory(d, 0o1777 if d == "tmp" else 0o755)
            for link in _MERGED:
                w.symlink(link, f"usr/{link}")
            entries = userland_entries(root)
            names = {rel for rel, _ in entries}
            for rel, disk in entries:
                w.parents(rel)
                if disk.is_symlink():
                    w.symlink(rel, os.readlink(disk))
                elif disk.is_dir():
                    w.directory(rel)
                else:
                    w.file(rel, disk.read_bytes(), disk.stat().st_mode & 0o777)
            for rel, target in alternatives(names):
                w.symlink(rel, target)
            if "usr/bin/python3" not in names:
                w.symlink("usr/bin/python3", "python3.13")
            w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
            w.finish()
        partial.replace(out)


def alternatives(names: set[str]) -> list[tuple[str, str]]:
    """Links that maintainer scripts would make (update-alternatives for BLAS and LAPACK):
    ``usr/lib/T/libblas.so.3`` -> ``blas/libblas.so.3``."""
    out = []
    for rel in sorted(names):
        m = re.fullmatch(r"(usr/lib/[^/]+)/(blas|lapack)/(lib[a-z]+\.so\.\d+)", rel)
        if m and f"{m.group(1)}/{m.group(3)}" not in names:
            out.append((f"{m.group(1)}/{m.group(3)}", f"{m.group(2)}/{m.group(3)}"))
    return out


# -- kernel ---------------------------------------------------------------------------------
def build_kernel(target: Target, debs: list[tuple[Package, Path]], out: Path) -> KernelImage:
    with tempfile.TemporaryDirectory(prefix="memslot-lab-") as tmp:
        root = Path(tmp)
        extract(debs, root)
        moddir = _modules_dir(root)
        release = moddir.name
        kernel_file = _kernel_file(root, release)
        out.mkdir(parents=True, exist_ok=True)
        kernel_out = out / "kernel"
        kernel_out.write_bytes(bootable_kernel(kernel_file.read_bytes()))
        for name in ("config",):
            if (moddir / name).is_file():
                shutil.copy(moddir / name, out / name)
        boot_config = root / "boot" / f"config-{release}"
        if boot_config.is_file():
            shutil.copy(boot_config, out / "config")
        order = module_closure(moddir, target.machine.kvm_modules)
        with gzip.open(out / "modules.cpio.gz", "wb") as raw:
            w = CpioWriter(raw)  # type: ignore[arg-type]
            w.directory("lab")
            w.directory("lab/modules")
            names = []
            for i, (name, data) in enumerate(order):
                fname = f"{i:02d}-{name}.ko"
                w.file(f"lab/modules/{fname}", data)
                names.append(fname)
            w.file("lab/modules.order", "".join(n + "\n" for n in names).encode())
            w.finish()
        manifest = {"target": target.name, "release": release, "kernel": "kernel",
                    "packages": [f"{p.name}={p.version}" for p, _ in debs],
                    "modules": [n for n, _ in order], "built": time.time()}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    image = KernelImage(kernel_out, out / "modules.cpio.gz", release,
                        tuple(manifest["packages"]))  # type: ignore[arg-type]
    return image


def _modules_dir(root: Path) -> Path:
    for base in (root / "usr" / "lib" / "modules", root / "lib" / "modules"):
        if base.is_dir():
            subdirs = [d for d in base.iterdir() if d.is_dir()]
            if len(subdirs) == 1:
                return subdirs[0]
    raise ImageError("the kernel packages hold no (single) lib/modules/RELEASE directory")


def _kernel_file(root: Path, release: str) -> Path:
    for cand in (root / "boot" / f"vmlinuz-{release}", root / "boot" / f"vmlinux-{release}",
                 root / "usr/lib/modules" / release / "vmlinuz",
                 root / "usr/lib/modules" / release / "vmlinux",
                 root / "lib/modules" / release / "vmlinuz"):
        if cand.is_file():
            return cand
    raise ImageError(f"the kernel packages hold no vmlinuz/vmlinux for {release}")


def bootable_kernel(data: bytes) -> bytes:
    """The kernel as QEMU's ``-kernel`` takes it: gzip'd images unpacked, the payload of an
    EFI zboot image (``zimg``) extracted and unpacked; bzImage and ELF unchanged."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:2] == b"MZ" and data[4:8] == b"zimg":
        offset = int.from_bytes(data[8:12], "little")
        size = int.from_bytes(data[12:16], "little")
        kind = data[24:32].rstrip(b"\0").decode(errors="replace")
        payload = data[offset:offset + size]
        return decompress(payload, kind)
    return data


def decompress(data: bytes, kind: str) -> bytes:
    """gzip, xz, zstd (the zstd tool) or raw."""
    if kind in ("gzip", ".gz") or data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if kind in ("xz", "lzma", ".xz") or data[:6] == b"\xfd7zXZ\0":
        return lzma.decompress(data)
    if kind in ("zstd", ".zst") or data[:4] == b"\x28\xb5\x2f\xfd":
        if shutil.which("zstd") is None:
            raise ToolMissing("zstd is not installed (run 'make lab-deps')")
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True)
        if proc.returncode:
            raise ImageError(f"zstd could not unpack: {proc.stderr.decode()[:200]}")
        return proc.stdout
    if kind in ("", "none", ".ko"):
        return data
    raise ImageError(f"unknown compression {kind!r}")


def modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's .modinfo section (first of each key)."""
    out: dict[str, str] = {}
    for key in (b"name", b"depends", b"softdep"):
        m = re.search(rb"(?:^|\0)" + key + rb"=([^\0]*)\0", data)
        if m:
            out[key.decode()] = m.group(1).decode(errors="replace")
    return out


def module_closure(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, unpacked .ko) of the wanted modules and their dependencies, dependencies first;
    modules built into the kernel are left out."""
    files: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        files[_modname(path.name)] = path
    builtin: set[str] = set()
    if (moddir / "modules.builtin").is_file():
        builtin = {_modname(Path(line.strip()).name)
                   for line in (moddir / "modules.builtin").read_text().splitlines() if line}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        path = files.get(name)
        if path is None:
            raise ImageError(f"module {name} is neither built into {moddir.name} nor shipped "
                             "as a module")
        data = decompress(path.read_bytes(), "".join(path.suffixes[1:]))
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            visit(dep)
        order.append((name, data))

    for name in wanted:
        visit(name)
    return order


def _modname(filename: str) -> str:
    return filename.split(".ko", 1)[0].replace("-", "_")

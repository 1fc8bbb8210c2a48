"""The kernel lab's pure parts: apt configuration, package resolution with its fallbacks, the
initramfs layout, QEMU command lines, console parsing and hang handling (with a fake QEMU), the
matrix table. No network, no QEMU, no downloads."""

from __future__ import annotations

import _thread
import gzip
import io
import json
import lzma
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from memslot.cli.main import main
from memslot.lab import debversion, image, matrix, qemu, resolve, session
from memslot.lab.archive import (
    Archive,
    Package,
    PackageIndex,
    PoolLag,
    apt_config,
    classify_apt_failure,
    find_mirror,
    mirror_in,
    parse_depends,
    parse_packages,
    sources_list,
)
from memslot.lab.cpio import CpioWriter, read_cpio
from memslot.lab.errors import GuestHang, ImageError, PackageMissing, UnknownTarget
from memslot.lab.overlay import BEGIN, BOOTED, EXIT, INIT, build_overlay
from memslot.lab.targets import Target, all_targets, get_target, newest

# --- targets ---------------------------------------------------------------------------------


def test_targets_cover_the_machines_and_versions() -> None:
    names = [t.name for t in all_targets()]
    assert {"amd64:5.10", "amd64:7.3", "arm64:6.1", "arm64-16k:7.2", "riscv64:7.2",
            "ppc64el:6.12"} <= set(names)
    s390 = get_target("s390x:6.12")
    assert not s390.bootable and "SIE" in (s390.machine.impossible or "")
    assert newest("amd64").name == "amd64:7.3"
    assert get_target("arm64:5.10").suite == "bullseye"


@pytest.mark.parametrize("name", ["amd64", "amd64:9.9", "mips:6.1", "riscv64:5.10", ""])
def test_unknown_targets(name: str) -> None:
    with pytest.raises(UnknownTarget):
        get_target(name)


# --- Debian versions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("7.2.13-1", "7.2.12-1", 1),
    ("7.3~rc7-1~exp1", "7.3-1", -1),
    ("7.3~rc7-1~exp1", "7.3~rc6-1~exp1", 1),
    ("1:2.2.4+ds-1", "2.3-1", 1),
    ("6.1.153-1", "6.1.153-1", 0),
    ("1.0a-1", "1.0-1", 1),
    ("1.0+b1", "1.0", 1),
    ("5.10.244-1", "5.10.99-1", 1),
])
def test_debian_version_order(a: str, b: str, expected: int) -> None:
    assert debversion.compare(a, b) == expected
    assert debversion.compare(b, a) == -expected


def test_kernel_series_membership() -> None:
    assert debversion.in_series("7.2.13-1", "7.2")
    assert debversion.in_series("7.3~rc7-1~exp1", "7.3")
    assert not debversion.in_series("7.21.0-1", "7.2")
    assert not debversion.in_series("6.12.1-1", "6.1")
    assert debversion.newest_first(["1.0-1", "1.0-2", "0.9-9"]) == ["1.0-2", "1.0-1", "0.9-9"]


# --- apt configuration -------------------------------------------------------------------------


def test_private_apt_config(tmp_path: Path) -> None:
    text = apt_config(tmp_path, "riscv64")
    assert f'Dir::State::status "{tmp_path}/status";' in text
    assert f'Dir::Etc::Parts "{tmp_path}/empty";' in text  # no host configuration
    assert 'APT::Architectures { "riscv64"; };' in text
    assert 'Acquire::Check-Valid-Until "false";' in text  # sid, experimental
    line = sources_list("http://mirror.example/debian", "sid", "arm64",
                        (Path("/k1.gpg"), Path("/k2.gpg")))
    assert line == ("deb [arch=arm64 signed-by=/k1.gpg,/k2.gpg] http://mirror.example/debian "
                    "sid main\n")


def test_archive_configure_writes_only_its_directory(tmp_path: Path) -> None:
    keyring = tmp_path / "keyrings" / "debian-archive-keyring.gpg"
    keyring.parent.mkdir()
    keyring.write_bytes(b"key")
    a = Archive("sid", "arm64", tmp_path, mirror="http://mirror.example/debian")
    a.configure()
    root = tmp_path / "apt" / "sid_arm64"
    assert (root / "status").read_text() == ""
    assert "sid main" in (root / "sources.list").read_text()
    assert str(keyring) in (root / "sources.list").read_text()
    assert a.env["APT_CONFIG"] == str(root / "apt.conf")


def test_mirror_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deb822 = textwrap.dedent("""\
        Types: deb
        URIs: http://security.example/debian-security
        Suites: bookworm-security
        Components: main

        Types: deb
        URIs: http://mirror.example/debian/
        Suites: bookworm bookworm-updates
        Components: main
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
        """)
    assert mirror_in(deb822, deb822=True) == "http://mirror.example/debian"
    one_line = "# comment\ndeb [arch=amd64] http://m.example/debian trixie main contrib\n"
    assert mirror_in(one_line, deb822=False) == "http://m.example/debian"
    assert mirror_in("deb http://x.example/other nodistro main\n", deb822=False) is None
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(deb822)
    monkeypatch.delenv("MEMSLOT_LAB_MIRROR", raising=False)
    assert find_mirror((tmp_path / "missing.list", d)) == "http://mirror.example/debian"
    monkeypatch.setenv("MEMSLOT_LAB_MIRROR", "http://env.example/debian/")
    assert find_mirror((d,)) == "http://env.example/debian"


def test_apt_failures_are_classified() -> None:
    assert classify_apt_failure("Err:1 http://m/debian/pool/x.deb\n  404  Not Found") == "lag"
    assert classify_apt_failure("W: ... NO_PUBKEY 0E98404D386FA1D9") == "signature"
    assert classify_apt_failure("Err:1 ... Could not resolve 'm'") == "unreachable"
    assert classify_apt_failure("E: something else") == "other"


PACKAGES = textwrap.dedent("""\
    Package: linux-image-amd64
    Source: linux-signed-amd64 (7.2.13+1)
    Version: 7.2.13-1
    Architecture: amd64
    Depends: linux-base-amd64 (= 7.2.13-1), linux-image-7.2.13+deb14-amd64 (= 7.2.13-1)
    Size: 1000
    Filename: pool/main/l/x.deb
    Description: meta
     continuation line: ignored

    Package: linux-image-7.2.13+deb14-amd64
    Source: linux-signed-amd64 (7.2.13+1)
    Version: 7.2.13-1
    Architecture: amd64
    Depends: dracut | initramfs-tools (>= 0.120), linux-base-7.2.13+deb14-amd64 (= 7.2.13-1),
     linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)
    Size: 2000

    Package: linux-binary-7.2.13+deb14-amd64
    Source: linux-signed-amd64 (7.2.13+1)
    Version: 7.2.13-1
    Architecture: amd64
    Depends: linux-base-7.2.13+deb14-amd64 (= 7.2.13-1)
    Size: 3000

    Package: linux-modules-7.2.13+deb14-amd64
    Source: linux
    Version: 7.2.13-1
    Architecture: amd64
    Depends: kmod, linux-base-7.2.13+deb14-amd64 (= 7.2.13-1)
    Size: 4000

    Package: linux-base-7.2.13+deb14-amd64
    Source: linux
    Version: 7.2.13-1
    Architecture: amd64
    Size: 5000

    Package: linux-image-7.2.12+deb14-amd64
    Source: linux-signed-amd64 (7.2.12+1)
    Version: 7.2.12-1
    Architecture: amd64
    Depends: linux-base (>= 4.3~), kmod
    Size: 6000

    Package: linux-image-7.2.12+deb14-amd64-dbg
    Source: linux
    Version: 7.2.12-1
    Architecture: amd64
    Size: 7000

    Package: linux-image-6.12.1+deb13-amd64
    Source: linux-signed-amd64
    Version: 6.12.1-1
    Architecture: amd64
    Size: 8000

    Package: kmod
    Version: 34-1
    Architecture: amd64
    Size: 10

    Package: linux-base
    Version: 4.12
    Architecture: all
    Size: 10
    """)


def _index(text: str = PACKAGES) -> PackageIndex:
    idx = PackageIndex()
    for p in parse_packages(iter(text.splitlines(keepends=True))):
        idx.add(p)
    return idx


def test_packages_index_parsing() -> None:
    idx = _index()
    meta = idx.versions("linux-image-amd64")[0]
    assert meta.source == "linux-signed-amd64" and meta.size == 1000
    assert meta.depends == (("linux-base-amd64",), ("linux-image-7.2.13+deb14-amd64",))
    assert parse_depends("a (>= 1) | b:any, c [amd64], , d") == (("a", "b"), ("c",), ("d",))
    assert meta.deb_name == "linux-image-amd64_7.2.13-1_amd64.deb"
    epoch = Package("python3-numpy", "1:2.2.4+ds-1", "arm64", "numpy", (), "", 1)
    assert epoch.deb_name == "python3-numpy_1%3a2.2.4+ds-1_arm64.deb"


def test_kernel_resolution_follows_the_split_packages() -> None:
    idx = _index()
    candidates = resolve.kernel_candidates(idx, "amd64", "7.2")
    assert [p.name for p in candidates] == ["linux-image-7.2.13+deb14-amd64",
                                           "linux-image-7.2.12+deb14-amd64"]
    closure = resolve.kernel_closure(idx, candidates[0])
    assert sorted(p.name for p in closure) == [
        "linux-base-7.2.13+deb14-amd64", "linux-binary-7.2.13+deb14-amd64",
        "linux-image-7.2.13+deb14-amd64", "linux-modules-7.2.13+deb14-amd64"]
    # the older layout: one package; the generic linux-base and kmod are not the kernel's
    assert [p.name for p in resolve.kernel_closure(idx, candidates[1])] == [
        "linux-image-7.2.12+deb14-amd64"]
    assert resolve.kernel_candidates(idx, "arm64", "7.2") == []


class FakeArchive:
    """An archive whose pool lacks some versions (404) or is unreachable."""

    def __init__(self, idx: PackageIndex, lagging: set[str], suite: str = "sid") -> None:
        self.suite = suite
        self.arch = "amd64"
        self.idx = idx
        self.lagging = lagging
        self.messages: list[str] = []
        self.downloaded: list[str] = []

    def index(self) -> PackageIndex:
        return self.idx

    def log(self, message: str) -> None:
        self.messages.append(message)

    def download(self, pkg: Package) -> Path:
        if pkg.name in self.lagging:
            raise PoolLag(f"the pool does not serve {pkg.name} {pkg.version} (404)")
        self.downloaded.append(pkg.name)
        return Path(pkg.deb_name)


def test_kernel_download_falls_back_past_a_lagging_pool() -> None:
    fake = FakeArchive(_index(), lagging={"linux-modules-7.2.13+deb14-amd64"})
    got = resolve.fetch_kernel(fake, get_target("amd64:7.2"))  # type: ignore[arg-type]
    assert [p.name for p, _ in got] == ["linux-image-7.2.12+deb14-amd64"]
    assert any("trying another listed version" in m for m in fake.messages)


def test_kernel_download_reports_when_no_version_is_served() -> None:
    fake = FakeArchive(_index(), lagging={"linux-modules-7.2.13+deb14-amd64",
                                          "linux-image-7.2.12+deb14-amd64"})
    with pytest.raises(PackageMissing, match=r"serves none of the listed amd64:7\.2 kernels"):
        resolve.fetch_kernel(fake, get_target("amd64:7.2"))  # type: ignore[arg-type]
    with pytest.raises(PackageMissing, match=r"lists no 6\.1 kernel"):
        resolve.fetch_kernel(FakeArchive(_index(), set()),  # type: ignore[arg-type]
                             get_target("amd64:6.1"))


USERLAND = textwrap.dedent("""\
    Package: python3.13-minimal
    Version: 3.13.5-2
    Architecture: arm64
    Depends: libc6 (>= 2.38), libpython3.13-minimal (= 3.13.5-2), zlib1g
    Size: 1

    Package: libpython3.13-minimal
    Version: 3.13.5-2
    Architecture: arm64
    Depends: libc6, libssl3t64
    Size: 1

    Package: libc6
    Version: 2.41-12
    Architecture: arm64
    Depends: libgcc-s1
    Size: 1

    Package: libgcc-s1
    Version: 14.2.0-19
    Architecture: arm64
    Depends: gcc-14-base (= 14.2.0-19), libc6
    Size: 1

    Package: zlib1g
    Version: 1:1.3
    Architecture: arm64
    Size: 1

    Package: python3-numpy
    Version: 1:2.2.4+ds-1
    Architecture: arm64
    Depends: python3 (<< 3.14), libblas3 | libblas.so.3, libc6
    Size: 1

    Package: libopenblas0
    Version: 0.3
    Architecture: arm64
    Provides: libblas.so.3
    Size: 1
    """)


def test_userland_closure_skips_what_a_guest_never_reads() -> None:
    idx = _index(USERLAND)
    got = {p.name for p in resolve.userland_closure(idx, ("python3.13-minimal", "python3-numpy"))}
    # libblas3 is missing: its alternative libblas.so.3 is provided by libopenblas0
    assert got == {"python3.13-minimal", "libpython3.13-minimal", "libc6", "libgcc-s1",
                   "zlib1g", "python3-numpy", "libopenblas0"}
    with pytest.raises(PackageMissing, match="busybox-static"):
        resolve.userland_closure(idx, ("busybox-static",))


def test_userland_falls_back_to_a_newer_suite_when_the_pool_lags(
        monkeypatch: pytest.MonkeyPatch) -> None:
    trixie = FakeArchive(_index(USERLAND), lagging={"libc6"}, suite="trixie")
    sid = FakeArchive(_index(USERLAND.replace("2.41-12", "2.42-1")), set(), suite="sid")
    monkeypatch.setattr(resolve, "USERLAND_ROOTS", ("python3.13-minimal", "python3-numpy"))
    got = {p.name: p.version
           for p, _ in resolve.fetch_userland(trixie, [sid])}  # type: ignore[arg-type]
    assert got["libc6"] == "2.42-1" and got["zlib1g"] == "1:1.3"
    assert any("libc6 2.41-12 is not in the trixie pool" in m for m in trixie.messages)
    sid.lagging = {"libc6"}
    with pytest.raises(PackageMissing, match=r"tried 2\.41-12 \(trixie\), 2\.42-1 \(sid\)"):
        resolve.fetch_userland(trixie, [sid])  # type: ignore[arg-type]


# --- the image -------------------------------------------------------------------------------


def test_cpio_round_trip_and_alignment() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.parents("a/b/c.txt")
    w.file("a/b/c.txt", b"hello", 0o600)
    w.symlink("lib", "usr/lib")
    w.file("a/b/c.txt", b"dup ignored")
    w.finish()
    data = buf.getvalue()
    assert len(data) % 512 == 0
    entries = read_cpio(data)
    assert list(entries) == ["a", "a/b", "a/b/c.txt", "lib"]
    mode, content = entries["a/b/c.txt"]
    assert content == b"hello" and stat.S_ISREG(mode) and mode & 0o777 == 0o600
    assert stat.S_ISLNK(entries["lib"][0]) and entries["lib"][1] == b"usr/lib"
    assert stat.S_ISDIR(entries["a"][0])


def test_userland_layout_is_merged_into_usr(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for rel in ("lib/x86_64-linux-gnu/libz.so.1", "usr/bin/python3.13",
                "usr/share/doc/x/copyright", "usr/lib/python3.13/test/test_x.py",
                "usr/lib/python3.13/json/__init__.py",
                "usr/lib/python3.13/json/__pycache__/__init__.cpython-313.pyc",
                "usr/lib/python3/dist-packages/numpy/tests/test_a.py",
                "usr/lib/x86_64-linux-gnu/gconv/IBM1390.so", "etc/ld.so.conf"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    kept = {rel for rel, _ in image.userland_entries(root)}
    assert "usr/lib/x86_64-linux-gnu/libz.so.1" in kept
    assert "usr/lib/python3.13/json/__pycache__/__init__.cpython-313.pyc" in kept
    assert "usr/bin/python3.13" in kept
    assert not any(k.startswith(("usr/share/doc", "etc", "usr/lib/python3.13/test"))
                   or "/tests/" in k or "gconv" in k for k in kept)
    links = image.alternatives({"usr/lib/aarch64-linux-gnu/blas/libblas.so.3",
                                "usr/lib/aarch64-linux-gnu/lapack/liblapack.so.3",
                                "usr/lib/aarch64-linux-gnu/libc.so.6"})
    assert links == [("usr/lib/aarch64-linux-gnu/libblas.so.3", "blas/libblas.so.3"),
                     ("usr/lib/aarch64-linux-gnu/liblapack.so.3", "lapack/liblapack.so.3")]


def test_kernel_images_are_unpacked_for_qemu() -> None:
    raw = b"\x00kernel Image" * 100
    assert image.bootable_kernel(gzip.compress(raw)) == raw
    payload = gzip.compress(raw)
    header = bytearray(64)
    header[0:2] = b"MZ"
    header[4:8] = b"zimg"
    header[8:12] = (64).to_bytes(4, "little")
    header[12:16] = len(payload).to_bytes(4, "little")
    header[24:28] = b"gzip"
    assert image.bootable_kernel(bytes(header) + payload) == raw
    bzimage = b"MZ" + b"\0" * 100 + b"HdrS"
    assert image.bootable_kernel(bzimage) == bzimage
    assert image.decompress(lzma.compress(raw), ".xz") == raw
    with pytest.raises(ImageError, match="unknown compression"):
        image.decompress(b"abc", "lz4")


def _module(name: str, depends: str) -> bytes:
    return (b"\x7fELF....\0license=GPL\0" + f"depends={depends}\0name={name}\0".encode()
            + b"vermagic=7.2\0")


def test_module_closure_orders_dependencies_first(tmp_path: Path) -> None:
    moddir = tmp_path / "7.2.13+deb14-amd64"
    kvm = moddir / "kernel/arch/x86/kvm"
    kvm.mkdir(parents=True)
    (kvm / "kvm-amd.ko.xz").write_bytes(lzma.compress(_module("kvm_amd", "kvm,ccp")))
    (kvm / "kvm.ko.xz").write_bytes(lzma.compress(_module("kvm", "irqbypass")))
    ccp = moddir / "kernel/drivers/crypto/ccp"
    ccp.mkdir(parents=True)
    (ccp / "ccp.ko").write_bytes(_module("ccp", ""))
    (moddir / "modules.builtin").write_text("kernel/virt/lib/irqbypass.ko\n")
    order = image.module_closure(moddir, ("kvm_amd",))
    assert [n for n, _ in order] == ["kvm", "ccp", "kvm_amd"]
    assert order[0][1].startswith(b"\x7fELF")  # unpacked
    assert image.modinfo(order[2][1])["depends"] == "kvm,ccp"
    assert image.module_closure(moddir, ("irqbypass",)) == []  # built in
    with pytest.raises(ImageError, match="kvm_hv"):
        image.module_closure(moddir, ("kvm_hv",))


def test_overlay_holds_init_job_and_pure_python(tmp_path: Path) -> None:
    pkg = tmp_path / "memslot"
    (pkg / "lab").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "lab" / "guest.py").write_text("y = 2\n")
    (pkg / "engine.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"host bytecode")
    data = build_overlay({"kind": "cli", "argv": ["profiles"]}, {"/lab/user.py": b"pass\n"},
                         package_dir=pkg)
    entries = read_cpio(gzip.decompress(data))
    assert json.loads(entries["lab/job.json"][1]) == {"kind": "cli", "argv": ["profiles"]}
    assert entries["init"][1].decode() == INIT and entries["init"][0] & 0o111
    assert "lab/src/memslot/lab/guest.py" in entries and "lab/user.py" in entries
    assert not any(n.endswith((".so", ".pyc")) for n in entries)
    for marker in (BOOTED, BEGIN, EXIT):
        assert marker in INIT


# --- QEMU --------------------------------------------------------------------------------------


def test_qemu_command_line() -> None:
    t = get_target("arm64:6.1")
    cmd = qemu.qemu_command(t, Path("/k"), Path("/i"), cmdline_extra=("kvm-arm.mode=nvhe",))
    assert cmd[:4] == ["nice", "-n", "10", "qemu-system-aarch64"]
    assert "virt,virtualization=on,gic-version=3" in cmd and "max,pauth-impdef=on" in cmd
    assert cmd[cmd.index("-smp") + 1] == "1"  # one vCPU
    assert cmd[cmd.index("-kernel") + 1] == "/k" and cmd[cmd.index("-initrd") + 1] == "/i"
    append = cmd[cmd.index("-append") + 1]
    assert "console=ttyAMA0" in append and append.endswith("kvm-arm.mode=nvhe")
    ppc = qemu.qemu_command(get_target("ppc64el:6.12"), Path("/k"), Path("/i"), nice=0)
    assert ppc[0] == "qemu-system-ppc64" and "console=hvc0" in ppc[-1]
    assert any("cap-nested-hv=on" in a for a in ppc)
    x86 = qemu.qemu_command(get_target("amd64:7.3"), Path("/k"), Path("/i"))
    assert "-cpu" in x86 and x86[x86.index("-cpu") + 1] == "max"


def test_console_parser() -> None:
    con = qemu.Console()
    assert con.feed("[    1.0] Linux version 7.2\r\n") is None
    assert con.feed(BOOTED) is None and con.booted
    assert con.feed("@@MEMSLOT-LAB-MODULE-FAILED 00-kvm.ko@@") is None
    assert con.failed_modules == ["00-kvm.ko"]
    assert con.feed(BEGIN) is None and con.phase == "running"
    assert con.feed("2000 requests\r") == "2000 requests"
    assert con.feed("[  9.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!") is not None
    assert con.trouble and "soft lockup" in con.trouble[0]
    assert con.feed("tail" + EXIT + " 3@@") == "tail"
    assert con.status == 3 and con.phase == "done"
    assert con.feed("after") is None


FAKE_QEMU = """\
import os, sys, time
mode = os.environ.get("FAKE_QEMU_MODE", "ok")
state = os.environ.get("FAKE_QEMU_STATE")
if state:
    n = int(open(state).read()) if os.path.exists(state) else 0
    open(state, "w").write(str(n + 1))
    if n == 0 and mode == "hang-once":
        mode = "hang"
    elif mode == "hang-once":
        mode = "ok"
pidfile = os.environ.get("FAKE_QEMU_PIDS")
if pidfile:
    open(pidfile, "a").write(f"{os.getpid()}\\n")
print("SeaBIOS\\r\\n[    0.000000] Linux version 7.2.13", flush=True)
print("@@MEMSLOT-LAB-BOOTED@@", flush=True)
if mode == "noboot":
    time.sleep(600)
print("@@MEMSLOT-LAB-BEGIN@@", flush=True)
print("hello from the guest", flush=True)
print('@@RESULT {"kind": "detect", "profile": {"name": "detected"}}', flush=True)
if mode == "hang":
    print("[   30.1] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [python3:70]", flush=True)
    time.sleep(600)
if mode == "die":
    sys.exit(1)
print("@@MEMSLOT-LAB-EXIT 7@@", flush=True)
if mode == "slowoff":
    time.sleep(600)
"""


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    path = tmp_path / "fake-qemu"
    path.write_text(f"#!{sys.executable}\n" + FAKE_QEMU)
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is not running
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mode", ["ok", "slowoff"])
def test_boot_streams_output_and_returns_the_status(
        fake_qemu: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    lines: list[str] = []
    start = time.monotonic()
    status, con = qemu.boot([str(fake_qemu)], qemu.Deadlines(20, 20, shutdown=0.5),
                            lines.append)
    assert status == 7 and con.booted
    assert lines[0] == "hello from the guest" and lines[1].startswith("@@RESULT")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(("mode", "match"), [
    ("hang", "hung running the command.*soft lockup"),
    ("noboot", "hung booting"),
    ("die", "ended without finishing its command"),
])
def test_hangs_end_the_guest(fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             mode: str, match: str) -> None:
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    monkeypatch.setenv("FAKE_QEMU_PIDS", str(pids))
    start = time.monotonic()
    with pytest.raises(GuestHang, match=match) as info:
        qemu.boot([str(fake_qemu)], qemu.Deadlines(2.5, 1.5), lambda _l: None)
    assert time.monotonic() - start < 10
    assert info.value.log_tail  # the console's last lines come with it
    pid = int(pids.read_text().split()[0])
    assert not _alive(pid)  # nothing left running


def _fake_cache(tmp_path: Path, target_name: str) -> Path:
    cache = tmp_path / "cache"
    t = get_target(target_name)
    root = t.image_dir(cache)
    root.mkdir(parents=True)
    (root / "kernel").write_bytes(b"kernel")
    (root / "modules.cpio.gz").write_bytes(b"")
    (root / "manifest.json").write_text(json.dumps(
        {"release": "7.2.13+deb14-amd64", "kernel": "kernel", "packages": ["x=1"]}))
    image.userland_path(t.machine.debian_arch, cache).write_bytes(b"")
    return cache


def test_a_hang_is_retried_once_and_reported(fake_qemu: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _fake_cache(tmp_path, "amd64:7.2")
    monkeypatch.setattr(session, "host_python", lambda *_a: None)
    monkeypatch.setattr(session, "qemu_command", lambda *a, **k: [str(fake_qemu)])
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang-once")
    monkeypatch.setenv("FAKE_QEMU_STATE", str(tmp_path / "state"))
    out: list[str] = []
    result = session.run_job(get_target("amd64:7.2"), {"kind": "cli", "argv": ["profiles"]},
                             on_output=out.append, timeout=1.5, cache=cache,
                             qemu=str(fake_qemu))
    assert result.status == 7 and result.attempts == 2
    assert len(result.hangs) == 1 and "soft lockup" in result.hangs[0]
    assert result.results == [{"kind": "detect", "profile": {"name": "detected"}}]
    assert "hello from the guest" in out
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    with pytest.raises(GuestHang, match="hung 2 times"):
        session.run_job(get_target("amd64:7.2"), {"kind": "cli", "argv": ["x"]},
                        on_output=out.append, timeout=1.0, cache=cache, qemu=str(fake_qemu))


# --- CLI ----------------------------------------------------------------------------------------


def test_lab_list_and_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEMSLOT_LAB_CACHE", str(_fake_cache(tmp_path, "amd64:7.2")))
    assert main(["lab", "list", "--json"]) == 0
    rows = {r["target"]: r for r in json.loads(capsys.readouterr().out)["targets"]}
    assert rows["amd64:7.2"]["state"] == "built"
    assert rows["amd64:7.2"]["kernel"] == "7.2.13+deb14-amd64"
    assert rows["arm64:6.1"]["state"] == "not built"
    assert rows["s390x:6.12"]["state"].startswith("impossible")
    assert main(["lab", "run", "sparc:6.1", "--", "profiles"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown target" in err
    assert main(["lab", "run", "amd64:7.2"]) == 2
    assert "nothing to run" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert main(["lab", "run", "amd64:7.2", "--", "profiles"]) == 2
    err = capsys.readouterr().err
    assert "qemu-system-x86_64 is not installed (run 'make lab-deps')" in err
    assert err.count("\n") == 1
    assert main(["lab", "build", "s390x:6.12"]) == 2
    assert "SIE" in capsys.readouterr().err


# --- the matrix ----------------------------------------------------------------------------------


def _result(divergent: bool) -> session.RunResult:
    measurements = [{"shape": f"{n} pages at gfn 0", "step": s, "kernel_bytes": 4096,
                     "model_bytes": 4096 if (n != 512 or not divergent) else 0, "match":
                     n != 512 or not divergent, "samples": [4096]}
                    for n in (1, 512) for s in ("CREATE", "DELETE")]
    fuzz = {"kind": "fuzz", "label": "detected", "profile": "detected", "requests": 20000,
            "agreed": 19999 if divergent else 20000, "sequences": 50, "seconds": 90.0,
            "divergences": [{"what": "divergence at line 3: EINVAL vs EEXIST",
                             "reproducer": ["{}"]}] if divergent else [],
            "check_failures": []}
    preset = dict(fuzz, label="preset x86_64@7.2", profile="x86_64@7.2", agreed=20000,
                  divergences=[])
    return session.RunResult(
        "amd64:7.2", 1 if divergent else 0, 120.0, 20.0, 1, [],
        [{"kind": "detect", "profile": {"name": "detected"}, "release": "7.2.13+deb14-amd64"},
         fuzz, preset, {"kind": "measure", "measurements": measurements, "seconds": 5},
         {"kind": "pytest", "status": 0, "passed": 20, "failed": 0, "skipped": 1}])


def test_matrix_rows_and_markdown(tmp_path: Path) -> None:
    t = get_target("amd64:7.2")
    ok = matrix.rows_from(t, _result(False), [])
    assert ok.state == "ok" and not ok.failed
    assert ok.fuzz_cell("detected") == ("20,000", "100.000% (detected)")
    assert ok.fuzz_cell("preset") == ("20,000", "100.000% (x86_64@7.2)")
    assert ok.measure_cell() == "2/2" and ok.guest_cell() == "20/20"
    bad = matrix.rows_from(t, _result(True), [])
    assert bad.failed and bad.state == "DIVERGES"
    assert "EINVAL vs EEXIST" in bad.note and "metadata 1/2 shapes" in bad.note
    impossible = matrix.run_target(get_target("s390x:6.12"), matrix.MatrixOptions())
    assert impossible.state == "impossible" and not impossible.failed
    out = tmp_path / "kernel-matrix.md"
    matrix.write_markdown([ok, bad, impossible], out, matrix.MatrixOptions(), 600)
    text = out.read_text()
    assert "| amd64:7.2 | 7.2.13+deb14-amd64 | 20,000 | 100.000% (detected) |" in text
    assert "impossible: KVM needs the SIE" in text
    assert "total time 10.0 min" in text
    assert "EINVAL vs EEXIST" in text
    assert matrix.preset_candidates(get_target("ppc64el:6.1")) == ["ppc64-hv@6.1", "ppc64-hv"]


def test_matrix_saves_raw_results(tmp_path: Path) -> None:
    t = get_target("amd64:7.2")
    row = matrix.rows_from(t, _result(True), [])
    opts = matrix.MatrixOptions(results_dir=tmp_path)
    matrix._save(row, ["console line"], opts, None)
    d = tmp_path / "amd64-7.2"
    assert json.loads((d / "detect.json").read_text()) == {"name": "detected"}
    assert "EINVAL vs EEXIST" in (d / "fuzz-detected-divergences.txt").read_text()
    assert json.loads((d / "summary.json").read_text())["state"] == "DIVERGES"
    assert (d / "console.log").read_text() == "console line\n"
    loaded = matrix.load_rows(tmp_path)
    assert [r.target for r in loaded] == ["amd64:7.2"]
    assert loaded[0].fuzz_cell("detected") == row.fuzz_cell("detected")
    assert loaded[0].measure_cell() == "1/2"


def test_matrix_from_saved_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    matrix._save(matrix.rows_from(get_target("amd64:7.2"), _result(False), []), [],
                 matrix.MatrixOptions(results_dir=tmp_path), None)
    out = tmp_path / "m.md"
    assert main(["lab", "matrix", "--from-results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| amd64:7.2 | 7.2.13+deb14-amd64 | 20,000 |" in text
    assert "| arm64:6.1 | - | - | - | - | - | - | - | not run |" in text
    assert main(["lab", "matrix", "--from-results", str(tmp_path / "none")]) == 2
    assert "no saved matrix rows" in capsys.readouterr().err


def _wait_for(path: Path, seconds: float = 20) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise AssertionError(f"nothing wrote {path}")


def test_a_killed_lab_takes_its_guest_with_it(fake_qemu: Path, tmp_path: Path) -> None:
    """Even SIGKILL of the lab's process ends QEMU (PR_SET_PDEATHSIG)."""
    pids = tmp_path / "pids"
    script = ("import sys; from memslot.lab import qemu\n"
              f"qemu.boot([{str(fake_qemu)!r}], qemu.Deadlines(60, 60), print)\n")
    env = {**os.environ, "FAKE_QEMU_MODE": "hang", "FAKE_QEMU_PIDS": str(pids)}
    lab = subprocess.Popen([sys.executable, "-c", script], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        guest = _wait_for(pids)
        lab.kill()
        lab.wait(10)
        deadline = time.monotonic() + 10
        while _alive(guest) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(guest)
    finally:
        lab.kill()
        lab.wait(10)


def test_a_terminated_lab_run_ends_its_guest(fake_qemu: Path, tmp_path: Path) -> None:
    """SIGTERM to 'memslot lab run': the guest is ended in the finally, one-line message."""
    cache = _fake_cache(tmp_path, "amd64:7.2")
    (cache / "host-python" / "amd64").mkdir(parents=True)
    (cache / "host-python" / "amd64" / ".complete").touch()  # no host Python: guest compiles
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-system-x86_64").symlink_to(fake_qemu)
    pids = tmp_path / "pids"
    env = {**os.environ, "MEMSLOT_LAB_CACHE": str(cache), "FAKE_QEMU_MODE": "hang",
           "FAKE_QEMU_PIDS": str(pids), "PATH": f"{bindir}:{os.environ['PATH']}"}
    lab = subprocess.Popen([sys.executable, "-m", "memslot", "lab", "run", "amd64:7.2",
                            "--", "profiles"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        guest = _wait_for(pids)
        time.sleep(0.3)
        lab.terminate()
        _, err = lab.communicate(timeout=20)
        assert lab.returncode == 130
        assert "interrupted" in err
        assert not _alive(guest)
    finally:
        lab.kill()
        lab.wait(10)


# --- the matrix's scheduling (--jobs) ----------------------------------------------------------


def _fake_rows(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float],
               log: list[tuple[str, str]]) -> dict[str, int]:
    """Replace run_target: each target takes ``seconds[name]``; ``log`` gets (event, name);
    returns the peak number of targets running at once (key "peak")."""
    lock = threading.Lock()
    state = {"running": 0, "peak": 0}

    def fake(target: Target, opts: matrix.MatrixOptions, log_: object = None,
             cancel: threading.Event | None = None) -> matrix.Row:
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            log.append(("start", target.name))
        time.sleep(seconds[target.name])
        with lock:
            state["running"] -= 1
            log.append(("end", target.name))
        return matrix.Row(target.name, "ok", kernel=f"{target.version}-fake",
                          seconds=seconds[target.name])

    monkeypatch.setattr(matrix, "run_target", fake)
    return state


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_matrix_runs_up_to_jobs_targets_at_once(monkeypatch: pytest.MonkeyPatch,
                                                jobs: int) -> None:
    names = ["amd64:5.10", "amd64:6.1", "arm64:6.1", "riscv64:7.2"]
    seconds = {"amd64:5.10": 0.6, "amd64:6.1": 0.1, "arm64:6.1": 0.1, "riscv64:7.2": 0.1}
    events: list[tuple[str, str]] = []
    state = _fake_rows(monkeypatch, seconds, events)
    seen: list[str] = []
    rows = matrix.run_matrix([get_target(n) for n in names], matrix.MatrixOptions(),
                             on_row=lambda r: seen.append(r.target), jobs=jobs)
    assert [r.target for r in rows] == names  # target order, whatever finished first
    assert state["peak"] == min(jobs, len(names))
    assert sorted(seen) == sorted(names)
    if jobs == 1:
        assert seen == names
    else:  # rows are reported as they finish: the slow first target comes last
        assert seen[-1] == "amd64:5.10"
        assert [n for e, n in events if e == "start"][:jobs] == names[:jobs]
    with pytest.raises(ValueError):
        matrix.run_matrix([], matrix.MatrixOptions(), jobs=0)


def test_matrix_table_stays_in_target_order(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    names = ["amd64:5.10", "amd64:6.1", "arm64:6.1"]
    _fake_rows(monkeypatch, {"amd64:5.10": 0.5, "amd64:6.1": 0.05, "arm64:6.1": 0.05}, [])
    tables: list[str] = []
    real = matrix.write_markdown

    def spy(rows: list[matrix.Row], path: Path, *a: object, **k: object) -> None:
        real(rows, path, *a, **k)  # type: ignore[arg-type]
        tables.append(path.read_text())

    monkeypatch.setattr(matrix, "write_markdown", spy)
    out = tmp_path / "m.md"
    assert main(["lab", "matrix", "--targets", *names, "--jobs", "2", "--out", str(out)]) == 0

    def order(text: str) -> list[str]:
        return [line.split(" | ")[0].lstrip("| ") for line in text.splitlines()
                if line.startswith("| amd64") or line.startswith("| arm64")]

    assert len(tables) == 3
    assert all(order(t) == names for t in tables)  # finished rows and pending ones, in order
    assert "| amd64:5.10 | - |" in tables[0] and "not run" in tables[0]  # still running
    assert "| amd64:5.10 | 5.10-fake |" in tables[-1] and "not run" not in tables[-1]
    assert main(["lab", "matrix", "--targets", *names, "--jobs", "0"]) == 2


def _started(pids: Path, count: int, seconds: float = 20) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pids.exists() and len(pids.read_text().split()) >= count:
            return [int(p) for p in pids.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"{count} guests did not start")


def test_ctrl_c_on_a_parallel_matrix_ends_every_guest(
        fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two guests running, a third queued: Ctrl-C ends both QEMUs (through the real
    run_target / run_job / boot path) and never starts the third."""
    names = ["amd64:7.2", "amd64:6.1", "amd64:5.10"]
    for name in names:
        cache = _fake_cache(tmp_path, name)
    monkeypatch.setenv("MEMSLOT_LAB_CACHE", str(cache))
    monkeypatch.setattr(session, "host_python", lambda *_a: None)
    monkeypatch.setattr(session, "find_qemu", lambda _t: str(fake_qemu))
    monkeypatch.setattr(session, "qemu_command", lambda *a, **k: [str(fake_qemu)])
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    monkeypatch.setenv("FAKE_QEMU_PIDS", str(pids))
    started: list[int] = []

    def interrupt() -> None:
        started.extend(_started(pids, 2))
        _thread.interrupt_main()

    # interrupt_main() does nothing while SIGINT is ignored (a background launch) or left at
    # SIG_DFL: Python's own handler for the length of the test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    helper = threading.Thread(target=interrupt)
    helper.start()
    opts = matrix.MatrixOptions(measure=False, guest_checks=False, preset=False)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            matrix.run_matrix([get_target(n) for n in names], opts, jobs=2)
    finally:
        helper.join(30)
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 30
    assert len(started) == 2 and len(pids.read_text().split()) == 2  # the third never ran
    assert not any(_alive(pid) for pid in started)
    assert not [t for t in threading.enumerate() if t.name.startswith("memslot-lab")]

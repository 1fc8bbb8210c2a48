"""The initramfs format: a ``newc`` cpio archive (the kernel's
``Documentation/driver-api/early-userspace/buffer-format.rst``), written directly so the host
needs no cpio tool. The kernel unpacks several concatenated archives (each optionally
compressed) into one rootfs, which lets a cached image take a small per-run archive on top."""

from __future__ import annotations

import stat
from typing import BinaryIO

TRAILER = "TRAILER!!!"


class CpioWriter:
    """Writes entries in order; parents must be added before their children."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes, nlink: int = 1) -> None:
        name = name.strip("/") or "."
        if name in self.names and name != TRAILER:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        self.ino += 1
        self.out.write(header.encode() + encoded)
        self.out.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def parents(self, name: str) -> None:
        """Add every missing parent directory of ``name``."""
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.names:
                self.directory(path)

    def finish(self) -> None:
        self._entry(TRAILER, 0, b"")
        self.out.write(b"\0" * (-self.out.tell() % 512) if self.out.seekable() else b"")


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive: name -> (mode, data). For tests and inspection."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos:pos + 6] != b"070701":
            if data[pos:pos + 1] == b"\0":
                pos += 1
                continue
            raise ValueError(f"bad cpio magic at {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        body = name_start + namesize + (-(110 + namesize) % 4)
        content = data[body:body + filesize]
        pos = body + filesize + (-filesize % 4)
        if name == TRAILER:
            continue
        out[name] = (mode, content)
    return out

"""Guest memory as an ELF64 core file, the format QEMU's ``dump-guest-memory`` writes and
forensic tools read (Volatility 3's ELF layer, crash, drgn): an ``ET_CORE`` header, one
``PT_LOAD`` per region with ``p_paddr`` = its gpa and ``p_filesz`` = ``p_memsz`` = its size,
then the regions' bytes at page-aligned offsets. Zero pages are not written (the file is
sparse where the guest's memory is), and the file appears under its name only when complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np

__all__ = ["EM_AARCH64", "EM_PPC64", "EM_RISCV", "EM_S390", "EM_X86_64", "write_elf_core"]

EM_X86_64: Final = 62
EM_PPC64: Final = 21
EM_AARCH64: Final = 183
EM_RISCV: Final = 243
EM_S390: Final = 22
#: ``e_machine`` by machine name (``uname -m`` style) and by memslot profile arch.
MACHINES: Final = {"x86_64": EM_X86_64, "ppc64": EM_PPC64, "ppc64le": EM_PPC64,
                   "arm64": EM_AARCH64, "aarch64": EM_AARCH64, "riscv64": EM_RISCV,
                   "s390x": EM_S390, "x86": EM_X86_64, "ppc-hv": EM_PPC64, "ppc-pr": EM_PPC64,
                   "riscv": EM_RISCV, "s390": EM_S390}


def machine_of(vm: object) -> int:
    """``e_machine`` for a VM: its profile's arch (the model), else this host's."""
    import platform

    profile = getattr(vm, "profile", None)
    arch = getattr(profile, "arch", None)
    if isinstance(arch, str) and arch in MACHINES:
        return MACHINES[arch]
    return MACHINES.get(platform.machine(), EM_X86_64)

_ET_CORE: Final = 4
_PT_LOAD: Final = 1
_PF_RWX: Final = 7
_EHDR: Final = struct.Struct("<16sHHIQQQIHHHHHH")  # 64 bytes
_PHDR: Final = struct.Struct("<IIQQQQQQ")  # 56 bytes
_ALIGN: Final = 4096
_STEP: Final = 1 << 20  # bytes compared with zero (and written) at a time
_PN_XNUM: Final = 0xFFFF


def write_elf_core(path: str | os.PathLike[str], regions: Sequence[tuple[int, memoryview]],
                   machine: int = EM_X86_64) -> None:
    """Write ``regions`` (``(gpa, bytes)`` each) as an ELF64 little-endian core file."""
    if len(regions) >= _PN_XNUM:
        raise ValueError(f"{len(regions)} regions: more program headers than ELF allows here")
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, LSB, EV_CURRENT, SysV
    phoff = _EHDR.size
    offset = -(-(phoff + _PHDR.size * len(regions)) // _ALIGN) * _ALIGN
    headers = [_EHDR.pack(ident, _ET_CORE, machine, 1, 0, phoff, 0, 0, _EHDR.size, _PHDR.size,
                          len(regions), 0, 0, 0)]
    placed: list[tuple[int, memoryview]] = []
    for gpa, buf in regions:
        size = buf.nbytes
        headers.append(_PHDR.pack(_PT_LOAD, _PF_RWX, offset, 0, gpa, size, size, _ALIGN))
        placed.append((offset, buf))
        offset += -(-size // _ALIGN) * _ALIGN
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        _pwrite_all(fd, b"".join(headers), 0)
        for start, buf in placed:
            data = np.frombuffer(buf, dtype=np.uint8)
            for pos in range(0, data.size, _STEP):
                part = data[pos : pos + _STEP]
                if not part.any():
                    continue
                pages = part[: part.size - part.size % _ALIGN].reshape(-1, _ALIGN)
                used = np.flatnonzero(pages.view(np.uint64).any(axis=1))
                if part.size % _ALIGN:  # a tail shorter than a page: write it as it is
                    used = np.append(used, pages.shape[0])
                breaks = np.flatnonzero(np.diff(used) != 1) + 1
                for run in np.split(used, breaks):
                    lo, hi = int(run[0]) * _ALIGN, (int(run[-1]) + 1) * _ALIGN
                    _pwrite_all(fd, part[lo:hi].data, start + pos + lo)
        os.ftruncate(fd, offset)
        os.fsync(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

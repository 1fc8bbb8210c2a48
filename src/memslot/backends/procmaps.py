"""This process's VMAs over a range, as ``kvm_arch_prepare_memory_region`` sees them in
``current->mm``: read from ``/proc/self/maps``, and from ``/proc/self/smaps``'s ``VmFlags``
(the only place ``VM_PFNMAP`` shows) for the VMAs that meet the range."""

from __future__ import annotations

import re

from ..engine.vmas import Vma, VmFlag

MAPS = "/proc/self/maps"
SMAPS = "/proc/self/smaps"

#: ``VmFlags`` mnemonics of ``show_smap_vma_flags`` (fs/proc/task_mmu.c) that the model reads.
_SMAPS_FLAGS = {"rd": VmFlag.READ, "wr": VmFlag.WRITE, "ex": VmFlag.EXEC,
                "sh": VmFlag.SHARED, "pf": VmFlag.PFNMAP}


#: One line of /proc/PID/maps: start, end, permissions.
_LINE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ([-rwxsp]{4})", re.MULTILINE)
_PERMS = ((ord("r"), VmFlag.READ), (ord("w"), VmFlag.WRITE), (ord("x"), VmFlag.EXEC),
          (ord("s"), VmFlag.SHARED))


def _span(line: str) -> tuple[int, int]:
    lo, _, hi = line.split(None, 1)[0].partition("-")
    return int(lo, 16), int(hi, 16)


def parse_maps(text: str | bytes, start: int, end: int) -> list[Vma]:
    """The VMAs of a ``/proc/PID/maps`` text meeting ``[start, end)``, flags from the
    permission column (``rwxs``/``rwxp``). The lines are in address order."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    out = []
    for m in _LINE.finditer(data):
        lo = int(m[1], 16)
        if lo >= end:
            break
        hi = int(m[2], 16)
        if hi <= start:
            continue
        perms = m[3]
        flags = VmFlag.NONE
        for ch, flag in _PERMS:
            if ch in perms:
                flags |= flag
        out.append(Vma(lo, hi, flags))
    return out


def parse_smaps_flags(text: str, starts: set[int]) -> dict[int, VmFlag]:
    """``VmFlags`` of the VMAs of a ``/proc/PID/smaps`` text that begin at ``starts``."""
    out: dict[int, VmFlag] = {}
    current: int | None = None
    for line in text.splitlines():
        if line.startswith("VmFlags:"):
            if current is not None:
                flags = VmFlag.NONE
                for word in line.split()[1:]:
                    flags |= _SMAPS_FLAGS.get(word, VmFlag.NONE)
                out[current] = flags
            current = None
        elif line[:1] in "0123456789abcdef" and "-" in line.split(None, 1)[0]:
            lo = _span(line)[0]
            current = lo if lo in starts else None
    return out


def read_vmas(start: int, end: int, *, pfnmap: bool = True, maps: str = MAPS,
              smaps: str = SMAPS) -> list[Vma]:
    """This process's VMAs meeting ``[start, end)`` in address order (``[]`` for an empty
    range). ``VM_PFNMAP`` shows only in ``smaps``, which costs far more (it counts every
    VMA's pages): it is read only with ``pfnmap`` and when some VMA meets the range."""
    if start >= end:
        return []
    with open(maps, "rb") as f:
        vmas = parse_maps(f.read(), start, end)
    if not vmas or not pfnmap:
        return vmas
    try:
        with open(smaps, encoding="ascii", errors="replace") as f:
            exact = parse_smaps_flags(f.read(), {v.start for v in vmas})
    except OSError:  # no smaps (CONFIG_PROC_PAGE_MONITOR=n): the permissions are all there is
        return vmas
    return [v._replace(flags=exact.get(v.start, v.flags)) for v in vmas]

"""Byte sizes as people read them, the one formatter every listing uses."""

from __future__ import annotations

_UNITS = (("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))


def human_bytes(n: int, exact: bool = False) -> str:
    """``1536`` -> ``"1.5 KiB"`` (exact bytes below 1 KiB, one decimal above, negative sizes
    as deltas). With ``exact``, only a whole number of a unit (``"2 MiB"``) and otherwise the
    exact value in hex (``"0x1800"``), for layouts where rounding would mislead."""
    if exact:
        for unit, shift in _UNITS[1:]:
            if n >= 1 << shift and n % (1 << shift) == 0:
                return f"{n >> shift} {unit}"
        return f"{n:#x}"
    size = abs(n)
    if size < 1024:
        return f"{n} B"
    for unit, shift in reversed(_UNITS[1:]):
        if size < 1 << (shift + 10):
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n / (1 << 50):.1f} PiB"


def size_label(n: int) -> str:
    """A page size as people name it: ``2M``, ``1G``, ``32M``, ``64G`` (the largest unit
    that divides it)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 slot``, ``2 slots`` (``words`` for an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"

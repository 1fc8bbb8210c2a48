"""Debian version ordering (deb-version(7): epoch, upstream version, revision; ``~`` sorts
before everything, letters before other characters), used to try a package's listed versions
newest first."""

from __future__ import annotations

import functools
import re

_DIGITS = re.compile(r"\d+")


def _split(version: str) -> tuple[int, str, str]:
    epoch, sep, rest = version.partition(":")
    if not sep:
        epoch, rest = "0", version
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, "0"
    return int(epoch or 0), upstream, revision


def _order(ch: str) -> int:
    if ch == "~":
        return -1
    if ch.isalpha():
        return ord(ch)
    return ord(ch) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        # non-digit prefix, character by character
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ca = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            cb = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ca != cb:
                return -1 if ca < cb else 1
            if i < len(a) and not a[i].isdigit():
                i += 1
            if j < len(b) and not b[j].isdigit():
                j += 1
        ma = _DIGITS.match(a, i)
        mb = _DIGITS.match(b, j)
        na = int(ma.group()) if ma else 0
        nb = int(mb.group()) if mb else 0
        if na != nb:
            return -1 if na < nb else 1
        i = ma.end() if ma else i
        j = mb.end() if mb else j
    return 0


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian orders versions ``a`` and ``b``."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def newest_first(versions: list[str]) -> list[str]:
    return sorted(versions, key=functools.cmp_to_key(compare), reverse=True)


def in_series(version: str, series: str) -> bool:
    """Whether a package version belongs to a kernel series: ``7.2.13-1`` and ``7.2~rc3-1`` to
    ``7.2``, not ``7.21.0-1``."""
    _, upstream, _ = _split(version)
    if not upstream.startswith(series):
        return False
    rest = upstream[len(series):]
    return not rest or not rest[0].isdigit()

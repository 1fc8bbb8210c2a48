"""Exceptions. Every failure the kernel reports is a :class:`KvmError`, an ``OSError`` whose
``errno`` is the kernel's, raised identically by the model and the /dev/kvm backend."""

from __future__ import annotations

import errno as _errno
import os


class MemslotError(Exception):
    """Base class of memslot's own (non-kernel) errors."""


class KvmError(OSError):
    """A request the kernel (or the model of it) refused.

    ``errno`` and ``strerror`` are the kernel's; ``rule`` names the check that failed (the
    kernel function it lives in) and ``request`` describes what was asked.
    """

    def __init__(self, err: int, rule: str = "", request: str = "") -> None:
        detail = "; ".join(p for p in (rule, request) if p)
        super().__init__(err, os.strerror(err), detail or None)
        self.rule = rule
        self.request = request

    @property
    def errno_name(self) -> str:
        """Symbolic name of the errno, e.g. ``EEXIST``."""
        return _errno.errorcode.get(self.errno or 0, str(self.errno))

    def __str__(self) -> str:
        text = f"[Errno {self.errno}] {self.errno_name}: {self.strerror}"
        if self.rule:
            text += f" ({self.rule})"
        if self.request:
            text += f" for {self.request}"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.rule, self.request))


class KvmUnavailable(MemslotError, OSError):
    """There is no usable /dev/kvm (missing, not permitted, or not KVM)."""


class ClosedError(MemslotError, ValueError):
    """The VM (or vCPU) was closed; no further calls are possible."""


class GuestAddressError(MemslotError, ValueError):
    """A guest-physical access touched an address no region backs."""


def errno_value(name_or_value: str | int) -> int:
    """``"EEXIST"`` -> 17, ``"0"``/``0`` -> 0, ``17`` -> 17; ``ValueError`` otherwise."""
    if isinstance(name_or_value, int) and not isinstance(name_or_value, bool):
        if name_or_value < 0:
            raise ValueError(f"errno must not be negative: {name_or_value}")
        return name_or_value
    if isinstance(name_or_value, str):
        text = name_or_value.strip()
        if text.isdigit():
            return int(text)
        value = getattr(_errno, text.upper(), None)
        if isinstance(value, int) and text.upper().startswith("E"):
            return value
    raise ValueError(f"not an errno name or number: {name_or_value!r}")


def errno_name(value: int) -> str:
    """17 -> ``"EEXIST"``, 0 -> ``"0"``."""
    if value == 0:
        return "0"
    return _errno.errorcode.get(value, str(value))


class UnsupportedError(MemslotError, NotImplementedError):
    """The backend cannot do this (e.g. a model-only fault injection on :class:`DualVM`)."""

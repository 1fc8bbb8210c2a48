"""A bound on the kernel memory requests from untrusted input may make the real kernel
allocate. Before a request reaches ``/dev/kvm``, the model predicts the memslot metadata the
kernel would allocate for it (rmaps, lpage_info, write tracking, the dirty bitmap... per the
profile's arch), and :class:`KernelMemoryBudget` refuses it when the live total would pass the
limit: one 8 TiB slot on x86 shadow paging makes the kernel allocate about 20 GiB.

The prediction applies the request alone to a scratch :class:`~memslot.ModelVM` (a slot's
metadata depends on the slot only: its size, base gfn, flags and address alignment) and
deletes it again, so the budget's own memory stays a few entries per live slot."""

from __future__ import annotations

from typing import Final

from ..errors import KvmError, MemslotError
from ..profile import Profile
from ..request import MemoryRegion
from .model import ModelVM

__all__ = ["DEFAULT_FRACTION", "KernelMemoryBudget", "KernelMemoryLimitError", "default_limit",
           "parse_size"]

#: The default limit: this share of the machine's memory.
DEFAULT_FRACTION: Final = 8
_FALLBACK_LIMIT: Final = 2 << 30


class KernelMemoryLimitError(MemslotError):
    """A request refused because the kernel memory the model predicts for it would pass the
    budget's limit. Nothing was sent to the kernel."""


def default_limit() -> int:
    """An eighth of the machine's memory (``MemTotal``), or 2 GiB when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // DEFAULT_FRACTION
    except (OSError, ValueError, IndexError):
        pass
    return _FALLBACK_LIMIT


_UNITS: Final = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
                 "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"8GiB"``, ``"1073741824"`` -> bytes (``ValueError`` otherwise)."""
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):]
    if not number or unit not in _UNITS or len(number) > 20 or not number.isdigit():
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 8G, 1T)")
    return int(number) * _UNITS[unit]


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class KernelMemoryBudget:
    """Predicts and bounds the memslot metadata a kernel holds for the requests sent to it.
    Call :meth:`admit` before issuing a request (it raises :class:`KernelMemoryLimitError`)
    and :meth:`record` after it succeeded."""

    def __init__(self, profile: Profile | str, limit: int | None = None) -> None:
        self.limit = default_limit() if limit is None else limit
        self._scratch = ModelVM(profile)
        self._live: dict[tuple[int, int, int], int] = {}  # (VM, as_id, id) -> bytes
        self.total = 0

    def predict(self, region: MemoryRegion) -> int:
        """Bytes of metadata the kernel allocates for the slot this request leaves (0 for a
        DELETE, or a request the model refuses on its own)."""
        if region.memory_size == 0 or region.guest_memfd is not None:
            return 0
        scratch = self._scratch
        before = scratch.metadata_bytes()
        try:
            scratch.set_user_memory_region(region.slot, region.flags, region.guest_phys_addr,
                                           region.memory_size, region.userspace_addr)
        except (KvmError, ValueError, TypeError):
            return 0
        cost = scratch.metadata_bytes() - before
        scratch.set_user_memory_region(region.slot, 0, region.guest_phys_addr, 0,
                                       region.userspace_addr)
        return cost

    def admit(self, region: MemoryRegion) -> int:
        """The predicted cost of ``region``; raises when the kernel would hold more than the
        limit while it applies it (a MOVE holds the old and the new metadata at once)."""
        cost = self.predict(region)
        if cost and self.total + cost > self.limit:
            raise KernelMemoryLimitError(
                f"{region.describe()}: the kernel would allocate about {_human(cost)} of "
                f"memslot metadata for it (the model's prediction; {_human(self.total)} live), "
                f"more than the kernel memory limit of {_human(self.limit)}; refused before "
                "the kernel saw it (raise the limit with --kernel-memory-limit)"
            )
        return cost

    def record(self, region: MemoryRegion, cost: int, owner: int = 0) -> None:
        """Account a request the kernel accepted (``cost`` from :meth:`admit`) on VM number
        ``owner`` (a trace may drive several VMs; the limit covers them all)."""
        key = (owner, region.as_id, region.id)
        self.total -= self._live.pop(key, 0)
        if region.memory_size:
            self._live[key] = cost
            self.total += cost

    def close(self) -> None:
        self._scratch.close()

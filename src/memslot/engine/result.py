"""What one request did: the result record every request yields."""

from __future__ import annotations

from typing import Any, Final

from ..errors import errno_name
from ..request import MemoryRegion
from .change import ChangeType, Rule
from .ledger import Allocation, AllocGroup, flatten

# Steps of the update protocol (kvm_set_memory_region -> kvm_set_memslot), recorded by the
# engine as it takes them (OpResult.steps). A step that fails is the last forward step;
# the unwind steps after it undo what was done.
STEP_VALIDATE: Final = "validate"
STEP_NOOP: Final = "identical to the existing slot: nothing to do"
STEP_ALLOC_SLOT: Final = "kzalloc new slot"
STEP_GMEM_BIND: Final = "bind guest_memfd range"
STEP_ALLOC_INVALID: Final = "kzalloc INVALID working slot"
STEP_INVALIDATE: Final = "swap: old slot replaced by its INVALID copy"
STEP_ALLOC_BITMAP: Final = "prepare: allocate dirty bitmap"
STEP_KEEP_BITMAP: Final = "prepare: keep the old slot's dirty bitmap"
STEP_PREPARE_ARCH: Final = "prepare: arch"
STEP_FREE_BITMAP: Final = "free dirty bitmap (prepare failed)"
STEP_RESTORE: Final = "swap: old slot restored (prepare failed)"
STEP_INSTALL: Final = "swap: install"
STEP_REMOVE: Final = "swap: INVALID copy removed"
STEP_FREE_INVALID: Final = "kfree INVALID working slot"
STEP_COMMIT: Final = "commit: accounting and arch"
STEP_FREE_OLD: Final = "free old slot"
STEP_GMEM_UNBIND: Final = "unbind guest_memfd range (failed)"
STEP_FREE_NEW: Final = "kfree new slot (failed)"

# Where a failed request stopped (OpResult.stage).
STAGE_VALIDATE: Final = "validate"
STAGE_ALLOC_SLOT: Final = "alloc-slot"
STAGE_GMEM: Final = "gmem-bind"
STAGE_ALLOC_INVALID: Final = "alloc-invalid"
STAGE_BITMAP: Final = "prepare-bitmap"
STAGE_ARCH: Final = "prepare-arch"


class OpResult:
    """One request's outcome. ``errno`` 0 is success; otherwise ``rule`` failed.

    ``steps`` lists the protocol steps the engine took, in order, as it took them (the
    ``STEP_*`` strings; unwind steps included), ``allocated``/``freed`` the ledger entries this
    request created and released, ``generation_before``/``_after`` the address space's
    generation (``None`` if the request named an invalid address space).
    """

    __slots__ = ("_allocated", "_freed", "change", "detail", "errno", "generation_after",
                 "generation_before", "request", "rule", "stage", "steps")

    def __init__(self, request: MemoryRegion) -> None:
        self.request = request
        self.change: ChangeType | None = None
        self.errno = 0
        self.rule: Rule | None = None
        self.detail = ""
        self.generation_before: int | None = None
        self.generation_after: int | None = None
        self.stage: str | None = None
        self.steps: list[str] = []
        self._allocated: list[AllocGroup] = []
        self._freed: list[AllocGroup] = []

    @property
    def allocated(self) -> list[Allocation]:
        """Allocations made by this request, in order (including ones its unwind freed)."""
        return flatten(self._allocated)

    @property
    def freed(self) -> list[Allocation]:
        """Allocations released by this request, in order."""
        return flatten(self._freed)

    def __repr__(self) -> str:
        return f"<OpResult {self.summary()}>"

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def bytes_allocated(self) -> int:
        return sum(g.bytes for g in self._allocated)

    @property
    def bytes_freed(self) -> int:
        return sum(g.bytes for g in self._freed)

    @property
    def net_bytes(self) -> int:
        """Change of the live ledger total caused by this request."""
        return self.bytes_allocated - self.bytes_freed

    @property
    def vmalloc_delta(self) -> int:
        return sum(g.vmalloc_bytes for g in self._allocated) - sum(
            g.vmalloc_bytes for g in self._freed
        )

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)

    def summary(self) -> str:
        """One line: change type or errno, and the metadata moved."""
        what = str(self.change) if self.change else "-"
        if self.errno:
            text = f"{self.errno_name:<7} {what:<10} {self.rule}"
            if self.detail:
                text += f" ({self.detail})"
        else:
            text = f"{'ok':<7} {what:<10}"
        if self._allocated or self._freed:
            text += f"  +{self.bytes_allocated}B -{self.bytes_freed}B"
        return text

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "request": {
                "slot": r.slot, "as_id": r.as_id, "id": r.id, "flags": r.flags,
                "guest_phys_addr": r.guest_phys_addr, "memory_size": r.memory_size,
                "userspace_addr": r.userspace_addr,
                **({"guest_memfd": r.guest_memfd, "guest_memfd_offset": r.guest_memfd_offset}
                   if r.guest_memfd is not None else {}),
            },
            "change": str(self.change) if self.change else None,
            "errno": self.errno,
            "errno_name": self.errno_name,
            "rule": None if self.rule is None else {
                "code": self.rule.code, "function": self.rule.function, "text": self.rule.text},
            "detail": self.detail or None,
            "generation_before": self.generation_before,
            "generation_after": self.generation_after,
            "stage": self.stage,
            "steps": list(self.steps),
            "allocated": [a.as_dict() for a in self.allocated],
            "freed": [a.as_dict() for a in self.freed],
            "bytes_allocated": self.bytes_allocated,
            "bytes_freed": self.bytes_freed,
        }

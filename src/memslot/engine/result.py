"""What one request did: the result record every request yields."""

from __future__ import annotations

from typing import Any

from ..errors import errno_name
from ..request import MemoryRegion
from .change import ChangeType, Rule
from .ledger import Allocation, AllocGroup, flatten

# Steps of the update protocol (kvm_set_memory_region -> kvm_set_memslot), as recorded.
STEP_VALIDATE = "validate"
STEP_ALLOC_SLOT = "kzalloc new slot"
STEP_GMEM_BIND = "bind guest_memfd range"
STEP_ALLOC_INVALID = "kzalloc INVALID working slot"
STEP_INVALIDATE = "swap: old slot replaced by its INVALID copy"
STEP_FLUSH = "flush shadow mappings of the old slot"
STEP_PREPARE_BITMAP = "prepare: dirty bitmap"
STEP_PREPARE_ARCH = "prepare: arch"
STEP_RESTORE = "swap: old slot restored (prepare failed)"
STEP_INSTALL = "swap: install"
STEP_FREE_INVALID = "kfree INVALID working slot"
STEP_COMMIT = "commit: accounting and arch"
STEP_FREE_OLD = "free old slot"
STEP_FREE_NEW = "kfree new slot (failed)"
STEP_NOOP = "identical to the existing slot: nothing to do"

# Where a failed request stopped (OpResult.stage).
STAGE_VALIDATE = "validate"
STAGE_ALLOC_SLOT = "alloc-slot"
STAGE_GMEM = "gmem-bind"
STAGE_ALLOC_INVALID = "alloc-invalid"
STAGE_BITMAP = "prepare-bitmap"
STAGE_ARCH = "prepare-arch"


def protocol_steps(change: ChangeType | None, stage: str | None, gmem: bool) -> list[str]:
    """The steps ``kvm_set_memory_region`` takes for a request classified ``change`` that
    failed at ``stage`` (``None``: it succeeded); ``gmem`` if it binds a guest_memfd.

    The steps follow from these three facts, so results record only them and the list is
    built when someone reads it.
    """
    steps = [STEP_VALIDATE]
    if change is None or stage == STAGE_VALIDATE:
        return steps
    if change is ChangeType.NOOP:
        steps.append(STEP_NOOP)
        return steps
    invalidates = change is ChangeType.DELETE or change is ChangeType.MOVE
    has_new = change is not ChangeType.DELETE
    if has_new:
        steps.append(STEP_ALLOC_SLOT)
        if stage == STAGE_ALLOC_SLOT:
            return steps
        if gmem:
            steps.append(STEP_GMEM_BIND)
            if stage == STAGE_GMEM:
                return [*steps, STEP_FREE_NEW]
    tail = [STEP_FREE_NEW] if has_new else []
    if invalidates:
        steps.append(STEP_ALLOC_INVALID)
        if stage == STAGE_ALLOC_INVALID:
            return steps + tail
        steps += [STEP_INVALIDATE, STEP_FLUSH]
    if has_new:
        steps.append(STEP_PREPARE_BITMAP)
    if stage != STAGE_BITMAP:
        steps.append(STEP_PREPARE_ARCH)
    if stage is not None:
        if invalidates:
            steps += [STEP_RESTORE, STEP_FREE_INVALID]
        return steps + tail
    steps.append(STEP_INSTALL)
    if invalidates:
        steps.append(STEP_FREE_INVALID)
    steps.append(STEP_COMMIT)
    if change is not ChangeType.CREATE:
        steps.append(STEP_FREE_OLD)
    return steps


class OpResult:
    """One request's outcome. ``errno`` 0 is success; otherwise ``rule`` failed.

    ``steps`` lists the protocol steps taken, ``allocated``/``freed`` the ledger entries this
    request created and released, ``generation_before``/``_after`` the address space's
    generation (``None`` if the request named an invalid address space).
    """

    __slots__ = ("_allocated", "_freed", "change", "detail", "errno", "generation_after",
                 "generation_before", "request", "rule", "stage")

    def __init__(self, request: MemoryRegion) -> None:
        self.request = request
        self.change: ChangeType | None = None
        self.errno = 0
        self.rule: Rule | None = None
        self.detail = ""
        self.generation_before: int | None = None
        self.generation_after: int | None = None
        self.stage: str | None = None
        self._allocated: list[AllocGroup] = []
        self._freed: list[AllocGroup] = []

    @property
    def steps(self) -> list[str]:
        """The protocol steps this request went through, in order."""
        from ..constants import KVM_MEM_GUEST_MEMFD

        gmem = bool(self.request.flags & KVM_MEM_GUEST_MEMFD)
        return protocol_steps(self.change, self.stage if self.errno else None, gmem)

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
            "steps": self.steps,
            "allocated": [a.as_dict() for a in self.allocated],
            "freed": [a.as_dict() for a in self.freed],
            "bytes_allocated": self.bytes_allocated,
            "bytes_freed": self.bytes_freed,
        }

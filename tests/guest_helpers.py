"""Helpers shared by the guest-memory tests."""

from __future__ import annotations

import memslot
from memslot.guest import GuestRegion

PAGE = 4096


def guest_write(vm: memslot.ModelVM, region: GuestRegion, gpa: int, data: bytes) -> None:
    """What a vCPU does: store into the memory and let KVM mark the page."""
    off = gpa - region.gpa
    region.mapping.buffer[off : off + len(data)] = data
    for gfn in range(gpa // PAGE, (gpa + len(data) - 1) // PAGE + 1):
        vm.mark_page_dirty(gfn)

"""memslot: the Linux KVM memory-slot subsystem as an exact, executable model, a /dev/kvm
backend that answers the same calls, guest memory for Python VMMs, and trace tools.

>>> import memslot
>>> with memslot.ModelVM("x86_64-shadow") as vm:
...     vm.set_user_memory_region(0, 0, 0, 0x200000, 0x7f0000000000)
...     vm.memslots()[0].npages
512
"""

from . import constants as _constants
from .backends.base import (
    KVM_HVA_ERR_BAD,
    KVM_HVA_ERR_RO_BAD,
    VM,
    FaultInjection,
    ModelIntrospection,
    kvm_is_error_hva,
)
from .backends.dual import Divergence, DualVM
from .backends.kvm import KvmVM, kvm_available
from .backends.model import ModelVM
from .backends.vcpu import Vcpu
from .constants import *  # noqa: F403  (kernel names are the public names)
from .engine.change import ChangeType, Rule
from .engine.ledger import Allocation
from .engine.memslots import SwapEvent
from .engine.result import OpResult
from .engine.slot import MemorySlot
from .errors import ClosedError, GuestAddressError, KvmError, KvmUnavailable, MemslotError
from .guest import DirtySet, GuestMemory, GuestRegion, LayoutError, SnapshotError, SnapshotInfo
from .harness.detect import detect_profile
from .profile import PRESETS, Profile, get_profile
from .request import MemoryRegion

__version__ = "0.1.0"

__all__ = [
    "KVM_HVA_ERR_BAD",
    "KVM_HVA_ERR_RO_BAD",
    "PRESETS",
    "VM",
    "FaultInjection",
    "ModelIntrospection",
    "Allocation",
    "ChangeType",
    "ClosedError",
    "DirtySet",
    "GuestMemory",
    "GuestRegion",
    "LayoutError",
    "SnapshotError",
    "SnapshotInfo",
    "Divergence",
    "DualVM",
    "KvmVM",
    "Vcpu",
    "detect_profile",
    "kvm_available",
    "GuestAddressError",
    "KvmError",
    "KvmUnavailable",
    "MemoryRegion",
    "MemorySlot",
    "MemslotError",
    "ModelVM",
    "OpResult",
    "Profile",
    "Rule",
    "SwapEvent",
    "get_profile",
    "kvm_is_error_hva",
    *_constants.__all__,
]

"""memslot: the Linux KVM memory-slot subsystem as an exact, executable model, a /dev/kvm
backend that answers the same calls, guest memory for Python VMMs, and trace tools.

>>> import memslot
>>> with memslot.ModelVM("x86_64-shadow") as vm:
...     vm.set_user_memory_region(0, 0, 0, 0x200000, 0x7f0000000000)
...     vm.memslots()[0].npages
512
"""

import typing as _typing

from . import constants as _constants
from .constants import *  # noqa: F403  (kernel names are the public names)

if _typing.TYPE_CHECKING:
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

#: The public names above, imported on first use (``import memslot`` for the command line or
#: one class does not load the model, /dev/kvm, guest memory and numpy all at once).
_LAZY: dict[str, str] = {
    "KVM_HVA_ERR_BAD": "backends.base",
    "KVM_HVA_ERR_RO_BAD": "backends.base",
    "VM": "backends.base",
    "FaultInjection": "backends.base",
    "ModelIntrospection": "backends.base",
    "kvm_is_error_hva": "backends.base",
    "Divergence": "backends.dual",
    "DualVM": "backends.dual",
    "KvmVM": "backends.kvm",
    "kvm_available": "backends.kvm",
    "ModelVM": "backends.model",
    "Vcpu": "backends.vcpu",
    "ChangeType": "engine.change",
    "Rule": "engine.change",
    "Allocation": "engine.ledger",
    "SwapEvent": "engine.memslots",
    "OpResult": "engine.result",
    "MemorySlot": "engine.slot",
    "ClosedError": "errors",
    "GuestAddressError": "errors",
    "KvmError": "errors",
    "KvmUnavailable": "errors",
    "MemslotError": "errors",
    "DirtySet": "guest",
    "GuestMemory": "guest",
    "GuestRegion": "guest",
    "LayoutError": "guest",
    "SnapshotError": "guest",
    "SnapshotInfo": "guest",
    "detect_profile": "harness.detect",
    "PRESETS": "profile",
    "Profile": "profile",
    "get_profile": "profile",
    "MemoryRegion": "request",
}

if not _typing.TYPE_CHECKING:  # (to a type checker every public name is imported above)

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_LAZY))


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

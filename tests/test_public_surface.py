"""The package's public surface is curated: what ``import memslot`` offers is ``__all__`` plus
its subpackages, and nothing leaks from star imports."""

from __future__ import annotations

import types

import memslot
from memslot import constants


def test_public_names_are_all_declared() -> None:
    """Those loaded and those loaded on first use (``dir()``) alike."""
    public = {
        name for name in dir(memslot)
        if not name.startswith("_") and not isinstance(getattr(memslot, name), types.ModuleType)
    }
    assert public == set(memslot.__all__)
    loaded = {name for name, value in vars(memslot).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert loaded <= public


def test_constants_export_only_kernel_names_and_helpers() -> None:
    assert "Final" not in constants.__all__
    assert "annotations" not in constants.__all__
    assert all(
        name.startswith(("KVM_", "PAGE_")) or name in ("CAPABILITY_NAMES", "FLAG_NAMES",
                                                       "flag_names")
        for name in constants.__all__
    )
    for name in constants.__all__:
        assert getattr(memslot, name) is getattr(constants, name)

"""Shared test fixtures."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

import memslot


@functools.cache
def _kvm_status() -> tuple[bool, str]:
    from memslot.backends.kvm import kvm_available

    return kvm_available()


@pytest.fixture
def require_kvm() -> None:
    """Skip, with the reason from ``kvm_available()``, where /dev/kvm cannot make a VM."""
    ok, reason = _kvm_status()
    if not ok:
        pytest.skip(f"needs /dev/kvm: {reason}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``kvm`` use ``require_kvm``; tests using ``require_kvm`` are marked ``kvm``
    (so ``-m "not kvm"`` deselects them)."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        if item.get_closest_marker("kvm") is not None:
            if "require_kvm" not in item.fixturenames:
                item.fixturenames.insert(0, "require_kvm")
        elif "require_kvm" in item.fixturenames:
            item.add_marker(pytest.mark.kvm)


@pytest.fixture
def vm() -> Iterator[memslot.ModelVM]:
    """A model VM (default profile), closed after the test; files needing another backend
    define their own ``vm``."""
    machine = memslot.ModelVM()
    try:
        yield machine
    finally:
        machine.close()

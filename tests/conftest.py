"""Shared test fixtures."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Iterator

import pytest

import memslot


def pytest_configure(config: pytest.Config) -> None:
    """The Ctrl-C tests need SIGINT delivered: a shell without job control starts background
    commands (``make test &``, CI runners) with SIGINT ignored, which Python keeps, so
    ``_thread.interrupt_main()`` did nothing and children inherited the ignore."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config: pytest.Config) -> str:
    from memslot import build_info

    return f"memslot build under test: {build_info.describe()} ({memslot.__file__})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The build under test, also under ``-q`` (which hides the header)."""
    from memslot import build_info

    terminalreporter.write_line(f"memslot build under test: {build_info.describe()}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """``MEMSLOT_REQUIRE_COMPILED=1`` (CI, where a C compiler exists) fails the run at once
    when the install silently fell back to pure Python."""
    if os.environ.get("MEMSLOT_REQUIRE_COMPILED", "") in ("", "0"):
        return
    from memslot import build_info

    missing = sorted(set(build_info.COMPILED_MODULES) - set(build_info.compiled_modules()))
    if missing:
        raise pytest.UsageError(
            "MEMSLOT_REQUIRE_COMPILED is set but these modules run uncompiled: "
            + ", ".join(missing)
        )


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

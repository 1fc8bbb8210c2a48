"""Which build of memslot is running: the model's hot modules compiled with mypyc, or the same
modules as plain Python (``MEMSLOT_PURE_PYTHON=1``, an editable install, or no C compiler)."""

from __future__ import annotations

import importlib
import importlib.machinery

#: The modules ``setup.py`` compiles with mypyc when it can.
COMPILED_MODULES = (
    "memslot.engine.memslots",
    "memslot.engine.dirty",
    "memslot.engine.mm",
    "memslot.engine.slot",
    "memslot.engine.slotset",
    "memslot.engine.sorted_ints",
    "memslot.engine.hva_index",
    "memslot.engine.ledger",
    "memslot.engine.result",
    "memslot.engine.hooks",
    "memslot.arch.x86",
    "memslot.arch.ppc",
    "memslot.arch.arm64",
    "memslot.arch.riscv",
    "memslot.arch.s390",
    "memslot.trace.jsonl",
    "memslot.trace.lines",
    "memslot.harness.replay",
    "memslot.request",
)


def compiled_modules() -> list[str]:
    """The modules of :data:`COMPILED_MODULES` that were imported from a compiled extension."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    out = []
    for name in COMPILED_MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if path.endswith(suffixes):
            out.append(name)
    return out


def describe() -> str:
    """One line: ``compiled (mypyc, 12/12 modules)`` or ``pure Python``."""
    done = compiled_modules()
    if not done:
        return "pure Python"
    return f"compiled (mypyc, {len(done)}/{len(COMPILED_MODULES)} modules)"

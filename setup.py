"""Build hook: compile the model's hot modules with mypyc (they are plain, type-checked Python
and also run uncompiled). ``MEMSLOT_PURE_PYTHON=1`` (or a missing mypyc) skips compilation;
behaviour is identical either way, only the per-request cost differs (about 1.7x)."""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "src/memslot/engine/memslots.py",
    "src/memslot/engine/slotset.py",
    "src/memslot/engine/sorted_ints.py",
    "src/memslot/engine/hva_index.py",
    "src/memslot/engine/ledger.py",
    "src/memslot/engine/result.py",
    "src/memslot/engine/hooks.py",
    "src/memslot/arch/x86.py",
    "src/memslot/arch/ppc.py",
    "src/memslot/arch/arm64.py",
    "src/memslot/arch/riscv.py",
    "src/memslot/arch/s390.py",
]


def _extensions() -> list[object]:
    if os.environ.get("MEMSLOT_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    extensions = list(mypycify(COMPILED, opt_level="3", debug_level="1"))
    for ext in extensions:
        # A machine without a working C compiler still gets a working (pure) install.
        ext.optional = True
    return extensions


setup(ext_modules=_extensions())

"""Build hook: compile the model's hot modules with mypyc (they are plain, type-checked Python
and also run uncompiled). ``MEMSLOT_PURE_PYTHON=1`` (or a missing mypyc) skips compilation;
behaviour is identical either way, only the per-request cost differs (about 1.7x).

Editable installs are never compiled: mypyc would put ``.so`` files beside the sources in
``src/``, and Python imports those before the ``.py`` files, so edits would have no effect."""

from __future__ import annotations

import ast
import os
import re
import sys

from setuptools import setup

# The module list lives in memslot/build_info.py (read here without importing the package).
COMPILED = [
    "src/" + name.replace(".", "/") + ".py"
    for name in ast.literal_eval(
        re.search(r"COMPILED_MODULES = (\(.*?\))", open("src/memslot/build_info.py").read(), re.S)[1]
    )
]


def _extensions() -> list[object]:
    if os.environ.get("MEMSLOT_PURE_PYTHON", "") not in ("", "0"):
        return []
    if "editable_wheel" in sys.argv or "develop" in sys.argv:
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

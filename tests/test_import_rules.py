"""The layering of DESIGN.md, enforced: each package imports only from the layers below it
(relative imports inside ``src/memslot`` are read with ``ast``, nothing is executed)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import memslot

ROOT = pathlib.Path(memslot.__file__).parent
FOUNDATION = {"constants", "errors", "request", "profile", "versions", "closing", "build_info",
              "units"}

#: package -> what it may import besides itself (the foundation imports only the foundation).
ALLOWED: dict[str, set[str]] = {
    **{name: FOUNDATION for name in FOUNDATION},
    "engine": FOUNDATION,
    "arch": FOUNDATION | {"engine"},
    "backends": FOUNDATION | {"engine", "arch"},
    "trace": FOUNDATION,
    "guest": FOUNDATION | {"engine", "backends"},
    "harness": FOUNDATION | {"engine", "arch", "backends", "trace", "guest"},
    "tools": FOUNDATION | {"engine", "arch", "backends", "trace", "guest", "harness"},
    "lab": FOUNDATION | {"engine", "arch", "backends", "trace", "harness"},
}


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level memslot packages/modules that ``path`` imports relatively."""
    package = list(path.relative_to(ROOT).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            out.add(target[0] if target else node.names[0].name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            out.update(n.split(".")[1] for n in names if n.startswith("memslot."))
    return out


def _owner(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


MODULES = sorted(p for p in ROOT.rglob("*.py") if _owner(p) not in ("__init__", "__main__"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_lower_layers(path: pathlib.Path) -> None:
    owner = _owner(path)
    if owner == "cli":
        return  # the command line sits on top of everything
    assert owner in ALLOWED, f"{owner} has no place in the layering: add it to DESIGN.md"
    bad = _imports(path) - ALLOWED[owner] - {owner}
    assert not bad, f"{path.relative_to(ROOT)} ({owner}) imports {sorted(bad)}"

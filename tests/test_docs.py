"""The docs the code and tests cite stay true to the code."""

from __future__ import annotations

import importlib
import pathlib
import re

from memslot.tools import rules

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_rule_table_is_generated_from_the_code() -> None:
    text = (DOCS / "rules.md").read_text()
    start = text.index(rules.BEGIN)
    end = text.index(rules.END) + len(rules.END)
    assert text[start:end] == rules.render_table(), "run: python -m memslot.tools.rules"


def test_every_rule_code_is_unique_and_named() -> None:
    codes = [rule.code for _, rule in rules.all_rules()]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", code) for code in codes)


def test_checklist_items_have_tests() -> None:
    text = (DOCS / "rules.md").read_text()
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", text, re.M)]
    assert numbers == list(range(1, 81))
    tested = {
        int(n)
        for path in pathlib.Path(__file__).parent.glob("test_*.py")
        for n in re.findall(r"def test_rule_(\d+)_", path.read_text())
    }
    assert set(numbers) - tested <= {79}  # 79 is a NULL pointer: real-kernel test only


def test_model_to_kernel_table_names_existing_functions() -> None:
    text = (DOCS / "kernel-sources.md").read_text()
    table = text[text.index("<!-- model-to-kernel -->"):text.index("<!-- end model-to-kernel -->")]
    paths = re.findall(r"^\| `(memslot\.[\w.]+)` \|", table, re.M)
    assert len(paths) > 30
    for path in paths:
        obj: object = importlib.import_module("memslot")
        parts = path.split(".")[1:]
        for i, part in enumerate(parts):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                obj = importlib.import_module(".".join(["memslot", *parts[: i + 1]]))
        assert callable(obj), path

"""The model's VmallocUsed prediction against the real kernel's (issue: metadata cost)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import memslot
from memslot.harness.measure import measure

pytestmark = pytest.mark.kvm


def test_model_predicts_vmalloc_to_the_page() -> None:
    """1 page, unaligned-end 513 pages, and 2^19 pages where vmalloc's own page-pointer array
    is itself vmalloc'd; base gfn 0 and 1; dirty logging on and off; MOVE and DELETE."""
    results = measure(memslot.detect_profile(), sizes=(1, 513, 1 << 19), repeats=3)
    assert len(results) == 3 * 2 * (5 + 3)
    wrong = [m.as_dict() for m in results if not m.match]
    assert wrong == []
    by_step = {(m.shape, m.step): m.kernel_bytes for m in results}
    assert by_step[("1 pages at gfn 0", "CREATE")] == 24 * 1024  # six one-page arrays
    assert by_step[("524288 pages at gfn 0", "MOVE to gfn 2^28+1")] == 8 * 1024


def test_measure_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memslot", "measure-metadata", "--sizes", "1", "4096",
         "--repeats", "3"], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "32/32 steps match to the page" in proc.stdout

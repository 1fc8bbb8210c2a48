"""The fuzzer's edge-weighted sequences on every preset, model alone, check() after each."""

from __future__ import annotations

import pytest

import memslot
from memslot.harness.fuzz import run_fuzz


@pytest.mark.parametrize("profile", sorted(memslot.PRESETS))
def test_model_fuzz_keeps_invariants(profile: str) -> None:
    report = run_fuzz(1500, seed=7, profile=memslot.get_profile(profile), backend="model")
    assert report.check_failures == [], report.check_failures[:1]
    assert report.requests == 1500
    outcomes = {k for k, _ in report.outcomes}
    assert {"CREATE", "DELETE", "-"} <= outcomes

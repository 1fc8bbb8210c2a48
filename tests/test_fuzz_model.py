"""The fuzzer's edge-weighted sequences on every preset, model alone, check() after each."""

from __future__ import annotations

import pytest

import memslot
from memslot.harness.fuzz import run_fuzz


@pytest.mark.parametrize("profile", sorted(memslot.PRESETS))
def test_model_fuzz_keeps_invariants(profile: str) -> None:
    """... except on 5.6, where the fuzzer's MOVEs find the seed thread's bug."""
    report = run_fuzz(1500, seed=7, profile=memslot.get_profile(profile), backend="model")
    if not memslot.get_profile(profile).move_reallocates_arch:
        assert report.check_failures != []
        # Every failure is an rmap / lpage_info array shaped for the slot's old base.
        assert all("rmap[" in first or "lpage_info[" in first
                   for first, _ in report.check_failures), report.check_failures[:1]
        return  # the fuzzer stops once it has enough reproducers
    assert report.check_failures == [], report.check_failures[:1]
    assert report.requests == 1500
    outcomes = {k for k, _ in report.outcomes}
    assert {"CREATE", "DELETE", "-"} <= outcomes

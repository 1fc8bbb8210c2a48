"""Every committed trace replays: on the model (x86_64-shadow, the host's shape) and, where
/dev/kvm works, on the model and the kernel side by side. Every recorded ret must match,
except in the two synthesized format samples, whose requests for address space 1 (x86 SMM)
cannot succeed on a one-address-space host. The recorded guest_memfd (fd 27) is re-created by
the replay."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from memslot.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
TRACES = sorted((ROOT / "examples" / "traces").glob("*.trace"))
RECORDED = [t for t in TRACES if t.name.startswith("qemu72-")]

#: Lines whose recorded ret cannot hold on a host with one address space.
ONE_AS_MISMATCHES = {
    "format-qemu62.trace": {5, 7, 15},  # Slot#65536+: address space 1 -> EINVAL
    "format-qemu9.trace": {6, 13, 18},  # AddrSpace#1 lines -> EINVAL
}
#: With SMM (two address spaces) every recorded ret holds.
TWO_AS_MISMATCHES: dict[str, set[int]] = {}


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def replay_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli("replay", "--json", *args)
    assert err == "", err
    return code, json.loads(out)


def mismatched_lines(data: dict[str, Any]) -> set[int]:
    return {s["line"] for s in data["steps"] if s["mismatch"]}


def test_every_trace_is_covered() -> None:
    assert len(RECORDED) == 9
    assert set(ONE_AS_MISMATCHES) | {t.name for t in RECORDED} == {t.name for t in TRACES}


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_model_shadow_profile(trace: Path) -> None:
    code, data = replay_json("--profile", "x86_64-shadow", "--check", str(trace))
    expected = ONE_AS_MISMATCHES.get(trace.name, set())
    assert mismatched_lines(data) == expected
    assert code == (1 if expected else 0)
    assert data["check"] == []
    compared = [s for s in data["steps"] if s["op"].get("expect") is not None]
    assert compared, "the trace records results"
    for s in compared:
        want = s["op"]["expect"]
        got = s["errno_name"] if s["errno"] else 0
        assert (got == want) == (s["line"] not in expected), s


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_model_smm_profile(trace: Path) -> None:
    _code, data = replay_json("--profile", "x86_64", str(trace))
    assert mismatched_lines(data) == TWO_AS_MISMATCHES.get(trace.name, set())


def test_recorded_failure_is_reproduced() -> None:
    code, data = replay_json("--profile", "x86_64-shadow",
                             str(ROOT / "examples/traces/qemu72-pc-9t-einval.trace"))
    assert code == 0
    last = data["steps"][-1]
    assert last["errno_name"] == "EINVAL"
    assert last["result"]["rule"]["code"] == "max-pages"


@pytest.mark.kvm
@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_kvm_side_by_side(trace: Path) -> None:
    """--backend both --profile detect: the kernel answers every request as the model does
    (no divergence), and as the trace recorded."""
    code, data = replay_json("--backend", "both", "--profile", "detect", str(trace))
    for s in data["steps"]:
        assert not any(p.startswith("divergence") for p in s.get("problems", [])), s
    from memslot.harness.detect import detect_profile

    table = ONE_AS_MISMATCHES if detect_profile().nr_address_spaces == 1 else TWO_AS_MISMATCHES
    expected = table.get(trace.name, set())
    assert mismatched_lines(data) == expected
    assert code == (1 if expected else 0)

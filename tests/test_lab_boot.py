"""One real boot of the newest amd64 target: memslot's fuzzer inside the guest, on the guest
kernel's /dev/kvm, agreeing with the model. Runs where QEMU is installed and the target's image
is cached (``make lab-deps``, ``memslot lab build amd64:7.3``); skipped with the reason
otherwise, so the suite never downloads anything."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from memslot.cli.main import main
from memslot.lab import image
from memslot.lab.targets import newest

pytestmark = pytest.mark.lab


def test_newest_amd64_kernel_agrees_with_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    target = newest("amd64")
    if shutil.which(target.machine.qemu) is None:
        pytest.skip(f"{target.machine.qemu} is not installed (make lab-deps)")
    if image.built(target) is None:
        pytest.skip(f"{target.name} is not built (memslot lab build {target.name})")
    status = main(["lab", "run", target.name, "--", "fuzz", "--ops", "400", "--seed", "5",
                   "--json"])
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["requests"] == 400
    assert report["agreed"] == 400, report["divergences"]
    assert status == 0


def test_riscv_vma_walk_agrees_with_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    """riscv's prepare walks the VMAs: a writable slot over PROT_READ memory is EPERM on the
    kernel, and DualVM tells the model this process's VMAs so both answer it."""
    target = newest("riscv64")
    if shutil.which(target.machine.qemu) is None:
        pytest.skip(f"{target.machine.qemu} is not installed (make lab-deps)")
    if image.built(target) is None:
        pytest.skip(f"{target.name} is not built (memslot lab build {target.name})")
    script = Path(__file__).parent / "lab_guest" / "vma_walk.py"
    status = main(["lab", "run", "--python", str(script), target.name])
    cases = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith('{"case"'):
            case = json.loads(line)
            cases[case["case"]] = case["errno"]
    assert status == 0  # no Divergence
    assert cases["prot-read"] == errno.EPERM and cases["prot-read-readonly"] == 0

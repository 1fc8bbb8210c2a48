"""One real boot of the newest amd64 target: memslot's fuzzer inside the guest, on the guest
kernel's /dev/kvm, agreeing with the model. Runs where QEMU is installed and the target's image
is cached (``make lab-deps``, ``memslot lab build amd64:7.3``); skipped with the reason
otherwise, so the suite never downloads anything."""

from __future__ import annotations

import json
import shutil

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

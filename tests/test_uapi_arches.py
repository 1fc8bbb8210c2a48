"""ioctl numbers on other architectures: the encoding is chosen from ``uname -m`` at import
(powerpc's _IOC_WRITE is 4 and _IOC_NONE 1; verified inside the lab's ppc64el guests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memslot.backends.uapi import ioc_encoding

PROBE = """
import json, os
real = os.uname()
fake = os.uname_result((*real[:4], {machine!r}))
os.uname = lambda: fake
from memslot.backends import uapi
print(json.dumps({{n: getattr(uapi, n) for n in (
    "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_USER_MEMORY_REGION2", "KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG",
    "KVM_ENABLE_CAP", "KVM_CREATE_GUEST_MEMFD")}}))
"""


def _numbers(machine: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(machine=machine)],
                         capture_output=True, text=True, check=True).stdout
    numbers: dict[str, int] = json.loads(out)
    return numbers


@pytest.mark.parametrize("machine", ["ppc64le", "ppc64"])
def test_powerpc_ioctl_numbers(machine: str) -> None:
    n = _numbers(machine)
    assert n["KVM_SET_USER_MEMORY_REGION"] == 0x8020AE46
    assert n["KVM_SET_USER_MEMORY_REGION2"] == 0x80A0AE49
    assert n["KVM_CREATE_VM"] == 0x2000AE01
    assert n["KVM_CHECK_EXTENSION"] == 0x2000AE03
    assert n["KVM_GET_DIRTY_LOG"] == 0x8010AE42
    assert n["KVM_ENABLE_CAP"] == 0x8068AEA3
    assert n["KVM_CLEAR_DIRTY_LOG"] == 0xC018AEC0  # read|write is the top bits either way
    assert n["KVM_CREATE_GUEST_MEMFD"] == 0xC040AED4


@pytest.mark.parametrize("machine", ["x86_64", "aarch64", "riscv64", "s390x"])
def test_asm_generic_ioctl_numbers(machine: str) -> None:
    n = _numbers(machine)
    assert n["KVM_SET_USER_MEMORY_REGION"] == 0x4020AE46
    assert n["KVM_CREATE_VM"] == 0xAE01
    assert n["KVM_GET_DIRTY_LOG"] == 0x4010AE42


def test_encodings() -> None:
    assert ioc_encoding("x86_64") == (14, 0, 1, 2)
    assert ioc_encoding("ppc64le") == (13, 1, 4, 2)
    assert ioc_encoding("mips64") == (13, 1, 4, 2)

"""A QEMU monitor (QMP) client for the tests that drive a real QEMU: connect when its socket
appears, then one command at a time."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import TextIO


def connect(path: Path, timeout: float) -> socket.socket:
    """A socket connected to QEMU's QMP socket at ``path``, waiting up to ``timeout`` seconds
    for QEMU to create it."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX)
    while True:
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            if time.monotonic() >= deadline:
                sock.close()
                raise AssertionError("QEMU's QMP socket never appeared") from None
            time.sleep(0.1)


def command(f: TextIO, name: str, **arguments: object) -> dict[str, object]:
    """Send one QMP command on the connection's file ``f`` and return its reply, skipping
    the events QEMU sends meanwhile (``{}`` when QEMU closed the connection first, as it may
    on ``quit``)."""
    f.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            return {}
        reply: dict[str, object] = json.loads(line)
        if "return" in reply or "error" in reply:
            return reply

"""QEMU trace logs (``-trace kvm_set_user_memory -trace kvm_clear_dirty_log``) -> trace operations.

Event formats, from qemu/qemu ``accel/kvm/trace-events`` (at 08c328682231 and in the commits
named) and ``accel/kvm/kvm-all.c`` (at 0021c4765a6b, before 9.1, and the 9.1 patches):

* QEMU up to 9.0 (Debian 12 ships 7.2)::

    kvm_set_user_memory "Slot#%d flags=0x%x gpa=0x%"PRIx64 " size=0x%"PRIx64
        " ua=0x%"PRIx64 " ret=%d"

  ``Slot#`` is the ioctl's whole 32-bit ``slot`` field: ``kvm_set_user_memory_region`` builds
  ``mem.slot = slot->slot | (kml->as_id << 16)`` and traces ``mem.slot``, so address space 1
  (x86 SMM) prints as ``Slot#65536`` and up.
* 72853afc638b "trace/kvm: Split address space and slot id in trace_kvm_set_user_memory()"
  (Xiaoyao Li; in Paolo Bonzini's pull request of 2024-04-23, the 9.1 cycle)::

    kvm_set_user_memory "AddrSpace#%d Slot#%d flags=0x%x gpa=... size=... ua=... ret=%d"

  (``mem.slot >> 16`` and ``(uint16_t)mem.slot``). The same pull request added
  ce5a983233b4 "kvm: Enable KVM_SET_USER_MEMORY_REGION2 for memslot", so released QEMU (9.1+,
  current at 08c328682231) prints::

    kvm_set_user_memory "AddrSpace#%d Slot#%d flags=0x%x gpa=0x%"PRIx64 " size=0x%"PRIx64
        " ua=0x%"PRIx64 " guest_memfd=%d guest_memfd_offset=0x%"PRIx64 " ret=%d"

  ``guest_memfd`` is a ``uint32_t`` printed with ``%d``: ``-1`` when the RAM block has none.
  QEMU issues ``KVM_SET_USER_MEMORY_REGION2`` when ``kvm_guest_memfd_supported``; the log does
  not say which ioctl ran, and without ``KVM_MEM_GUEST_MEMFD`` both act the same, so such a line
  becomes a v2 request only when its flags carry ``KVM_MEM_GUEST_MEMFD``.
* ``kvm_clear_dirty_log "slot#%"PRId32" start 0x%"PRIx64" size 0x%"PRIx32``, unchanged since
  QEMU 4.1 ("kvm: Support KVM_CLEAR_DIRTY_LOG", Peter Xu): the raw slot field
  (``as_id << 16 | id``), ``first_page`` and ``num_pages`` of one ``KVM_CLEAR_DIRTY_LOG``. The
  bitmap is not traced; the record says "all ones" (``b""``). ``kvm_log_clear_one_slot`` traces
  success and ``-ENOENT`` alike, so ``expect`` is ``None``.

``ret`` is ``kvm_vm_ioctl``'s result, ``-errno`` on failure (``ret=-22``); ``expect`` is its
negation. A failed request is the last line QEMU logs: ``kvm_set_phys_mem`` aborts on it.

Log prefixes are skipped: the log backend with ``-msg timestamp=on`` writes
``TID@SEC.USEC:kvm_set_user_memory ...`` (thread id); other collectors add ISO times or syslog
headers. Other lines are ignored. Neither ``KVM_GET_DIRTY_LOG`` nor ``KVM_ENABLE_CAP`` is traced.

READONLY toggles. The kernel refuses to flip ``KVM_MEM_READONLY`` on a live slot, so
``kvm_set_user_memory_region(kml, slot, new=false)``, when ``(flags ^ slot->old_flags) &
KVM_MEM_READONLY`` and the slot is live, first issues the ioctl with ``memory_size = 0`` and then
the real one, but traces once, after both, with the final values (the same in every version
above; a failing first ioctl is traced instead, with ``size=0``). That path is reached from
``kvm_slot_update_flags`` (``kvm_log_start``/``kvm_log_stop``). A ROM device entering or leaving
ROMD mode, or a PAM/ROM-BAR change, usually reaches KVM as ``kvm_region_del`` +
``kvm_region_add`` instead (``flatrange_equal`` compares ``readonly`` and ``romd_mode``): two
lines already. The parser keeps each live slot's flags and, for a line that changes READONLY on
a live slot, emits the implicit DELETE (``expect`` 0) and then the traced request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from ..constants import KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY
from ..request import MemoryRegion, slot_field
from .records import ClearDirtyLog, SetRegion, TraceFormatError, TraceOp

MAX_LINE = 1 << 20
"""Longest line accepted (characters); a longer one is an error, so memory stays bounded."""

SET_EVENT = "kvm_set_user_memory"
CLEAR_EVENT = "kvm_clear_dirty_log"

_EVENT = re.compile(r"(?:^|(?<=[\s:\]]))(kvm_set_user_memory|kvm_clear_dirty_log)(?=\s|$)")
_MARKER = {SET_EVENT: ("Slot#", "AddrSpace#"), CLEAR_EVENT: ("slot#",)}
_HEX = re.compile(r"0x([0-9a-fA-F]+)")
_DEC = re.compile(r"-?[0-9]{1,20}")
_U16, _U32, _U64 = 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1
_I32_MIN = -(1 << 31)
_BINARY = re.compile("[\0\udc80-\udcff]")
_TOGGLE_NOTE = "QEMU READONLY toggle: one trace line for a delete and a re-create"


class _LineError(Exception):
    pass


def _show(text: str, limit: int = 40) -> str:
    """A short, printable, one-line rendering of untrusted text."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return ascii(shown)


def _find_event(line: str) -> tuple[str, str] | None:
    """``(event, payload)`` if the line is a traced memslot event, else ``None``.

    The event name must stand after a log prefix (nothing, ``...:``, ``...]`` or a token that
    starts with a digit, as timestamps do), or be followed by its first field.
    """
    match = _EVENT.search(line)
    if match is None:
        return None
    name = match.group(1)
    payload = line[match.end():].strip()
    prefix = line[: match.start()].rstrip()
    last = prefix.rsplit(None, 1)[-1] if prefix else ""
    if (
        not prefix
        or prefix.endswith((":", "]"))
        or last[:1].isdigit()
        or payload.startswith(_MARKER[name])
    ):
        return name, payload
    return None


class _Fields:
    """The whitespace-separated fields of one event, consumed in the order QEMU prints them."""

    def __init__(self, event: str, payload: str) -> None:
        self.event = event
        self.tokens = payload.split()
        self.pos = 0

    def _next(self, what: str) -> str:
        if self.pos >= len(self.tokens):
            raise _LineError(f"{self.event}: truncated, {what} missing")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def peek(self) -> str:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ""

    def word(self, word: str) -> None:
        token = self._next(repr(word))
        if token != word:
            raise _LineError(f"{self.event}: expected {word!r}, got {_show(token)}")

    def _value(self, key: str) -> str:
        token = self._next(repr(key))
        if not token.startswith(key):
            raise _LineError(f"{self.event}: expected {key!r}, got {_show(token)}")
        return token[len(key):]

    def hex(self, key: str, limit: int = _U64) -> int:
        text = self._value(key) if key else self._next("a hex number")
        match = _HEX.fullmatch(text)
        if match is None:
            raise _LineError(f"{self.event}: {key or 'value'} {_show(text)} is not 0x<hex>")
        if len(match.group(1).lstrip("0")) > 16:
            raise _LineError(f"{self.event}: {key}{_show(text)} is too large (> {limit:#x})")
        value = int(text, 16)
        if value > limit:
            raise _LineError(f"{self.event}: {key}{text} is too large (> {limit:#x})")
        return value

    def dec(self, key: str, low: int, high: int) -> int:
        text = self._value(key)
        if not _DEC.fullmatch(text):
            raise _LineError(f"{self.event}: {key}{_show(text)} is not a decimal number")
        value = int(text)
        if not low <= value <= high:
            raise _LineError(f"{self.event}: {key}{value} is out of range [{low}, {high}]")
        return value

    def end(self) -> None:
        if self.pos < len(self.tokens):
            rest = " ".join(self.tokens[self.pos:])
            raise _LineError(f"{self.event}: unexpected trailing text {_show(rest)}")


def _parse_set(payload: str) -> tuple[MemoryRegion, int]:
    """A ``kvm_set_user_memory`` payload -> (request, errno)."""
    f = _Fields(SET_EVENT, payload)
    split = f.peek().startswith("AddrSpace#")
    if split:
        as_id = f.dec("AddrSpace#", 0, _U16)
        slot = slot_field(as_id, f.dec("Slot#", 0, _U16))
    else:
        # %d of a uint32_t: negative only when bit 31 (an address space >= 0x8000) is set.
        slot = f.dec("Slot#", _I32_MIN, _U32) & _U32
    flags = f.hex("flags=", _U32)
    gpa = f.hex("gpa=")
    size = f.hex("size=")
    uaddr = f.hex("ua=")
    gmem: int | None = None
    gmem_offset = 0
    if split and f.peek().startswith("guest_memfd="):
        fd = f.dec("guest_memfd=", _I32_MIN, _U32) & _U32
        offset = f.hex("guest_memfd_offset=")
        if flags & KVM_MEM_GUEST_MEMFD:
            gmem, gmem_offset = fd, offset
    ret = f.dec("ret=", _I32_MIN, 0)
    f.end()
    return MemoryRegion(slot, flags, gpa, size, uaddr, gmem_offset, gmem), -ret


def _parse_clear(payload: str, number: int) -> ClearDirtyLog:
    f = _Fields(CLEAR_EVENT, payload)
    slot = f.dec("slot#", _I32_MIN, _U32) & _U32
    f.word("start")
    first_page = f.hex("")
    f.word("size")
    num_pages = f.hex("", _U32)
    f.end()
    return ClearDirtyLog(slot, first_page, num_pages, b"", None, number)


def _check_text(line: str) -> None:
    if len(line) > MAX_LINE:
        raise _LineError(f"line longer than {MAX_LINE} characters")
    bad = _BINARY.search(line)
    if bad is not None:
        raise _LineError("binary data (NUL byte)" if bad.group() == "\0" else "not UTF-8 text")


class _SlotFlags:
    """Flags of the slots live in KVM, as far as the trace has shown them (keyed by the raw
    slot field), to spot the one-line READONLY toggle."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}

    def expand(self, region: MemoryRegion, err: int, number: int) -> list[SetRegion]:
        old = self.live.get(region.slot)
        toggle = (
            region.memory_size != 0
            and old is not None
            and (old ^ region.flags) & KVM_MEM_READONLY != 0
        )
        if region.memory_size == 0:
            if err == 0:
                self.live.pop(region.slot, None)
        elif err == 0:
            self.live[region.slot] = region.flags
        elif toggle:
            self.live.pop(region.slot, None)  # the implicit delete went through
        if not toggle:
            return [SetRegion(region, err, number)]
        delete = region._replace(memory_size=0)
        return [
            SetRegion(delete, 0, number, _TOGGLE_NOTE + " (the delete)"),
            SetRegion(region, err, number, _TOGGLE_NOTE + " (the re-create)"),
        ]


def parse_qemu_trace(
    lines: Iterable[str],
    path: str = "<input>",
    errors: list[TraceFormatError] | None = None,
) -> Iterator[TraceOp]:
    """Parse a QEMU trace log lazily (line numbers from 1).

    A malformed event line raises :class:`TraceFormatError`, or, when ``errors`` is a list, is
    recorded there and skipped. Lines that are not memslot events are ignored.
    """
    slots = _SlotFlags()
    for number, line in enumerate(lines, 1):
        try:
            _check_text(line)
            found = _find_event(line)
            if found is None:
                continue
            event, payload = found
            if event == CLEAR_EVENT:
                ops: list[TraceOp] = [_parse_clear(payload, number)]
            else:
                region, err = _parse_set(payload)
                ops = list(slots.expand(region, err, number))
        except _LineError as exc:
            error = TraceFormatError(path, number, str(exc))
            if errors is None:
                raise error from None
            errors.append(error)
            continue
        yield from ops

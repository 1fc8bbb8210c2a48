"""memslot's canonical trace format: JSON lines, one operation per line.

A request line (``"op"`` omitted or ``"set"``) has ``slot``, ``flags``, ``guest_phys_addr``,
``memory_size``, ``userspace_addr``; optional ``as_id`` (then ``slot`` is the id, below 65536),
``guest_memfd`` and ``guest_memfd_offset`` (make it a v2 request), ``expect`` (an errno name
such as ``"EEXIST"`` or ``0``), ``note`` and ``line`` (every operation: the line of the
original trace it came from, as ``memslot convert`` writes it). Other operations:
``{"op": "get_dirty_log", "slot": S}``, ``{"op": "clear_dirty_log", "slot": S,
"first_page": F, "num_pages": N, "bitmap": "<hex>" | "all" | null}``,
``{"op": "enable_cap", "cap": "KVM_CAP_..." | N, "args": [...]}``,
``{"op": "mark_dirty", "gfn": G, "as_id": A}``, ``{"op": "create_vm", "vm_type": T}``,
``{"op": "check_extension", "cap": ..., "value": V, "system": false}``,
``{"op": "create_guest_memfd", "size": S, "flags": F, "fd": N}``; the lifetime operations
``{"op": "create_vcpu", "vcpu_id": N | null}``, ``{"op": "close_vcpu", "vcpu_id": N}``,
``{"op": "close_guest_memfd", "fd": N}``, ``{"op": "fork", "how": "os.fork" | "libc",
"call": C}`` and ``{"op": "close_vm", "how": "fd" | "all"}``; any line may name its VM
with ``"vm": N`` (default 0) when a trace holds several. Integers may be written as JSON
numbers or as ``"0x..."`` strings. Blank lines are skipped. Unknown keys are errors.
The whole format: docs/trace-format.md.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol

from .. import constants
from ..errors import errno_name, errno_value
from ..request import MemoryRegion
from .lines import LineSource
from .records import (
    CLOSE_HOWS,
    FORK_CALLS,
    FORK_HOWS,
    BadLine,
    CheckExtension,
    ClearDirtyLog,
    CloseGuestMemfd,
    CloseVcpu,
    CloseVm,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableCap,
    Fork,
    GetDirtyLog,
    MarkDirty,
    SetRegion,
    TraceFormatError,
    TraceOp,
)

_COMMON = {"op", "expect", "note", "vm", "line"}
_KEYS: dict[str, set[str]] = {
    "set": _COMMON | {"slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr",
                      "as_id", "guest_memfd", "guest_memfd_offset"},
    "get_dirty_log": _COMMON | {"slot", "as_id", "bitmap"},
    "clear_dirty_log": _COMMON | {"slot", "as_id", "first_page", "num_pages", "bitmap"},
    "enable_cap": _COMMON | {"cap", "args", "flags"},
    "mark_dirty": _COMMON | {"gfn", "as_id"},
    "create_vm": _COMMON | {"vm_type"},
    "check_extension": _COMMON | {"cap", "value", "system"},
    "create_guest_memfd": _COMMON | {"size", "flags", "fd"},
    "create_vcpu": _COMMON | {"vcpu_id"},
    "close_vcpu": _COMMON | {"vcpu_id"},
    "close_guest_memfd": _COMMON | {"fd"},
    "fork": _COMMON | {"how", "call"},
    "close_vm": _COMMON | {"how"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "set": ("slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"),
    "get_dirty_log": ("slot",),
    "clear_dirty_log": ("slot", "first_page", "num_pages"),
    "enable_cap": ("cap",),
    "mark_dirty": ("gfn",),
    "create_vm": (),
    "check_extension": ("cap",),
    "create_guest_memfd": ("size",),
    "create_vcpu": (),
    "close_vcpu": ("vcpu_id",),
    "close_guest_memfd": ("fd",),
    "fork": ("how", "call"),
    "close_vm": (),
}
_U64 = (1 << 64) - 1


class _LineError(Exception):
    pass


def _int(obj: dict[str, Any], key: str, default: int | None = None, limit: int = _U64) -> int:
    if key not in obj:
        if default is None:
            raise _LineError(f"missing field {key!r}")
        return default
    value = obj[key]
    if isinstance(value, str) and value.lower().startswith("0x"):
        try:
            value = int(value, 16)
        except ValueError:
            raise _LineError(f"field {key!r} is not an integer: {obj[key]!r}") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _LineError(f"field {key!r} is not an integer: {value!r}")
    if value < 0:
        raise _LineError(f"field {key!r} is negative: {value}")
    if value > limit:
        raise _LineError(f"field {key!r} is too large: {value:#x} > {limit:#x}")
    return value


def _slot(obj: dict[str, Any]) -> int:
    if "as_id" in obj:
        as_id = _int(obj, "as_id", limit=0xFFFF)
        return (as_id << 16) | _int(obj, "slot", limit=0xFFFF)
    return _int(obj, "slot", limit=0xFFFFFFFF)


def _expect(obj: dict[str, Any]) -> int | None:
    if "expect" not in obj or obj["expect"] is None:
        return None
    value = obj["expect"]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _LineError(f"field 'expect' must be an errno name or 0: {value!r}")
    try:
        return errno_value(value)
    except ValueError as exc:
        raise _LineError(str(exc)) from None


def printable(text: str) -> str:
    """Text from input made safe to print: lone surrogates (undecodable bytes) and control
    characters (terminal escape sequences) are shown escaped."""
    if text.isprintable():
        return text
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _bitmap(obj: dict[str, Any], key: str = "bitmap") -> bytes | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _LineError(f"field {key!r} must be a hex string, \"all\" or null")
    if value == "all":
        return b""
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _LineError(f"field {key!r} is not hex: {value[:40]!r}") from None


def _cap(obj: dict[str, Any], limit: int = 0xFFFFFFFF) -> int:
    """A ``KVM_CAP_*`` name or number: ``struct kvm_enable_cap``'s u32 ``cap``, or (``limit``
    64 bits) ``KVM_CHECK_EXTENSION``'s ``unsigned long`` argument."""
    value = obj["cap"]
    if isinstance(value, str) and not value.lower().startswith("0x"):
        cap = getattr(constants, value, None)
        if not value.startswith("KVM_CAP_") or not isinstance(cap, int):
            raise _LineError(f"unknown capability {value!r}")
        return cap
    return _int(obj, "cap", limit=limit)


def parse_object(obj: Any, line: int = 0) -> TraceOp:
    """One decoded JSON value -> a trace operation (``_LineError`` on bad input)."""
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    op = obj.get("op", "set")
    if not isinstance(op, str) or op not in _KEYS:
        raise _LineError(f"unknown op {op!r}")
    unknown = sorted(set(obj) - _KEYS[op])
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise _LineError(f"unknown key{plural} {', '.join(map(repr, unknown))}")
    for key in _REQUIRED[op]:
        if key not in obj:
            raise _LineError(f"missing field {key!r}")
    note = obj.get("note", "")
    if not isinstance(note, str):
        raise _LineError("field 'note' must be a string")
    note = printable(note)
    if "line" in obj:
        line = _int(obj, "line", limit=0xFFFFFFFF)
        if line < 1:
            raise _LineError("field 'line' counts from 1")
    expect = _expect(obj)
    vm = _int(obj, "vm", 0, 0xFFFFFFFF)
    if op == "set":
        gmem = obj.get("guest_memfd")
        region = MemoryRegion(
            _slot(obj),
            _int(obj, "flags", limit=0xFFFFFFFF),
            _int(obj, "guest_phys_addr"),
            _int(obj, "memory_size"),
            _int(obj, "userspace_addr"),
            _int(obj, "guest_memfd_offset", 0),
            None if gmem is None else _int(obj, "guest_memfd", limit=0xFFFFFFFF),
        )
        return SetRegion(region, expect, line, note, vm)
    if op == "get_dirty_log":
        return GetDirtyLog(_slot(obj), expect, line, note, _bitmap(obj), vm)
    if op == "clear_dirty_log":
        return ClearDirtyLog(
            _slot(obj),
            _int(obj, "first_page"),
            _int(obj, "num_pages", limit=0xFFFFFFFF),
            _bitmap(obj),
            expect,
            line,
            note,
            vm,
        )
    if op == "enable_cap":
        args = obj.get("args", [])
        if not isinstance(args, list) or len(args) > 4:
            raise _LineError("field 'args' must be a list of at most 4 integers")
        values = tuple(_int({"args": a}, "args") for a in args)
        return EnableCap(_cap(obj), values, _int(obj, "flags", 0, 0xFFFFFFFF), expect, line, note,
                         vm)
    if op == "create_vm":
        return CreateVm(_int(obj, "vm_type", 0, 0xFFFFFFFF), expect, line, note, vm)
    if op == "check_extension":
        value = None if obj.get("value") is None else _int(obj, "value", limit=0x7FFFFFFF)
        system = obj.get("system", False)
        if not isinstance(system, bool):
            raise _LineError("field 'system' must be true or false")
        return CheckExtension(_cap(obj, _U64), value, system, expect, line, note, vm)
    if op == "create_guest_memfd":
        fd = None if obj.get("fd") is None else _int(obj, "fd", limit=0x7FFFFFFF)
        return CreateGuestMemfd(_int(obj, "size"), _int(obj, "flags", 0), fd, expect, line, note,
                                vm)
    if op == "create_vcpu":
        vcpu = None if obj.get("vcpu_id") is None else _int(obj, "vcpu_id")
        return CreateVcpu(vcpu, expect, line, note, vm)
    if op == "close_vcpu":
        return CloseVcpu(_int(obj, "vcpu_id"), expect, line, note, vm)
    if op == "close_guest_memfd":
        return CloseGuestMemfd(_int(obj, "fd", limit=0x7FFFFFFF), expect, line, note, vm)
    if op == "fork":
        return Fork(_choice(obj, "how", FORK_HOWS), _choice(obj, "call", FORK_CALLS), expect,
                    line, note, vm)
    if op == "close_vm":
        return CloseVm(_choice(obj, "how", CLOSE_HOWS, "all"), expect, line, note, vm)
    return MarkDirty(_int(obj, "gfn"), _int(obj, "as_id", 0, 0xFFFF), expect, line, note, vm)


def _choice(obj: dict[str, Any], key: str, choices: tuple[str, ...],
            default: str | None = None) -> str:
    value = obj.get(key, default)
    if value not in choices:
        raise _LineError(f"field {key!r} must be one of {', '.join(choices)}: {value!r}")
    assert isinstance(value, str)
    return value


def _fast_parser() -> Callable[[str | bytes], Any]:
    """A C parser for the common line (3-4x the standard library's speed, measured in
    bench/bench_replay.py): orjson's; the standard library decides every line orjson refuses,
    and words every error. (Imported by name: the mypyc build type-checks this module without
    orjson installed.)"""
    try:
        loads: Callable[[str | bytes], Any] = importlib.import_module("orjson").loads
    except ImportError:  # orjson is a dependency; without it the same results, slower
        return json.loads
    return loads


_fast_loads: Final = _fast_parser()
#: :func:`parse_lines` may be given undecoded lines (orjson parses only UTF-8 bytes; the
#: standard library would guess UTF-16/32 bytes).
PARSES_BYTES: Final = _fast_loads is not json.loads

_EXPECT: dict[int | str, int] = {}
_new_region: Final = tuple.__new__


# A frozen dataclass's __init__ sets each field with object.__setattr__ (about 2 us for a
# SetRegion); the slot descriptors do the same stores directly.
_SET_REGION_STORES: Final = tuple(getattr(SetRegion, name).__set__
                                  for name in ("region", "expect", "line", "note", "vm", "op"))


def _new_set_region(region: MemoryRegion, expect: int | None, line: int, note: str) -> SetRegion:
    """``SetRegion(region, expect, line, note)`` (VM 0), built without the dataclass
    ``__init__``: the same object, several times faster."""
    op: SetRegion = object.__new__(SetRegion)
    s_region, s_expect, s_line, s_note, s_vm, s_op = _SET_REGION_STORES
    s_region(op, region)
    s_expect(op, expect)
    s_line(op, line)
    s_note(op, note)
    s_vm(op, 0)
    s_op(op, "set")
    return op


#: What :meth:`JsonLines.advance` found: the end of the input, a plain request (v1, VM 0: its
#: fields in ``region``, ``expect``, ``line``, ``note``), or any other operation (``op``).
END: Final = 0
REQUEST: Final = 1
OPERATION: Final = 2

#: The largest int mypyc holds unboxed: a field below it is compared without a call.
_SHORT: Final = (1 << 62) - 1
_U32: Final = 0xFFFFFFFF
_NO_REGION: Final = MemoryRegion(0, 0, 0, 0, 0)
_MISSING: Final = object()


class _ErrorSink(Protocol):
    def append(self, error: TraceFormatError, /) -> None: ...


class JsonLines:
    """A JSON-lines trace read one operation at a time: :meth:`advance` reads lines from
    ``source`` (after the already-read ``head``) until one holds an operation, and says which
    kind. The common line (a v1 request of VM 0, fields as numbers or ``"0x"`` strings) is
    taken from its undecoded bytes by a lean path that builds no record: a caller that only
    needs the request (the replay's lean loop) reads ``region`` and ``expect``, others
    :meth:`operation`. Every other line goes through the general parser, with the same result.

    Bad lines raise :class:`TraceFormatError` naming the line, or with ``errors`` are recorded
    there (through the object's own ``append``: a caller's bounded sample) and skipped. Lines
    that come as ``bytes`` need ``decode`` (the reader's rules: a :class:`BadLine` for what is
    not text) when they are not the common line."""

    def __init__(
        self,
        source: LineSource,
        path: str = "<input>",
        errors: _ErrorSink | None = None,
        decode: Callable[[bytes], str] | None = None,
        head: list[str] | None = None,
    ) -> None:
        self.source = source
        self.path = path
        self.errors = errors
        self.decode = decode
        self._head: list[str] = head if head is not None else []
        self._next_head = 0
        self.number = 0  # lines read
        self.region = _NO_REGION
        self.expect: int | None = None
        self.line = 0
        self.note = ""
        self.op: TraceOp | None = None

    def advance(self) -> int:
        """Read up to the next operation: :data:`REQUEST`, :data:`OPERATION` or :data:`END`."""
        loads = _fast_loads
        head = self._head
        while True:
            text: str | bytes | None
            if self._next_head < len(head):
                text = head[self._next_head]
                self._next_head += 1
            else:
                text = self.source.next_line()
                if text is None:
                    return END
            self.number += 1
            number = self.number
            if PARSES_BYTES or type(text) is str:
                try:  # the lean path: the common request line
                    obj = loads(text)
                except ValueError:
                    pass
                else:
                    if type(obj) is dict and self._lean(obj, number):
                        return REQUEST
            if type(text) is bytes:
                decode = self.decode
                if decode is None:
                    raise TypeError("JsonLines: bytes lines need decode")
                text = decode(text)
            assert isinstance(text, str)
            if not text or text.isspace():
                if type(text) is not BadLine:
                    continue
                error = TraceFormatError(self.path, number, text.problem)
                if self.errors is None:
                    raise error
                self.errors.append(error)
                continue
            try:
                op = _parse_line(text.strip(), number, self.path)
            except TraceFormatError as exc:
                if self.errors is None:
                    raise
                self.errors.append(exc)
                continue
            self.op = op
            return OPERATION

    def operation(self, kind: int) -> TraceOp:
        """The operation :meth:`advance` found (``kind``, what it returned), as a record."""
        if kind == REQUEST:
            return _new_set_region(self.region, self.expect, self.line, self.note)
        op = self.op
        assert kind == OPERATION and op is not None
        return op

    def _lean(self, obj: dict[str, Any], number: int) -> bool:
        """Take ``obj`` as the common request line (v1, address space in ``slot``, numbers or
        ``"0x"`` strings) without the general checks: ``False`` for anything else, which the
        general parser then decides (the result is the same either way)."""
        size = len(obj)
        if size < 5:
            return False
        slot = obj.get("slot")
        flags = obj.get("flags")
        gpa = obj.get("guest_phys_addr")
        length = obj.get("memory_size")
        ua = obj.get("userspace_addr")
        # (a bad hex string, "0x" or "0x0x1", is the general path's to word)
        if type(gpa) is str:
            gpa = _hex_value(gpa)
            if gpa is None:
                return False
        if type(length) is str:
            length = _hex_value(length)
            if length is None:
                return False
        if type(ua) is str:
            ua = _hex_value(ua)
            if ua is None:
                return False
        # The region holds the int objects JSON gave (made before the checks below: compiled,
        # a value checked as an int is held unboxed, and would be boxed again, a new object).
        fields = (slot, flags, gpa, length, ua, 0, None)
        if (type(slot) is not int or type(flags) is not int or type(gpa) is not int
                or type(length) is not int or type(ua) is not int):
            return False
        if not (_in_u32(slot) and _in_u32(flags) and _in_u64(gpa) and _in_u64(length)
                and _in_u64(ua)):
            return False
        expect: int | None = None
        note = ""
        line = number
        extra = size - 5  # keys besides the five fields: only expect, note and line here
        if extra:
            spelling = obj.get("expect", _MISSING)
            if spelling is not _MISSING:
                extra -= 1
                if spelling is not None:
                    cached = _EXPECT.get(spelling) if type(spelling) in (int, str) else None
                    if cached is None:
                        return False
                    expect = cached
            if extra:
                text = obj.get("note", _MISSING)  # (untyped: a str local would be
                if text is not _MISSING:             # type-checked as it is assigned)
                    extra -= 1
                    if type(text) is not str or not text.isprintable():
                        return False  # printable() in the general path
                    note = text
                source = obj.get("line", _MISSING)
                if source is not _MISSING:
                    extra -= 1
                    if type(source) is not int or not 1 <= source <= 0xFFFFFFFF:
                        return False  # (null included: the general path refuses it)
                    line = source
                if extra:
                    return False  # another key: the general path says which
        self.region = _new_region(MemoryRegion, fields)
        self.expect = expect
        self.line = line
        self.note = note
        return True


#: The ``"0x"`` spellings the lean path read, with their values: a VMM's trace names the same
#: addresses and sizes again and again, and a lookup costs a third of int(text, 16).
_HEX: dict[str, object] = {}
_HEX_KEPT: Final = 4096


def _hex_value(text: str) -> object:
    """The value of a ``"0x"`` spelling, ``None`` for any other text."""
    value = _HEX.get(text)
    if value is None:
        if not (text.startswith("0x") or text.startswith("0X")):
            return None
        try:
            value = int(text, 16)
        except ValueError:
            return None
        if len(_HEX) < _HEX_KEPT:
            _HEX[text] = value
    return value


def _in_u32(value: int) -> bool:
    return 0 <= value <= _U32


def _in_u64(value: int) -> bool:
    # (a value past _SHORT is boxed: only then the comparison with the 64-bit limit)
    return value >= 0 and (value <= _SHORT or value <= _U64)


def _fast_set(obj: dict[str, Any], line: int) -> SetRegion | None:
    """The lean path's record of ``obj`` (read as line ``line``), or ``None`` when it leaves
    the line to the general parser."""
    lean = JsonLines(LineSource())
    if not lean._lean(obj, line):
        return None
    return _new_set_region(lean.region, lean.expect, lean.line, lean.note)


def parse_lines(
    lines: Iterable[str | bytes],
    path: str = "<input>",
    errors: list[TraceFormatError] | None = None,
    decode: Callable[[bytes], str] | None = None,
) -> Iterator[TraceOp]:
    """Parse JSON lines lazily; raises :class:`TraceFormatError` naming the line, or, when
    ``errors`` is a list, records the error there and goes on with the next line.

    Lines may also come as raw ``bytes`` with ``decode`` to make text of them (the reader's
    rules: a :class:`BadLine` for what is not text). The common line is then parsed from its
    bytes, undecoded (orjson refuses whatever is not UTF-8 or holds a NUL, so such a line
    goes through ``decode`` and fails the same way); any other line is decoded first."""
    return operations(JsonLines(LineSource(lines=iter(lines)), path, errors, decode))


def operations(parser: JsonLines) -> Iterator[TraceOp]:
    """Every operation ``parser`` reads, as records."""
    while True:
        kind = parser.advance()
        if kind == END:
            return
        yield parser.operation(kind)


def _parse_line(text: str, number: int, path: str) -> TraceOp:
    """One non-blank line, every rule checked, errors naming the line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, number, f"malformed JSON: {exc.msg}") from None
    except RecursionError:
        raise TraceFormatError(path, number, "malformed JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise TraceFormatError(path, number, f"malformed JSON: {exc}") from None
    try:
        op = parse_object(obj, number)
    except _LineError as exc:
        raise TraceFormatError(path, number, str(exc)) from None
    if isinstance(op, SetRegion) and op.expect is not None:
        _remember_expect(obj["expect"], op.expect)
    return op


def _remember_expect(spelling: Any, value: int) -> None:
    """Cache an ``expect`` spelling that :func:`_expect` accepted, for the lean path."""
    if len(_EXPECT) < 1024 and type(spelling) in (int, str):
        _EXPECT[spelling] = value


def _hex(value: int) -> str:
    return f"{value:#x}"


def to_object(op: TraceOp, keep_line: bool = False) -> dict[str, Any]:
    """A trace operation -> a JSON-ready dict (the inverse of :func:`parse_object`); with
    ``keep_line`` it carries the line it came from (``"line"``)."""
    out: dict[str, Any]
    if isinstance(op, SetRegion):
        r = op.region
        out = {"slot": r.id, "as_id": r.as_id} if r.as_id else {"slot": r.slot}
        out |= {
            "flags": r.flags,
            "guest_phys_addr": _hex(r.guest_phys_addr),
            "memory_size": _hex(r.memory_size),
            "userspace_addr": _hex(r.userspace_addr),
        }
        if r.guest_memfd is not None:
            out |= {"guest_memfd": r.guest_memfd, "guest_memfd_offset": _hex(r.guest_memfd_offset)}
    elif isinstance(op, GetDirtyLog):
        out = {"op": op.op, "slot": op.slot}
        if op.expect_bitmap is not None:
            out["bitmap"] = op.expect_bitmap.hex()
    elif isinstance(op, ClearDirtyLog):
        out = {"op": op.op, "slot": op.slot, "first_page": op.first_page,
               "num_pages": op.num_pages,
               "bitmap": None if op.bitmap is None else (op.bitmap.hex() if op.bitmap else "all")}
    elif isinstance(op, EnableCap):
        name = constants.CAPABILITY_NAMES.get(op.cap)
        out = {"op": op.op, "cap": name or op.cap, "args": list(op.args)}
        if op.flags:
            out["flags"] = op.flags
    elif isinstance(op, CreateVm):
        out = {"op": op.op, "vm_type": op.vm_type}
    elif isinstance(op, CheckExtension):
        out = {"op": op.op, "cap": constants.CAPABILITY_NAMES.get(op.cap) or op.cap,
               "value": op.value}
        if op.system:
            out["system"] = True
    elif isinstance(op, CreateGuestMemfd):
        out = {"op": op.op, "size": _hex(op.size), "flags": op.flags, "fd": op.fd}
    elif isinstance(op, CreateVcpu | CloseVcpu):
        out = {"op": op.op, "vcpu_id": op.vcpu_id}
    elif isinstance(op, CloseGuestMemfd):
        out = {"op": op.op, "fd": op.fd}
    elif isinstance(op, Fork):
        out = {"op": op.op, "how": op.how, "call": op.call}
    elif isinstance(op, CloseVm):
        out = {"op": op.op, "how": op.how}
    else:
        out = {"op": op.op, "gfn": _hex(op.gfn)}
        if op.as_id:
            out["as_id"] = op.as_id
    if op.expect is not None:
        out["expect"] = errno_name(op.expect) if op.expect else 0
    if op.note:
        out["note"] = op.note
    if op.vm:
        out["vm"] = op.vm
    if keep_line and op.line:
        out["line"] = op.line
    return out


def dumps(op: TraceOp, keep_line: bool = False) -> str:
    """One JSON line (no newline)."""
    return json.dumps(to_object(op, keep_line), separators=(", ", ": "))

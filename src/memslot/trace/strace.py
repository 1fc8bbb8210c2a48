"""strace logs (``strace -f -o FILE VMM``, or ``memslot record``) -> trace operations.

The memslot calls of any VMM, read from its KVM ioctls:

* ``KVM_SET_USER_MEMORY_REGION``: strace decodes the struct (``{slot=0, flags=0,
  guest_phys_addr=0, memory_size=134217728, userspace_addr=0x7f40efe00000}``; flags by name
  or, with ``-X raw``, in hex).
* Calls strace prints only as a pointer (strace 6.1 up to today's ``src/kvm.c``):
  ``KVM_SET_USER_MEMORY_REGION2``, ``KVM_CREATE_GUEST_MEMFD``, ``KVM_ENABLE_CAP``,
  ``KVM_GET_DIRTY_LOG`` and ``KVM_CLEAR_DIRTY_LOG`` are decoded from the argument bytes
  ``memslot record`` writes after the call's line, in strace's own dump format (``-e write=``):
  `` | 00000  01 00 00 00 04 00 ...  ................ |`` -- the ``_IOC_SIZE`` bytes of the
  struct, then, for ``KVM_CLEAR_DIRTY_LOG`` with a bitmap, the bitmap. Without those bytes
  (a plain strace log) such a call is a malformed line that names the cause; so is a call
  followed by ``memslot record``'s `` | memslot record: argument bytes not read: WHY`` line.
* ``KVM_CREATE_VM`` (the type), ``KVM_CHECK_EXTENSION`` (the capability; only the memslot
  ones the model answers are kept, on a VM fd or on ``/dev/kvm``).
* ``KVM_ENABLE_CAP`` on a VM fd for the dirty-logging capabilities and the x86 ones the model
  owns (``arch/x86_caps.py``); other
  capabilities, vCPU and device ioctls are not memslot operations and are left out (so is an
  ``KVM_ENABLE_CAP`` without its bytes: the capability is unknown).

VMs are kept apart by file descriptor and process: ``open``/``openat`` of ``/dev/kvm``,
``KVM_CREATE_VM``'s result, ``dup*``/``fcntl(F_DUPFD)``, ``close`` and ``close_range``, and
``clone``/``clone3``/``fork``/``vfork`` (``CLONE_FILES`` shares the descriptor table, anything
else copies it; ``execve`` drops the close-on-exec VM descriptors) give each thread its
process's table. ``-y`` annotations (``4<anon_inode:kvm-vm>``) name a descriptor's kind
directly, which also covers descriptors opened before an attach (``strace -p``). A log without
the clone lines still works: a thread's first VM call on a descriptor it has not seen is tied
to the one process that holds a VM there. VMs are numbered 0, 1, ... as they appear
(``op.vm``).

Lines: ``[PID ]`` or ``[pid PID] `` (``PID<comm>`` with ``--decode-pids=comm``), an optional
timestamp (``-t``/``-tt``/``-ttt``/``-r``), syscall number (``-n``) and instruction pointer
(``-i``), then ``name(args) = ret`` with an optional errno (``-1 EEXIST (File exists)``),
``(DELAYED)``, ``<unavailable>`` and ``<time>`` (``-T``); arguments may carry names
(``fd=4``, newer strace), requests may be numbers or ``_IOC(...)`` (``-X raw``, older strace).
``name(args <unfinished ...>`` and ``<... name resumed>rest`` are joined per thread. A call that
returns ``? ERESTART...`` did not happen: the kernel restarts it, and strace prints the
restarted call again. ``+++ exited ... +++`` ends a thread; signals, ``-k`` stack frames and
other lines are ignored, and so is every call but the few read here (:data:`_INTERESTING`:
their name is the only cost). CRLF line ends are accepted. What a log cannot tell (``-Z``,
``-z``, ``-e trace=`` filters, a last line cut short) is said by :func:`log_notes`.
"""

from __future__ import annotations

import errno as _errno
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .. import constants as c
from ..request import MemoryRegion
from .records import (
    CheckExtension,
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVm,
    EnableCap,
    GetDirtyLog,
    SetRegion,
    TraceFormatError,
    TraceOp,
)

#: ``KVM_CHECK_EXTENSION`` capabilities kept: those the model answers (``extension_value``).
MEMSLOT_CAPS = frozenset({
    c.KVM_CAP_USER_MEMORY, c.KVM_CAP_SYNC_MMU, c.KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
    c.KVM_CAP_JOIN_MEMORY_REGIONS_WORKS, c.KVM_CAP_USER_MEMORY2, c.KVM_CAP_NR_MEMSLOTS,
    c.KVM_CAP_MULTI_ADDRESS_SPACE, c.KVM_CAP_READONLY_MEM, c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    c.KVM_CAP_DIRTY_LOG_RING, c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    c.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, c.KVM_CAP_GUEST_MEMFD,
})
#: ``KVM_ENABLE_CAP`` capabilities kept: the dirty-logging ones the generic code owns and the
#: x86 ones the model knows (QEMU enables EXCEPTION_PAYLOAD, MAX_VCPU_ID, ... on every VM).
ENABLE_CAPS = frozenset({
    c.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, c.KVM_CAP_DIRTY_LOG_RING,
    c.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, c.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
}) | c.X86_ENABLE_CAPS
#: The KVM ioctls read here (numbers as ``backends/uapi.py`` computes them; a test checks).
REQUESTS: dict[str, int] = {
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
}
KVMIO = 0xAE
_R = REQUESTS
#: Requests decoded from the argument bytes ``memslot record`` dumps after the line.
RAW_REQUESTS = frozenset({
    _R["KVM_SET_USER_MEMORY_REGION2"], _R["KVM_CREATE_GUEST_MEMFD"], _R["KVM_ENABLE_CAP"],
    _R["KVM_GET_DIRTY_LOG"], _R["KVM_CLEAR_DIRTY_LOG"],
})
_MEMSLOT_REQUESTS = RAW_REQUESTS | {_R["KVM_SET_USER_MEMORY_REGION"]}
_NAMES = dict(REQUESTS)
_REQUEST_NAMES = {value: name for name, value in REQUESTS.items()}
_CAPS = {name: value for value, name in c.CAPABILITY_NAMES.items()}
_MEM_FLAGS = {"KVM_MEM_LOG_DIRTY_PAGES": c.KVM_MEM_LOG_DIRTY_PAGES,
              "KVM_MEM_READONLY": c.KVM_MEM_READONLY, "KVM_MEM_GUEST_MEMFD": c.KVM_MEM_GUEST_MEMFD}
_IOC_DIRS = {"_IOC_NONE": 0, "_IOC_WRITE": 1, "_IOC_READ": 2}
CLONE_FILES = 0x400
O_CLOEXEC = 0o2000000
F_DUPFD, F_DUPFD_CLOEXEC = 0, 1030
_KVM_PATH = "/dev/kvm"
_VM_INODE = "anon_inode:kvm-vm"
_VCPU_INODE = "anon_inode:kvm-vcpu:"
_KINDS = {_KVM_PATH: "kvm", _VM_INODE: "vm"}
#: VM-fd-only requests: one on a descriptor the log never showed is a VM made before it began.
_VM_ONLY = _MEMSLOT_REQUESTS - {_R["KVM_ENABLE_CAP"]}

#: What strace puts before a call, each part optional: leading blanks (``-r`` pads its
#: figure), the pid (``-f``: ``N `` with ``-o``, ``[pid N]`` without; ``--decode-pids=comm``
#: adds ``<comm>``), a timestamp (``-t``, ``-tt``, ``-ttt``, ``-r``), the syscall number
#: (``-n``: ``[ 16]``) and the instruction pointer (``-i``: ``[00007f3a1c51bd6b]``).
_PREFIX = re.compile(
    r"[ \t]*(?:\[pid\s+(?P<pid>\d+)(?:<[^>\n]*>)?\]\s+|(?P<bare>\d+)(?:<[^>\n]*>)?\s+)?"
    r"(?:(?:\d{1,2}:\d{2}:\d{2}(?:\.\d+)?|\d+\.\d+)\s+)?"
    r"(?:\[\s*\d+\]\s+)?"
    r"(?:\[[0-9a-f?]{8,16}\]\s+)?"
)
_CALL = re.compile(r"(?P<name>[a-z_][a-z0-9_]*)\((?P<rest>.*)$")
_RESUMED = re.compile(r"<\.\.\. (?P<name>[a-z_][a-z0-9_]*) resumed>(?P<rest>.*)$")
_EXIT = re.compile(r"\+\+\+ (?:exited with -?\d+|killed by SIG\w+(?: \(core dumped\))?) \+\+\+$")
_DUMP = re.compile(r" \| (?P<offset>[0-9a-f]{5,8})  (?P<hex>[0-9a-f ]{1,49}?)\s{2,}.{0,16} \|$")
_MISSED = re.compile(r" \| memslot record: (?P<why>.+)$")
_UNFINISHED = " <unfinished ...>"
#: strace's own notes on stderr, which may land inside a call's line (no ``-o``, no ``-q``).
_NOTE = re.compile(r"(?:\S*strace: Process \d+ (?:attached|detached|suspended)\s*)+$")
#: A result: the value (``-y`` may name the fd it is), the errno and its text, strace's
#: ``(DELAYED)``-style notes, ``<unavailable>`` (strace could not fetch it) and ``-T``'s time.
_RET = re.compile(
    r"(?P<value>-?\d+|0x[0-9a-f]+|\?)(?:<[^>]*(?:<[^>]*>)?[^>]*>)?"
    r"(?: (?P<err>E[A-Z0-9_]+))?(?: \(.*\))?(?: <unavailable>)?(?: <[0-9.]+>)?$"
)
#: ``name=`` before an argument (newer strace can print argument names: ``fd=4, op=...``).
_ARG_NAME = re.compile(r"[a-z_][a-z0-9_]*=(?!=)")
_FIELD = re.compile(r"(\w+)=")
#: An ioctl request strace has no name for: ``_IOC(_IOC_WRITE, 0xae, 0x46, 0x20)`` (a size of
#: zero is printed ``0``).
_IOC = re.compile(r"_IOC\(([^,]+), (0x[0-9a-f]+|\d+), (0x[0-9a-f]+|\d+), (0x[0-9a-f]+|\d+)\)")
#: A descriptor: decimal, or hex with ``-e raw=``; ``-y`` adds ``<path>``.
_FD = re.compile(r"(-?\d+|0x[0-9a-f]+)(?:<(.*)>)?(?:\(deleted\))?$")
_EQUALS = re.compile(r"\) +=  ?")
_INTERESTING = frozenset({
    "ioctl", "open", "openat", "openat2", "close", "close_range", "dup", "dup2", "dup3", "fcntl",
    "clone", "clone3", "fork", "vfork", "execve", "execveat",
})
_STRACE_HINT = ("record with `memslot record`, which saves the argument bytes strace does "
                "not decode")


class LineError(Exception):
    """A malformed line (the message names what is wrong)."""


@dataclass(slots=True)
class Call:
    """One completed system call of the log."""

    tid: int
    name: str
    args: str
    ret: str
    line: int
    dump: bytearray = field(default_factory=bytearray)
    missing: str = ""  # why memslot record could not read the argument bytes

    @property
    def value(self) -> int | None:
        """The result as a number (``None`` for ``?``); an error is ``-1``."""
        m = _RET.match(self.ret)
        if m is None or m.group("value") == "?":
            return None
        return int(m.group("value"), 0)

    @property
    def errno(self) -> int | None:
        """0 on success, the errno of a failure, ``None`` when the call did not return."""
        m = _RET.match(self.ret)
        if m is None or m.group("value") == "?":
            return None
        err = m.group("err")
        if err is None:
            return 0
        value = getattr(_errno, err, None)
        if not isinstance(value, int):
            raise LineError(f"{self.name}: unknown errno {err}")
        return value


def split_prefix(line: str) -> tuple[int, str]:
    """``(tid, body)`` of a log line (tid 0 when the log has no pid column)."""
    m = _PREFIX.match(line)
    assert m is not None  # every part is optional
    pid = m.group("pid") or m.group("bare")
    return (int(pid) if pid else 0), line[m.end():]


def is_strace_line(line: str) -> bool:
    """Whether a line is unmistakably strace output: a call with its result, an unfinished or
    resumed call, or a thread's exit."""
    text = line.rstrip("\r\n")
    if not text or text[0] == "{" or (text[0] in " \t" and not text.lstrip()[:1].isdigit()):
        return False  # (blanks lead only -r's timestamp; a dump or -k line is not a call)
    _, body = split_prefix(text)
    if _RESUMED.match(body) or _EXIT.match(body):
        return True
    m = _CALL.match(body)
    if m is None:
        return False
    return body.endswith(_UNFINISHED) or _split_result(body) is not None


def _split_result(body: str) -> tuple[str, str] | None:
    """``name(args) = ret`` (strace pads with spaces before ``=``) -> (``name(args``, ``ret``)."""
    matches = list(_EQUALS.finditer(body))
    found = matches[-1] if matches else None
    if found is None or _RET.match(body[found.end():]) is None:
        return None
    return body[:found.start()], body[found.end():]


class CallReader:
    """Turns log lines into completed :class:`Call` objects, joining unfinished and resumed
    halves per thread. ``feed`` returns the call a line completes (or ``None``). Only the
    calls that matter here (:data:`_INTERESTING`) are returned; the others cost a name lookup.

    A call whose line ends before its result is continued by the next line when that one is
    no call of its own (strace writing to stderr breaks ``clone3({...}`` before
    `` => {parent_tid=[N]}, 88) = N`` or `` <unfinished ...>``, and
    ``clone(..., flags=...|SIGCHLD`` before ``, child_tidptr=...) = N``, putting its own
    ``strace: Process N attached`` between, which is dropped); otherwise it is malformed, and
    its line number and cause are put in ``broken`` for the caller to report.

    ``results`` counts the results of those calls: ``[succeeded, failed]`` (what tells a log
    of failed calls only, or of successful ones only, from a whole one); ``truncated`` is the
    number of a last line cut short (no newline: strace was killed while writing it)."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[str, str, int]] = {}
        self.exited: list[int] = []
        self.results = [0, 0]
        self.truncated = 0
        self.partial: tuple[int, str, int] | None = None  # a call line without its result
        self.broken: list[tuple[int, str]] = []

    def feed(self, line: str, number: int) -> Call | None:
        text = line.rstrip("\r\n")
        if "strace: Process " in text:  # strace's own note, written into a call's line
            text = _NOTE.sub("", text)
            if not text.strip():  # or on a line of its own, maybe inside a broken call
                return None
        if self.partial is not None:
            tid, body, begun = self.partial
            self.partial = None
            rest = split_prefix(text)[1]
            if (rest and (rest[:1] not in ("<", "+", "-", "|", ">") or rest == _UNFINISHED[1:])
                    and _CALL.match(rest) is None and not text.startswith((" | ", " > "))):
                return self._complete(tid, body + text, begun, line)
            self._broken(body, begun)
        tid, body = split_prefix(text)
        first = body[:1]
        if first == "+":
            if _EXIT.match(body) is None:
                return None
            start = self.pending.pop(tid, None)
            self.exited.append(tid)
            if start is not None:  # died inside the call: whether it took effect is unknown
                return Call(tid, start[0], start[1], "?", start[2])
            return None
        if first == "<":
            resumed = _RESUMED.match(body)
            if resumed is None:
                return None
            start = self.pending.pop(tid, None)
            if start is None or start[0] != resumed.group("name"):
                return None  # begun before the log did (an attach), or not one of ours
            body = f"{start[0]}({start[1]}{resumed.group('rest')}"
        return self._complete(tid, body, number, line)

    def _complete(self, tid: int, body: str, number: int, line: str) -> Call | None:
        m = _CALL.match(body)
        if m is None:
            return None
        name = m.group("name")
        if name not in _INTERESTING:
            return None
        if body.endswith(_UNFINISHED):
            self.pending[tid] = (name, m.group("rest")[: -len(_UNFINISHED)], number)
            return None
        split = _split_result(body)
        if split is None:
            if not line.endswith("\n"):  # the last line, cut short
                self.truncated = number
            else:  # continued by the next line, or malformed
                self.partial = (tid, body, number)
            return None
        head, ret = split
        call = Call(tid, name, head[len(name) + 1:], ret, number)
        if ret[:1] == "-" and " E" in ret:
            self.results[1] += 1
        elif ret[:1] != "?":
            self.results[0] += 1
        return call

    def _broken(self, body: str, number: int) -> None:
        name = body.split("(", 1)[0]
        self.broken.append((number, f"{name}: truncated or malformed call (no ') = result')"))

    def end(self) -> None:
        """The input ended: a call line still waiting for its continuation is malformed."""
        if self.partial is not None:
            self._broken(self.partial[1], self.partial[2])
            self.partial = None

    def unfinished(self) -> list[tuple[int, str, str, int]]:
        """Calls begun but never resumed: ``(tid, name, args, line)``."""
        return [(tid, n, a, line) for tid, (n, a, line) in self.pending.items()]


def ioctl_pointer(call: Call) -> tuple[int, int, int] | None:
    """``(fd, request, argument)`` of an ioctl call, ``None`` if it cannot be read."""
    args = _call_args(call.args)
    if call.name != "ioctl" or len(args) < 3:
        return None
    try:
        fd, _ = _fd(args[0])
        request = _request(args[1])
        address = int(_strip_comment(args[2]), 0)
    except (LineError, ValueError):
        return None
    return fd, request, address


def parse_dump_line(line: str) -> tuple[int, bytes] | None:
    """A `` | 00000  de ad ...  ascii |`` line -> (offset, bytes); ``None`` if not one."""
    m = _DUMP.match(line.rstrip("\r\n"))
    if m is None:
        return None
    return int(m.group("offset"), 16), bytes.fromhex(m.group("hex").replace(" ", ""))


def format_missed(why: str) -> str:
    """The line ``memslot record`` writes after a call whose argument bytes it could not read
    (the parser reports the call with ``why``)."""
    return f" | memslot record: argument bytes not read: {why}\n"


def parse_missed_line(line: str) -> str | None:
    """The text of a :func:`format_missed` line; ``None`` if not one."""
    m = _MISSED.match(line.rstrip("\r\n"))
    return None if m is None else m.group("why")


def format_dump(data: bytes) -> list[str]:
    """strace's hex dump of ``data`` (the lines ``memslot record`` writes after a call)."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset:offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk[:8])
        if len(chunk) > 8:
            hexes += "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f" | {offset:05x}  {hexes:<49}  {text:<16} |\n")
    return lines


# -- argument text ----------------------------------------------------------------------------


_SPECIAL = re.compile(r'[,"\\()\[\]{}<>]')


def _split_args(text: str, maxsplit: int = -1) -> list[str]:
    """Top-level comma-separated arguments (brackets, braces, parentheses, quotes and ``<...>``
    annotations kept whole); at most ``maxsplit`` splits, the rest whole, as ``str.split``.
    (Only the characters that matter are visited: this runs for every ioctl of a log.)"""
    out: list[str] = []
    depth, start, quote, escaped = 0, 0, False, -1
    for m in _SPECIAL.finditer(text):
        i = m.start()
        if i == escaped:
            continue
        ch = text[i]
        if quote:
            if ch == "\\":
                escaped = i + 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
        elif ch == ",":
            if depth == 0:
                out.append(text[start:i].strip())
                start = i + 1
                if len(out) == maxsplit:
                    break
        elif ch in "([{<":
            depth += 1
        elif ch != ">" or text[i - 1:i] != "=":  # "=>" (clone3's out value) is no bracket
            depth -= 1
    tail = text[start:].strip()
    if tail or out:
        out.append(tail)
    return out


def _call_args(text: str, maxsplit: int = -1) -> list[str]:
    """A call's arguments, without the ``name=`` newer strace can print before each."""
    args = _split_args(text, maxsplit)
    if "=" in text:
        args = [a[m.end():] if (m := _ARG_NAME.match(a)) is not None else a for a in args]
    return args


def _strip_comment(text: str) -> str:
    return text.split(" /* ", 1)[0].strip()


def _fd(text: str) -> tuple[int, str | None]:
    """``4`` or ``4<anon_inode:kvm-vm>`` (``-y``) -> (4, path)."""
    m = _FD.match(text.strip())
    if m is None:
        raise LineError(f"not a file descriptor: {text[:40]!r}")
    path = m.group(2)
    if path is not None:
        path = path.split("<", 1)[0]  # -yy adds <char 10:232>
    return int(m.group(1), 0), path


def _int(text: str, what: str) -> int:
    text = _strip_comment(text)
    try:
        return int(text, 0)
    except ValueError:
        raise LineError(f"{what}: not a number: {text[:40]!r}") from None


def _request(text: str) -> int:
    text = _strip_comment(text)
    if text in _NAMES:
        return _NAMES[text]
    m = _IOC.fullmatch(text)
    if m is not None:
        direction = 0
        for part in m.group(1).split("|"):
            if part.strip() not in _IOC_DIRS:
                raise LineError(f"ioctl: unknown direction {part!r}")
            direction |= _IOC_DIRS[part.strip()]
        ty, nr, size = (int(m.group(i), 0) for i in (2, 3, 4))
        return (direction << 30) | (size << 16) | (ty << 8) | nr
    if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", text):
        return int(text, 0)
    return -1  # a request strace named that is not one of ours


def _flags(text: str, names: dict[str, int], what: str) -> int:
    value = 0
    for part in _strip_comment(text).split("|"):
        part = part.strip()
        if part in names:
            value |= names[part]
        else:
            value |= _int(part, what)
    return value


def _struct_fields(text: str) -> dict[str, str]:
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise LineError(f"expected a struct, got {text[:40]!r}")
    fields: dict[str, str] = {}
    for part in _split_args(text[1:-1]):
        m = _FIELD.match(part)
        if m is None:
            raise LineError(f"malformed struct field {part[:40]!r}")
        fields[m.group(1)] = part[m.end():]
    return fields


def _cap(text: str) -> int:
    text = _strip_comment(text)
    if text in _CAPS:
        return _CAPS[text]
    if text.startswith("KVM_CAP_"):
        return -1  # a capability the model does not know
    return _int(text, "capability")


def _need(data: bytes, size: int, what: str, missing: str = "") -> bytes:
    if not data and missing:
        raise LineError(f"{what}: {missing}")
    if not data:
        raise LineError(f"{what}: the argument bytes are not in the log ({_STRACE_HINT})")
    if len(data) < size:
        raise LineError(f"{what}: {len(data)} argument bytes, need {size}")
    return data


# -- descriptor tables ----------------------------------------------------------------------


@dataclass(slots=True)
class _Fd:
    kind: str  # "kvm" | "vm" | "vcpu"
    vm: int = -1
    cloexec: bool = True


class _Table:
    """One process's file descriptors that matter: /dev/kvm and VMs."""

    def __init__(self, fds: dict[int, _Fd] | None = None) -> None:
        self.fds: dict[int, _Fd] = dict(fds or {})


class StraceParser:
    """The state of one log: threads, descriptor tables, VMs."""

    def __init__(self, path: str = "<input>") -> None:
        self.path = path
        self.tables: dict[int, _Table] = {}
        self.vms = 0
        # what the log shows, for what it cannot tell (:meth:`notes`)
        self.ioctls = 0  # ioctl calls of any kind
        self.descriptor_calls = 0  # opens and closes
        self.started = False  # a successful execve: strace ran the program from its start
        self.caps_unread = 0  # KVM_ENABLE_CAP on a VM without its argument bytes
        self.implied = 0  # VMs the log shows in use but not being made

    # tables -------------------------------------------------------------------------------
    def table(self, tid: int) -> _Table:
        table = self.tables.get(tid)
        if table is None:
            table = self.tables[tid] = _Table()
        return table

    def _new_vm(self) -> int:
        self.vms += 1
        return self.vms - 1

    def lookup(self, tid: int, fd: int, path: str | None) -> _Fd | None:
        """What ``fd`` of thread ``tid`` is (``path``: its ``-y`` annotation, if any)."""
        table = self.table(tid)
        entry = table.fds.get(fd)
        kind = None if path is None else _KINDS.get(path, "other")
        if path is not None and path.startswith(_VCPU_INODE):
            kind = "vcpu"
        if kind == "other":
            table.fds.pop(fd, None)
            return None
        if entry is not None and kind in (None, entry.kind):
            return entry
        # A thread the log did not show being cloned: the one process holding such an fd.
        owners = {id(t): t for t in self.tables.values()
                  if fd in t.fds and kind in (None, t.fds[fd].kind)}
        if len(owners) == 1:
            (owner,) = owners.values()
            owner.fds.update({k: v for k, v in table.fds.items() if k not in owner.fds})
            self.tables[tid] = owner
            return owner.fds[fd]
        if kind == "kvm":
            entry = table.fds[fd] = _Fd("kvm", cloexec=False)
            return entry
        if kind == "vm":  # made before the log began (strace -p)
            self.implied += 1
            entry = table.fds[fd] = _Fd("vm", self._new_vm())
            return entry
        if kind == "vcpu":
            entry = table.fds[fd] = _Fd("vcpu")
            return entry
        return None

    def _clone(self, call: Call) -> None:
        child = call.value
        if child is None or child <= 0:
            return
        if call.name in ("fork", "vfork"):
            flags = 0
        else:
            m = re.search(r"flags=([^,}]+)", call.args)
            flags = 0
            for part in (m.group(1).split("|") if m else ()):
                part = _strip_comment(part)
                if part == "CLONE_FILES":
                    flags |= CLONE_FILES
                elif re.fullmatch(r"0x[0-9a-f]+|\d+", part):
                    flags |= int(part, 0)
        parent = self.table(call.tid)
        mine = self.tables.get(child)
        if flags & CLONE_FILES:
            if mine is not None and mine is not parent:
                parent.fds.update({k: v for k, v in mine.fds.items() if k not in parent.fds})
            self.tables[child] = parent
        else:
            fds = dict(parent.fds)
            if mine is not None:
                fds.update(mine.fds)
            self.tables[child] = _Table(fds)

    # calls --------------------------------------------------------------------------------
    def handle(self, call: Call) -> list[TraceOp]:
        name = call.name
        if call.ret.startswith("? ERESTART"):
            return []  # interrupted before it took effect; the restart is a call of its own
        if name == "ioctl":
            self.ioctls += 1
            return self._ioctl(call)
        if name in ("open", "openat", "openat2", "close", "close_range"):
            self.descriptor_calls += 1
        if name in ("open", "openat", "openat2"):
            self._open(call)
        elif name == "close":
            if call.errno == 0:
                fd, _ = _fd(_call_args(call.args)[0])
                self.table(call.tid).fds.pop(fd, None)
        elif name == "close_range":
            args = _call_args(call.args)
            if call.errno == 0 and len(args) == 3 and not _int(args[2].replace(
                    "CLOSE_RANGE_CLOEXEC", "4").replace("CLOSE_RANGE_UNSHARE", "2"),
                    "close_range flags") & 4:
                first, last = _int(args[0], "fd"), _int(args[1], "fd")
                fds = self.table(call.tid).fds
                for fd in [f for f in fds if first <= f <= last]:
                    del fds[fd]
        elif name in ("dup", "dup2", "dup3", "fcntl"):
            self._dup(call)
        elif name in ("clone", "clone3", "fork", "vfork"):
            self._clone(call)
        elif name in ("execve", "execveat") and call.errno == 0:
            self.started = True
            old = self.table(call.tid)
            self.tables[call.tid] = _Table({k: v for k, v in old.fds.items() if not v.cloexec})
        return []

    def _open(self, call: Call) -> None:
        args = _call_args(call.args)
        fd = call.value
        if fd is None or fd < 0:
            return
        table = self.table(call.tid)
        paths = [a for a in args if a.startswith('"')]
        path = paths[0].strip('"') if paths else ""
        if "\\x" in path:  # -x / -xx: "\x2f\x64\x65\x76..."
            path = re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), path)
        if path == _KVM_PATH:
            flags_text = args[2] if call.name == "openat" and len(args) > 2 else (
                args[1] if len(args) > 1 else "0")
            cloexec = "O_CLOEXEC" in flags_text or (
                _strip_comment(flags_text).startswith("0x")
                and bool(int(_strip_comment(flags_text), 16) & O_CLOEXEC))
            table.fds[fd] = _Fd("kvm", cloexec=cloexec)
        else:
            table.fds.pop(fd, None)

    def _dup(self, call: Call) -> None:
        args = _call_args(call.args)
        new = call.value
        if new is None or new < 0 or not args:
            return
        if call.name == "fcntl":
            if len(args) < 2:
                return
            cmd = _strip_comment(args[1])
            number = {"F_DUPFD": F_DUPFD, "F_DUPFD_CLOEXEC": F_DUPFD_CLOEXEC}.get(cmd)
            if number is None:
                number = int(cmd, 0) if re.fullmatch(r"0x[0-9a-f]+|\d+", cmd) else -1
            if number not in (F_DUPFD, F_DUPFD_CLOEXEC):
                return
        fd, path = _fd(args[0])
        table = self.table(call.tid)
        old = self.lookup(call.tid, fd, path)
        if old is None:
            table.fds.pop(new, None)
        else:
            table.fds[new] = _Fd(old.kind, old.vm, old.cloexec)

    def _ioctl(self, call: Call) -> list[TraceOp]:
        args = _call_args(call.args, 2)  # fd, request, argument
        if len(args) < 2:
            raise LineError("ioctl: expected fd, request and argument")
        request = _request(args[1])
        if (request >> 8) & 0xFF != KVMIO:
            return []
        fd, path = _fd(args[0])
        arg = args[2] if len(args) > 2 else "0"
        expect = call.errno
        entry = self.lookup(call.tid, fd, path)
        if path is None and (entry is None or expect == 0):
            # Made before the log began (attached late), or closed and made again where the
            # log does not show it (-e trace=ioctl): KVM_CREATE_VM succeeds only on /dev/kvm,
            # a memslot call only on a VM.
            if request == _R["KVM_CREATE_VM"] and (entry is None or entry.kind != "kvm"):
                entry = self.table(call.tid).fds[fd] = _Fd("kvm", cloexec=False)
            elif request in _VM_ONLY and (entry is None or entry.kind != "vm"):
                self.implied += 1
                entry = self.table(call.tid).fds[fd] = _Fd("vm", self._new_vm())
        if entry is None:
            return []
        line = call.line
        if request == _R["KVM_CREATE_VM"]:
            if entry.kind != "kvm" or expect != 0:
                return []
            new = call.value
            assert new is not None
            number = self._new_vm()
            self.table(call.tid).fds[new] = _Fd("vm", number)
            return [CreateVm(_int(arg, "VM type"), 0, line, "", number)]
        if request == _R["KVM_CHECK_EXTENSION"]:
            cap = _cap(arg)
            if cap not in MEMSLOT_CAPS:
                return []
            value = call.value if expect == 0 else None
            system = entry.kind == "kvm"
            vm = 0 if system else entry.vm
            return [CheckExtension(cap, value, system, expect, line, "", vm)]
        if request == _R["KVM_CREATE_VCPU"] and entry.kind == "vm" and expect == 0:
            vcpu = call.value
            assert vcpu is not None
            self.table(call.tid).fds[vcpu] = _Fd("vcpu")
            return []
        if entry.kind != "vm":
            return []
        vm = entry.vm
        if call.missing and not call.dump and request in RAW_REQUESTS:
            raise LineError(f"{_REQUEST_NAMES[request]}: {call.missing}")
        if request == _R["KVM_SET_USER_MEMORY_REGION"]:
            region = _region1(call.dump) if call.dump else _region_text(arg)
            return [SetRegion(region, expect, line, "", vm)]
        if request not in RAW_REQUESTS:
            return []
        name = _REQUEST_NAMES[request]
        size = (request >> 16) & 0x3FFF
        if request == _R["KVM_ENABLE_CAP"] and not call.dump:
            self.caps_unread += 1  # a plain log: which capability is unknown (see notes)
            return []
        data = _need(bytes(call.dump), size, name)
        if request == _R["KVM_SET_USER_MEMORY_REGION2"]:
            slot, flags, gpa, msize, ua, offset, gmem = struct.unpack_from("<IIQQQQI", data)
            region = MemoryRegion(slot, flags, gpa, msize, ua, offset, gmem)
            return [SetRegion(region, expect, line, "", vm)]
        if request == _R["KVM_CREATE_GUEST_MEMFD"]:
            gsize, gflags = struct.unpack_from("<QQ", data)
            fd_out = call.value if expect == 0 else None
            return [CreateGuestMemfd(gsize, gflags, fd_out, expect, line, "", vm)]
        if request == _R["KVM_ENABLE_CAP"]:
            cap, cflags, *cargs = struct.unpack_from("<II4Q", data)
            if cap not in ENABLE_CAPS:
                return []
            while cargs and cargs[-1] == 0:
                cargs.pop()
            return [EnableCap(cap, tuple(cargs), cflags, expect, line, "", vm)]
        if request == _R["KVM_GET_DIRTY_LOG"]:
            (slot,) = struct.unpack_from("<I", data)
            return [GetDirtyLog(slot, expect, line, "", None, vm)]
        slot, num, first, pointer = struct.unpack_from("<IIQQ", data)
        bitmap: bytes | None = None
        note = ""
        if pointer:
            rest = data[size:]
            want = ((num + 63) // 64) * 8
            if rest and len(rest) != want:
                raise LineError(f"{name}: bitmap of {len(rest)} bytes, {num} pages need {want}")
            bitmap = rest if rest else b""
            if not rest:
                note = "bitmap not in the log: all ones assumed"
        return [ClearDirtyLog(slot, first, num, bitmap, expect, line, note, vm)]


def log_notes(parser: StraceParser, reader: CallReader) -> list[str]:
    """What the log could not tell, one line each: the strace options that leave things out
    (``-Z``, ``-z``, ``-e trace=`` without the descriptor calls or without ``ioctl``), the
    ``KVM_ENABLE_CAP`` calls whose capability is unknown, a last line cut short."""
    notes = []
    succeeded, failed = reader.results
    if parser.vms and failed and not succeeded:
        notes.append("every call in the log failed (strace -Z, --status=failed?): the calls "
                     "that made the VMs and their slots are not in it, so results are replayed "
                     "from empty VMs")
    elif parser.implied:
        many = parser.implied > 1
        notes.append(f"{parser.implied} VM{'s' if many else ''} in use but not made in the log "
                     "(strace -p, or a VM made before the log began?): "
                     f"{'their' if many else 'its'} earlier slots are unknown, so results are "
                     "replayed from an empty VM")
    if parser.vms and parser.started and succeeded >= 20 and not failed:
        notes.append("no call in the log failed (strace -z, --status=successful?): a request "
                     "the kernel refused would be missing from it")
    if not parser.ioctls and (succeeded or failed):
        notes.append("the log has no ioctl call (strace -e trace= without ioctl?): no memslot "
                     "operation can come from it")
    elif parser.vms and not parser.descriptor_calls:
        notes.append("the log shows no open or close call (strace -e trace=ioctl?): "
                     "descriptors are followed by their ioctls alone, and a closed VM is taken "
                     "as live until its descriptor is made again")
    if parser.caps_unread:
        many = parser.caps_unread > 1
        notes.append(f"{parser.caps_unread} KVM_ENABLE_CAP call{'s' if many else ''} without "
                     f"{'their' if many else 'its'} argument bytes (strace prints only the "
                     "pointer): which capabilit" + ("ies" if many else "y") + " is unknown, "
                     "left out (" + _STRACE_HINT + ")")
    if reader.truncated:
        notes.append(f"line {reader.truncated}, the last, is cut short (strace killed while "
                     "writing it?): its call is left out")
    return notes


def _region1(data: bytearray) -> MemoryRegion:
    slot, flags, gpa, size, ua = struct.unpack_from("<IIQQQ", _need(bytes(data), 32,
                                                    "KVM_SET_USER_MEMORY_REGION"))
    return MemoryRegion(slot, flags, gpa, size, ua)


def _region_text(arg: str) -> MemoryRegion:
    if not arg.startswith("{"):
        raise LineError("KVM_SET_USER_MEMORY_REGION: the log has only the struct's address "
                        f"({arg[:40]!r}): strace -e raw=ioctl, or strace could not read it")
    fields = _struct_fields(arg)
    missing = [k for k in ("slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr")
               if k not in fields]
    if missing:
        raise LineError(f"KVM_SET_USER_MEMORY_REGION: missing {', '.join(missing)}")
    values = [
        _int(fields["slot"], "slot"),
        _flags(fields["flags"], _MEM_FLAGS, "flags"),
        _int(fields["guest_phys_addr"], "guest_phys_addr"),
        _int(fields["memory_size"], "memory_size"),
        _int(fields["userspace_addr"], "userspace_addr"),
    ]
    limits = (0xFFFFFFFF, 0xFFFFFFFF, (1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1)
    for value, limit in zip(values, limits, strict=True):
        if not 0 <= value <= limit:
            raise LineError(f"KVM_SET_USER_MEMORY_REGION: {value:#x} out of range")
    return MemoryRegion(*values)


def parse_strace(
    lines: Iterable[str],
    path: str = "<input>",
    errors: list[TraceFormatError] | None = None,
    notes: list[str] | None = None,
) -> Iterator[TraceOp]:
    """Parse an strace log lazily (line numbers from 1). A malformed memslot call raises
    :class:`TraceFormatError`, or, with ``errors`` a list, is recorded there and skipped.
    ``notes``, when given, receives at the end what the log could not tell
    (:func:`log_notes`)."""
    parser = StraceParser(path)
    reader = CallReader()
    held: Call | None = None  # a completed call, waiting for its dump lines

    def finish(call: Call) -> Iterator[TraceOp]:
        try:
            ops = parser.handle(call)
        except (LineError, struct.error) as exc:
            error = TraceFormatError(path, call.line, str(exc))
            if errors is None:
                raise error from None
            errors.append(error)
            return
        yield from ops

    number = 0
    for number, line in enumerate(lines, 1):
        if held is not None:
            missing = parse_missed_line(line)
            if missing is not None and not held.dump:
                held.missing = f"memslot record: {missing}"
                continue
            dump = parse_dump_line(line)
            if dump is not None:
                offset, data = dump
                if offset != len(held.dump):
                    error = TraceFormatError(path, number, f"dump offset {offset:#x}, expected "
                                             f"{len(held.dump):#x}")
                    if errors is None:
                        raise error
                    errors.append(error)
                    continue
                held.dump += data
                continue
            yield from finish(held)
            held = None
        try:
            if "\0" in line:
                raise LineError("binary data (NUL byte)")
            call = reader.feed(line, number)
        except LineError as exc:
            error = TraceFormatError(path, number, str(exc))
            if errors is None:
                raise error from None
            errors.append(error)
            continue
        if reader.broken:
            for at, message in reader.broken:
                error = TraceFormatError(path, at, message)
                if errors is None:
                    raise error
                errors.append(error)
            reader.broken.clear()
        if call is not None:
            held = call
        if reader.exited:
            if held is not None:
                yield from finish(held)
                held = None
            for tid in reader.exited:
                parser.tables.pop(tid, None)
            reader.exited.clear()
    if held is not None:
        yield from finish(held)
    reader.end()
    for at, message in reader.broken:
        error = TraceFormatError(path, at, message)
        if errors is None:
            raise error
        errors.append(error)
    for tid, name, args, line_number in reader.unfinished():
        if name == "ioctl":  # the log ends inside the call: its result is unknown
            yield from finish(Call(tid, name, args, "?", line_number))
    if notes is not None:
        notes.extend(log_notes(parser, reader))

"""Measure the kernel's memslot metadata cost (/proc/meminfo VmallocUsed around each request on
/dev/kvm) next to the model's prediction for the same request."""

from __future__ import annotations

import mmap
import statistics
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from ..arch import arch_class
from ..backends.kvm import KvmVM
from ..backends.model import ModelVM
from ..constants import KVM_MEM_LOG_DIRTY_PAGES
from ..profile import Profile
from ..request import MemoryRegion

UA = 0x100000000000  # 16 TiB; KVM never touches the memory of a slot it only registers
DEFAULT_SIZES = (1, 512, 513, 4096, 32768, 1 << 18, 1 << 19, 1 << 20)


def vmalloc_used() -> int:
    """/proc/meminfo VmallocUsed in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("VmallocUsed:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmallocUsed in /proc/meminfo")


H = TypeVar("H", bound=Hashable)

#: Callers in /proc/vmallocinfo whose areas are KVM's memslot metadata (``kvcalloc`` and
#: vmalloc's own page-pointer array are shown with the KVM function that asked).
_KVM_CALLERS = ("kvm", "memslot")


def kvm_vmalloc_areas() -> dict[str, int] | None:
    """KVM's vmalloc areas now, ``"start-end caller" -> bytes of pages`` (/proc/vmallocinfo;
    the addresses are hashed but stable), or ``None`` where the file cannot be read. An area
    that exists before and after a step is the same area: following known areas is immune to
    what other VMs allocate and free meanwhile."""
    try:
        with open("/proc/vmallocinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or not fields[3].startswith("pages="):
            continue
        if any(name in fields[2] for name in _KVM_CALLERS):
            out[f"{fields[0]} {fields[2]}"] = int(fields[3][6:]) * 4096
    return out if lines else None


def read_vmallocinfo() -> bytes | None:
    """/proc/vmallocinfo as it is now (root only), ``None`` where it cannot be read."""
    try:
        with open("/proc/vmallocinfo", "rb") as f:
            return f.read()
    except OSError:
        return None


def kvm_areas_of(text: bytes) -> dict[bytes, int]:
    """KVM's areas in a /proc/vmallocinfo text, ``b"start-end caller" -> bytes of pages``."""
    out: dict[bytes, int] = {}
    callers = tuple(name.encode() for name in _KVM_CALLERS)
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[3].startswith(b"pages="):
            continue
        if any(name in fields[2] for name in callers):
            # pages= counts the kernel's pages
            out[fields[0] + b" " + fields[2]] = int(fields[3][6:]) * mmap.PAGESIZE
    return out


def kvm_pages_bytes(text: bytes) -> int:
    """Bytes of the vmalloc pages held by KVM functions in a /proc/vmallocinfo text."""
    return sum(kvm_areas_of(text).values())


def kvm_vmalloc_used() -> int | None:
    """Bytes of vmalloc pages held by KVM functions (/proc/vmallocinfo, root only), or
    ``None`` where the file cannot be read. Unlike VmallocUsed it leaves out what the rest of
    the host allocates meanwhile (kernel stacks of every new thread, BPF, drivers)."""
    text = read_vmallocinfo()
    return kvm_pages_bytes(text) if text else None


def vmalloc_reader() -> Callable[[], int]:
    """The most selective reading this host allows: KVM's own vmalloc pages, or
    VmallocUsed."""
    if kvm_vmalloc_used() is None:
        return vmalloc_used

    def read() -> int:
        value = kvm_vmalloc_used()
        return vmalloc_used() if value is None else value

    return read


class Reading(NamedTuple):
    """How a step's vmalloc is read: ``take()`` captures the host's state as bytes (two
    equal captures in a row: nothing moved in between), ``count(state)`` gives its bytes of
    vmalloc (later: parsing is slow)."""

    take: Callable[[], bytes]
    count: Callable[[bytes], int]


def vmalloc_reading() -> Reading:
    """The most selective :class:`Reading` this host allows (as :func:`vmalloc_reader`):
    /proc/vmallocinfo's KVM areas, else VmallocUsed."""
    if read_vmallocinfo():
        return Reading(lambda: read_vmallocinfo() or b"", kvm_pages_bytes)
    read = vmalloc_reader()
    return Reading(lambda: b"%d" % read(), int)


def repeat_until_stable(scenario: Callable[[], H], agree: int = 2, max_runs: int = 30) -> H:
    """Run ``scenario`` until one result has come ``agree`` times and twice more often than
    any other (other VMs on the host disturb single runs, rarely the same way twice); the most
    frequent result if ``max_runs`` pass first."""
    seen: Counter[H] = Counter()
    for _ in range(max_runs):
        seen[scenario()] += 1
        (best, count), *rest = [*seen.most_common(2), (None, 0)]
        if count >= agree and count >= rest[0][1] + 2:
            return best
    return seen.most_common(1)[0][0]


@dataclass(frozen=True)
class Measurement:
    shape: str
    step: str
    kernel_bytes: int
    model_bytes: int
    samples: tuple[int, ...]

    @property
    def match(self) -> bool:
        return self.kernel_bytes == self.model_bytes

    def as_dict(self) -> dict[str, object]:
        return {"shape": self.shape, "step": self.step, "kernel_bytes": self.kernel_bytes,
                "model_bytes": self.model_bytes, "match": self.match,
                "samples": list(self.samples)}


Step = tuple[str, int, int, int]  # (label, flags, gpa, size); size 0 = DELETE


def moved_gfn(profile: Profile) -> int:
    """Where the MOVE step goes: gfn 2^28+1 (unaligned at every large-page level), or the
    middle of the guest physical space plus one where that is smaller (a 40-bit arm64 IPA
    with 4 KiB pages ends at gfn 2^28; TCG's x86 MAXPHYADDR is 40 bits)."""
    top = arch_class(profile).gfn_limit(profile) or 1 << 52
    return min(1 << 28, top // 4) + 1


def shape_steps(npages: int, base_gfn: int, dirty: bool, page: int,
                moved_gfn: int = (1 << 28) + 1) -> list[Step]:
    """CREATE, dirty logging on and off (FLAGS_ONLY), a MOVE to an unaligned base, DELETE."""
    size = npages * page
    flags = KVM_MEM_LOG_DIRTY_PAGES if dirty else 0
    gpa = base_gfn * page
    moved = moved_gfn * page
    label = "MOVE to gfn 2^28+1" if moved_gfn == (1 << 28) + 1 else f"MOVE to gfn {moved_gfn:#x}"
    steps: list[Step] = [("CREATE", flags, gpa, size)]
    if not dirty:
        steps.append(("FLAGS_ONLY dirty on", KVM_MEM_LOG_DIRTY_PAGES, gpa, size))
        steps.append(("FLAGS_ONLY dirty off", 0, gpa, size))
    steps.append((label, flags, moved, size))
    steps.append(("DELETE", flags, moved, 0))
    return steps


def _consistent(reading: Reading, gate: Callable[[], int], tries: int) -> bytes | None:
    """A capture of the host's state that the next capture repeats, VmallocUsed unmoved
    around both (a capture of /proc/vmallocinfo takes milliseconds: one taken while another
    VM was made and closed shows that VM's areas although VmallocUsed is the same before and
    after); ``None`` if the host never holds still that long."""
    for _ in range(tries):
        first = gate()
        state, again = reading.take(), reading.take()
        if state == again and gate() == first:
            return state
    return None


def _run_once(steps: list[Step], tries: int = 50) -> list[int | None]:
    """One pass on a fresh VM: the vmalloc delta of each step (KVM's own areas where
    /proc/vmallocinfo is readable: :func:`_run_by_identity`, else VmallocUsed around each
    step, ``None`` where the host moved while it was read)."""
    reading = vmalloc_reading()
    if reading.count is kvm_pages_bytes:
        return _run_by_identity(steps, reading, tries)
    deltas: list[int | None] = []
    gate = vmalloc_used
    with KvmVM() as vm:
        for _, flags, gpa, size in steps:
            before = _consistent(reading, gate, tries)
            vm.set_user_memory_region(0, flags, gpa, size, UA)
            after = _consistent(reading, gate, 1)
            if before is None or after is None:
                deltas.append(None)
            else:
                deltas.append(reading.count(after) - reading.count(before))
    return deltas


def _run_by_identity(steps: list[Step], reading: Reading, tries: int) -> list[int | None]:
    """The deltas of one pass counted from the areas this VM allocated and freed, followed
    by identity (other VMs on a busy host allocate and free all the time, and a request can
    be preempted for milliseconds).

    Each step, and the close of the VM, has a window: a consistent capture of KVM's areas
    (:func:`_consistent`) just before the request, one just after; between windows the pass
    waits a few window lengths with nothing of this VM happening. An area is this VM's when
    it appeared inside a window and vanished inside a later one (closing the VM frees
    whatever it still holds): an area born or dead between windows is another process's.
    Another VM's area counts only when both its birth and its death fall inside this VM's
    windows, which :func:`measure`'s vote across passes outweighs."""
    gate = vmalloc_used
    captures: list[dict[bytes, int] | None] = []  # before, after of each window in turn
    clock = time.monotonic

    def window(action: Callable[[], object]) -> None:
        start = clock()
        before = _consistent(reading, gate, tries)
        action()
        after = _consistent(reading, gate, tries)
        captures.extend(None if c is None else kvm_areas_of(c) for c in (before, after))
        time.sleep(min(0.05, 3 * (clock() - start)))  # a gap: births and deaths there are not ours

    with KvmVM() as vm:
        for _, flags, gpa, size in steps:
            def step(f: int = flags, g: int = gpa, n: int = size) -> None:
                vm.set_user_memory_region(0, f, g, n, UA)

            window(step)
        window(vm.close)
    known = [c for c in captures if c is not None]
    if len(known) < len(captures):  # the host never held still: nothing can be followed
        return [None] * len(steps)
    deltas = [0] * (len(steps) + 1)
    born: dict[bytes, int] = {}  # area -> the window it appeared in
    for index in range(1, len(known)):
        old, new = known[index - 1], known[index]
        inside = index % 2 == 1  # from a window's before to its after
        for key, size in old.items():
            if key not in new and key in born:
                window_of_birth = born.pop(key)
                if inside:
                    deltas[window_of_birth] += size
                    deltas[index // 2] -= size
        if inside:
            born.update(dict.fromkeys((k for k in new if k not in old), index // 2))
    return list(deltas[:len(steps)])


def _model(profile: Profile, steps: list[Step]) -> list[int]:
    out = []
    with ModelVM(profile) as vm:
        for _, flags, gpa, size in steps:
            result = vm.submit(_region(flags, gpa, size))
            if result.errno:
                raise RuntimeError(f"model refused a measurement step: {result.summary()}")
            out.append(result.vmalloc_delta)
    return out


def _region(flags: int, gpa: int, size: int) -> MemoryRegion:
    return MemoryRegion(0, flags, gpa, size, UA)


def measure(
    profile: Profile,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
    max_passes: int = 25,
) -> list[Measurement]:
    """For each slot shape (size, base aligned or not, dirty logging on or off) and step, the
    kernel's vmalloc delta beside the model's prediction. Other activity on the host moves
    the reading too, so samples taken while it moved are dropped and passes repeat until, for
    every step, the most frequent delta has been seen ``repeats // 2 + 1`` times and twice more
    than any other (at least ``repeats`` passes, at most ``max_passes``); that value counts."""
    page = profile.page_size
    agree = repeats // 2 + 1
    out: list[Measurement] = []
    for npages in sizes:
        for base_gfn in (0, 1):
            for dirty in (False, True):
                shape = f"{npages} pages at gfn {base_gfn}{' +dirty' if dirty else ''}"
                if progress is not None:
                    progress(shape)
                steps = shape_steps(npages, base_gfn, dirty, page, moved_gfn(profile))
                runs = [_run_once(steps) for _ in range(repeats)]
                while len(runs) < max_passes and not all(
                    _agreement(_valid(runs, i)) >= agree for i in range(len(steps))
                ):
                    runs.append(_run_once(steps))
                predicted = _model(profile, steps)
                for i, (label, *_rest) in enumerate(steps):
                    samples = _valid(runs, i)
                    out.append(Measurement(shape, label, _stable(samples), predicted[i], samples))
    return out


def _valid(runs: list[list[int | None]], i: int) -> tuple[int, ...]:
    return tuple(d for run in runs if (d := run[i]) is not None)


def _agreement(samples: tuple[int, ...]) -> int:
    """The count of the most frequent value, or 0 unless it leads every other value by two
    (a disturbance seldom repeats; one that repeats twice must still be outvoted twice)."""
    counts = [*sorted((samples.count(v) for v in set(samples)), reverse=True), 0, 0]
    return counts[0] if counts[0] >= counts[1] + 2 else 0


def _stable(samples: tuple[int, ...]) -> int:
    """The mode of the samples (ties: the median)."""
    if not samples:
        raise RuntimeError("the host never went quiet around this step")
    counts = {v: samples.count(v) for v in samples}
    best = max(counts.values())
    modes = sorted(v for v, n in counts.items() if n == best)
    return modes[0] if len(modes) == 1 else int(statistics.median(samples))

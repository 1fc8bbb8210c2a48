"""Measure the kernel's memslot metadata cost (/proc/meminfo VmallocUsed around each request on
/dev/kvm) next to the model's prediction for the same request."""

from __future__ import annotations

import mmap
import statistics
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

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


def kvm_vmalloc_used() -> int | None:
    """Bytes of vmalloc pages held by KVM functions (/proc/vmallocinfo, root only), or
    ``None`` where the file cannot be read. Unlike VmallocUsed it leaves out what the rest of
    the host allocates meanwhile (kernel stacks of every new thread, BPF, drivers)."""
    try:
        with open("/proc/vmallocinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    pages = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or not fields[3].startswith("pages="):
            continue
        if any(name in fields[2] for name in _KVM_CALLERS):
            pages += int(fields[3][6:])
    return pages * mmap.PAGESIZE if lines else None  # pages= counts the kernel's pages


def vmalloc_reader() -> Callable[[], int]:
    """The most selective reading this host allows: KVM's own vmalloc pages, or
    VmallocUsed."""
    if kvm_vmalloc_used() is None:
        return vmalloc_used

    def read() -> int:
        value = kvm_vmalloc_used()
        return vmalloc_used() if value is None else value

    return read


def quiet_read(read: Callable[[], int], tries: int = 50) -> int:
    """``read()`` once two consecutive reads agree (no allocation in flight elsewhere on the
    host between them); the last read if the host never goes quiet."""
    last = read()
    for _ in range(tries):
        now = read()
        if now == last:
            return now
        last = now
    return last


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


def _run_once(steps: list[Step]) -> list[int | None]:
    """One pass on a fresh VM: the vmalloc delta of each step (KVM's own areas where
    /proc/vmallocinfo is readable, else VmallocUsed), ``None`` where the host was not quiet
    around it (the reading moved right after the step)."""
    deltas: list[int | None] = []
    read = vmalloc_reader()
    with KvmVM() as vm:
        for _, flags, gpa, size in steps:
            before = quiet_read(read)
            vm.set_user_memory_region(0, flags, gpa, size, UA)
            after = read()
            settled = read()
            deltas.append(after - before if after == settled else None)
    return deltas


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

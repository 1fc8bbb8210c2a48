"""The layout a trace leaves, judged: large-page eligibility per slot (x86: from the
lpage_info disallow rules; elsewhere the same gpa/hva alignment rule, labelled an estimate),
the misalignment that disables large pages for a whole slot and the address that would fix
it, metadata memory per slot and in total, dirty-bitmap memory, and the headroom against
``KVM_CAP_NR_MEMSLOTS`` and ``KVM_MEM_MAX_NR_PAGES``. Everything is plain data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backends.model import ModelVM
from ..constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_MAX_NR_PAGES, flag_names
from ..engine.dirty import dirty_bitmap_bytes
from ..engine.ledger import KIND_DIRTY_BITMAP
from ..engine.slot import MemorySlot
from ..harness.replay import Replayer
from ..profile import Profile
from ..trace.records import CloseVm, TraceOp
from ..units import human_bytes, plural, size_label
from .session import At, ModelRun, Progress

#: The four hosts of a side-by-side comparison: x86 TDP with SMM, x86 shadow, POWER HV, arm64.
COMPARE_PROFILES = ("x86_64", "x86_64-shadow", "ppc64-hv", "arm64")
#: Findings at or past these fractions of a limit.
NEAR_MAX_PAGES = 0.9
MIN_HEADROOM = 0.1


def huge_window(gpa: int, size: int, ua: int, frame: int) -> tuple[int, int] | None:
    """The gpa range ``[start, end)`` that can be mapped with ``frame``-sized pages: whole
    frames inside the slot, and none at all when gpa and hva disagree modulo the frame (the
    x86 ``disallow_lpage`` rules, arm64 ``fault_supports_stage2_huge_mapping``)."""
    if (gpa - ua) % frame:
        return None
    start = -(-gpa // frame) * frame
    end = (gpa + size) // frame * frame
    return (start, end) if end > start else None


def aligned_ua(gpa: int, ua: int, frame: int) -> int:
    """The lowest host address at or above ``ua`` congruent to ``gpa`` modulo ``frame``."""
    return ua + (gpa - ua) % frame


def huge_sizes(vm: ModelVM) -> list[tuple[str, int]]:
    """The large-page sizes judged, smallest first, as ``(label, bytes)``: the arch's
    (x86 lpage_info levels, arm64/riscv PMD/PUD blocks at this page size, POWER radix)."""
    return [(size_label(s), s) for s in vm.arch.huge_page_sizes(vm.profile.page_shift)]


def _huge(vm: ModelVM, slot: MemorySlot, gpa: int, size: int) -> dict[str, Any]:
    """Per huge size: eligible bytes and share, how it was found, and the misalignment."""
    profile = vm.profile
    shift = profile.page_shift
    tracking = vm.arch.huge_page_tracking
    ranges = vm.huge_ranges(slot) if tracking is not None else {}
    out: dict[str, Any] = {}
    for name, frame in huge_sizes(vm):
        window = huge_window(gpa, size, slot.userspace_addr, frame)
        if tracking is not None:
            got = ranges.get(name, [])
            window = (got[0][0] << shift, got[0][1] << shift) if got else None
        eligible = window[1] - window[0] if window else 0
        misaligned = (gpa - slot.userspace_addr) % frame != 0
        fix = aligned_ua(gpa, slot.userspace_addr, frame) if misaligned else None
        potential = huge_window(gpa, size, gpa, frame)
        lost = (potential[1] - potential[0] if potential else 0) - eligible
        out[name] = {
            "source": tracking or "estimate",
            "eligible_bytes": eligible,
            "share": eligible / size if size else 0.0,
            "window": list(window) if window else None,
            "misaligned": misaligned,
            "gpa_offset": gpa % frame,
            "ua_offset": slot.userspace_addr % frame,
            "fix_userspace_addr": fix,
            "lost_bytes": max(lost, 0),
        }
    return out


def slot_report(vm: ModelVM, slot: MemorySlot) -> dict[str, Any]:
    """One slot: place, flags, large pages, metadata, dirty bitmap, page limit."""
    shift = vm.profile.page_shift
    gpa, size = slot.base_gfn << shift, slot.npages << shift
    meta = vm.describe_metadata(slot)
    bitmap = vm.ledger.spec(KIND_DIRTY_BITMAP, 2, dirty_bitmap_bytes(slot.npages))
    logging = bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES)
    current = [a for a in meta["arrays"] if a["array"] == "dirty_bitmap"]
    return {
        "as_id": slot.as_id,
        "id": slot.id,
        "guest_phys_addr": gpa,
        "memory_size": size,
        "end": gpa + size,
        "npages": slot.npages,
        "userspace_addr": slot.userspace_addr,
        "flags": slot.flags,
        "flag_names": flag_names(slot.flags),
        "huge": _huge(vm, slot, gpa, size),
        "metadata_bytes": meta["bytes"],
        "metadata_vmalloc_bytes": meta["vmalloc_bytes"],
        "arrays": meta["arrays"],
        "dirty_logging": logging,
        "dirty_bitmap_bytes": current[0]["bytes"] if current else 0,
        "dirty_bitmap_if_logging_bytes": bitmap.bytes,
        "dirty_bitmap_if_logging_vmalloc_bytes": bitmap.vmalloc_bytes,
        "max_pages_share": slot.npages / KVM_MEM_MAX_NR_PAGES,
    }


def findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Problems a VMM developer should fix (``severity`` "warning", counted by ``--strict``)
    and notes, for one profile's report."""
    out: list[dict[str, Any]] = []
    profile = report["profile"]
    for s in report["slots"]:
        name = f"{s['as_id']}:{s['id']}"
        where = f"slot {name} ({human_bytes(s['memory_size'])} at {s['guest_phys_addr']:#x})"
        first = next(iter(s["huge"]), None)
        for size_name, h in s["huge"].items():
            if h["misaligned"] and h["lost_bytes"] and not h["eligible_bytes"]:
                est = "" if h["source"] == "lpage_info" else " (estimate)"
                # Misalignment at the smallest size disables every large page of the slot
                # (it implies the larger ones'); a larger size alone matters only with
                # hugetlbfs backing of that size, so it is a note.
                smallest = size_name == first
                out.append({
                    "code": "huge-misaligned" if smallest
                    else f"huge-misaligned-{size_name.lower()}",
                    "severity": "warning" if smallest else "note", "slot": name,
                    "text": f"{where}: gpa is {h['gpa_offset']:#x} into its {size_name} frame "
                            f"but userspace_addr is {h['ua_offset']:#x} into its own, so no "
                            f"{size_name} page can map it{est}; userspace_addr "
                            f"{h['fix_userspace_addr']:#x} (gpa mod {size_name}) would allow "
                            f"{human_bytes(h['lost_bytes'])} of {size_name} mappings"
                            + ("" if smallest else f" (with {size_name} hugetlbfs backing)"),
                })
        if s["max_pages_share"] >= NEAR_MAX_PAGES:
            out.append({
                "code": "near-max-pages", "severity": "warning", "slot": name,
                "text": f"{where}: {s['npages']} pages is {100 * s['max_pages_share']:.1f}% of "
                        f"KVM_MEM_MAX_NR_PAGES ({KVM_MEM_MAX_NR_PAGES}); a larger guest needs "
                        "its memory split across slots",
            })
    for a in report["address_spaces"]:
        if a["slots"] and a["headroom_share"] < MIN_HEADROOM:
            out.append({
                "code": "slot-headroom", "severity": "warning", "slot": None,
                "text": f"address space {a['as_id']}: {a['slots']} of {a['limit']} slots "
                        f"(KVM_CAP_NR_MEMSLOTS) used, headroom {100 * a['headroom_share']:.1f}%",
            })
    mism = report["mismatched"]
    if mism:
        first = mism[0]
        where = f"line {first['line']}" if first["line"] else f"operation {first['index']}"
        out.append({
            "code": "replay-mismatch", "severity": "warning", "slot": None,
            "text": f"{plural(report['outcomes']['mismatches'], 'result')} under {profile} "
                    f"{'differs' if report['outcomes']['mismatches'] == 1 else 'differ'} from "
                    f"the trace (first at {where}: {'; '.join(first['problems'])})",
        })
    if report["totals"]["huge_source"] == "estimate" and report["slots"]:
        out.append({
            "code": "huge-estimate", "severity": "note", "slot": None,
            "text": f"{report['arch']} keeps no per-slot large-page tracking: large-page shares "
                    "are estimates from the gpa/hva alignment rule",
        })
    return out


def run_report(run: ModelRun, total_ops: int) -> dict[str, Any]:
    """The report of a replayed (prefix of a) trace."""
    vm, profile = run.vm, run.profile
    slots = [slot_report(vm, s) for as_id in range(vm.nr_address_spaces)
             for s in vm.memslots(as_id)]
    tally = run.tally
    mismatched = [{"index": s.index, "line": s.op.line or None, "problems": s.problems}
                  for s in tally.mismatched]
    spaces = []
    for as_id in range(vm.nr_address_spaces):
        used = sum(1 for s in slots if s["as_id"] == as_id and s["id"] < profile.user_mem_slots)
        limit = profile.user_mem_slots
        spaces.append({"as_id": as_id, "slots": used, "limit": limit,
                       "headroom": limit - used, "headroom_share": (limit - used) / limit})
    guest = sum(s["memory_size"] for s in slots)

    def share(level: str) -> float:
        return sum(s["huge"][level]["eligible_bytes"] for s in slots) / guest if guest else 0.0

    report: dict[str, Any] = {
        "profile": profile.name,
        "arch": profile.arch,
        "description": profile.description,
        "operations": total_ops,
        "applied": tally.operations,
        "outcomes": {
            "ok": tally.ok,
            "refused": tally.refused,
            "skipped": tally.skipped,
            "mismatches": tally.mismatches,
        },
        "mismatched": mismatched,
        "address_spaces": spaces,
        "slots": slots,
        "totals": {
            "slots": len(slots),
            "guest_bytes": guest,
            "metadata_bytes": vm.metadata_bytes(),
            "vmalloc_bytes": vm.vmalloc_bytes(),
            "huge_share": {name: share(name) for name, _ in huge_sizes(vm)},
            "huge_source": vm.arch.huge_page_tracking or "estimate",
            "dirty_bitmap_bytes": sum(s["dirty_bitmap_bytes"] for s in slots),
            "dirty_bitmap_if_logging_bytes": sum(s["dirty_bitmap_if_logging_bytes"]
                                                 for s in slots),
            "dirty_bitmap_if_logging_vmalloc_bytes": sum(
                s["dirty_bitmap_if_logging_vmalloc_bytes"] for s in slots),
            "nr_memslot_pages": vm.nr_memslot_pages,
            "largest_slot_pages": max((s["npages"] for s in slots), default=0),
            "max_nr_pages": KVM_MEM_MAX_NR_PAGES,
            "nr_memslots": profile.user_mem_slots,
            "generations": [vm.generation(i) for i in range(vm.nr_address_spaces)],
        },
    }
    report["findings"] = findings(report)
    return report


def report_trace(
    ops: Iterable[TraceOp],
    profiles: Iterable[Profile],
    upto: int | At | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One report per profile for the same trace (prefix: ``upto`` operations, or an
    :class:`At`), read once: each operation goes to every profile's VM in turn. The rest of
    the trace is read, not applied, to count its operations, as is everything from a
    ``close_vm`` of the first VM on (the report is of the VM it closed). ``ValueError`` when the
    trace ends before ``upto``."""
    at = At(upto) if isinstance(upto, int) else upto
    runs = [ModelRun(ModelVM(p), p) for p in profiles]
    try:
        replayers = [Replayer(run.vm) for run in runs]
        stream = iter(ops)
        applied = closing = 0
        for op in at.take(stream) if at is not None else stream:
            if isinstance(op, CloseVm) and op.vm == 0:
                closing = 1
                break
            for replayer, run in zip(replayers, runs, strict=True):
                run.tally.add(replayer.step(op))
            applied += 1
            if progress is not None and applied % 500 == 0:
                progress(applied)
        total = (applied + closing + sum(1 for _ in stream)
                 + (at.overshoot if at is not None else 0))
        if at is not None and at.problem() is not None:
            raise ValueError(at.problem())
        return [run_report(run, total) for run in runs]
    finally:
        for run in runs:
            run.close()


def warnings(reports: list[dict[str, Any]]) -> int:
    """Findings ``--strict`` counts, over all reports."""
    return sum(1 for r in reports for f in r["findings"] if f["severity"] == "warning")

"""``memslot report``: large-page eligibility, metadata cost and limits of the layout a trace
leaves (or reaches at ``--at N``), under one or several host profiles side by side."""

from __future__ import annotations

import argparse
from typing import Any

from ..tools.report import COMPARE_PROFILES, report_trace, warnings
from ..units import plural
from . import render
from .backends import resolve_profile
from .common import EXIT_MISMATCH, EXIT_OK, Command, die, emit_json, human_bytes
from .trace_input import Input, add_input_options, at_or_die


def configure(p: argparse.ArgumentParser) -> None:
    add_input_options(p)
    p.add_argument("--profile", action="append", default=[], metavar="P",
                   help="host profile; repeat to compare side by side (default x86_64; "
                        "'detect' for the running kernel)")
    p.add_argument("--compare", action="store_true",
                   help=f"compare the profiles {', '.join(COMPARE_PROFILES)} (x86 TDP with "
                        "SMM, x86 shadow, POWER HV, arm64)")
    p.add_argument("--at", metavar="N",
                   help="report the layout after operation N (1-based; 'L37': after line 37)")
    p.add_argument("--arrays", action="store_true", help="list every metadata array per slot")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on findings: slots whose gpa/hva misalignment disables large "
                        "pages, slots near KVM_MEM_MAX_NR_PAGES, slot headroom below 10%%, "
                        "results that differ from the trace, an input without operations")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _pct(x: float) -> str:
    if x == 0:
        return "0%"
    if x == 1:
        return "100%"
    if x >= 0.999:
        return ">99.9%"
    return f"{100 * x:.1f}%" if x >= 0.001 else "<0.1%"


def run(args: argparse.Namespace) -> int:
    names = list(args.profile)
    if args.compare:
        names += [n for n in COMPARE_PROFILES if n not in names]
    profiles = [resolve_profile(n) for n in (names or ["x86_64"])]
    at = at_or_die(args.at)
    source = Input(args)
    with render.progress(source.size() or 0, "replaying", not (args.json or source.streaming),
                         unit="bytes") as update:
        try:
            reports = report_trace(source, profiles, at,
                                   lambda n: update(source.position()))
        except ValueError as exc:  # --at past the end
            die(str(exc))
    bad = source.malformed
    notice = source.notice(reports[0]["operations"])
    if notice is not None:
        for r in reports:
            r["findings"].insert(0, {"code": "no-operations", "severity": "warning",
                                     "slot": None, "text": notice})
    found = warnings(reports)
    if args.json:
        emit_json({"file": source.path, "at": args.at, "reports": reports,
                   "malformed_lines": bad, "warnings": found, "notice": notice})
    else:
        print_reports(source.path, reports, args.arrays)
        for text in bad:
            render.line(f"skipped malformed line: {text}", "yellow")
    return EXIT_MISMATCH if args.strict and found else EXIT_OK


def _huge_cell(h: dict[str, Any]) -> str:
    text = _pct(h["share"])
    if h["misaligned"] and h["lost_bytes"]:
        text += " MISALIGNED"
    if h["source"] != "lpage_info":
        text += " (est.)"
    return text


def _fix_cell(s: dict[str, Any]) -> str:
    fixes = [f"{name}: ua={h['fix_userspace_addr']:#x}" for name, h in s["huge"].items()
             if h["misaligned"] and h["lost_bytes"]]
    return "; ".join(fixes) or "-"


def print_slots(r: dict[str, Any], arrays: bool) -> None:
    sizes = list(r["totals"]["huge_share"])
    rows = []
    for s in r["slots"]:
        bitmap = (human_bytes(s["dirty_bitmap_bytes"]) if s["dirty_logging"]
                  else f"({human_bytes(s['dirty_bitmap_if_logging_bytes'])})")
        rows.append([
            f"{s['as_id']}:{s['id']}", f"{s['guest_phys_addr']:#x}",
            human_bytes(s["memory_size"]), f"{s['userspace_addr']:#x}", s["flag_names"],
            *(_huge_cell(s["huge"][n]) for n in sizes), _fix_cell(s),
            human_bytes(s["metadata_bytes"]), human_bytes(s["metadata_vmalloc_bytes"]), bitmap,
            _pct(s["max_pages_share"]),
        ])
    after = 6 + len(sizes)  # metadata, vmalloc, dirty bitmap, of max pages
    render.print_table(rows, ["slot", "gpa", "size", "userspace_addr", "flags", *sizes,
                              "fix (aligned ua)", "metadata", "vmalloc", "dirty bitmap",
                              "of max pages"], right={2, *range(after, after + 4)})
    if arrays:
        for s in r["slots"]:
            render.line(f"  slot {s['as_id']}:{s['id']}: " + ", ".join(
                f"{a['array']} {a['entries']} = {human_bytes(a['bytes'])}" for a in s["arrays"]))


def print_totals(r: dict[str, Any]) -> None:
    t = r["totals"]
    est = "" if t["huge_source"] == "lpage_info" else " (estimate)"
    mappable = ", ".join(f"{n} pages {_pct(share)}" for n, share in t["huge_share"].items())
    render.line(f"guest memory {human_bytes(t['guest_bytes'])} in {plural(t['slots'], 'slot')}; "
          + (f"mappable with {mappable}{est}" if mappable else "base pages only"))
    render.line(f"metadata {human_bytes(t['metadata_bytes'])} ({t['metadata_bytes']} B), "
          f"VmallocUsed {human_bytes(t['vmalloc_bytes'])}; dirty bitmaps now "
          f"{human_bytes(t['dirty_bitmap_bytes'])}, with logging on every slot "
          f"{human_bytes(t['dirty_bitmap_if_logging_bytes'])} (VmallocUsed "
          f"{human_bytes(t['dirty_bitmap_if_logging_vmalloc_bytes'])})")
    spaces = "; ".join(
        f"address space {a['as_id']}: {a['slots']} of {plural(a['limit'], 'slot')}, headroom "
        f"{_pct(a['headroom_share'])}" for a in r["address_spaces"])
    render.line(f"limits: {spaces}; largest slot {plural(t['largest_slot_pages'], 'page')} = "
          f"{_pct(t['largest_slot_pages'] / t['max_nr_pages'])} of KVM_MEM_MAX_NR_PAGES")


def print_findings(r: dict[str, Any]) -> None:
    if not r["findings"]:
        render.line("findings: none", "green")
        return
    print("findings:")
    for f in r["findings"]:
        render.line(f"  {f['severity']}: [{f['code']}] {f['text']}",
                    "yellow" if f["severity"] == "warning" else "")


def _outcome(r: dict[str, Any]) -> str:
    o = r["outcomes"]
    return (f"{o['ok']} ok, {o['refused']} refused"
            + (f", {o['skipped']} skipped" if o["skipped"] else "")
            + f", {o['mismatches']} differ")


def print_reports(path: str, reports: list[dict[str, Any]], arrays: bool) -> None:
    """The text form: each profile's slot table, totals and findings, then (with several
    profiles) the side-by-side comparison."""
    for n, r in enumerate(reports):
        if n:
            print()
        render.heading(f"{path} under {r['profile']} ({r['arch']}): after {r['applied']} of "
                       f"{plural(r['operations'], 'operation')}: {_outcome(r)} from the trace")
        print_slots(r, arrays)
        print_totals(r)
        print_findings(r)
    if len(reports) > 1:
        print()
        print_comparison(reports)


def _mappable(r: dict[str, Any], size: str) -> str:
    share = r["totals"]["huge_share"].get(size)
    if share is None:
        return "-"
    return _pct(share) + ("" if r["totals"]["huge_source"] == "lpage_info" else " (est.)")


def print_comparison(reports: list[dict[str, Any]]) -> None:
    """Metrics as rows, one column per profile; then metadata per slot side by side."""
    sizes = list(dict.fromkeys(n for r in reports for n in r["totals"]["huge_share"]))
    def row(label: str, fn: Any) -> list[str]:
        return [label] + [fn(r) for r in reports]

    rows = [
        row("requests", _outcome),
        row("slots", lambda r: str(r["totals"]["slots"])),
        row("guest memory", lambda r: human_bytes(r["totals"]["guest_bytes"])),
        row("metadata", lambda r: human_bytes(r["totals"]["metadata_bytes"])),
        row("VmallocUsed", lambda r: human_bytes(r["totals"]["vmalloc_bytes"])),
        *(row(f"{n}-mappable", lambda r, n=n: _mappable(r, n)) for n in sizes),
        row("dirty bitmaps, all logging",
            lambda r: human_bytes(r["totals"]["dirty_bitmap_if_logging_bytes"])),
        row("slot headroom", lambda r: ", ".join(
            f"{a['headroom']}" for a in r["address_spaces"])),
        row("warnings", lambda r: str(sum(1 for f in r["findings"]
                                          if f["severity"] == "warning"))),
    ]
    render.print_table(rows, ["side by side"] + [r["profile"] for r in reports],
                       title="profiles side by side")
    keys: list[tuple[int, int]] = []
    per: list[dict[tuple[int, int], dict[str, Any]]] = []
    for r in reports:
        m = {(s["as_id"], s["id"]): s for s in r["slots"]}
        per.append(m)
        keys += [k for k in m if k not in keys]
    keys.sort()
    rows = []
    for k in keys:
        first = next(m[k] for m in per if k in m)
        rows.append([f"{k[0]}:{k[1]}", f"{first['guest_phys_addr']:#x}",
                     human_bytes(first["memory_size"])]
                    + [human_bytes(m[k]["metadata_bytes"]) if k in m else "-" for m in per])
    print()
    render.print_table(rows, ["slot", "gpa", "size"] + [r["profile"] for r in reports],
                       title="metadata per slot", right=set(range(2, 3 + len(reports))))


COMMAND = Command(
    "report",
    "large-page eligibility (and the misalignment that prevents it), metadata memory, dirty "
    "bitmaps and limits of a trace's layout, under one or several profiles",
    configure,
    run,
)

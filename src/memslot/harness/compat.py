"""Which kernels accept a trace: replay it on every versioned profile, stop at the first
request a profile refuses, and name the rule and the release where that rule changes.

A request is refused when the model answers an errno other than the one the trace recorded
(0 when it recorded none). ``changes_in`` is the release between this profile's kernel and
the nearest kernel of the same kind that gets past the request (newer preferred): the
documented release of the rule's change (:data:`memslot.versions.RULE_CHANGES`) when it
lies there, else that kernel's version; ``None`` when no kernel of the kind gets past it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.model import ModelVM
from ..constants import KVM_MEM_READONLY, flag_names
from ..engine.change import Rule
from ..errors import errno_name
from ..profile import PRESETS, VERSIONED_PRESETS, Profile
from ..trace.records import SetRegion, TraceOp
from ..versions import CHANGES, RULE_CHANGES, at_least, version_tuple
from .replay import Replayer


@dataclass(frozen=True)
class Refusal:
    """The first request a profile refuses."""

    index: int  # 0-based position in the trace
    line: int
    errno: int
    rule: str  # the rule's code
    reason: str  # what about this request the rule refused


@dataclass(frozen=True)
class Outcome:
    profile: Profile
    refusal: Refusal | None
    changes_in: str | None = None

    @property
    def accepted(self) -> bool:
        return self.refusal is None

    def kind(self) -> str:
        return kind_of(self.profile)

    def summary(self) -> str:
        """``slot 600 >= 509 user slots before 5.12`` (empty when accepted)."""
        r = self.refusal
        if r is None:
            return ""
        text = r.reason
        if r.rule == "region2-missing" and self.changes_in is not None:
            return f"REGION2 needs {self.changes_in}"
        if self.changes_in is not None:
            newer = version_tuple(self.changes_in) > version_tuple(self.profile.kernel)
            text += f" {'before' if newer else 'since'} {self.changes_in}"
        return text

    def as_dict(self) -> dict[str, Any]:
        r = self.refusal
        return {
            "profile": self.profile.name,
            "arch": self.profile.arch,
            "kernel": self.profile.kernel,
            "accepted": r is None,
            "first_refusal": None if r is None else {
                "line": r.line,
                "errno": errno_name(r.errno),
                "rule": f"{r.rule}: {r.reason}",
                "changes_in": self.changes_in,
            },
        }


def kind_of(profile: Profile) -> str:
    """``x86_64-shadow@5.10`` -> ``x86_64-shadow``; a custom build is a kind of its own
    (``x86_64-shadow/custom``): another build's versions say nothing of its config."""
    kind = profile.name.split("@", 1)[0]
    return kind if profile.build == "debian" else f"{kind}/{profile.build}"


def compat_profiles() -> list[Profile]:
    """The versioned presets plus the kinds that have no versions (ppc64-pr, s390x)."""
    kinds = {kind_of(p) for p in VERSIONED_PRESETS.values()}
    extra = [p for name, p in PRESETS.items() if "@" not in name and name not in kinds]
    return [*VERSIONED_PRESETS.values(), *extra]


def first_refusal(profile: Profile, ops: Sequence[TraceOp]) -> Refusal | None:
    """Replay ``ops`` on a fresh model VM of ``profile``; the first refused request."""
    with ModelVM(profile) as vm:
        replayer = Replayer(vm)
        for i, op in enumerate(ops):
            step = replayer.step(op)
            if step.errno is None:
                continue  # nothing the model can judge
            expect = op.expect or 0
            if step.errno == expect or step.errno == 0:
                continue
            if step.result is not None and step.result.rule is not None:
                rule: Rule | None = step.result.rule
                code = step.result.rule.code
            else:
                rule = None
                code = _rule_code(step.message)
            return Refusal(i, op.line or i + 1, step.errno, code,
                           _reason(profile, op, code, rule, step.message))
    return None


def check(ops: Sequence[TraceOp], profiles: Iterable[Profile] | None = None) -> list[Outcome]:
    """Every profile's first refusal of ``ops`` and the release where its rule changes."""
    chosen = list(compat_profiles() if profiles is None else profiles)
    refusals = {p.name: first_refusal(p, ops) for p in chosen}
    # Siblings of each kind, for changes_in (also those not chosen, replayed on demand).
    siblings: dict[str, list[Profile]] = {}
    for p in VERSIONED_PRESETS.values():
        siblings.setdefault(kind_of(p), []).append(p)
    cache: dict[str, Refusal | None] = dict(refusals)
    out = []
    for p in chosen:
        r = refusals[p.name]
        changes = None
        if r is not None:
            changes = _changes_in(p, r, siblings.get(kind_of(p), []), ops, cache)
        out.append(Outcome(p, r, changes))
    return out


def _changes_in(
    p: Profile, r: Refusal, kin: list[Profile], ops: Sequence[TraceOp],
    cache: dict[str, Refusal | None],
) -> str | None:
    def passes(q: Profile) -> bool:
        if q.name not in cache:
            cache[q.name] = first_refusal(q, ops)
        other = cache[q.name]
        return other is None or other.index > r.index

    here = version_tuple(p.kernel)
    newer = sorted((q for q in kin if version_tuple(q.kernel) > here),
                   key=lambda q: version_tuple(q.kernel))
    older = sorted((q for q in kin if version_tuple(q.kernel) < here),
                   key=lambda q: version_tuple(q.kernel), reverse=True)
    documented = CHANGES.get(RULE_CHANGES.get(r.rule, ""))
    for q in newer:
        if passes(q):
            if documented and at_least(documented.since, p.kernel) and \
                    at_least(q.kernel, documented.since) and documented.since != p.kernel:
                return documented.since
            return q.kernel
    for q in older:
        if passes(q):
            if documented and at_least(p.kernel, documented.since) and \
                    not at_least(q.kernel, documented.since):
                return documented.since
            return _next_version(q, kin)
    return None


def _next_version(q: Profile, kin: list[Profile]) -> str:
    """The first version of the kind after ``q`` (where the refusal starts)."""
    later = sorted((version_tuple(k.kernel), k.kernel) for k in kin
                   if version_tuple(k.kernel) > version_tuple(q.kernel))
    return later[0][1] if later else q.kernel


def _rule_code(message: str) -> str:
    """The code of the rule whose text a KvmError carried (non-memslot operations)."""
    from ..engine import change

    for value in vars(change).values():
        if isinstance(value, Rule) and message.startswith(str(value)):
            return value.code
    return "refused"


def _reason(profile: Profile, op: TraceOp, code: str, rule: Rule | None,
            message: str) -> str:
    """The refusal in words a VMM developer reads, with the numbers of this request."""
    if isinstance(op, SetRegion):
        r = op.region
        p = profile
        page = p.page_size
        if code == "user-slot-id":
            return f"slot {r.id} >= {p.user_mem_slots} user slots"
        if code == "region2-missing":
            return "KVM_SET_USER_MEMORY_REGION2 is unknown to this kernel"
        if code == "flags" and r.flags & KVM_MEM_READONLY and not p.readonly_mem:
            return "no read-only memory (KVM_MEM_READONLY) on this arch"
        if code == "flags":
            return f"flags {flag_names(r.flags)} not valid on this kernel / VM type"
        if code == "x86-max-gfn":
            last = (r.guest_phys_addr + r.memory_size) // page - 1
            limit = "2^52" if not p.tdp else f"2^{p.phys_bits}"
            return f"last gfn {last:#x} above the max gfn (gpa limit {limit})"
        if code in ("arm64-ipa", "riscv-gpa"):
            return (f"slot ends at {r.guest_phys_addr + r.memory_size:#x}, past the "
                    f"{p.ipa_bits}-bit guest physical space")
        if code == "access-ok":
            ua_limit = p.user_addr_limit or 0
            return f"userspace_addr + size above the user address limit {ua_limit:#x}"
        if code in ("size-align", "gpa-align", "uaddr-align"):
            return f"{rule.text if rule else code} ({page // 1024} KiB pages)"
        if code == "as-id":
            return f"address space {r.as_id} >= {p.nr_address_spaces}"
    if rule is not None:
        return f"{rule.function}: {rule.text}"
    return message or code


__all__ = ["Outcome", "Refusal", "check", "compat_profiles", "first_refusal", "kind_of"]

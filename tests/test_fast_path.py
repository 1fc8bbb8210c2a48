"""The engine's fast path (``Memslots._passes_fast_checks``) may only accept requests that the
ordered checks of ``Memslots._validate`` accept too, on every preset; and it must actually
take the common request, or it is no fast path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memslot import PRESETS, Profile
from memslot.arch import make_arch
from memslot.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
)
from memslot.engine.ledger import Ledger
from memslot.engine.memslots import Memslots
from memslot.request import MemoryRegion

U64 = (1 << 64) - 1


def engine(profile: Profile) -> Memslots:
    ledger = Ledger(profile.page_size)
    return Memslots(profile, make_arch(profile, ledger, frozenset()), ledger)


ENGINES = {name: engine(p) for name, p in PRESETS.items()}


def _near(points: list[int]) -> st.SearchStrategy[int]:
    """Mostly page-aligned values at and around interesting boundaries (so requests get deep
    into the checks), sometimes anything in 64 bits."""
    deltas = st.sampled_from([0, 0, 0x1000, -0x1000, 0x10000, -0x10000, 1, -1])
    around = st.builds(lambda p, d: (p + d) & U64, st.sampled_from(points), deltas)
    aligned = st.integers(0, 1 << 48).map(lambda x: x << 16)
    return st.one_of(around, around, aligned, st.integers(0, U64))


_ADDRESSES = _near([0, 1 << 16, 1 << 21, 1 << 30, 1 << 47, 0x7FFFFFFFF000, 1 << 48, 1 << 52,
                    1 << 56, 1 << 63, (1 << 64) - (1 << 16), (1 << 64) - (1 << 40)])
_SIZES = _near([0, 1 << 16, 1 << 20, (2**31 - 1) << 12, (2**31 - 1) << 16, 2**31 << 12,
                2**31 << 16, 1 << 40, 1 << 47, 1 << 56, 1 << 63])
_IDS = st.one_of(st.integers(0, 3), st.sampled_from(
    [KVM_MEM_SLOTS_NUM - 1 - k for k in range(4)] + [KVM_MEM_SLOTS_NUM, 0xFFFF]))
_FLAGS = st.one_of(
    st.sampled_from([0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD,
                     KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY, 1 << 3, 1 << 16, 1 << 31]),
    st.integers(0, 0xFFFFFFFF),
)


@st.composite
def requests(draw: st.DrawFn) -> MemoryRegion:
    as_id = draw(st.sampled_from([0, 0, 0, 1, 2, 0xFFFF]))
    size = draw(_SIZES)
    gpa, uaddr = draw(_ADDRESSES), draw(_ADDRESSES)
    # Sometimes place the end of a range right at a limit, where the sums matter.
    edge = st.sampled_from([0, 0x1000, 0x10000, -0x1000, -0x10000])
    if draw(st.integers(0, 3)) == 0:
        gpa = (U64 + 1 - size + draw(edge)) & U64
    if draw(st.integers(0, 3)) == 0:
        limit = draw(st.sampled_from([0x7FFFFFFFF000, 1 << 47, 1 << 48, 1 << 56, U64 + 1]))
        uaddr = (limit - size + draw(edge)) & U64
    return MemoryRegion(
        slot=(as_id << 16) | draw(_IDS),
        flags=draw(_FLAGS),
        guest_phys_addr=gpa,
        memory_size=size,
        userspace_addr=uaddr,
        guest_memfd_offset=draw(_ADDRESSES),
        guest_memfd=draw(st.sampled_from([None, None, 3])),
    )


@settings(max_examples=2000, deadline=None)
@given(name=st.sampled_from(sorted(PRESETS)), r=requests(), internal=st.booleans())
def test_fast_path_accepts_only_what_validate_accepts(
    name: str, r: MemoryRegion, internal: bool
) -> None:
    m = ENGINES[name]
    if m._passes_fast_checks(r, internal):
        assert m._validate(r, internal) is None, (name, r.describe(), internal)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_fast_path_takes_the_common_request(name: str) -> None:
    m = ENGINES[name]
    page = PRESETS[name].page_size
    for flags in (0, KVM_MEM_LOG_DIRTY_PAGES):
        r = MemoryRegion(1, flags, 1 << 32, 256 * page, 1 << 40)
        assert m._validate(r, False) is None
        assert m._passes_fast_checks(r, False), (name, r.describe())

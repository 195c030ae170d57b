"""MappingTracker (tracer/model/mappings.py) against a page-by-page model: any sequence
of mmap (accessible or PROT_NONE, MAP_FIXED or not), munmap, mremap, mprotect and brk
leaves the same live bytes per owner, PROT_NONE address space counted only for the
allocator's own ranges."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.model.mappings import PAGE, MappingTracker, Owner

OWNERS = [Owner((i,), "mmap", False) for i in range(3)] + [Owner((7,), "mmap", True)]
HEAP = Owner((9,), "brk", False)

pages = st.integers(0, 40)
ops = st.lists(st.one_of(
    st.tuples(st.just("mmap"), pages, st.integers(1, 8 * PAGE), st.sampled_from(OWNERS),
              st.booleans(), st.booleans()),
    st.tuples(st.just("munmap"), pages, st.integers(1, 8 * PAGE)),
    st.tuples(st.just("mremap"), pages, st.integers(1, 4), pages, st.integers(1, 6)),
    st.tuples(st.just("mprotect"), pages, st.integers(1, 8 * PAGE), st.booleans()),
    st.tuples(st.just("brk"), st.integers(100, 120)),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_live_bytes_per_owner_match_a_page_model(sequence: list[tuple]) -> None:
    tracker = MappingTracker()
    model: dict[int, tuple[Owner, bool]] = {}  # page -> (owner, accessible)
    brk: int | None = None
    made: dict[Owner, tuple[int, int]] = {}  # owner -> (mappings made, bytes)

    def count(owner: Owner, pages: int) -> None:
        calls, size = made.get(owner, (0, 0))
        made[owner] = (calls + 1, size + pages * PAGE)

    for op, *args in sequence:
        if op == "mmap":
            page, length, owner, accessible, fixed = args
            tracker.mmap(page * PAGE, length, owner, accessible, fixed)
            n = -(-length // PAGE)
            if accessible or (owner.allocator_internal and not fixed):  # not a decommit
                count(owner, n)
            for p in range(page, page + n):
                kept = model.get(p) if fixed and not accessible else None  # a decommit
                model[p] = (kept[0] if kept else owner, accessible)
        elif op == "munmap":
            page, length = args
            tracker.munmap(page * PAGE, length)
            for p in range(page, page - (-length // PAGE)):
                model.pop(p, None)
        elif op == "mremap":
            old, old_n, new, new_n = args
            tracker.mremap(old * PAGE, old_n * PAGE, new * PAGE, new_n * PAGE)
            moved = [model[p] for p in range(old, old + old_n) if p in model]
            if moved:
                for p in range(old, old + old_n):
                    model.pop(p, None)
                model.update({p: moved[0] for p in range(new, new + new_n)})
        elif op == "mprotect":
            page, length, accessible = args
            tracker.mprotect(page * PAGE, length, accessible)
            for p in range(page, page - (-length // PAGE)):
                if p in model:
                    model[p] = (model[p][0], accessible)
        else:
            page, = args
            tracker.brk(page * PAGE, HEAP)
            if brk is not None and page > brk:
                count(HEAP, page - brk)
                model.update({p: (HEAP, True) for p in range(brk, page)})
            elif brk is not None:
                for p in range(page, brk):
                    model.pop(p, None)
            brk = page
        starts = [start for start, _, _ in tracker.ranges()]
        assert starts == sorted(starts)
        ends = [end for _, end, _ in tracker.ranges()]
        assert all(e <= s for e, s in zip(ends, starts[1:]))  # never overlapping
        assert all(s < e for s, e in zip(starts, ends))  # never empty
    want: dict[Owner, int] = {}
    reserved = 0
    for owner, accessible in model.values():
        if accessible or owner.allocator_internal:
            want[owner] = want.get(owner, 0) + PAGE
        else:
            reserved += PAGE
    totals = list(tracker.totals())
    assert {o: size for o, size, *_ in totals if size} == want
    assert {o: (calls, size) for o, _, _, calls, size in totals if calls} == made
    assert set(want) <= {o for o, *_ in totals}
    assert tracker.reserved()[0] == reserved


def test_a_reservation_committed_and_decommitted_piece_by_piece() -> None:
    """V8's pattern: reserve 64 pages, commit 32 with 4 mprotects, decommit 8 by a
    MAP_FIXED PROT_NONE mmap (another stack) and 4 by mprotect: 20 pages in 3 ranges,
    all the reservation's; 44 reserved in 3."""
    v8, decommit = OWNERS[0], OWNERS[1]
    tracker = MappingTracker()
    tracker.mmap(0, 64 * PAGE, v8, accessible=False)
    assert list(tracker.totals()) == [] and tracker.reserved() == (64 * PAGE, 1)
    for i in range(4):
        tracker.mprotect(8 * i * PAGE, 8 * PAGE, True)
    assert list(tracker.totals()) == [(v8, 32 * PAGE, 1, 0, 0)]
    tracker.mmap(8 * PAGE, 8 * PAGE, decommit, accessible=False, fixed=True)
    tracker.mprotect(24 * PAGE, 4 * PAGE, False)
    assert list(tracker.totals()) == [(v8, 20 * PAGE, 3, 0, 0)]
    assert tracker.reserved() == (44 * PAGE, 3)
    tracker.mprotect(8 * PAGE, 8 * PAGE, True)  # committed again: still the reservation's
    assert list(tracker.totals()) == [(v8, 28 * PAGE, 2, 0, 0)]

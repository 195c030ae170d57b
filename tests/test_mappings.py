"""MappingTracker (tracer/model/mappings.py) against a page-by-page model: any sequence
of mmap, munmap, mremap and brk leaves the same live bytes per owner."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.model.mappings import PAGE, MappingTracker, Owner

OWNERS = [Owner((i,), "mmap", False) for i in range(3)]
HEAP = Owner((9,), "brk", False)

pages = st.integers(0, 40)
ops = st.lists(st.one_of(
    st.tuples(st.just("mmap"), pages, st.integers(1, 8 * PAGE), st.sampled_from(OWNERS)),
    st.tuples(st.just("munmap"), pages, st.integers(1, 8 * PAGE)),
    st.tuples(st.just("mremap"), pages, st.integers(1, 4), pages, st.integers(1, 6)),
    st.tuples(st.just("brk"), st.integers(100, 120)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_live_bytes_per_owner_match_a_page_model(sequence: list[tuple]) -> None:
    tracker = MappingTracker()
    model: dict[int, Owner] = {}  # page -> owner
    brk: int | None = None
    for op, *args in sequence:
        if op == "mmap":
            page, length, owner = args
            tracker.mmap(page * PAGE, length, owner)
            n = -(-length // PAGE)
            model.update({p: owner for p in range(page, page + n)})
        elif op == "munmap":
            page, length = args
            tracker.munmap(page * PAGE, length)
            for p in range(page, page - (-length // PAGE)):
                model.pop(p, None)
        elif op == "mremap":
            old, old_n, new, new_n = args
            tracker.mremap(old * PAGE, old_n * PAGE, new * PAGE, new_n * PAGE)
            owners = [model[p] for p in range(old, old + old_n) if p in model]
            if owners:
                for p in range(old, old + old_n):
                    model.pop(p, None)
                first = next(model_owner for model_owner in owners)
                model.update({p: first for p in range(new, new + new_n)})
        else:
            page, = args
            tracker.brk(page * PAGE, HEAP)
            if brk is not None and page > brk:
                model.update({p: HEAP for p in range(brk, page)})
            elif brk is not None:
                for p in range(page, brk):
                    model.pop(p, None)
            brk = page
        starts = [start for start, _, _ in tracker.ranges()]
        assert starts == sorted(starts)
        ends = [end for _, end, _ in tracker.ranges()]
        assert all(e <= s for e, s in zip(ends, starts[1:]))  # never overlapping
    want: dict[Owner, int] = {}
    for owner in model.values():
        want[owner] = want.get(owner, 0) + PAGE
    assert {o: size for o, size, _ in tracker.totals()} == want

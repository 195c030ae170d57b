"""PerfMap: tolerant, incremental reading of /tmp/perf-PID.map."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.symbols.perfmap import PerfMap, parse_line, perf_map_path


def test_lookup_and_garbage(tmp_path: Path) -> None:
    p = tmp_path / "perf-1.map"
    p.write_text("3ef414f0d8a0 5c LazyCompile:~foo /app/a.js:1:10\n"
                 "not a line\n"
                 "zz 10 bad hex\n"
                 "3ef414f0e000 0 zero size\n"
                 "0x3ef414f0f000 20 Builtin:ArrayPush\n"
                 "3ef414f10000 40\n")
    pm = PerfMap(str(p))
    assert len(pm) == 2
    assert pm.lookup(0x3EF414F0D8A0) == ("LazyCompile:~foo /app/a.js:1:10", 0)
    assert pm.lookup(0x3EF414F0D8A0 + 0x5B) == ("LazyCompile:~foo /app/a.js:1:10", 0x5B)
    assert pm.lookup(0x3EF414F0D8A0 + 0x5C) is None
    assert pm.lookup(0x3EF414F0F010) == ("Builtin:ArrayPush", 0x10)
    assert pm.lookup(0) is None


def test_incremental_partial_lines_and_replacement(tmp_path: Path) -> None:
    p = tmp_path / "perf-2.map"
    p.write_text("1000 100 first\n2000 10 sec")
    pm = PerfMap(str(p))
    assert pm.lookup(0x2000) is None  # unfinished line waits
    with open(p, "a") as f:
        f.write("ond\n1000 80 replaced\n")
    assert pm.refresh() is True
    assert pm.lookup(0x2005) == ("second", 5)
    assert pm.lookup(0x1010) == ("replaced", 0x10)  # the later line wins
    assert pm.lookup(0x1090) is None
    assert pm.refresh() is False
    p.write_text("5000 10 new\n")  # rewritten (shrank): start over
    assert pm.refresh() is True
    assert pm.lookup(0x5001) == ("new", 1) and pm.lookup(0x2005) is None
    os.unlink(p)
    assert pm.refresh() is False and pm.lookup(0x5001) == ("new", 1)


def test_missing_file_and_path(tmp_path: Path) -> None:
    pm = PerfMap(str(tmp_path / "none.map"))
    assert len(pm) == 0 and pm.lookup(0x1000) is None
    assert perf_map_path(os.getpid()) == f"/tmp/perf-{os.getpid()}.map"
    assert perf_map_path(2**22 + 12345) == f"/tmp/perf-{2**22 + 12345}.map"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=2000),
                      st.lists(st.tuples(st.integers(-5, 2**66), st.integers(-5, 2**20),
                                         st.text(max_size=30)), max_size=30)
                      .map(lambda xs: "".join(f"{a:x} {b:x} {n}\n" for a, b, n in xs)
                           .encode("utf-8", "surrogatepass"))),
       addrs=st.lists(st.integers(0, 2**64), max_size=10))
def test_fuzz_never_raises(tmp_path: Path, data: bytes, addrs: list[int]) -> None:
    p = tmp_path / "perf-fuzz.map"
    p.write_bytes(data[: len(data) // 2])
    pm = PerfMap(str(p))
    p.write_bytes(data)
    pm.refresh()
    for a in addrs:
        pm.lookup(a)
    for line in data.decode("utf-8", "replace").splitlines():
        parse_line(line)

"""Where free's entry probe goes (tracer/probes/placement.py), and the disk cache of
that analysis by build-id: trusted only when nobody else could have written it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tracer.probes import placement
from tracer.probes.allocators import EntryPoint, find_entry_points

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


@pytest.fixture(scope="module")
def free() -> EntryPoint:
    return next(ep for ep in find_entry_points([LIBC], None) if ep.symbol == "free")


def _analysed(free: EntryPoint) -> int:
    with open(free.path, "rb") as fh:
        fh.seek(free.file_offset)
        return placement.entry_offset(fh.read(free.size), ignores_null_first_arg=True)


def _offset(free: EntryPoint, cache: Path) -> int:
    return placement.probe_offset(free.path, free.file_offset, free.size,
                                  cache_dir=str(cache))


def _no_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(code: bytes, ignores_null_first_arg: bool) -> int:
        raise AssertionError("analysed again instead of read from the cache")
    monkeypatch.setattr(placement, "entry_offset", fail)


def test_frees_probe_sits_past_its_null_test(free: EntryPoint) -> None:
    """glibc's free starts `test %rdi,%rdi; je`: the probe goes on the emulated je."""
    with open(free.path, "rb") as fh:
        fh.seek(free.file_offset)
        assert fh.read(3) == b"\x48\x85\xff"  # test %rdi,%rdi: 3 bytes
    assert _analysed(free) == 3


def test_the_analysis_is_cached_by_build_id(free: EntryPoint, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert _offset(free, tmp_path) == _analysed(free)
    [entry] = list(tmp_path.iterdir())
    assert entry.stat().st_mode & 0o777 == 0o600 and entry.suffix == ".json"
    _no_analysis(monkeypatch)
    assert _offset(free, tmp_path) == 3


def test_an_entry_others_can_write_is_analysed_afresh(free: EntryPoint, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _offset(free, tmp_path)
    [entry] = list(tmp_path.iterdir())
    entry.write_text(entry.read_text().replace('": 3}', '": 5}'))
    os.chmod(entry, 0o666)
    assert _offset(free, tmp_path) == 3  # the planted 5 is not used
    assert entry.stat().st_mode & 0o777 == 0o600 and '": 3}' in entry.read_text()
    _no_analysis(monkeypatch)
    assert _offset(free, tmp_path) == 3


@pytest.mark.parametrize("text", ['{"v": 1, "offsets": {', '[1, 2]',
                                  '{"v": 1, "offsets": {"%s": 99999}}'])
def test_a_torn_or_impossible_entry_is_analysed_afresh(free: EntryPoint, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       text: str) -> None:
    _offset(free, tmp_path)
    [entry] = list(tmp_path.iterdir())
    entry.write_text(text.replace("%s", f"{free.file_offset:x}:{free.size:x}"))
    assert _offset(free, tmp_path) == 3
    _no_analysis(monkeypatch)
    assert _offset(free, tmp_path) == 3

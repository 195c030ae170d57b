"""The sweep for frames outside executable code (tests/framecheck.py) finds planted
data frames in every kind of output, and fails the test that wrote them."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import framecheck
import pytest
from elftools.elf.elffile import ELFFile

from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot
from tracer.recording import RecordingWriter

pytest_plugins = ["pytester"]

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
TESTS = Path(__file__).parent


def _libc_offsets() -> tuple[int, int]:
    """An address in libc's code, and one in its data (a PT_LOAD without PF_X), as
    frames give them (link-time addresses)."""
    with open(LIBC, "rb") as fh:
        loads = [s for s in ELFFile(fh).iter_segments() if s["p_type"] == "PT_LOAD"]
    code = next(s for s in loads if s["p_flags"] & 1)
    data = next(s for s in loads if not s["p_flags"] & 1 and s["p_vaddr"] > code["p_vaddr"])
    return code["p_vaddr"] + 0x100, data["p_vaddr"] + 0x100


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A directory outside pytest's temporary one, which the suite's own sweep checks
    after this test: what is planted here must not fail the planting test."""
    with tempfile.TemporaryDirectory(prefix="natrace-framecheck-") as tmp:
        yield Path(tmp)


def frame(module: str, offset: int = 0x10, address: int = 0x7F0000001010) -> dict[str, object]:
    return {"address": address, "module": module, "module_offset": offset}


def test_frames_in_code_pass_and_frames_in_data_do_not() -> None:
    code, data = _libc_offsets()
    assert framecheck.frame_problem(frame(LIBC, code)) is None
    assert framecheck.frame_problem(frame("[vdso]")) is None
    assert framecheck.frame_problem(frame("[jit]")) is None
    assert framecheck.frame_problem(frame("/gone/with/its/test.so")) is None
    assert "outside its executable segments" in str(framecheck.frame_problem(frame(LIBC, data)))
    for module in ("[heap]", "[stack]", "[anon]"):
        assert "is no code" in str(framecheck.frame_problem(frame(module)))
    assert "outside every mapping" in str(framecheck.frame_problem(frame("", 0,
                                                                         0x7878787878787878)))


def test_every_output_kind_is_swept(elsewhere: Path) -> None:
    code, data = _libc_offsets()
    sweep = framecheck.Sweep(elsewhere)
    good = {"sites": [{"stack": [frame(LIBC, code)]}]}
    (elsewhere / "good.json").write_text(json.dumps(good))
    (elsewhere / "good.folded").write_text("main;leak_here 4096\n")
    assert sweep.check() == []
    assert sweep.check() == []  # each file once
    bad = {"sites": [{"stack": [frame(LIBC, code), frame("[heap]", 0x2715A0)]}],
           "locks": {"locks": [{"waiters": [{"stack": [frame(LIBC, data)]}]}]}}
    (elsewhere / "report.json").write_text(json.dumps(bad))
    (elsewhere / "flame.folded").write_text("[unknown 0x7878787878787878];leak 10\n")
    (elsewhere / "report.txt").write_text("  <- [stack]+0x1edd0 [[stack]]\n")
    (elsewhere / "flame.svg").write_text("<title>[heap]+0x10 (10 bytes)</title>")
    rec = elsewhere / "r.natrace"
    with RecordingWriter(str(rec), {"pid": 1, "command": "x"}) as writer:
        writer.add(Snapshot(1, "x", 0.0, 1.0, sites=[Site("malloc", [
            Frame(0x7878787878787878)], 10, 1)]))
    framecheck.seen("natrace snapshot", {"sites": [{"stack": [frame("[anon]")]}]})
    found = "\n".join(sweep.check())
    for planted in (f"{elsewhere}/report.json: [heap]+0x2715a0: [heap] is no code",
                    f"{elsewhere}/report.json: {LIBC}+{data:#x}: offset",
                    f"{elsewhere}/flame.folded: [unknown 0x7878787878787878]: a frame in data",
                    f"{elsewhere}/report.txt: [stack]+0x1edd0", f"{elsewhere}/flame.svg: [heap]",
                    f"{rec}: [unknown]+0x0: address 0x7878787878787878 is outside",
                    "natrace snapshot (stdout): [anon]+0x10: [anon] is no code"):
        assert planted in found, found
    assert "good" not in found


def test_a_test_that_writes_a_data_frame_errors_at_teardown(
        pytester: pytest.Pytester, elsewhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makepyfile(test_planted="""
        import json

        def test_clean(tmp_path):
            (tmp_path / "r.json").write_text(json.dumps({"stack": [
                {"address": 1, "module": "[vdso]", "module_offset": 0}]}))

        def test_planted(tmp_path):
            (tmp_path / "r.json").write_text(json.dumps({"stack": [
                {"address": 1, "module": "[heap]", "module_offset": 0x2715a0}]}))
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--basetemp",
                                           str(elsewhere / "inner"))
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*frames outside executable code*",
                                 "*r.json: [[]heap]+0x2715a0: [[]heap] is no code*"])

"""Stacks through code without frame pointers: CFI rows (tracer/symbols/cfi.py) checked
against readelf, and the BPF walk (bpf/stacks.bpf.h) on fixtures built -O2 without frame
pointers (tests/fixtures/src/nofp), launched and attached, exact bytes and every frame."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from allocfixtures import build_nofp
from test_alloc_tracing import malloc_sites, run_json, site
from tracing import snapshot_json, waiting

from tracer.probes.unwinding import _ROW as unwind_row
from tracer.probes.unwinding import _clip
from tracer.symbols import cfi

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"

# function -> (bytes, blocks) and the frames from it up to main (chain.c's ground truth)
TRUTH = {
    "level5": ((10_000, 10), ["level5", "level4", "level3", "level2", "level1", "main"]),
    "lib_nofp_leak": ((900, 3), ["lib_nofp_leak", "call_lib", "main"]),
    "fp_callback": ((400, 2), ["fp_callback", "lib_fp_call", "call_fp_lib", "main"]),
}


def _readelf_rows(path: str) -> list[tuple[int, tuple[int, ...]]]:
    """(address, expected rule) for every row readelf -wF prints of the file's FDEs."""
    out = subprocess.run(["readelf", "-wF", path], capture_output=True, text=True,
                         check=False).stdout  # exits 1 over libc's unrelated DWARF notes
    rows: list[tuple[int, tuple[int, ...]]] = []
    cols: list[str] | None = None
    in_fde = False
    for line in out.splitlines():
        if " FDE " in line:
            in_fde, cols = True, None
        elif " CIE " in line:
            in_fde, cols = False, None
        elif line.strip().startswith("LOC"):
            cols = line.split()
        elif in_fde and cols and re.match(r"^[0-9a-f]{16} ", line):
            fields = dict(zip(cols, line.split(), strict=False))
            rows.append((int(fields["LOC"], 16), _expected(fields)))
    return rows


def _expected(fields: dict[str, str]) -> tuple[int, ...]:
    m = re.match(r"(rsp|rbp)\+(\d+)$", fields["CFA"])
    if fields.get("ra", "u") == "u":
        return (cfi.CFA_END,)
    if not m or fields["ra"] != "c-8":
        return (cfi.CFA_UNSUPPORTED,)
    rule = cfi.CFA_RSP if m.group(1) == "rsp" else cfi.CFA_RBP
    rbp = fields.get("rbp", "u")
    if rbp.startswith("c"):
        return (rule, int(m.group(2)), cfi.RBP_SAVED, int(rbp[1:]))
    if rbp == "u":
        return (rule, int(m.group(2)), cfi.RBP_SAME, 0)
    return (rule, int(m.group(2)), cfi.RBP_LOST, 0)


def _rule(row: cfi.Row | None, width: int) -> tuple[int, ...] | None:
    if row is None:
        return None
    return (row.cfa, row.cfa_off, row.rbp, row.rbp_off)[:width]


@pytest.mark.parametrize("which", ["chain", "libnofp", "libc"])
def test_rows_match_readelf(which: str) -> None:
    """Every row readelf decodes is the row in force at its address (registers other than
    rbp and the return address left aside); libc has a few 'register' rules readelf
    prints in two words, compared as rbp 'lost'."""
    fx = build_nofp()
    path = {"chain": str(fx.chain), "libnofp": str(fx.libnofp), "libc": LIBC}[which]
    table = cfi.parse_file(path)
    expected = _readelf_rows(path)
    assert expected and len(table) > 0
    wrong = [(hex(pc), rule, _rule(table.find(pc), len(rule))) for pc, rule in expected
             if _rule(table.find(pc), len(rule)) != rule]
    assert len(wrong) <= (8 if which == "libc" else 0), wrong[:10]


def test_frame_pointer_verdict() -> None:
    """Only a cost question (CFI rows are right for code with frame pointers too): node's
    ~370k rows stay out of the table, libc's and -O2 code's go in."""
    assert cfi.parse_file("/usr/bin/node").frame_pointers
    assert not cfi.parse_file(str(build_nofp().chain)).frame_pointers
    assert not cfi.parse_file(LIBC).frame_pointers


def test_rows_are_cached_by_build_id(tmp_path: Path) -> None:
    path = str(build_nofp().chain)
    first = cfi.unwind_table(path, cache_dir=str(tmp_path))
    assert list(tmp_path.glob("*.ncfi"))
    again = cfi.unwind_table(path, cache_dir=str(tmp_path))
    assert again == first and len(first) > 0


def test_a_cache_entry_others_can_write_is_parsed_afresh(tmp_path: Path) -> None:
    path = str(build_nofp().chain)
    first = cfi.unwind_table(path, cache_dir=str(tmp_path))
    [entry] = list(tmp_path.glob("*.ncfi"))
    entry.write_bytes(entry.read_bytes()[:-cfi.ROW.size] + cfi.ROW.pack(0, 0, 0, 0, 0))
    entry.chmod(0o666)
    assert cfi.unwind_table(path, cache_dir=str(tmp_path)) == first  # not the planted row
    entry.chmod(0o644)
    assert cfi.unwind_table(path, cache_dir=str(tmp_path)) == first  # rewritten, trusted


def test_gaps_between_functions_have_no_rows() -> None:
    table = cfi.parse_file(str(build_nofp().chain))
    assert any(r.cfa == cfi.CFA_NONE for r in table.iter_rows())
    assert table.find(0) is None


def test_the_loaders_entry_point_is_the_outermost_frame() -> None:
    """ld.so's _start has no FDE; every start-up stack (and its libraries'
    constructors', from _dl_start_user) ends there: the outermost frame, not an early
    end for want of unwind rows."""
    from elftools.elf.elffile import ELFFile

    path = str(Path("/lib64/ld-linux-x86-64.so.2").resolve())
    with open(path, "rb") as fh:
        entry = ELFFile(fh).header["e_entry"]
    table = cfi.parse_file(path)
    assert [table.find(entry + k).cfa for k in (0, 8, 0x30)] == [cfi.CFA_END] * 3


def test_rows_are_moved_and_clipped_to_a_mapping() -> None:
    """A mapping's rows in runtime addresses: the row in force at its start moved to
    it, rows at or past its end dropped, a "no information" row before the first."""
    rows = b"".join(cfi.ROW.pack(pc, off, -16, cfi.CFA_RSP, cfi.RBP_SAVED)
                    for pc, off in [(0x1000, 8), (0x1010, 16), (0x1020, 24), (0x1100, 8)])
    table = cfi.UnwindTable(rows, 2, 0, ".eh_frame")
    bias = 0x7F0000000000
    got = list(unwind_row.iter_unpack(_clip(table, bias, bias + 0x1018, bias + 0x1100)))
    assert got == [(bias + 0x1018, 16, -16, cfi.CFA_RSP, cfi.RBP_SAVED),
                   (bias + 0x1020, 24, -16, cfi.CFA_RSP, cfi.RBP_SAVED)]
    got = list(unwind_row.iter_unpack(_clip(table, bias, bias + 0x800, bias + 0x1010)))
    assert got == [(bias + 0x800, 0, 0, cfi.CFA_NONE, 0),
                   (bias + 0x1000, 8, -16, cfi.CFA_RSP, cfi.RBP_SAVED)]


def test_garbage_is_no_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"\x7fELF" + b"\xff" * 200)
    assert len(cfi.parse_file(str(bad))) == 0


def _symbols(s: dict[str, Any]) -> list[str | None]:
    return [f["symbol"] for f in s["stack"]]


def assert_true_stacks(report: dict[str, Any]) -> None:
    sites = malloc_sites(report)
    for function, (figures, frames) in TRUTH.items():
        assert sites.get(function) == figures, (function, sites)
        symbols = _symbols(site(report, function))
        assert symbols[:len(frames)] == frames, symbols
    qsorted = _symbols(site(report, "cmp_leak"))
    assert site(report, "cmp_leak")["bytes"] == 77
    assert qsorted[0] == "cmp_leak" and "qsort_r" in qsorted, qsorted
    assert qsorted[qsorted.index("qsort_r") + 1:][:2] == ["sort_numbers", "main"], qsorted
    assert not any(report["loss"].values()), report["loss"]


@pytest.mark.bpf
def test_launched_stacks_are_true_without_frame_pointers(tmp_path: Path) -> None:
    report, code = run_json(tmp_path, "--", str(build_nofp().chain))
    assert code == 0
    assert_true_stacks(report)
    # up to the thread's first frame, through libc's start code
    assert _symbols(site(report, "level5"))[-1] == "_start"


@pytest.mark.bpf
def test_attached_stacks_are_true_without_frame_pointers() -> None:
    with waiting(str(build_nofp().chain), "--wait") as target:
        assert_true_stacks(snapshot_json(target))


@pytest.mark.bpf
def test_the_stack_cache_tells_chains_with_the_same_registers_apart(tmp_path: Path) -> None:
    """twochains.c reaches one malloc through chains that leave the same pc and sp (the
    stack-id cache's key): the cache answers most captures, yet each chain keeps its own
    stack and exact figures, because a changed word above is seen (stale, walked)."""
    report, code = run_json(tmp_path, "--charge-to", "module:twochains", "--",
                            str(build_nofp().twochains))
    assert code == 0
    above = {"near_a": [], "near_b": [], "far_a": ["step"], "far_b": ["step"]}
    assert malloc_sites(report) == {function: (20_000, 200) for function in above}
    for function, between in above.items():
        frames = ["alloc_here", *between, function, "burst", "main"]
        assert _symbols(site(report, function))[:len(frames)] == frames
    unwinding = report["unwinding"]
    assert unwinding["cached"] > 0 and unwinding["cache_stale"] > 0, unwinding
    assert not any(report["loss"].values()), report["loss"]


@pytest.mark.bpf
def test_frame_pointer_mode_misses_the_callers(tmp_path: Path) -> None:
    """What --unwind fp (the kernel's walk, as bcc's memleak does) sees of the same chain:
    the frames of functions without a frame pointer are skipped."""
    report, code = run_json(tmp_path, "--unwind", "fp", "--", str(build_nofp().chain))
    assert code == 0
    assert malloc_sites(report)["level5"] == (10_000, 10)
    assert _symbols(site(report, "level5"))[:6] != TRUTH["level5"][1]


@pytest.mark.bpf
def test_standard_library_leaks_are_charged_to_their_caller(tmp_path: Path) -> None:
    """Through libstdc++ (no frame pointers): the bytes go to the program's function,
    the library function it called stays visible as `via`."""
    report, code = run_json(tmp_path, "--", str(build_nofp().containers))
    assert code == 0
    sites = malloc_sites(report)
    assert sites["cache_insert"] == (20 * 72 + 20 * 41, 40)
    assert sites["grow_log"] == (1_921, 1)
    grow = site(report, "grow_log")
    # grow_log called std::string::append, inlined from the header into grow_log (its
    # own frame, classed libstdc++), which called libstdc++'s _M_append
    assert grow["via"].endswith("::append(char const*)"), grow["via"]
    symbols = _symbols(grow)
    at = symbols.index("grow_log")
    assert symbols[at + 1] == "main" and grow["stack"][at - 1]["inlined"], symbols
    assert "_M_append" in (symbols[at - 2] or ""), symbols
    modules = {m["module"]: m["bytes"] for m in report["modules"]}
    assert modules["containers"] >= 2_260 + 1_921


@pytest.mark.bpf
def test_python_ctypes_libpq_is_unwound_to_the_interpreter(tmp_path: Path) -> None:
    """libpq (frame pointers) <- libffi <- _ctypes <- python3.11's interpreter (neither
    keeps frame pointers) <- main <- _start: every frame in order."""
    script = Path(__file__).parent / "fixtures" / "src" / "nofp" / "pq_ctypes.py"
    report, code = run_json(tmp_path, "--no-handles", "--", "/usr/bin/python3.11", str(script))
    assert code == 0
    connects = [s for s in report["sites"] if s["module_class"] == "libpq"
                and s["via"] == "PQconnectdb"]
    assert connects
    symbols = _symbols(max(connects, key=lambda s: s["bytes"]))
    order = ["PQconnectdb", "ffi_call", "_PyEval_EvalFrameDefault", "Py_RunMain", "_start"]
    at = [symbols.index(name) for name in order]
    assert at == sorted(at), symbols
    unwinding = report["unwinding"]
    assert unwinding["objects"]["/usr/bin/python3.11"] == "cfi"
    # libpq keeps frame pointers: walked by them, its ~2,400 rows stay out of the table
    assert [how for path, how in unwinding["objects"].items() if "/libpq.so" in path] == ["fp"]
    assert unwinding["ended"]["outermost"] > 0

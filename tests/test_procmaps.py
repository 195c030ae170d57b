"""MapsHistory: parsing, history across unmaps, and safe paths into a process's root."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.symbols.procmaps import MapsHistory, parse_line, resolve_in_root

LINES = [
    "55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1311 /usr/bin/prog\n",
    "55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 1311 /usr/bin/prog\n",
    "55d0c1a00000-55d0c1a21000 rw-p 00000000 00:00 0 [heap]\n",
    "7f0000000000-7f0000001000 r-xp 00001000 08:01 77 /opt/lib/libfoo.so.1 (deleted)\n",
    "7f0000100000-7f0000101000 r-xp 00000000 00:01 1024 /memfd:jit-code (deleted)\n",
    "7f0000200000-7f0000201000 rwxp 00000000 00:00 0 \n",
    "7f0000300000-7f0000301000 rw-p 00000000 00:00 0\n",
    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n",
    "7ffd10000000-7ffd10002000 r-xp 00000000 00:00 0 [vdso]\n",
    "7f0000400000-7f0000401000 r-xp 00000000 08:01 99 /path with spaces/lib x.so\n",
]


def test_parse_fields_and_flags() -> None:
    h = MapsHistory.from_lines(LINES)
    prog = h.find(0x55D0C0A01234)
    assert prog is not None
    assert (prog.path, prog.offset, prog.perms, prog.inode) == ("/usr/bin/prog", 0x1000, "r-xp",
                                                                1311)
    assert prog.file_offset(0x55D0C0A01234) == 0x1234
    assert prog.file_backed and prog.executable and not prog.anon

    foo = h.find(0x7F0000000010)
    assert foo is not None and foo.deleted and foo.clean_path == "/opt/lib/libfoo.so.1"

    memfd = h.find(0x7F0000100010)
    assert memfd is not None and memfd.memfd and memfd.file_backed and not memfd.anon

    jit = h.find(0x7F0000200010)
    assert jit is not None and jit.anon and jit.executable and jit.path == ""

    vdso = h.find(0x7FFD10000100)
    assert vdso is not None and vdso.vdso and vdso.special and not vdso.file_backed

    heap = h.find(0x55D0C1A00010)
    assert heap is not None and heap.special and heap.path == "[heap]"

    spaced = h.find(0x7F0000400000)
    assert spaced is not None and spaced.path == "/path with spaces/lib x.so"

    assert h.find(0x1000) is None


def test_odd_lines_are_skipped() -> None:
    junk = ["", "\n", "garbage", "zz-yy r-xp 0 0 0 /x", "10-5 r-xp 00000000 00:00 0 /back",
            "1000-2000 r-xp nothex 00:00 0 /x", "1000-2000 rwxpq 00000000 00:00 0 /x",
            "1000-2000 r-xp 00000000 00:00 notint /x", "\x00\xff-\n"]
    h = MapsHistory.from_lines(junk + LINES[:2])
    assert len(h.mappings) == 2
    for line in junk:
        assert parse_line(line) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=120)))
def test_parse_never_raises(lines: list[str]) -> None:
    h = MapsHistory.from_lines(lines)
    h.find(0x1000)


def test_history_keeps_unmapped_and_prefers_newest() -> None:
    old = "7f0000000000-7f0000002000 r-xp 00000000 08:01 10 /lib/old.so\n"
    new = "7f0000000000-7f0000001000 r-xp 00000000 08:01 11 /lib/new.so\n"
    anon = "7f0000800000-7f0000900000 rw-p 00000000 00:00 0\n"
    h = MapsHistory.from_lines([old, anon])
    assert h.update([new]) is True
    assert h.update([new]) is False
    # Newest first where both cover the address; the old one still answers elsewhere.
    m = h.find(0x7F0000000100)
    assert m is not None and m.path == "/lib/new.so"
    m = h.find(0x7F0000001100)
    assert m is not None and m.path == "/lib/old.so"
    # Plain anonymous read-write memory is not kept once it is gone.
    assert h.find(0x7F0000800010) is None
    assert [x.path for x in h.mappings_of("/lib/old.so")] == ["/lib/old.so"]


def test_live_maps_and_module_path() -> None:
    # read once it runs its own code: every mapping of its start-up is made by then
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ok', flush=True); "
                             "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        h = MapsHistory(proc.pid)
        exe = os.path.realpath(sys.executable)
        mine = [m for m in h.mappings if m.clean_path == exe]
        assert mine, "python's own mapping is missing"
        p = h.module_path(mine[0])
        assert p is not None and p.startswith(f"/proc/{proc.pid}/")
        with open(p, "rb") as f:
            assert f.read(4) == b"\x7fELF"
        assert h.refresh() is False  # nothing new appeared
    finally:
        proc.kill()
        proc.wait()
    assert h.refresh() is False  # process gone: history stays, no error
    assert h.find(mine[0].start) == mine[0]
    # After exit the same-root fallback still reaches the (unchanged) file.
    assert h.module_path(mine[0]) == exe


def test_resolve_in_root_never_leaves_root(tmp_path: object) -> None:
    root = str(tmp_path)
    os.makedirs(f"{root}/usr/lib")
    with open(f"{root}/usr/lib/libreal.so.1", "w") as f:
        f.write("x")
    os.symlink("libreal.so.1", f"{root}/usr/lib/libreal.so")
    os.symlink("/usr/lib", f"{root}/lib64")
    os.symlink("/etc/passwd", f"{root}/usr/lib/escape")  # absolute: stays in root
    os.symlink("../../../../../../etc/hostname", f"{root}/usr/lib/dotdot")
    os.symlink("loop", f"{root}/loop")

    assert resolve_in_root(root, "/usr/lib/libreal.so") == f"{root}/usr/lib/libreal.so.1"
    assert resolve_in_root(root, "/lib64/libreal.so") == f"{root}/usr/lib/libreal.so.1"
    assert resolve_in_root(root, "/usr/lib/escape") is None
    assert resolve_in_root(root, "/usr/lib/dotdot") is None
    assert resolve_in_root(root, "/loop") is None
    os.makedirs(f"{root}/etc")
    with open(f"{root}/etc/passwd", "w") as f:
        f.write("inside")
    assert resolve_in_root(root, "/usr/lib/escape") == f"{root}/etc/passwd"


def test_deleted_file_reached_through_map_files(tmp_path: object) -> None:
    lib = os.path.join(str(tmp_path), "libgone.so")
    with open("/bin/true", "rb") as src, open(lib, "wb") as dst:
        dst.write(src.read())
    code = ("import mmap,os,sys,time\n"
            f"f=open({lib!r},'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ|mmap.PROT_EXEC)\n"
            "print('ok',flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        os.unlink(lib)
        h = MapsHistory(proc.pid)
        gone = [m for m in h.mappings if m.clean_path == lib]
        assert gone and gone[0].deleted
        p = h.module_path(gone[0])
        if os.access(f"/proc/{proc.pid}/map_files", os.R_OK):
            assert p is not None and "/map_files/" in p
            with open(p, "rb") as f:
                assert f.read(4) == b"\x7fELF"
    finally:
        proc.kill()
        proc.wait()
    assert h.module_path(gone[0]) is None  # deleted and the process is gone

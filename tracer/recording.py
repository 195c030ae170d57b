"""Recordings: a traced session as one self-contained SQLite file (`natrace record`).

A recording holds a series of Snapshots with every stack already symbolized, so it
opens on a machine that never saw the traced process. It is a plain SQLite database
(stdlib sqlite3) that users may query; docs/recording.md has example queries.

Schema, version 6 (`meta.schema_version`; a reader refuses a newer version and reads
versions 1 to 5, which lack the columns marked v2 to v6):

  meta(key TEXT PRIMARY KEY, value TEXT)
      format='natrace-recording', schema_version, natrace_version, created_at (epoch s),
      hostname, kernel, pid, command, interval (s), options (JSON of SessionOptions).
  modules(id INTEGER PRIMARY KEY, path TEXT UNIQUE, class TEXT, build_id TEXT NULL)
      every mapped file a frame points into ('' = no known mapping), its attribution
      class (libpq, addon:NAME, node, js, libc, ...) and GNU build id (hex) when read.
  frames(id INTEGER PRIMARY KEY, module_id, address, module_offset, symbol NULL,
         symbol_offset, file NULL, line NULL, inlined (v4), class NULL (v4))
      each distinct symbolized frame, stored once. address and module_offset are
      unsigned 64-bit values stored as SQLite's signed INTEGER (two's complement: add
      2**64 to a negative value). inlined 1: a function inlined into the next frame of
      the stack (same address), expanded from DWARF; class: the frame's attribution
      class where it is not its module's (libstdc++ code inlined into the program),
      NULL otherwise.
  stacks(id INTEGER PRIMARY KEY, depth)
  stack_frames(stack_id, position, frame_id, PRIMARY KEY(stack_id, position))
      position 0 is the innermost frame (the allocator's caller); each distinct stack
      is stored once however many sites and snapshots use it.
  snapshots(id INTEGER PRIMARY KEY, taken_at (epoch s), duration (s traced), pid,
            command, sample_bytes (0 = exact), min_age, target_exited, exit_code NULL,
            total_bytes, total_blocks, peak_bytes NULL (v2))
      one row per interval; ids grow with time. peak_bytes: the most bytes traced
      malloc blocks held at the session's once-a-second samples (a lower bound of the
      true peak; NULL: not known).
  sites(snapshot_id, seq, kind ('malloc'|'mmap'|'brk'|'stack'), stack_id NULL,
        charge_index, bytes, blocks, allocs, alloc_bytes, allocator_internal,
        lost_stack NULL, via NULL, per_minute NULL, suspect, temp_allocs, temp_bytes,
        first_at NULL, last_at NULL (the last four v2), samples, alloc_samples (v3),
        library_index NULL (v5), pid (v6),
        PRIMARY KEY(snapshot_id, seq))
      every call site that allocated while traced or holds memory, at that snapshot:
      bytes/blocks outstanding (unfreed; 0 for a site whose blocks were all freed),
      allocs and alloc_bytes made while traced (freed or not), the temporary ones among
      them (temp_*: freed by the allocating thread before its next allocation),
      seconds into the trace of its first and latest allocation;
      stack_id is NULL when the stack was not captured (lost_stack
      says why); via names the API of the charged module its caller called (PQexec);
      library_index is the position of the system library's frame that allocated for
      the charged frame (libpq under vault_keep_results; NULL: the charged function's
      own allocation), whose module the bytes count to;
      per_minute is the bytes' growth over the last minute traced (NULL: not known),
      suspect 1 when that growth is steady enough to call the site a leak suspect.
      samples/alloc_samples: in a sampled session, the samples behind bytes/blocks and
      behind allocs/alloc_bytes (what the sampling error is computed from; 0: exact, or
      a v1/v2 file, whose reports then show no intervals).
      pid: the traced process the site is of (a process tree has several; 0 in a file
      before v6: the snapshot's own process).
      total_* in snapshots leave allocator_internal sites out, as reports do.
  counters(snapshot_id, grp ('loss'|'calls'), name, value, PRIMARY KEY(...))
      lost and untracked counts, probe call counts.
  sections(snapshot_id, name, data, PRIMARY KEY(snapshot_id, name))
      every other Snapshot field that is set (lock, syscall, fault and memory
      statistics), as JSON of its dataclasses (tracer.model.codec), under its field name.

Each snapshot is one transaction (rollback journal, synchronous=FULL), so a recording
whose natrace was killed keeps every snapshot committed before; a hot journal left by
the kill is rolled back on a private copy, never in the input file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tracer import __version__, files
from tracer.errors import FileFormatError, UsageError
from tracer.model import codec
from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot

FORMAT = "natrace-recording"
SCHEMA_VERSION = 6

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE modules(id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, class TEXT NOT NULL,
                     build_id TEXT);
CREATE TABLE frames(id INTEGER PRIMARY KEY, module_id INTEGER NOT NULL REFERENCES modules,
                    address INTEGER NOT NULL, module_offset INTEGER NOT NULL, symbol TEXT,
                    symbol_offset INTEGER NOT NULL, file TEXT, line INTEGER,
                    inlined INTEGER NOT NULL, class TEXT);
CREATE TABLE stacks(id INTEGER PRIMARY KEY, depth INTEGER NOT NULL);
CREATE TABLE stack_frames(stack_id INTEGER NOT NULL REFERENCES stacks,
                          position INTEGER NOT NULL,
                          frame_id INTEGER NOT NULL REFERENCES frames,
                          PRIMARY KEY(stack_id, position)) WITHOUT ROWID;
CREATE TABLE snapshots(id INTEGER PRIMARY KEY, taken_at REAL NOT NULL, duration REAL NOT NULL,
                       pid INTEGER NOT NULL, command TEXT NOT NULL,
                       sample_bytes INTEGER NOT NULL, min_age REAL NOT NULL,
                       target_exited INTEGER NOT NULL, exit_code INTEGER,
                       total_bytes INTEGER NOT NULL, total_blocks INTEGER NOT NULL,
                       peak_bytes INTEGER);
CREATE TABLE sites(snapshot_id INTEGER NOT NULL REFERENCES snapshots, seq INTEGER NOT NULL,
                   kind TEXT NOT NULL, stack_id INTEGER REFERENCES stacks,
                   charge_index INTEGER NOT NULL, bytes INTEGER NOT NULL,
                   blocks INTEGER NOT NULL, allocs INTEGER NOT NULL,
                   alloc_bytes INTEGER NOT NULL, allocator_internal INTEGER NOT NULL,
                   lost_stack TEXT, via TEXT, per_minute REAL, suspect INTEGER NOT NULL,
                   temp_allocs INTEGER NOT NULL, temp_bytes INTEGER NOT NULL,
                   first_at REAL, last_at REAL,
                   samples INTEGER NOT NULL, alloc_samples INTEGER NOT NULL,
                   library_index INTEGER, pid INTEGER NOT NULL,
                   PRIMARY KEY(snapshot_id, seq)) WITHOUT ROWID;
CREATE TABLE counters(snapshot_id INTEGER NOT NULL REFERENCES snapshots, grp TEXT NOT NULL,
                      name TEXT NOT NULL, value INTEGER NOT NULL,
                      PRIMARY KEY(snapshot_id, grp, name)) WITHOUT ROWID;
CREATE TABLE sections(snapshot_id INTEGER NOT NULL REFERENCES snapshots, name TEXT NOT NULL,
                      data TEXT NOT NULL, PRIMARY KEY(snapshot_id, name)) WITHOUT ROWID;
"""

# Snapshot fields stored in their own tables; every other field goes to `sections`.
_CORE_FIELDS = frozenset({"pid", "command", "taken_at", "duration", "sample_bytes", "min_age",
                          "sites", "loss", "calls", "target_exited", "exit_code",
                          "peak_bytes"})
_SQLITE_MAGIC = b"SQLite format 3\0"


class RecordingWriter:
    """Appends snapshots to a new recording, one committed transaction each.

    `build_id(path)` names a module's GNU build id (None when unknown); it is asked once
    per module.
    """

    def __init__(self, path: str, meta: dict[str, Any],
                 build_id: Callable[[str], str | None] = lambda _path: None,
                 option: str = "-o") -> None:
        self.path = path
        self._build_id = build_id
        self._modules: dict[str, int] = {}
        self._classes: dict[int, str] = {}  # module id -> its class
        self._frames: dict[Frame, int] = {}
        self._stacks: dict[tuple[int, ...], int] = {}
        self._db = sqlite3.connect(_create(path, meta, option), isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")

    def add(self, snap: Snapshot) -> int:
        """Store one snapshot (committed before returning); returns its id."""
        db = self._db
        db.execute("BEGIN")
        try:
            cur = db.execute(
                "INSERT INTO snapshots(taken_at, duration, pid, command, sample_bytes, min_age,"
                " target_exited, exit_code, total_bytes, total_blocks, peak_bytes)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (snap.taken_at, snap.duration, snap.pid, snap.command, snap.sample_bytes,
                 snap.min_age, int(snap.target_exited), snap.exit_code, snap.total_bytes(),
                 snap.total_blocks(), snap.peak_bytes))
            sid = cur.lastrowid
            assert sid is not None
            db.executemany(
                "INSERT INTO sites VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(sid, seq, s.kind, self._stack(s.frames) if s.frames else None,
                  s.charge_index, s.bytes, s.blocks, s.allocs, s.alloc_bytes,
                  int(s.allocator_internal), s.lost_stack, s.via, s.per_minute,
                  int(s.suspect), s.temp_allocs, s.temp_bytes, s.first_at, s.last_at,
                  s.samples, s.alloc_samples, s.library_index, s.pid)
                 for seq, s in enumerate(snap.sites)])
            db.executemany("INSERT INTO counters VALUES (?,?,?,?)",
                           [(sid, grp, name, int(value))
                            for grp, values in (("loss", snap.loss), ("calls", snap.calls))
                            for name, value in values.items()])
            db.executemany("INSERT INTO sections VALUES (?,?,?)",
                           [(sid, name, json.dumps(codec.encode(value)))
                            for name, value in _sections(snap)])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return sid

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stack(self, frames: list[Frame]) -> int:
        for f in frames:  # a module's class is its own code's, not that inlined into it
            if not f.inlined:
                self._module(f.module, f.module_class)
        ids = tuple(self._frame(f) for f in frames)
        sid = self._stacks.get(ids)
        if sid is None:
            cur = self._db.execute("INSERT INTO stacks(depth) VALUES (?)", (len(ids),))
            sid = self._stacks[ids] = int(cur.lastrowid or 0)
            self._db.executemany("INSERT INTO stack_frames VALUES (?,?,?)",
                                 [(sid, pos, fid) for pos, fid in enumerate(ids)])
        return sid

    def _frame(self, f: Frame) -> int:
        fid = self._frames.get(f)
        if fid is None:
            mid = self._module(f.module, f.module_class)
            cls = f.module_class if f.module_class != self._classes[mid] else None
            cur = self._db.execute(
                "INSERT INTO frames(module_id, address, module_offset, symbol, symbol_offset,"
                " file, line, inlined, class) VALUES (?,?,?,?,?,?,?,?,?)",
                (mid, _signed64(f.address), _signed64(f.module_offset), f.symbol,
                 f.symbol_offset, f.file, f.line, int(f.inlined), cls))
            fid = self._frames[f] = int(cur.lastrowid or 0)
        return fid

    def _module(self, path: str, cls: str) -> int:
        mid = self._modules.get(path)
        if mid is None:
            build_id = self._build_id(path) if path and not path.startswith("[") else None
            cur = self._db.execute("INSERT INTO modules(path, class, build_id) VALUES (?,?,?)",
                                   (path, cls, build_id))
            mid = self._modules[path] = int(cur.lastrowid or 0)
            self._classes[mid] = cls
        return mid


def _sections(snap: Snapshot) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(snap):
        if f.name not in _CORE_FIELDS:
            value = getattr(snap, f.name)
            if value is not None:
                yield f.name, value


def _create(path: str, meta: dict[str, Any], option: str) -> str:
    """Schema and meta in a temporary file, renamed over `path` once complete (mode 0600);
    the file really written (symlinks followed). SQLite needs a regular file: a device,
    FIFO or descriptor is refused (tracer/files.py checks it before tracing)."""
    out = files.check_output(path, option, regular_only=True)

    def fill(_fd: int, tmp: str) -> None:
        db = sqlite3.connect(tmp)
        with contextlib.closing(db):
            db.executescript(_SCHEMA)
            rows = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                    "natrace_version": __version__, "created_at": time.time(),
                    "hostname": platform.node(), "kernel": platform.release(), **meta}
            db.executemany("INSERT INTO meta VALUES (?,?)",
                           [(k, v if isinstance(v, str) else json.dumps(v))
                            for k, v in rows.items()])
            db.commit()

    try:
        files.replace_atomically(out.real, fill)
    except (OSError, sqlite3.Error) as err:
        raise out.fail(f"cannot write: {getattr(err, 'strerror', None) or err}") from None
    return out.real


@dataclass(frozen=True)
class SnapshotInfo:
    id: int
    taken_at: float
    duration: float


class Recording:
    """A recording opened for reading; every malformed input raises FileFormatError."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tmpdir: str | None = None
        self.version = 0  # the file's schema version, read by _validate
        _check_file(path)
        db_path = self._private_copy_if_hot(path)
        with self._guard():
            self._db = sqlite3.connect(f"file:{_uri_path(db_path)}?mode=ro", uri=True)
            self._validate()
            self.meta: dict[str, str] = dict(self._db.execute("SELECT key, value FROM meta"))
            self.snapshots = [SnapshotInfo(_int(i), _num(t), _num(d)) for i, t, d in
                              self._db.execute("SELECT id, taken_at, duration FROM snapshots"
                                               " ORDER BY id")]
            self.build_ids: dict[str, str] = {
                _str(p): _str(b) for p, b in
                self._db.execute("SELECT path, build_id FROM modules WHERE build_id IS NOT NULL")}
        self._frames: dict[int, Frame] = {}

    def close(self) -> None:
        self._db.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def at(self, seconds: float | None = None) -> SnapshotInfo:
        """The snapshot taken nearest to `seconds` of tracing (the earlier on a tie;
        None: the last). Past the last snapshot by more than the spacing between
        snapshots, no snapshot is near: a UsageError saying what the file covers."""
        if not self.snapshots:
            raise FileFormatError(f"{self.path}: the recording holds no snapshot")
        if seconds is None:
            return self.snapshots[-1]
        first, last = self.snapshots[0], self.snapshots[-1]
        if seconds > last.duration + self._spacing():
            raise UsageError(f"{self.path}: no snapshot near {seconds:g} s: its "
                             f"{len(self.snapshots)} snapshots were taken from "
                             f"{first.duration:.1f} s to {last.duration:.1f} s of tracing")
        return min(self.snapshots, key=lambda s: (abs(s.duration - seconds), s.id))

    def describe(self, info: SnapshotInfo, asked: float | None = None) -> str:
        """Which snapshot a report shows: "snapshot 3 of 5, taken 4.0 s into the trace
        (the nearest to 4 s)"."""
        index = next(i for i, s in enumerate(self.snapshots, 1) if s.id == info.id)
        text = (f"snapshot {index} of {len(self.snapshots)}, taken {info.duration:.1f} s "
                "into the trace")
        return text + (f" (the nearest to {asked:g} s)" if asked is not None else "")

    def _spacing(self) -> float:
        """Seconds between snapshots: the recording's interval, else their mean gap."""
        try:
            interval = float(json.loads(self.meta.get("interval", "null")) or 0)
        except (ValueError, TypeError):
            interval = 0.0
        spans = self.snapshots[-1].duration - self.snapshots[0].duration
        gap = spans / (len(self.snapshots) - 1) if len(self.snapshots) > 1 else 0.0
        return max(interval, gap, 1.0)

    def snapshot(self, seconds: float | None = None) -> Snapshot:
        """The Snapshot recorded nearest to `seconds` of tracing (see `at`)."""
        info = self.at(seconds)
        with self._guard():
            return self._load(info.id)

    def chosen(self, seconds: float | None) -> tuple[Snapshot, str | None]:
        """The snapshot nearest to `seconds` and, when a time was asked, which one it is
        (`describe`), for the report to say."""
        snap = self.snapshot(seconds)
        return snap, None if seconds is None else self.describe(self.at(seconds), seconds)

    # -- reading ----------------------------------------------------------------------

    def _load(self, sid: int) -> Snapshot:
        db = self._db
        v2 = self.version >= 2
        row = db.execute("SELECT taken_at, duration, pid, command, sample_bytes, min_age,"
                         " target_exited, exit_code, " + ("peak_bytes" if v2 else "NULL") +
                         " FROM snapshots WHERE id=?", (sid,)).fetchone()
        taken_at, duration, pid, command, sample_bytes, min_age, exited, exit_code, peak = row
        stacks = self._stacks(sid)
        sites = []
        later = ("temp_allocs, temp_bytes, first_at, last_at" if v2 else "0, 0, NULL, NULL") \
            + (", samples, alloc_samples" if self.version >= 3 else ", 0, 0") \
            + (", library_index" if self.version >= 5 else ", NULL") \
            + (", pid" if self.version >= 6 else ", 0")
        for (kind, stack_id, charge, nbytes, blocks, allocs, alloc_bytes, internal,
             lost, via, per_minute, suspect, temp_allocs, temp_bytes, first_at,
             last_at, samples, alloc_samples, library, site_pid) in db.execute(
                "SELECT kind, stack_id, charge_index, bytes, blocks, allocs, alloc_bytes,"
                " allocator_internal, lost_stack, via, per_minute, suspect, " + later +
                " FROM sites WHERE snapshot_id=? ORDER BY seq", (sid,)):
            frames = stacks[stack_id] if stack_id is not None else []
            sites.append(Site(_str(kind), list(frames), _int(nbytes), _int(blocks), _int(allocs),
                              _int(alloc_bytes), _int(charge), bool(_int(internal)),
                              _opt(_str, lost), via=_opt(_str, via),
                              per_minute=_opt(_num, per_minute),
                              suspect=bool(_int(suspect)), temp_allocs=_int(temp_allocs),
                              temp_bytes=_int(temp_bytes), first_at=_opt(_num, first_at),
                              last_at=_opt(_num, last_at), samples=_int(samples),
                              alloc_samples=_int(alloc_samples),
                              library_index=_opt(_int, library), pid=_int(site_pid)))
        counters: dict[str, dict[str, int]] = {"loss": {}, "calls": {}}
        for grp, name, value in db.execute("SELECT grp, name, value FROM counters"
                                           " WHERE snapshot_id=?", (sid,)):
            counters.setdefault(_str(grp), {})[_str(name)] = _int(value)
        extra: dict[str, Any] = {}
        hints = codec.field_hints(Snapshot)
        known = {f.name for f in dataclasses.fields(Snapshot) if f.init}
        for name, data in db.execute("SELECT name, data FROM sections WHERE snapshot_id=?",
                                     (sid,)):
            if name in known and name not in _CORE_FIELDS:  # newer sections: SQL only
                extra[name] = codec.decode(hints[name], json.loads(_str(data)))
        return Snapshot(pid=_int(pid), command=_str(command), taken_at=_num(taken_at),
                        duration=_num(duration), sample_bytes=_int(sample_bytes),
                        min_age=_num(min_age), sites=sites, loss=counters["loss"],
                        calls=counters["calls"], target_exited=bool(_int(exited)),
                        exit_code=_opt(_int, exit_code), peak_bytes=_opt(_int, peak), **extra)

    def _stacks(self, sid: int) -> dict[int, list[Frame]]:
        stacks: dict[int, list[Frame]] = {}
        rows = self._db.execute(
            "SELECT sf.stack_id, sf.position, f.id, f.address, f.module_offset, f.symbol,"
            " f.symbol_offset, f.file, f.line, m.path, m.class, " +
            ("f.inlined, f.class" if self.version >= 4 else "0, NULL") +
            " FROM stack_frames sf JOIN frames f ON f.id = sf.frame_id"
            " JOIN modules m ON m.id = f.module_id"
            " WHERE sf.stack_id IN (SELECT stack_id FROM sites WHERE snapshot_id=?)"
            " ORDER BY sf.stack_id, sf.position", (sid,))
        for (stack_id, _pos, fid, addr, off, sym, sym_off, file, line, path, cls, inl,
             own) in rows:
            frame = self._frames.get(fid)
            if frame is None:
                frame = self._frames[fid] = Frame(
                    _int(addr) % 2**64, _str(path), _int(off) % 2**64, _opt(_str, sym),
                    _int(sym_off),
                    _opt(_str, file), _opt(_int, line), _str(own if own is not None else cls),
                    bool(_int(inl)))
            stacks.setdefault(stack_id, []).append(frame)
        return stacks

    def _validate(self) -> None:
        check = self._db.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise FileFormatError(f"{self.path}: corrupted recording ({check and check[0]})")
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:
            raise FileFormatError(f"{self.path}: not a natrace recording") from None
        if meta.get("format") != FORMAT:
            raise FileFormatError(f"{self.path}: not a natrace recording")
        version = self.version = _int(int(meta.get("schema_version", "")))
        if version > SCHEMA_VERSION:
            raise FileFormatError(
                f"{self.path}: written by a newer natrace ({meta.get('natrace_version')}, "
                f"recording schema {version}); this natrace {__version__} reads up to "
                f"schema {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Whatever a damaged file makes sqlite or the decoding raise: one-line error."""
        try:
            yield
        except FileFormatError:
            raise
        except (sqlite3.Error, ValueError, TypeError, KeyError, IndexError, OverflowError,
                UnicodeError, RecursionError, MemoryError) as err:
            raise FileFormatError(f"{self.path}: corrupted recording "
                                  f"({type(err).__name__}: {err})") from None

    def _private_copy_if_hot(self, path: str) -> str:
        """A kill mid-transaction leaves a journal: roll it back on a copy, not the input."""
        journal = path + "-journal"
        if not (os.path.exists(journal) and os.path.getsize(journal) > 0):
            return path
        self._tmpdir = tempfile.mkdtemp(prefix="natrace-")
        copy = os.path.join(self._tmpdir, "recording.db")
        try:
            shutil.copyfile(path, copy)
            shutil.copyfile(journal, copy + "-journal")
            db = sqlite3.connect(copy)
            with contextlib.closing(db):
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # rolls back
        except (OSError, sqlite3.Error) as err:
            raise FileFormatError(f"{path}: cannot roll back its journal: {err}") from None
        return copy


def _check_file(path: str) -> None:
    """Missing, empty, not SQLite, or shorter than its header says: say which."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
            size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a directory, not a recording") from None
    except OSError as err:
        raise FileFormatError(f"{path}: cannot read: {err.strerror}") from None
    if size == 0:
        raise FileFormatError(f"{path}: empty file, not a recording")
    if not header.startswith(_SQLITE_MAGIC) or len(header) < 100:
        raise FileFormatError(f"{path}: not a natrace recording")
    page_size, = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    pages, = struct.unpack(">I", header[28:32])
    change, valid_for = header[24:28], header[92:96]
    if change == valid_for and pages and size < pages * page_size:
        raise FileFormatError(f"{path}: truncated recording ({size} of "
                              f"{pages * page_size} bytes)")


def _uri_path(path: str) -> str:
    return os.path.abspath(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"expected an integer, found {v!r}")
    return v


def _signed64(v: int) -> int:
    """An unsigned 64-bit value as SQLite's signed INTEGER holds it."""
    return v - 2**64 if v >= 2**63 else v


def _num(v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"expected a number, found {v!r}")
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected text, found {v!r}")
    return v


def _opt(check: Callable[[Any], Any], v: Any) -> Any:
    return None if v is None else check(v)

"""pprof: a gzipped profile.proto (github.com/google/pprof/proto/profile.proto), for
`go tool pprof`, Pyroscope and Parca.

Encoded by hand (a protobuf dependency for five messages is not worth it). One sample
per user site (those whose blocks were all freed included) with six values:
inuse_space/bytes, inuse_objects/count, alloc_space/bytes, alloc_objects/count,
temp_space/bytes, temp_objects/count (temporary allocations: freed by the thread
before its next allocation); `--metric` picks the default sample type.
Locations are the distinct addresses of the stacks (address, mapping, function:line),
a function inlined there one more Line before its caller's, innermost first, as
profile.proto has it; mappings are the modules with their GNU build ids, so a symbol
server can re-symbolize.

Field numbers used (profile.proto):
  Profile: 1 sample_type, 2 sample, 3 mapping, 4 location, 5 function, 6 string_table,
           9 time_nanos, 10 duration_nanos, 11 period_type, 12 period,
           13 comment, 14 default_sample_type
  ValueType: 1 type, 2 unit (string table indexes)
  Sample: 1 location_id (packed, leaf first), 2 value (packed), 3 label
  Label: 1 key, 2 str
  Mapping: 1 id, 2 memory_start, 3 memory_limit, 4 file_offset, 5 filename, 6 build_id,
           7 has_functions, 8 has_filenames, 9 has_line_numbers
  Location: 1 id, 2 mapping_id, 3 address, 4 line
  Line: 1 function_id, 2 line
  Function: 1 id, 2 name, 3 system_name, 4 filename
"""

from __future__ import annotations

import gzip

from tracer.errors import UsageError
from tracer.model.frames import Frame
from tracer.model.snapshot import Snapshot
from tracer.reporters.stacks import ExportOptions, function_name, site_frames

SAMPLE_TYPES = [("inuse_space", "bytes"), ("inuse_objects", "count"),
                ("alloc_space", "bytes"), ("alloc_objects", "count"),
                ("temp_space", "bytes"), ("temp_objects", "count")]
_DEFAULT_TYPE = {"unfreed": "inuse_space", "allocated": "alloc_space",
                 "allocations": "alloc_objects", "temporary": "temp_objects"}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are ten-byte two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    """A varint field (wire type 0); zero is the default and is left out."""
    return _varint(field << 3) + _varint(n) if n else b""


def _bytes(field: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2): string, message or packed repeated."""
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _packed(field: int, values: list[int]) -> bytes:
    return _bytes(field, b"".join(_varint(v) for v in values)) if values else b""


class _Strings:
    def __init__(self) -> None:
        self.table: list[str] = [""]
        self.index: dict[str, int] = {"": 0}

    def __call__(self, s: str) -> int:
        if s not in self.index:
            self.index[s] = len(self.table)
            self.table.append(s)
        return self.index[s]


def _by_address(frames: list[Frame]) -> list[tuple[Frame, ...]]:
    """Frames grouped per address: each inlined frame with the frame it is inlined in."""
    groups: list[tuple[Frame, ...]] = []
    pending: list[Frame] = []
    for f in frames:
        pending.append(f)
        if not f.inlined:
            groups.append(tuple(pending))
            pending = []
    if pending:
        groups.append(tuple(pending))
    return groups


def render(snap: Snapshot, options: ExportOptions) -> bytes:
    if options.metric.name not in _DEFAULT_TYPE:
        raise UsageError(f"pprof exports carry allocation metrics only, not "
                         f"{options.metric.name}")
    s = _Strings()
    out = bytearray()
    for typ, unit in SAMPLE_TYPES:
        out += _bytes(1, _int(1, s(typ)) + _int(2, s(unit)))

    mappings: dict[str, int] = {}
    bounds: dict[str, list[int]] = {}
    functions: dict[tuple[str, str, str], int] = {}
    locations: dict[tuple[Frame, ...], int] = {}
    with_files: set[str] = set()
    with_lines: set[str] = set()
    body_functions = bytearray()
    body_locations = bytearray()

    def function(f: Frame) -> int:
        key = (function_name(f), f.module, f.file or "")
        fid = functions.get(key)
        if fid is None:
            fid = functions[key] = len(functions) + 1
            body_functions.extend(_bytes(5, _int(1, fid) + _int(2, s(key[0])) +
                                         _int(3, s(f.symbol or key[0])) + _int(4, s(key[2]))))
        if f.file:
            with_files.add(f.module)
        if f.line:
            with_lines.add(f.module)
        return fid

    def location(group: tuple[Frame, ...]) -> int:
        """One address: its inlined frames (innermost first), then the frame holding it."""
        if group in locations:
            return locations[group]
        f = group[-1]
        mid = mappings.setdefault(f.module, len(mappings) + 1)
        lo_hi = bounds.setdefault(f.module, [f.address - f.module_offset, f.address + 1])
        lo_hi[0] = min(lo_hi[0], f.address - f.module_offset)
        lo_hi[1] = max(lo_hi[1], f.address + 1)
        lid = locations[group] = len(locations) + 1
        lines = b"".join(_bytes(4, _int(1, function(g)) + _int(2, g.line or 0)) for g in group)
        body_locations.extend(_bytes(4, _int(1, lid) + _int(2, mid) + _int(3, f.address) +
                                     lines))
        return lid

    for site in snap.user_sites():
        values = [site.bytes, site.blocks, site.alloc_bytes, site.allocs, site.temp_bytes,
                  site.temp_allocs]
        if not any(values):
            continue
        ids = [location(g) for g in _by_address(site_frames(site))]  # leaf first
        label = _bytes(3, _int(1, s("kind")) + _int(2, s(site.kind)))
        out += _bytes(2, _packed(1, ids) + _packed(2, values) + label)

    for module, mid in mappings.items():
        start, limit = bounds[module]
        build_id = options.build_ids.get(module, "")
        out += _bytes(3, _int(1, mid) + _int(2, max(start, 0)) + _int(3, limit) +
                      _int(5, s(module)) + _int(6, s(build_id)) + _int(7, 1) +
                      _int(8, int(module in with_files)) + _int(9, int(module in with_lines)))
    out += body_locations
    out += body_functions
    period_type = _int(1, s("space")) + _int(2, s("bytes"))
    default = s(_DEFAULT_TYPE[options.metric.name])
    comment = s(f"natrace: {snap.command} (PID {snap.pid})")
    out += _int(9, int(snap.taken_at * 1e9)) + _int(10, int(snap.duration * 1e9))
    out += _bytes(11, period_type) + _int(12, snap.sample_bytes or 1)
    out += _packed(13, [comment]) + _int(14, default)
    for text in s.table:  # last: every string is interned by now
        out += _bytes(6, text.encode())
    return gzip.compress(bytes(out), mtime=0)

"""The leak figure each tool reports for one function, read from its own output.

Every parser returns (blocks, bytes) charged to `function`, summed over the
records whose stack names it; (0, 0) when the tool reported none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

Figure = tuple[int, int]


def natrace(report_json: Path, function: str) -> Figure:
    report = json.loads(report_json.read_text())
    sites = [s for s in report["sites"] if s["function"] == function and s["kind"] == "malloc"]
    return sum(s["blocks"] for s in sites), sum(s["bytes"] for s in sites)


_MEMLEAK_RECORD = re.compile(r"^\t(\d+) bytes in (\d+) allocations from stack\n((?:\t\t.*\n?)*)",
                             re.MULTILINE)


def memleak(report: str, function: str) -> Figure:
    """One periodic report of memleak-bpfcc (the text after its '[time] Top N' header)."""
    blocks = size = 0
    for m in _MEMLEAK_RECORD.finditer(report):
        if re.search(rf"\b{re.escape(function)}\+", m.group(3)):
            size += int(m.group(1))
            blocks += int(m.group(2))
    return blocks, size


_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}
_HEAPTRACK_RECORD = re.compile(r"^([\d.]+)([KMG]?) leaked over (\d+) calls from\n(\S+)",
                               re.MULTILINE)


def heaptrack(printed: str, function: str) -> Figure:
    """`heaptrack_print -l 1` output; its byte figures are rounded to 3 significant digits."""
    blocks = size = 0
    for m in _HEAPTRACK_RECORD.finditer(printed):
        if m.group(4) == function:
            size += round(float(m.group(1)) * _UNITS[m.group(2)])
            blocks += int(m.group(3))
    return blocks, size


_VALGRIND_RECORD = re.compile(
    r"==\d+== ([\d,]+) bytes in ([\d,]+) blocks are definitely lost in loss record[^\n]*\n"
    r"((?:==\d+==\s+(?:at|by) [^\n]*\n)*)")


def valgrind(log: str, function: str) -> Figure:
    """memcheck's 'definitely lost' records (--leak-check=full)."""
    blocks = size = 0
    for m in _VALGRIND_RECORD.finditer(log):
        if re.search(rf": {re.escape(function)} \(", m.group(3)):
            size += int(m.group(1).replace(",", ""))
            blocks += int(m.group(2).replace(",", ""))
    return blocks, size

"""Parsing sizes and durations given on the command line (512K, 1GiB, 30s, 2m)."""

from __future__ import annotations

import re

import click

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_size(text: str) -> int:
    """Bytes from `4096`, `512K`, `512KiB`, `1.5G`; K/M/G are powers of 1024."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 512K, 1GiB)")
    return int(float(m.group(1)) * 1024 ** _POWERS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Bytes as a person reads them: exact below 10 KiB, then KiB/MiB/GiB."""
    if abs(n) < 10 * 1024:
        return f"{int(n):,} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError("unreachable")


def parse_duration(text: str) -> float:
    """Seconds from `10`, `10s`, `500ms`, `2m`, `1h`."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 10, 10s, 500ms, 2m)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class Duration(click.ParamType):
    name = "SECONDS"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = parse_duration(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)
        if seconds <= 0:
            self.fail(f"must be more than zero, not {value!r}", param, ctx)
        return seconds

"""Leak suspects: which series of bytes keep growing, not which are large.

A site that holds 100 MB but stopped growing is a cache; 5 MB growing 1 MB/min is a
leak. Each site's unfreed bytes are kept over a sliding window and fitted with a
least-squares line; a site is a suspect when the line rises fast enough, explains the
samples well (R²), rests on enough samples, and still rises over the window's later
half (a step up long ago followed by a plateau fits a line fairly well too).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Fit:
    """A least-squares line through (seconds, bytes) samples."""

    per_minute: float  # slope, bytes per minute
    r2: float  # share of the variance the line explains; 0 for a flat or 1-point series
    samples: int
    span: float  # seconds between the first and last sample
    recent_per_minute: float  # slope over the later half of the span


def fit(series: Iterable[tuple[float, float]]) -> Fit:
    """Least-squares slope and R² of (t, value) points, and the later half's slope."""
    points = list(series)
    if len(points) < 2:
        return Fit(0.0, 0.0, len(points), 0.0, 0.0)
    per_minute, r2 = _line(points)
    middle = (points[0][0] + points[-1][0]) / 2
    recent, _ = _line([p for p in points if p[0] >= middle])
    return Fit(per_minute, r2, len(points), points[-1][0] - points[0][0], recent)


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(slope per minute, R²); zeros for fewer than two distinct times."""
    n = len(points)
    if n < 2:
        return 0.0, 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    stt = sum((t - mean_t) ** 2 for t, _ in points)
    svv = sum((v - mean_v) ** 2 for _, v in points)
    stv = sum((t - mean_t) * (v - mean_v) for t, v in points)
    if stt == 0:
        return 0.0, 0.0
    r2 = (stv * stv) / (stt * svv) if svv else 0.0
    return stv / stt * 60.0, r2


@dataclass(frozen=True)
class GrowthPolicy:
    """When sustained growth counts as a leak suspect."""

    window: float = 60.0  # seconds of history fitted
    min_samples: int = 5
    min_r2: float = 0.8
    min_per_minute: float = 64 * 1024  # bytes/min below which growth is noise

    def is_suspect(self, f: Fit) -> bool:
        return (f.samples >= self.min_samples and f.r2 >= self.min_r2
                and f.per_minute >= self.min_per_minute
                and f.recent_per_minute >= self.min_per_minute / 2)


class Series:
    """One value over time, trimmed to a window."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.points: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> None:
        self.points.append((t, value))
        while self.points and self.points[0][0] < t - self.window:
            self.points.popleft()

    def fit(self) -> Fit:
        return fit(self.points)

    def values(self) -> list[float]:
        return [v for _, v in self.points]


class GrowthTracker(Generic[K]):
    """Per-key series of bytes, fed one observation (all keys at one time) at a time.

    A key missing from an observation holds 0 bytes then (everything it held was
    freed); a key whose window holds only zeros is forgotten.
    """

    def __init__(self, policy: GrowthPolicy | None = None) -> None:
        self.policy = policy or GrowthPolicy()
        self._series: dict[K, Series] = {}
        self._fits: dict[K, Fit] = {}

    def observe(self, t: float, values: dict[K, float]) -> None:
        for key in self._series.keys() - values.keys():
            self._series[key].add(t, 0.0)
        for key, value in values.items():
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = Series(self.policy.window)
            series.add(t, value)
        for key in [k for k, s in self._series.items() if not any(s.values())]:
            del self._series[key]
        self._fits = {}  # fitted when asked: a session observes thousands of keys a second

    def fit(self, key: K) -> Fit:
        got = self._fits.get(key)
        if got is None:
            series = self._series.get(key)
            got = series.fit() if series is not None else Fit(0.0, 0.0, 0, 0.0, 0.0)
            self._fits[key] = got
        return got

    def suspect(self, key: K) -> bool:
        return self.policy.is_suspect(self.fit(key))

    def combined_fit(self, keys: Iterable[K]) -> Fit:
        """The fit of several keys' summed series (a call site made of several stacks).
        Every observation covers all keys at one time, so summing per time is exact."""
        totals: dict[float, float] = {}
        for key in keys:
            series = self._series.get(key)
            for t, v in series.points if series else ():
                totals[t] = totals.get(t, 0.0) + v
        return fit(sorted(totals.items()))

    def suspects(self) -> list[K]:
        """Suspect keys, fastest-growing first."""
        keys = [k for k in self._series if self.policy.is_suspect(self.fit(k))]
        return sorted(keys, key=lambda k: -self.fit(k).per_minute)

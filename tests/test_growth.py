"""Leak suspects from synthetic series: sustained growth, not size, makes a suspect."""

from __future__ import annotations

import random

import pytest

from tracer.model.growth import GrowthPolicy, GrowthTracker, fit

MIB = 1024 * 1024


def feed(tracker: GrowthTracker[str], seconds: int, **series: object) -> None:
    """series: name -> function of t (seconds) giving bytes; one observation a second."""
    for t in range(seconds):
        tracker.observe(float(t), {k: f(t) for k, f in series.items()})  # type: ignore[operator]


def test_fit_of_a_line_is_exact() -> None:
    f = fit([(t, 1000 + 50 * t) for t in range(10)])
    assert f.per_minute == pytest.approx(3000)
    assert f.r2 == pytest.approx(1.0)
    assert f.recent_per_minute == pytest.approx(3000)
    assert (f.samples, f.span) == (10, 9)


def test_fit_of_flat_or_short_series_is_zero() -> None:
    assert fit([(t, 5.0) for t in range(10)]).r2 == 0.0
    assert fit([(0.0, 5.0)]).per_minute == 0.0
    assert fit([]).samples == 0
    assert fit([(1.0, 1.0), (1.0, 2.0)]).per_minute == 0.0  # no time passed


def test_big_cache_that_stopped_growing_is_not_a_suspect_small_steady_leak_is() -> None:
    tracker = GrowthTracker[str]()
    feed(tracker, 60,
         cache=lambda t: 100 * MIB,
         leak=lambda t: 5 * MIB + t * MIB / 60)  # 1 MiB per minute
    assert tracker.suspects() == ["leak"]
    assert tracker.fit("leak").per_minute == pytest.approx(MIB)
    assert not tracker.suspect("cache")


def test_step_up_then_plateau_is_not_a_suspect() -> None:
    tracker = GrowthTracker[str]()
    feed(tracker, 60, step=lambda t: MIB if t < 20 else 50 * MIB)
    f = tracker.fit("step")
    assert f.per_minute > 0 and f.recent_per_minute == 0
    assert not tracker.suspect("step")


def test_churn_is_not_a_suspect_even_with_a_drift() -> None:
    rng = random.Random(1)
    tracker = GrowthTracker[str]()
    feed(tracker, 60, churn=lambda t: rng.choice([0, 8 * MIB]) + t * 100)
    assert tracker.fit("churn").r2 < 0.8
    assert not tracker.suspect("churn")


def test_noisy_leak_is_still_a_suspect() -> None:
    rng = random.Random(2)
    tracker = GrowthTracker[str]()
    feed(tracker, 60, leak=lambda t: t * 640 * 1024 + rng.randint(0, 256 * 1024))
    assert tracker.suspect("leak")


def test_too_few_samples_or_too_slow_is_not_a_suspect() -> None:
    tracker = GrowthTracker[str](GrowthPolicy(min_samples=5))
    feed(tracker, 4, fast=lambda t: (t + 1) * MIB)
    assert not tracker.suspect("fast")
    tracker.observe(4.0, {"fast": 5 * MIB})
    assert tracker.suspect("fast")
    slow = GrowthTracker[str]()
    feed(slow, 60, slow=lambda t: 1000 + t * 10)  # 600 B/min: noise
    assert not slow.suspect("slow")


def test_window_forgets_old_samples() -> None:
    tracker = GrowthTracker[str](GrowthPolicy(window=10))
    feed(tracker, 100, x=lambda t: t * MIB if t < 50 else 50 * MIB)
    f = tracker.fit("x")
    assert f.samples == 11 and f.per_minute == 0
    assert not tracker.suspect("x")


def test_missing_key_counts_as_freed_and_is_forgotten_when_all_zero() -> None:
    tracker = GrowthTracker[str](GrowthPolicy(window=5))
    tracker.observe(0.0, {"a": 100.0})
    tracker.observe(1.0, {})
    assert tracker.fit("a").samples == 2
    for t in range(2, 9):
        tracker.observe(float(t), {})
    assert tracker.fit("a").samples == 0


def test_suspects_fastest_first() -> None:
    tracker = GrowthTracker[str]()
    feed(tracker, 30, slow=lambda t: t * 10 * 1024 * 60, fast=lambda t: t * MIB)
    assert tracker.suspects() == ["fast", "slow"]


def test_combined_fit_sums_the_series_of_several_keys() -> None:
    tracker: GrowthTracker[str] = GrowthTracker()
    for t in range(10):
        # two stacks of one call site: one grows, one appears halfway and grows too
        tracker.observe(float(t), {"a": 1000.0 * (t + 1), **({"b": 500.0 * (t - 4)} if t >= 5
                                                        else {})})
    whole = tracker.combined_fit(["a", "b"])
    assert whole.samples == 10
    assert whole.per_minute > tracker.fit("a").per_minute
    assert tracker.combined_fit(["missing"]).samples == 0

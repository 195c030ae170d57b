"""What `natrace top` shows at each refresh: a Snapshot plus what only time reveals.

A LiveSampler is fed the session once per interval and returns a LiveState: the
snapshot (with the session's memory timeline, regions and arenas), each site's growth
fit (leak suspects), events per second, and natrace's own cost. Views (the Textual
app, the batch printer) read LiveStates only; the driver owning the Session never
touches a widget.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import psutil

from tracer.engine.session import POLL_SECONDS, Session
from tracer.model.growth import Fit, GrowthPolicy, GrowthTracker, fit
from tracer.model.sites import SiteKey
from tracer.model.snapshot import Snapshot

RSS_WINDOW = 120.0  # seconds of RSS history behind the header's sparkline and rate


@dataclass
class ProcessStats:
    """The target's RSS history and uptime, and natrace's own CPU and RSS."""

    rss: list[float] = field(default_factory=list)  # bytes, oldest first (Snapshot.memory)
    rss_fit: Fit | None = None
    uptime: float | None = None
    self_cpu: float = 0.0  # percent of one core since the previous state
    self_rss: int = 0


@dataclass
class LiveState:
    snapshot: Snapshot
    fits: dict[SiteKey, Fit]
    suspects: list[SiteKey]  # fastest-growing first
    process: ProcessStats
    events_per_s: float
    lost: int  # events and allocations not recorded, since the start
    ended: bool  # the target exited; the figures are final

    def fit(self, key: SiteKey) -> Fit:
        return self.fits.get(key) or Fit(0.0, 0.0, 0, 0.0, 0.0)


class LiveSampler:
    """Turns the session's state into LiveStates, one per interval."""

    def __init__(self, session: Session, policy: GrowthPolicy | None = None) -> None:
        self.session = session
        self.growth: GrowthTracker[SiteKey] = GrowthTracker(policy)
        self._me = psutil.Process()
        self._me.cpu_percent(None)
        self._last_events: tuple[float, int] | None = None

    def sample(self) -> LiveState:
        snap = self.session.snapshot()
        now = time.monotonic()
        user = snap.user_sites()
        held: dict[SiteKey, float] = {}  # a function in several processes: their sum
        for s in user:
            held[s.key] = held.get(s.key, 0.0) + s.bytes
        self.growth.observe(now, held)
        events = snap.calls.get("allocs", 0) + snap.calls.get("frees", 0)
        rate = 0.0
        if self._last_events is not None and now > self._last_events[0]:
            rate = (events - self._last_events[1]) / (now - self._last_events[0])
        self._last_events = (now, events)
        lost = sum(v for k, v in snap.loss.items() if k != "untracked_bytes")
        return LiveState(
            snapshot=snap,
            fits={s.key: self.growth.fit(s.key) for s in user},
            suspects=self.growth.suspects(),
            process=self._process(snap),
            events_per_s=max(rate, 0.0),
            lost=lost,
            ended=snap.target_exited,
        )

    def _process(self, snap: Snapshot) -> ProcessStats:
        stats = ProcessStats(self_cpu=self._me.cpu_percent(None),
                             self_rss=self._me.memory_info().rss)
        timeline = snap.memory.timeline if snap.memory is not None else []
        recent = [(m.at, float(m.rss)) for m in timeline if m.at >= snap.taken_at - RSS_WINDOW]
        stats.rss = [rss for _, rss in recent]
        stats.rss_fit = fit(recent)
        if not snap.target_exited:
            with contextlib.suppress(psutil.Error, OSError):
                stats.uptime = time.time() - psutil.Process(snap.pid).create_time()
        return stats


class LiveDriver:
    """Keeps the session polled and yields a LiveState every `interval` seconds.

    Runs in one thread (the TUI's worker): bcc is only ever touched from there. When
    the target exits, the last state is taken and the probes are detached at once so a
    launched target held in exit() can finish.
    """

    def __init__(self, session: Session, interval: float,
                 policy: GrowthPolicy | None = None) -> None:
        self.session = session
        self.interval = interval
        self.sampler = LiveSampler(session, policy)
        self.ended = False
        self._stop = threading.Event()

    def next_state(self) -> LiveState | None:
        """The state after the next interval; None once stopped (q, or SIGINT/SIGTERM/SIGHUP
        caught by the session) or after the target ended."""
        if self.ended:
            return None
        deadline = time.monotonic() + self.interval
        while not self._stop.is_set() and self.session.stop_requested is None:
            if not self.session.poll():
                self.ended = True
                state = self.sampler.sample()
                self.session.close()
                return state
            if time.monotonic() >= deadline:
                return self.sampler.sample()
            self._stop.wait(POLL_SECONDS)
        return None

    def stop(self) -> None:
        self._stop.set()

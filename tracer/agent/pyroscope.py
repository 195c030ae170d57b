"""Profiles to Grafana Pyroscope through its Push API: `POST /push.v1.PusherService/Push`
(Connect protocol, JSON codec), a PushRequest of RawProfileSeries, each with its labels
and one gzipped pprof (tracer/reporters/pprof.py) as `rawProfile`.

One series per module class of a process, labelled service_name (--service or the
process's comm), host, pid and module, so Pyroscope can select "what libpq holds on
every host". Pushing happens on its own thread: tracing never waits for the network.
A push that fails is retried with exponential backoff; when the queue is full the
oldest push is dropped. Every outcome is counted for the metrics.

Tested against the published schema (api/push/v1/push.proto of grafana/pyroscope),
not against a server: see tests/test_agent_pyroscope.py.
"""

from __future__ import annotations

import base64
import json
import queue
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from tracer.engine.recordings import build_ids
from tracer.model.snapshot import Snapshot
from tracer.reporters import pprof
from tracer.reporters.stacks import ExportOptions

PUSH_PATH = "/push.v1.PusherService/Push"
QUEUE_LENGTH = 16
MAX_ATTEMPTS = 5
FIRST_BACKOFF = 0.5  # seconds; doubled after every failed attempt
TIMEOUT = 10.0


@dataclass(frozen=True)
class PushCounts:
    pushed: int
    failures: int  # failed attempts (each retry counts)
    dropped: int  # pushes given up: out of attempts, or pushed out of a full queue


def push_request(snap: Snapshot, service: str, host: str) -> bytes:
    """The JSON PushRequest for one snapshot: a series per module class."""
    ids = build_ids(snap)
    series = []
    for module, _, _, sites in snap.by_module():
        profile = pprof.render(replace(snap, sites=sites), ExportOptions(build_ids=ids))
        labels = {"__name__": "memory", "service_name": service, "host": host,
                  "pid": str(snap.pid), "module": module}
        series.append({
            "labels": [{"name": k, "value": v} for k, v in labels.items()],
            "samples": [{"rawProfile": base64.b64encode(profile).decode(),
                         "ID": str(uuid.uuid4())}],
        })
    return json.dumps({"series": series}).encode()


class Pusher:
    def __init__(self, url: str, sleep: Callable[[float], bool] | None = None) -> None:
        self.endpoint = url.rstrip("/") + PUSH_PATH
        self.host = socket.gethostname()
        self.pushed = self.failures = self.dropped = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_LENGTH)
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="natrace-pyroscope",
                                        daemon=True)
        self._thread.start()

    def submit(self, snap: Snapshot, service: str) -> None:
        """Queue a snapshot's profiles; never blocks (a full queue drops its oldest)."""
        if not snap.user_sites():
            return
        body = push_request(snap, service, self.host)
        while True:
            try:
                self._queue.put_nowait(body)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._count("dropped")
                except queue.Empty:
                    pass

    def counts(self) -> PushCounts:
        with self._lock:
            return PushCounts(self.pushed, self.failures, self.dropped)

    def close(self, timeout: float = 5.0) -> None:
        """Give queued pushes `timeout` seconds to go out, then stop."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            self._stop.set()
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(1.0)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            if body is None or self._stop.is_set():
                return
            backoff = FIRST_BACKOFF
            for _ in range(MAX_ATTEMPTS):
                if self._post(body):
                    self._count("pushed")
                    break
                self._count("failures")
                if self._sleep(backoff):
                    return  # stopping
                backoff *= 2
            else:
                self._count("dropped")

    def _post(self, body: bytes) -> bool:
        request = urllib.request.Request(
            self.endpoint, data=body, method="POST",
            headers={"Content-Type": "application/json", "Connect-Protocol-Version": "1"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                response.read()
                return 200 <= response.status < 300
        except (urllib.error.URLError, OSError, ValueError):
            return False

"""Running `natrace agent` from the tests: the agent as a subprocess whose stderr lines
are read on a thread, a real Prometheus server scraping it, a loopback receiver in
Pyroscope's place, and the published protobuf schemas compiled at test time."""

from __future__ import annotations

import http.server
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

NATRACE = str(Path(sys.executable).with_name("natrace"))
SCHEMAS = Path(__file__).parent / "schemas"
PATIENCE = 180.0  # seconds before a wait gives up: a hang guard, never an assertion

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], patience: float = PATIENCE) -> T:
    """Poll `probe` until it returns something other than None."""
    deadline = time.monotonic() + patience
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


class AgentProcess:
    """`natrace agent ARGS` with its stderr lines collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([NATRACE, "agent", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("started")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def expect(self, pattern: str, patience: float = PATIENCE) -> re.Match[str]:
        """The next stderr line matching `pattern` (a regex); earlier lines are kept."""
        deadline = time.monotonic() + patience
        while True:
            try:
                line = self._new.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; got:\n"
                                     + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"agent exited ({self.proc.wait()}) before a line "
                                     f"matching {pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def written_on_sigusr1(self, pid: int, what: str = "window over") -> tuple[Path, str]:
        """SIGUSR1 to the agent (PID's allocation window ends now, or its sampled
        figures are written): the JSON report it wrote and the line that said so."""
        os.kill(self.proc.pid, signal.SIGUSR1)
        line = self.expect(rf"PID {pid} .*{what}.*; report (\S+),")
        return Path(line[1].rstrip(",")), line.string

    def fds(self, kind: str | None = None) -> int:
        """Open file descriptors of the agent (only those whose link is `kind`)."""
        kinds = self.fd_kinds()
        return sum(kinds.values()) if kind is None else kinds.get(kind, 0)

    def fd_kinds(self) -> dict[str, int]:
        """The agent's open descriptors by what they are: a file's path, "socket",
        "pipe", or an anon inode's name."""
        base = f"/proc/{self.proc.pid}/fd"
        kinds: dict[str, int] = {}
        for fd in os.listdir(base):
            try:
                link = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            kind = link.split(":", 1)[0] if link.startswith(("socket:", "pipe:")) else link
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> int:
        """SIGTERM, then the exit code (the agent removes every probe first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=PATIENCE)
        self.expect_rest()
        return code

    def expect_rest(self) -> None:
        while (line := self._new.get(timeout=PATIENCE)) is not None:
            self.lines.append(line)


@contextmanager
def running_agent(*args: str) -> Iterator[AgentProcess]:
    agent = AgentProcess(*args)
    try:
        yield agent
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


@contextmanager
def prometheus(tmp_path: Path, scrape_port: int) -> Iterator[Callable[[str], list[Any]]]:
    """A real Prometheus server on a loopback port scraping 127.0.0.1:scrape_port every
    second; yields a function running an instant PromQL query (its result vector)."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is not installed: run scripts/provision.sh"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      "scrape_configs:\n  - job_name: natrace\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{scrape_port}']\n")
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([exe, f"--config.file={config}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool | None:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as r:
                return True if r.status == 200 else None
        except OSError:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
            return None

    def query(promql: str) -> list[Any]:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    try:
        wait_for("Prometheus to be ready", ready)
        yield query
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


class Receiver:
    """A loopback HTTP server in Pyroscope's place: records every POST (path, headers,
    body); answers 503 to the first `fail_first` of them, 200 with `{}` after."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.failed = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.failed < fail_first:
                    receiver.failed += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.posts.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def message_classes(tmp_path: Path, include: Path, proto: str, *names: str) -> list[Any]:
    """Compile `proto` (relative to `include`) with grpcio-tools' protoc into a
    descriptor set, and build the named message classes from it (no generated module
    to import: Pyroscope's `types` package would shadow Python's)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    out = tmp_path / (Path(proto).stem + ".pb")
    rc = protoc.main(["protoc", f"-I{include}", "--include_imports",
                      f"--descriptor_set_out={out}", str(include / proto)])
    assert rc == 0, proto
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)
    return [message_factory.GetMessageClass(pool.FindMessageTypeByName(n)) for n in names]

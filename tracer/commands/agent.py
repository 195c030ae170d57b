"""`natrace agent`: a host's native-memory watch, for Prometheus and Pyroscope.

Thin: options to objects, then tracer/agent's loop on a worker thread while this
thread waits for SIGINT/SIGTERM/SIGHUP (stop) and SIGUSR1 (end the allocation windows
now: a report around one user action); every probe is removed before it returns.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import click

from tracer.agent import metrics
from tracer.agent.daemon import Agent, AgentOptions
from tracer.agent.discovery import parse_selector
from tracer.agent.pyroscope import Pusher
from tracer.agent.supervisor import WatchConfig
from tracer.commands import common
from tracer.engine.limits import parse_action, parse_limits
from tracer.engine.session import SessionOptions
from tracer.errors import UsageError
from tracer.files import prepare_dir
from tracer.probes import target as targets
from tracer.probes.alloc import AllocOptions
from tracer.symbols.attribution import parse_charge_to
from tracer.units import Duration, Size


def parse_share(text: str) -> float:
    """'5%' or '0.05' -> 0.05 (a share of one CPU)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"--max-overhead: {text!r} is not a share of one CPU (e.g. 5%, "
                         "0.05)") from None
    if not 0 < value <= 1:
        raise UsageError("--max-overhead: give more than 0 and at most 100% of one CPU")
    return value


@click.command("agent")
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="A process to watch. Repeatable.")
@click.option("--match", "patterns", metavar="REGEX", multiple=True,
              help="Watch every process whose command line matches (new ones too). "
                   "Repeatable.")
@click.option("--cgroup", "cgroups", metavar="PATH", multiple=True,
              help="Watch every process in this cgroup v2 group or below it (e.g. "
                   "/system.slice/app.service). Repeatable.")
@click.option("--rss-limit", "rss_limit", metavar="SIZE", default=None,
              help="Trace allocations for a window when a process's RSS exceeds this.")
@click.option("--growth", metavar="SIZE/INTERVAL", default=None,
              help="... or when its RSS grows more than SIZE within INTERVAL (e.g. 100M/10m).")
@click.option("--window", type=Duration(), default=60.0, show_default=True,
              help="How long one allocation window lasts.")
@click.option("--cooldown", type=Duration(), default=600.0, show_default=True,
              help="Time before the same process may open another window.")
@click.option("--action", "action_text", default="report", show_default=True,
              help="After each window's report: report, signal:NAME or kill (as natrace "
                   "guard).")
@click.option("--grace", type=Duration(), default=5.0, show_default=True,
              help="With --action kill: seconds between SIGTERM and SIGKILL.")
@click.option("--record-dir", "record_dir", type=click.Path(),
              default="/var/lib/natrace", show_default=True,
              help="Where each window's recording and report go (mode 0600).")
@click.option("--json", "as_json", is_flag=True, help="Write window reports as JSON.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Call sites in reports and in the site-growth metric, per process.")
@click.option("--interval", type=Duration(), default=1.0, show_default=True,
              help="Seconds between scans for processes and memory checks.")
@click.option("--push-interval", "push_interval", type=Duration(), default=15.0,
              show_default=True,
              help="Seconds between symbolized refreshes (call-site metrics) and pushes.")
@click.option("--max-overhead", "max_overhead", default="5%", show_default=True,
              help="Budget: natrace's CPU plus its probes' estimated cost, as a share of "
                   "one CPU.")
@click.option("--listen", default=None, metavar="ADDR",
              help="Serve Prometheus metrics on http://ADDR/metrics (e.g. :9464).")
@click.option("--pyroscope", "pyroscope_url", default=None, metavar="URL",
              help="Push allocation profiles to this Grafana Pyroscope (e.g. "
                   "http://pyroscope:4040).")
@click.option("--service", default=None,
              help="Pyroscope service_name (default: each process's command name).")
@click.option("--charge-to", "charge_to", default="first", show_default=True,
              help="Frame that holds the bytes (as natrace run).")
@click.option("--sample", "sample", type=Size(), default=None,
              help="Sampling period of allocation tracing: the in-process sampler's mean "
                   "(default 512K) in processes that load it, byte-weighted sampling of the "
                   "uprobes in windows (default exact). The budget may raise it.")
def command(pids: tuple[int, ...], patterns: tuple[str, ...], cgroups: tuple[str, ...],
            rss_limit: str | None, growth: str | None, window: float, cooldown: float,
            action_text: str, grace: float, record_dir: str, as_json: bool, top: int,
            interval: float, push_interval: float, max_overhead: str, listen: str | None,
            pyroscope_url: str | None, service: str | None, charge_to: str,
            sample: int | None) -> None:
    """Watch a host's processes: triage probes always, allocation tracing in windows
    when memory trips a limit; metrics for Prometheus, profiles for Pyroscope."""
    selector = parse_selector(pids, patterns, cgroups)
    limits = parse_limits(rss_limit, growth) if rss_limit or growth else None
    action = parse_action(action_text)
    budget = parse_share(max_overhead)
    if interval <= 0 or push_interval <= 0 or window <= 0:
        raise UsageError("--interval, --push-interval and --window must be more than zero")
    if pyroscope_url is not None and not pyroscope_url.startswith(("http://", "https://")):
        raise UsageError(f"--pyroscope: {pyroscope_url!r} is not an http(s):// URL")
    try:
        parse_charge_to(charge_to)
    except ValueError as err:
        raise UsageError(f"--charge-to: {err}") from None
    if listen is not None:
        metrics.parse_listen(listen)
    for pid in pids:
        targets.attach(pid)  # one-line errors for a wrong PID before anything starts
    common.check_privileges()
    prepare_dir(record_dir, "--record-dir")
    watch = WatchConfig(limits, action, window, cooldown, record_dir, interval, top, as_json,
                        grace, SessionOptions(alloc=AllocOptions(sample_bytes=sample or 0),
                                       charge_to=charge_to, follow_exec=False))
    options = AgentOptions(selector, watch, push_interval, budget, service)

    collector = metrics.AgentCollector()
    server = metrics.serve(collector, listen) if listen else None
    pusher = Pusher(pyroscope_url) if pyroscope_url else None
    agent = Agent(options, collector, pusher, _log)
    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            agent.run(stop)
        except BaseException as err:  # re-raised on the main thread: one line there
            failure.append(err)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            agent.end_windows.set()
        else:
            stop.set()

    previous = {s: signal.signal(s, on_signal)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    worker = threading.Thread(target=work, name="natrace-agent")
    worker.start()
    where = f"; metrics on http://{listen}/metrics" if listen else ""
    _log(f"started (PID {os.getpid()}){where}; Ctrl-C stops")
    try:
        while worker.is_alive():
            worker.join(0.5)
    finally:
        stop.set()
        worker.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pusher is not None:
            pusher.close()
        if server is not None:
            metrics.stop(server)
    if failure:
        raise failure[0]
    _log("stopped; every probe removed")


def _log(line: str) -> None:
    click.echo(f"natrace agent: {line}", err=True)

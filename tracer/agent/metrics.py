"""/metrics for Prometheus (--listen ADDR), through prometheus_client.

A custom collector turns the agent's last published view (immutable: the HTTP thread
never touches a supervisor) into metric families at scrape time. Names follow
Prometheus' conventions: `natrace_` prefix, base units (bytes, seconds), `_total` on
counters; per-site series only for the top N sites of each process (bounded
cardinality), and the series of a process go away with it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tracer.agent.budget import BudgetState
from tracer.agent.pyroscope import PushCounts
from tracer.agent.supervisor import ProcessFigures
from tracer.errors import UsageError


@dataclass(frozen=True)
class AgentView:
    """Everything a scrape shows, published by the agent loop after every tick."""

    processes: tuple[ProcessFigures, ...] = ()
    budget: BudgetState | None = None
    rss: int = 0  # natrace's own resident memory
    escalations: int = 0
    attach_failures: int = 0
    ended: int = 0  # processes that ended while watched
    loops: int = 0  # turns of the agent loop (one per --interval when it keeps up)
    pushes: PushCounts | None = None


class AgentCollector(Collector):
    def __init__(self) -> None:
        self.view = AgentView()

    def collect(self) -> Iterator[Metric]:
        v = self.view  # one read: the loop swaps in a new view, never edits this one
        who = ["pid", "comm"]

        def per_process(name: str, doc: str, labels: list[str] | None = None,
                        counter: bool = False) -> GaugeMetricFamily | CounterMetricFamily:
            cls = CounterMetricFamily if counter else GaugeMetricFamily
            return cls(name, doc, labels=who + (labels or []))

        rss = per_process("natrace_process_rss_bytes", "Resident set size of a watched process.")
        mode = per_process("natrace_process_allocation_tracing",
                           "1 while allocation probes are attached (an escalation window or "
                           "the in-process sampler), 0 in triage mode.")
        sampler = per_process("natrace_process_in_process_sampler",
                              "1 when allocations come from the process's own sampler "
                              "(otel_memory probes, traced all the time), else 0.")
        probes = per_process("natrace_process_probes", "Probes attached to a watched process.")
        unfreed = per_process("natrace_unfreed_bytes", "Bytes allocated and not freed, by "
                              "module class, in the last allocation window.", ["module"])
        blocks = per_process("natrace_unfreed_blocks", "Blocks allocated and not freed, by "
                             "module class, in the last allocation window.", ["module"])
        growth = per_process("natrace_site_growth_bytes_per_second",
                             "Growth of a call site's unfreed bytes (top sites only).",
                             ["module", "site"])
        handles = per_process("natrace_live_handles", "Live handles by type (PGresult, "
                              "PGconn, N-API references, --handle pairs).", ["type"])
        locks = per_process("natrace_contended_locks", "Locks judged contended.")
        lost = per_process("natrace_events_lost", "Events the probes could not record, by "
                           "kind.", ["kind"], counter=True)
        windows = per_process("natrace_process_escalations", "Allocation windows opened "
                              "for this process.", counter=True)
        for p in v.processes:
            ids = [str(p.pid), p.comm]
            if p.rss is not None:
                rss.add_metric(ids, p.rss)
            mode.add_metric(ids, 0 if p.mode == "triage" else 1)
            sampler.add_metric(ids, 1 if p.mode == "sampled" else 0)
            probes.add_metric(ids, p.probes)
            windows.add_metric(ids, p.escalations)
            locks.add_metric(ids, p.contended_locks)
            for module, nbytes, nblocks in p.modules:
                unfreed.add_metric(ids + [module], nbytes)
                blocks.add_metric(ids + [module], nblocks)
            for s in p.sites:
                growth.add_metric(ids + [s.module, s.site], s.bytes_per_second)
            for name, live in p.handles:
                handles.add_metric(ids + [name], live)
            for kind, n in p.lost:
                lost.add_metric(ids + [kind], n)
        yield from (rss, mode, sampler, probes, unfreed, blocks, growth, handles, locks, lost,
                    windows)
        yield from _memory_families(v.processes, who)

        yield _gauge("natrace_watched_processes", "Processes watched now.", len(v.processes))
        yield _counter("natrace_escalations", "Allocation windows opened.", v.escalations)
        yield _counter("natrace_attach_failures", "Matching processes natrace could not "
                       "attach to.", v.attach_failures)
        yield _counter("natrace_agent_loops", "Turns of the agent's loop (one per "
                       "--interval while it keeps up).", v.loops)
        yield _counter("natrace_processes_ended", "Watched processes that ended.", v.ended)
        yield _gauge("natrace_agent_resident_memory_bytes", "natrace's own resident memory.",
                     v.rss)
        if v.budget is not None:
            b = v.budget
            yield _counter("natrace_agent_cpu_seconds", "natrace's own CPU time.",
                           b.own_cpu_seconds)
            yield _counter("natrace_agent_setup_cpu_seconds", "Of which compiling, "
                           "attaching and detaching probes (left out of the overhead).",
                           b.setup_cpu_seconds)
            yield _gauge("natrace_overhead_ratio", "Estimated cost of natrace as a share of "
                         "one CPU: its own CPU plus the probes' time in the traced processes.",
                         b.overhead)
            yield _gauge("natrace_overhead_budget_ratio", "--max-overhead, as a share of one "
                         "CPU.", b.limit)
            yield _gauge("natrace_over_budget", "1 while the estimate is over the budget.",
                         int(b.over))
            yield _gauge("natrace_escalation_sample_bytes", "Sampling period of the next "
                         "allocation window (0: exact).", b.sample_bytes)
            yield _gauge("natrace_escalation_window_ratio", "Share of --window the next "
                         "allocation window runs.", b.window_share)
            yield _counter("natrace_budget_fallbacks", "Allocation windows ended early to "
                           "stay within the budget.", b.fallbacks)
        if v.pushes is not None:
            yield _counter("natrace_pyroscope_pushes", "Profiles pushed to Pyroscope.",
                           v.pushes.pushed)
            yield _counter("natrace_pyroscope_push_failures", "Failed push attempts (each "
                           "retry counts).", v.pushes.failures)
            yield _counter("natrace_pyroscope_pushes_dropped", "Pushes given up (out of "
                           "retries, or pushed out of a full queue).", v.pushes.dropped)


#: Help of the allocator-books gauges (tracer/model/books.py's metrics() names them).
MEMORY_HELP = {
    "natrace_rss_part_bytes": "Resident memory by measured part (live blocks, free inside "
                              "the allocator, allocator overhead, V8 heap, thread stacks, "
                              "file mappings, other).",
    "natrace_allocator_free_bytes": "Free bytes inside a glibc arena (bins, tcache, top).",
    "natrace_allocator_free_resident_bytes": "Of an arena's free bytes, those resident.",
    "natrace_allocator_system_bytes": "Memory a glibc arena got from the system.",
    "natrace_allocator_in_use_bytes": "Bytes in blocks the allocator counts as in use.",
    "natrace_allocator_tcache_bytes": "Free bytes held in the threads' tcaches.",
    "natrace_memory_verdict": "1 for the verdict the allocator's books support: leak, "
                              "fragmentation, both, neither or unknown.",
}


def _memory_families(processes: tuple[ProcessFigures, ...],
                     who: list[str]) -> Iterator[GaugeMetricFamily]:
    """One gauge family per books metric, its label names taken from its samples."""
    families: dict[str, GaugeMetricFamily] = {}
    for p in processes:
        for name, labels, value in p.memory:
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(
                    name,
                    MEMORY_HELP.get(name, "Allocator books figure."),
                    labels=who + [k for k, _ in labels])
            family.add_metric([str(p.pid), p.comm] + [v for _, v in labels], value)
    yield from families.values()


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: {text!r} is not HOST:PORT (e.g. 127.0.0.1:9464, :9464)")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(collector: AgentCollector, listen: str) -> WSGIServer:
    """Start /metrics on its own thread; a one-line error if the address is unusable."""
    from prometheus_client.exposition import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    host, port = parse_listen(listen)
    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as err:
        raise UsageError(f"--listen: cannot listen on {listen}: {err.strerror}") from None
    return server


def stop(server: WSGIServer) -> None:
    threading.Thread(target=server.shutdown, daemon=True).start()
    server.server_close()

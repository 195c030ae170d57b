"""The few sentences a report leads with: what could not be recorded (when it matters),
which call sites look like leaks, which locks are contended, which handles are left
live — so a newcomer sees the answer in one screen.

Call sites are ranked by evidence of a leak, not by size alone:
  1. growing steadily (a leak suspect, tracer/model/growth.py), fastest first;
  2. still allocating and keeping what they allocate — ranked by unfreed bytes times
     the share of their allocations still unfreed (a site that keeps 40,000 of 40,000
     blocks is a better suspect than a bigger one that keeps 10 of 100,000);
  3. flat: a trace of 10 s or more shows no growth, or the site stopped allocating
     in its first half — caches, buffers sized once.
Sites that are no suspect and hold under 1% of the unfreed bytes are left out.
One-off startup memory (the dynamic loader mapping libraries, certificate stores,
runtime initialisation) is left out unless it grows; a closing line says how much.
A finding's figures are the site's own, never its module's.
"""

from __future__ import annotations

from tracer.model.frames import Frame, shorten
from tracer.model.sites import Site
from tracer.model.snapshot import LOSS_DESCRIPTIONS, Snapshot
from tracer.units import format_size

TOP_SITES = 3
LOSS_SHARE = 0.01  # loss above this share of calls or bytes leads the findings
MIN_SHARE = 0.01  # a site that is no leak suspect needs this share of unfreed bytes
SETTLED_TRACE = 10.0  # seconds of tracing before "stopped allocating early" means flat

#: Module classes whose memory is the runtime loading the program: the loader.
STARTUP_MODULES = frozenset({"ld.so"})
#: Functions whose allocations are one-off initialisation (normalized names: no
#: parameters, no leading underscores): ELF constructors, TLS set-up, certificate
#: stores, runtime start-up of node/V8 and CPython.
STARTUP_FUNCTIONS = frozenset({
    "dl_init", "call_init", "dl_start", "dl_open_worker", "dl_map_object", "libc_setup_tls",
    "libc_early_init", "init_cacheinfo",
    "X509_STORE_load_locations", "X509_STORE_load_file", "X509_STORE_set_default_paths",
    "X509_STORE_add_cert", "SSL_CTX_load_verify_locations", "SSL_CTX_set_default_verify_paths",
    "OPENSSL_init_crypto", "OPENSSL_init_ssl", "node::crypto::NewRootCertStore",
    "node::InitializeOncePerProcess", "node::InitializeNodeWithArgs", "v8::V8::Initialize",
    "Py_InitializeFromConfig", "Py_Initialize", "PyRuntime_Initialize",
})
#: Loss counters that mean allocations were not counted at all, and their share's base.
_LOST_CALLS = ("untracked", "sites_full")
_LOST_STACKS = ("stack_efault", "stack_full", "stack_enomem", "stack_other")


def findings(snap: Snapshot) -> list[str]:
    out = loss_findings(snap)
    ranked = ranked_sites(snap)
    out += [site_line(s, snap) for s in ranked[:TOP_SITES]]
    startup = [s for s in snap.holding_sites() if is_startup(s) and not s.suspect]
    if startup:
        est = "~" if snap.estimated else ""
        out.append(f"left out as one-off startup memory: {est}"
                   f"{format_size(sum(s.bytes for s in startup))} at {len(startup)} call "
                   f"sites ({', '.join(sorted({s.module_class for s in startup}))}: loading "
                   "libraries, initialisation), none of it growing")
    if snap.locks is not None:
        for lock in snap.locks.contended():
            where = ", ".join(sorted({w.site.label() for w in lock.waiters}))
            out.append(f"{lock.kind} {lock.uaddr:#x} is contended ({' and '.join(lock.rules)}):"
                       f" waiters blocked {lock.wait_ns / 1e9:.3g} thread-s ({lock.share:.2f} "
                       f"threads waiting on average), p99 {lock.p(0.99) / 1e6:.1f} ms, "
                       f"waiting in {where}")
    for handle in snap.handles:
        top = handle.top
        if handle.live > 0 and top is not None:
            via = f" via {top.site.via}" if top.site.via else ""
            out.append(f"{handle.name}: {handle.live:,} live, {handle.share(top):.0%} created "
                       f"at {top.site.label()}{via}")
    return out


def loss_findings(snap: Snapshot) -> list[str]:
    """Loss above 1% of the allocation calls (or of the bytes allocated) comes first:
    every figure after it leaves that part out."""
    calls = snap.calls.get("allocs", 0)
    if not calls:
        return []
    out = []
    lost = sum(snap.loss.get(k, 0) for k in _LOST_CALLS)
    lost_bytes = snap.loss.get("untracked_bytes", 0)
    allocated = snap.totals().alloc_bytes + lost_bytes
    if lost > LOSS_SHARE * calls or (allocated and lost_bytes > LOSS_SHARE * allocated):
        why = "; ".join(LOSS_DESCRIPTIONS[k].split(": ", 1)[-1]
                        for k in _LOST_CALLS if snap.loss.get(k))
        out.append(f"NOT RECORDED: {lost:,} of {calls:,} allocations ({lost / calls:.1%}, "
                   f"{format_size(lost_bytes)}) were not tracked ({why}); every figure below "
                   "leaves them out")
    stacks = sum(snap.loss.get(k, 0) for k in _LOST_STACKS)
    if stacks > LOSS_SHARE * calls:
        why = "; ".join(LOSS_DESCRIPTIONS[k] for k in _LOST_STACKS if snap.loss.get(k))
        out.append(f"STACKS LOST: {stacks:,} of {calls:,} allocations ({stacks / calls:.1%}) "
                   f"have no call site ({why}); their bytes are counted as "
                   "'[stack not captured]'")
    return out


def ranked_sites(snap: Snapshot) -> list[Site]:
    """The program's sites that hold memory, best leak evidence first (see the module
    docstring), startup memory that does not grow left out."""
    total = snap.totals().bytes
    candidates = [s for s in snap.holding_sites() if s.bytes > 0 and (s.suspect or (
        not is_startup(s) and s.bytes >= MIN_SHARE * total))]
    return sorted(candidates, key=lambda s: _rank(s, snap.duration))


def _rank(site: Site, traced: float) -> tuple[int, float, str]:
    if site.suspect:
        return (0, -(site.per_minute or 0.0), site.label())
    if _flat(site, traced):
        return (2, -float(site.bytes), site.label())
    return (1, -site.bytes * kept_share(site), site.label())


def kept_share(site: Site) -> float:
    """The share of the site's allocations still unfreed (1 when it counts no
    allocations: mappings, or blocks older than the trace)."""
    return min(1.0, site.blocks / site.allocs) if site.allocs > 0 else 1.0


def _flat(site: Site, traced: float) -> bool:
    if traced < SETTLED_TRACE:
        return False
    stopped_early = site.last_at is not None and site.last_at < traced / 2
    return stopped_early or (site.per_minute is not None and site.per_minute <= 0)


def is_startup(site: Site) -> bool:
    """Memory the runtime allocated once while starting: the loader's, or allocated
    under an initialisation function (ELF constructors, certificate stores, ...)."""
    if site.module_class in STARTUP_MODULES:
        return True
    return any(_function(f) in STARTUP_FUNCTIONS for f in site.frames)


def _function(frame: Frame) -> str:
    return short_name(frame).lstrip("_") if frame.symbol else ""


def site_line(site: Site, snap: Snapshot) -> str:
    """`leak_many [leaky] holds 38.1 MiB in 40,000 blocks (95.2% of unfreed), 40,000 of
    its 40,000 allocations unfreed, growing +1.2 MiB/min`, then for a library's
    allocations charged to their caller the library and the function called
    (`vault_keep_results [addon:vault] holds … allocated by libpq via PQexec`), else the
    API its caller went through and that caller (`via leak_many, from main [prog]`)."""
    est = "~" if snap.estimated else ""
    total = snap.totals().bytes
    share = f" ({site.bytes / total:.1%} of unfreed)" if total > 0 else ""
    interval = site.interval(site.bytes, site.samples, snap.sample_bytes) \
        if est and site.kind == "malloc" and site.samples else None
    margin = "" if interval is None else \
        f" (95% {format_size(interval[0])}-{format_size(interval[1])}, {site.samples:,} samples)"
    text = (f"{site.label(short=True)} [{_class(site.frame)}]{snap.pid_tag(site)} holds {est}"
            f"{format_size(site.bytes)}{margin} in {est}{site.blocks:,} {_unit(site)}{share}")
    if site.allocs:
        text += f", {est}{site.blocks:,} of its {est}{site.allocs:,} allocations unfreed"
    if site.suspect and site.per_minute is not None:
        text += f", growing {est}+{format_size(site.per_minute)}/min (leak suspect)"
    if site.library_index is not None:
        text += f", allocated by {site.module_class}"
        if site.via:
            text += f" via {site.via}"
    elif site.via:
        text += f" via {site.via}"
        caller = next((f for f in site.frames[site.charge_index:]
                       if f.module_class != site.module_class), None)
        if caller is not None and _names_an_entry(caller):
            text += f", from {short_name(caller)} [{caller.module_class}]"
    return text


#: Where processes and threads start (__libc_start_call_main, start_thread, clone3): a
#: chain that leaves the charged module only for them came from no caller worth naming.
_START_CLASSES = frozenset({"libc", "ld.so"})


def _names_an_entry(frame: Frame) -> bool:
    """A frame worth naming as the way into the charged module: symbolized (a runtime's
    stripped thread trampoline, `libstdc++.so.6+0xd44a3`, tells nothing), and not the
    C library's start of the process or thread."""
    return bool(frame.symbol) and frame.module_class not in _START_CLASSES


def _class(frame: Frame | None) -> str:
    return frame.module_class if frame else "unknown"


def _unit(site: Site) -> str:
    unit = "block" if site.kind == "malloc" else "range"
    return unit if site.blocks == 1 else unit + "s"


def short_name(frame: Frame) -> str:
    """A frame's function as tables show it (frames.shorten), else its label."""
    return shorten(frame.symbol) if frame.symbol else frame.label()

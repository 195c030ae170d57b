"""The few sentences a report leads with: who holds the memory, which locks are
contended, which handles are left live — so a newcomer sees the answer in one screen
("libpq holds 1.2 MiB via PQgetResult from vault_keep_results; addon:vault holds ...").
"""

from __future__ import annotations

from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot
from tracer.units import format_size

TOP_MODULES = 3


def findings(snap: Snapshot) -> list[str]:
    out = [_module_line(name, nbytes, blocks, sites[0])
           for name, nbytes, blocks, sites in snap.by_module()[:TOP_MODULES] if nbytes > 0]
    suspects = sorted((s for s in snap.user_sites() if s.suspect),
                      key=lambda s: -(s.per_minute or 0))
    if suspects:
        out.append("leak suspects (growing steadily): " + "; ".join(
            f"{s.label()} [{s.module_class}] +{format_size(s.per_minute or 0)}/min"
            for s in suspects[:TOP_MODULES]))
    if snap.locks is not None:
        for lock in snap.locks.contended():
            where = ", ".join(sorted({w.site.label() for w in lock.waiters}))
            out.append(f"{lock.kind} {lock.uaddr:#x} is contended ({' and '.join(lock.rules)}):"
                       f" waiters blocked {lock.share:.0%} of the traced time, p99 "
                       f"{lock.p(0.99) / 1e6:.1f} ms, waiting in {where}")
    for handle in snap.handles:
        top = handle.top
        if handle.live > 0 and top is not None:
            via = f" via {top.site.via}" if top.site.via else ""
            out.append(f"{handle.name}: {handle.live:,} live, {handle.share(top):.0%} created "
                       f"at {top.site.label()}{via}")
    return out


def _module_line(module: str, nbytes: int, blocks: int, site: Site) -> str:
    """`libpq holds 369 KiB in 150 blocks at pqResultAlloc via PQexec, from
    vault_keep_results [addon:vault]`: the charged frame, the module's API the caller
    went through, and that caller."""
    text = f"{module} holds {format_size(nbytes)} in {blocks:,} blocks at {site.label()}"
    if site.via:
        text += f" via {site.via}"
        caller = next((f for f in site.frames[site.charge_index:]
                       if f.module_class != site.module_class), None)
        if caller is not None:
            text += f", from {short_name(caller)} [{caller.module_class}]"
    return text


def short_name(frame: Frame) -> str:
    """A frame's function without symbol version or C++ parameter list."""
    if not frame.symbol:
        return frame.label()
    name = frame.symbol.split("@", 1)[0]
    depth, cut = 0, len(name)
    for k, ch in enumerate(name):  # the first '(' outside <...> and (anonymous namespace)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", k):
            cut = k
            break
    return name[:cut]

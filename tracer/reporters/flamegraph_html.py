"""Interactive flamegraph as one self-contained HTML page: flamegraph_svg's picture and
script inline, plus a real search box (no CDN, no external resources).

`page.html#search=REGEX` highlights matches on load, which makes a search linkable.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from tracer.model.snapshot import Snapshot
from tracer.reporters.flamegraph_svg import render_svg
from tracer.reporters.stacks import ExportOptions

_STYLE = """
body { margin: 0; background: #fbfbf6; font: 13px sans-serif; }
#bar { padding: 6px 10px; display: flex; gap: 8px; align-items: center; }
#natrace-search { width: 28em; font: 13px monospace; }
svg { display: block; max-width: 100%; height: auto; }
"""


def render(snap: Snapshot, options: ExportOptions) -> str:
    title = options.title or f"natrace: {snap.command} (PID {snap.pid})"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
            "<div id=\"bar\"><label for=\"natrace-search\">Search</label>"
            "<input id=\"natrace-search\" type=\"search\" "
            "placeholder=\"regular expression, e.g. leak|libpq\"></div>"
            f"{render_svg(snap, options, embedded=True)}</body></html>\n")

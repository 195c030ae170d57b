"""Export formats by name and by file extension, and writing one out (`natrace
flamegraph`, `--flamegraph FILE`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tracer.errors import UsageError
from tracer.model.snapshot import Snapshot
from tracer.reporters.stacks import ExportOptions

#: Each format's module under tracer/reporters/, imported only when that format is
#: written: the HTML one alone pulled urllib, http and email into every `natrace run`.
FORMATS: dict[str, str] = {"html": "flamegraph_html", "svg": "flamegraph_svg",
                           "folded": "folded", "pprof": "pprof", "speedscope": "speedscope"}
_EXTENSIONS = [(".speedscope.json", "speedscope"), (".html", "html"), (".htm", "html"),
               (".svg", "svg"), (".folded", "folded"), (".txt", "folded"),
               (".pb.gz", "pprof"), (".pprof", "pprof"), (".pb", "pprof")]


def format_for(path: str) -> str:
    """The format a file name asks for (flame.html, out.svg, x.folded, p.pb.gz, ...)."""
    lower = path.lower()
    for ext, fmt in _EXTENSIONS:
        if lower.endswith(ext):
            return fmt
    known = ", ".join(ext for ext, _ in _EXTENSIONS)
    raise UsageError(f"cannot tell the flamegraph format from {path!r} (use one of {known})")


def render(fmt: str, snap: Snapshot, options: ExportOptions) -> str | bytes:
    module = importlib.import_module(f"tracer.reporters.{FORMATS[fmt]}")
    renderer: Callable[[Snapshot, ExportOptions], str | bytes] = module.render
    return renderer(snap, options)

"""The package's layout is the pipeline: each stage folder imports only the stages before
it (ARCHITECTURE.md's arrows), no module imports itself back through others, and the
module map names every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tracer"
BASICS = {"cli", "errors", "units", "files", "recording", "__init__", "__main__"}
# stage -> stages it may import ("basics" is the package's top-level modules)
ALLOWED = {
    "probes": {"symbols", "model", "basics"},
    "symbols": {"model", "basics"},
    "memory": {"symbols", "model", "basics"},
    "engine": {"probes", "symbols", "memory", "model", "basics"},
    "model": {"basics"},
    "reporters": {"model", "basics"},
    "tui": {"engine", "model", "reporters", "basics"},
    "agent": {"probes", "symbols", "memory", "engine", "model", "reporters", "basics"},
    "commands": {"probes", "symbols", "memory", "engine", "model", "reporters", "tui",
                 "basics", "agent"},
    "basics": {"model", "commands"},
}
#: Stages that may use only some modules of a stage they import (ARCHITECTURE.md):
#: top's views read the live sampler's state, never the session or the probes.
ONLY = {("tui", "engine"): {"tracer.engine.live"}}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PKG / parts[-1]).is_dir() and len(parts) > 1 \
        else "basics"


def _imports(path: Path) -> set[str]:
    """tracer modules imported at run time (imports under `if TYPE_CHECKING:` left out)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tracer"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*sub.split("."))).is_dir()
                out.add(sub if is_module else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tracer")}
    return out


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def test_each_stage_imports_only_the_stages_before_it() -> None:
    wrong = []
    for mod, path in MODULES.items():
        for imp in _imports(path):
            a, b = _stage(mod), _stage(imp)
            outside = a != b and b not in ALLOWED.get(a, set())  # a new stage: add it here
            if outside or imp not in ONLY.get((a, b), {imp}):
                wrong.append(f"{mod} -> {imp}")
    assert wrong == []


def test_no_import_circle() -> None:
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    seen: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for d in sorted(graph.get(m, set())):
            if seen.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in seen:
                visit(d, [*path, d])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
    assert circles == []


def test_few_top_level_modules() -> None:
    top = {p.stem for p in PKG.glob("*.py")}
    assert top <= BASICS
    assert len(top - {"__init__", "__main__"}) <= 8


def test_architecture_map_names_every_module() -> None:
    """Every module is named in the module map: by its path, in a row that names its
    folder (`tracer/reporters/folded.py`, `speedscope.py`), or in its folder's section."""
    text = (ROOT / "ARCHITECTURE.md").read_text().split("## Module map", 1)[1]
    section, rows_of = "", {}
    for row in text.split("\n## ", 1)[0].splitlines():
        head = re.match(r"\| \*\*(.+?)\*\* \|", row)
        section = head.group(1) if head else section
        rows_of.setdefault(section, []).append(row)
    rows = [r for rs in rows_of.values() for r in rs]
    missing = []
    for path in MODULES.values():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        folder = path.parent.relative_to(ROOT).as_posix()
        name = f"`{path.name}`"
        if not (any(f"{folder}/{path.name}" in r or (folder in r and path.name in r)
                    for r in rows)
                or any(name in r for r in rows_of.get(f"{folder}/", []))):
            missing.append(f"{folder}/{path.name}")
    assert missing == []

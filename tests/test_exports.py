"""Every export format round-tripped from one real recording of tests/fixtures/src/leaky.c.

Folded lines parsed back, pprof decoded with the real protobuf runtime (profile.proto
compiled here by grpcio-tools' protoc), speedscope validated against its schema, and
the HTML flamegraph opened in headless Chromium.
"""

from __future__ import annotations

import gzip
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from allocfixtures import build
from framecheck import seen

pytestmark = pytest.mark.bpf

NATRACE = str(Path(sys.executable).with_name("natrace"))
SCHEMAS = Path(__file__).parent / "schemas"
MANY = 40_000  # leak_many: 40,000 blocks of 1000 B, the top site by far
CHURN = 20_000  # churn(): 20,000 malloc/free pairs, then 33 blocks of 64 B kept
# no_leak(): 100 x (malloc(100+i), realloc(300), free) + realloc(NULL, 50) freed by
# realloc(q, 0): 201 allocations of 45,000 B, all freed before the thread's next
# allocation (temporary)
NO_LEAK = (201, 45_000, 201)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rec = tmp_path_factory.mktemp("rec") / "leaky.natrace"
    proc = subprocess.run([NATRACE, "record", "--interval", "0.5", "-o", str(rec), "--",
                           str(build().leaky), "--many", str(MANY), "--churn", str(CHURN)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return rec


@pytest.fixture(scope="module")
def report(recording: Path) -> dict[str, Any]:
    proc = subprocess.run([NATRACE, "report", str(recording), "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return seen("natrace report", json.loads(proc.stdout))


def export(recording: Path, out: Path, *args: str) -> Path:
    proc = subprocess.run([NATRACE, "flamegraph", str(recording), "-o", str(out), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    return out


def user_sites(report: dict[str, Any]) -> list[dict[str, Any]]:
    return report["sites"]


def test_report_from_recording_has_the_ground_truth(report: dict[str, Any]) -> None:
    many = [s for s in report["sites"] if s["function"] == "leak_many"]
    assert [(s["bytes"], s["blocks"]) for s in many] == [(MANY * 1000, MANY)]
    assert user_sites(report)[0]["function"] == "leak_many"
    assert report["target_exited"] is True


def test_folded_lines_sum_to_the_recorded_total(recording: Path, report: dict[str, Any],
                                                tmp_path: Path) -> None:
    text = export(recording, tmp_path / "out.folded").read_text()
    total = 0
    stacks = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        stacks[stack] = int(count)
        assert all(frame.endswith("]") for frame in stack.split(";")), stack
    assert total == report["totals"]["bytes"]
    many = [s for s in stacks if s.split(";")[-1] == "leak_many [leaky]"]
    assert [stacks[s] for s in many] == [MANY * 1000]
    assert many[0].split(";")[-2] == "main [leaky]"  # root first, leaf last


def test_allocated_and_allocations_metrics(recording: Path, tmp_path: Path) -> None:
    text = export(recording, tmp_path / "n.folded", "--metric", "allocations").read_text()
    counts = {line.rpartition(" ")[0].split(";")[-1]: int(line.rpartition(" ")[2])
              for line in text.splitlines()}
    assert counts["leak_many [leaky]"] == MANY


def test_json_lists_add_up_to_their_totals(report: dict[str, Any]) -> None:
    totals, sites = report["totals"], report["sites"]
    for key in ("bytes", "blocks", "allocs", "alloc_bytes", "temp_allocs", "temp_bytes"):
        assert sum(s[key] for s in sites) == totals[key], key
        assert sum(m[key] for m in report["modules"]) == totals[key], key
    assert len(sites) == totals["sites"] == sum(m["sites"] for m in report["modules"])
    assert sum(1 for s in sites if s["bytes"] or s["blocks"]) == totals["holding_sites"]
    assert not any(s["allocator_internal"] for s in sites)
    runtime = report["runtime"]
    assert runtime["sites"] and all(s["allocator_internal"] for s in runtime["sites"])
    assert sum(s["bytes"] for s in runtime["sites"]) == runtime["totals"]["bytes"]
    assert len(runtime["sites"]) == runtime["totals"]["sites"]
    # every allocation the probes saw is in one site: churn is not dropped (the mapping
    # sites count their mmaps besides)
    assert sum(s["allocs"] for s in sites if s["kind"] == "malloc") == report["calls"]["allocs"]
    assert totals["peak_bytes"] >= MANY * 1000


def test_churn_and_freed_sites_count_in_allocation_metrics(recording: Path,
                                                           report: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """allocated/allocations/temporary count every allocation, freed or not: their
    totals are the probes' call counts in folded, speedscope, pprof and HTML alike."""
    totals = report["totals"]
    by_function = {s["function"]: s for s in report["sites"]}
    assert (by_function["churn"]["allocs"], by_function["churn"]["bytes"]) == (CHURN + 33,
                                                                                33 * 64)
    no_leak = by_function["no_leak"]
    assert (no_leak["allocs"], no_leak["alloc_bytes"], no_leak["temp_allocs"]) == NO_LEAK
    assert (no_leak["bytes"], no_leak["blocks"]) == (0, 0)
    for metric, total, leaves in (("allocations", totals["allocs"],
                                   {"churn": CHURN + 33, "no_leak": NO_LEAK[0]}),
                                  ("allocated", totals["alloc_bytes"],
                                   {"no_leak": NO_LEAK[1], "leak_many": MANY * 1000}),
                                  ("temporary", totals["temp_allocs"],
                                   {"no_leak": NO_LEAK[2]})):
        text = export(recording, tmp_path / f"{metric}.folded", "--metric", metric).read_text()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            stack, _, n = line.rpartition(" ")
            leaf = stack.split(";")[-1].split(" [")[0]
            counts[leaf] = counts.get(leaf, 0) + int(n)
        assert sum(counts.values()) == total, metric
        assert {k: counts[k] for k in leaves} == leaves, metric
        doc = json.loads(export(recording, tmp_path / f"{metric}.speedscope.json", "--metric",
                                metric).read_text())
        assert sum(doc["profiles"][0]["weights"]) == total, metric
        svg = export(recording, tmp_path / f"{metric}.html", "--metric", metric).read_text()
        assert f'data-total="{total}"' in svg, metric
    malloc = sum(s["allocs"] for s in report["sites"] if s["kind"] == "malloc")
    assert malloc == report["calls"]["allocs"]  # the mapping sites count their mmaps besides
    pb = compile_profile_proto(tmp_path)
    prof = pb.Profile()
    prof.ParseFromString(gzip.decompress(export(recording, tmp_path / "a.pb.gz", "--metric",
                                                "allocations").read_bytes()))
    st = list(prof.string_table)
    assert st[prof.default_sample_type] == "alloc_objects"
    sums = [sum(s.value[i] for s in prof.sample) for i in range(6)]
    assert sums == [totals["bytes"], totals["blocks"], totals["alloc_bytes"], totals["allocs"],
                    totals["temp_bytes"], totals["temp_allocs"]]


def compile_profile_proto(tmp_path: Path) -> Any:
    from grpc_tools import protoc

    out = tmp_path / "pb"
    out.mkdir()
    rc = protoc.main(["protoc", f"-I{SCHEMAS}", f"--python_out={out}",
                      str(SCHEMAS / "profile.proto")])
    assert rc == 0
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("profile_pb2")
    finally:
        sys.path.remove(str(out))


def test_pprof_decodes_with_protobuf_and_matches_sites(recording: Path, report: dict[str, Any],
                                                       tmp_path: Path) -> None:
    pb = compile_profile_proto(tmp_path)
    data = export(recording, tmp_path / "out.pb.gz").read_bytes()
    prof = pb.Profile()
    prof.ParseFromString(gzip.decompress(data))
    st = list(prof.string_table)
    assert st[0] == ""
    assert [(st[t.type], st[t.unit]) for t in prof.sample_type] == [
        ("inuse_space", "bytes"), ("inuse_objects", "count"), ("alloc_space", "bytes"),
        ("alloc_objects", "count"), ("temp_space", "bytes"), ("temp_objects", "count")]
    assert st[prof.default_sample_type] == "inuse_space"  # a string table index
    functions = {f.id: st[f.name] for f in prof.function}
    locations = {loc.id: loc for loc in prof.location}
    mappings = {m.id: m for m in prof.mapping}
    leaf_totals: dict[str, list[int]] = {}
    for sample in prof.sample:
        loc = locations[sample.location_id[0]]
        assert loc.mapping_id in mappings
        name = functions[loc.line[0].function_id]
        got = leaf_totals.setdefault(name, [0, 0])
        got[0] += sample.value[0]
        got[1] += sample.value[1]
    assert sum(v[0] for v in leaf_totals.values()) == report["totals"]["bytes"]
    assert sum(v[1] for v in leaf_totals.values()) == report["totals"]["blocks"]
    assert leaf_totals["leak_many"] == [MANY * 1000, MANY]
    leaky = [m for m in prof.mapping if st[m.filename] == str(build().leaky)]
    assert leaky and re.fullmatch(r"[0-9a-f]{40}", st[leaky[0].build_id])


def test_speedscope_validates_against_its_schema(recording: Path, report: dict[str, Any],
                                                 tmp_path: Path) -> None:
    doc = json.loads(export(recording, tmp_path / "out.speedscope.json").read_text())
    schema = json.loads((SCHEMAS / "speedscope-schema.json").read_text())
    jsonschema.validate(doc, schema)
    profile = doc["profiles"][0]
    assert (profile["type"], profile["unit"]) == ("sampled", "bytes")
    assert sum(profile["weights"]) == profile["endValue"] == report["totals"]["bytes"]
    names = [f["name"] for f in doc["shared"]["frames"]]
    heaviest = profile["samples"][profile["weights"].index(max(profile["weights"]))]
    assert names[heaviest[-1]] == "leak_many [leaky]"


def test_metrics_without_data_and_unknown_formats_are_one_line(recording: Path,
                                                               tmp_path: Path) -> None:
    proc = subprocess.run([NATRACE, "flamegraph", str(recording), "-o", str(tmp_path / "x.zip")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = subprocess.run([NATRACE, "flamegraph", str(recording), "-o", str(recording),
                           "--format", "folded"], capture_output=True, text=True)
    assert proc.returncode == 2 and "input file" in proc.stderr


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (scripts/provision.sh installs it)"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_html_flamegraph_in_headless_chromium(recording: Path, tmp_path: Path) -> None:
    page = export(recording, tmp_path / "flame.html")
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html  # self-contained: nothing fetched
    url = f"{page.as_uri()}#search=leak_many"
    shot = tmp_path / "flame.png"
    proc = chromium("--window-size=1280,700", f"--screenshot={shot}", url,
                    profile=tmp_path / "p1")
    assert shot.exists() and shot.stat().st_size > 5000, proc.stderr
    proc = chromium("--dump-dom", url, profile=tmp_path / "p2")
    dom = proc.stdout
    frames = re.findall(r'<g class="([^"]*)" data-n="([^"]*)"[^>]*>.*?<svg[^>]*width="([\d.]+)"',
                        dom, re.S)
    assert frames, dom[:2000]
    matched = [(name, float(width)) for cls, name, width in frames if "match" in cls.split()]
    assert matched and all("leak_many" in name for name, _ in matched), matched
    # wide enough for its whole label (12px monospace, ~7.3 px a character): visible
    assert matched[0][1] > 7.3 * len(matched[0][0]), matched
    assert "Matched: " in dom
    unmatched = [name for cls, name, _ in frames if "match" not in cls.split()]
    assert "main [leaky]" in unmatched


def test_legend_names_the_report_module_classes(recording: Path, report: dict[str, Any],
                                                tmp_path: Path) -> None:
    """One classification: the legend's classes and shares are the report's modules."""
    svg = export(recording, tmp_path / "legend.svg").read_text()
    legend = re.findall(r'<text class="legend"[^>]*>([^<]*)</text>', svg)
    total = report["totals"]["bytes"]
    expected = [f"{m['module']} {100.0 * m['bytes'] / total:.1f}%" for m in report["modules"]
                if m["bytes"]]
    assert legend[:6] == expected[:6], (legend, expected)
    if len(expected) > 6:
        assert legend[6].startswith("others ")


def test_svg_and_inverted(recording: Path, tmp_path: Path) -> None:
    svg = export(recording, tmp_path / "flame.svg", "--inverted").read_text()
    assert svg.startswith("<?xml")
    root = re.search(r'data-n="all"[^>]*><title>[^<]*</title><svg x="[\d.]+" y="(\d+)"', svg)
    assert root and int(root.group(1)) < 100  # icicle: the root row is at the top

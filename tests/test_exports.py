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

pytestmark = pytest.mark.bpf

NATRACE = str(Path(sys.executable).with_name("natrace"))
SCHEMAS = Path(__file__).parent / "schemas"
MANY = 40_000  # leak_many: 40,000 blocks of 1000 B, the top site by far


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rec = tmp_path_factory.mktemp("rec") / "leaky.natrace"
    proc = subprocess.run([NATRACE, "record", "--interval", "0.5", "-o", str(rec), "--",
                           str(build().leaky), "--many", str(MANY)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return rec


@pytest.fixture(scope="module")
def report(recording: Path) -> dict[str, Any]:
    proc = subprocess.run([NATRACE, "report", str(recording), "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def export(recording: Path, out: Path, *args: str) -> Path:
    proc = subprocess.run([NATRACE, "flamegraph", str(recording), "-o", str(out), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    return out


def user_sites(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in report["sites"] if not s["allocator_internal"]]


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
        ("alloc_objects", "count")]
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


def test_svg_and_inverted(recording: Path, tmp_path: Path) -> None:
    svg = export(recording, tmp_path / "flame.svg", "--inverted").read_text()
    assert svg.startswith("<?xml")
    root = re.search(r'data-n="all"[^>]*><title>[^<]*</title><svg x="[\d.]+" y="(\d+)"', svg)
    assert root and int(root.group(1)) < 100  # icicle: the root row is at the top

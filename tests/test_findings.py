"""The Findings a report leads with: loss first, then the leak — not the loader's
startup memory, not the biggest flat buffer — with the site's own figures.

Real runs of demo/leaky_server.c (cache_response() keeps 256 x 4,096 B) and
tests/fixtures/src/leaky.c; the ranking itself on hand-made snapshots.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from allocfixtures import build

from tracer.model.findings import findings, is_startup, ranked_sites
from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot

NATRACE = str(Path(sys.executable).with_name("natrace"))
DEMO = Path(__file__).parent.parent / "demo" / "leaky_server.c"
BUILD = Path(__file__).parent / "fixtures" / "build" / "findings"


@functools.cache
def leaky_server() -> Path:
    """The demo built as Debian builds programs: -O2, no frame pointers, with -g."""
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / "leaky_server"
    subprocess.run(["gcc", "-O2", "-g", "-o", str(out), str(DEMO)], check=True,
                   capture_output=True)
    return out


def run(tmp_path: Path, *args: str) -> tuple[dict[str, Any], list[str]]:
    """`natrace run --json` and the text report of the same run (from its recording):
    the JSON and the text's findings."""
    out, rec = tmp_path / "r.json", tmp_path / "r.natrace"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--record", str(rec),
                           *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    text = subprocess.run([NATRACE, "report", str(rec)], capture_output=True, text=True,
                          timeout=60).stdout.splitlines()
    start = text.index("Findings:")
    end = text.index("", start)
    return json.loads(out.read_text()), [line[4:] for line in text[start + 1:end]]


@pytest.mark.bpf
def test_first_finding_of_a_small_leaking_program_is_its_leak(tmp_path: Path) -> None:
    report, text = run(tmp_path, "--", str(leaky_server()))
    first = report["findings"][0]
    assert first.startswith("cache_response"), report["findings"]
    assert "holds 1.0 MiB in 256 blocks" in first
    assert "256 of its 256 allocations unfreed" in first
    site = next(s for s in report["sites"] if s["function"] == "cache_response")
    assert (site["bytes"], site["blocks"], site["allocs"]) == (256 * 4096, 256, 256)
    assert text == report["findings"]
    # the loader's mappings of library data are ld.so's, left out as startup memory
    loader = [s for s in report["sites"] if s["module_class"] == "ld.so" and s["bytes"]]
    assert loader, [s["label"] for s in report["sites"]]
    assert not any(f.startswith(s["label"]) for s in loader for f in report["findings"])
    assert report["findings"][-1].startswith("left out as one-off startup memory")
    # handle_request's churn is counted, temporary, and no finding
    body = next(s for s in report["sites"] if s["function"] == "build_response")
    assert (body["allocs"], body["bytes"]) == (2048, 0)


@pytest.mark.bpf
def test_loss_is_the_first_finding(tmp_path: Path) -> None:
    """--max-allocs 1024 with 5,000 blocks leaked: most allocations are not tracked."""
    report, text = run(tmp_path, "--max-allocs", "1024", "--", str(build().leaky), "--many",
                       "5000")
    lost, calls = report["loss"]["untracked"], report["calls"]["allocs"]
    assert lost > 3900  # 5,000 + leaky's other blocks, 1,024 slots
    assert text[0] == report["findings"][0]
    assert text[0].startswith(f"NOT RECORDED: {lost:,} of {calls:,} allocations "
                              f"({lost / calls:.1%}, ")
    assert "raise --max-allocs" in text[0]
    assert report["findings"][1].startswith("leak_many")


LEAK = Frame(0x1000, "/opt/app", 0x1000, "leak_here", 8, module_class="app")
CACHE = Frame(0x2000, "/opt/app", 0x2000, "fill_cache", 8, module_class="app")
OTHER = Frame(0x2100, "/opt/app", 0x2100, "small_buffer", 8, module_class="app")
LOADER = Frame(0x3000, "/lib64/ld-linux-x86-64.so.2", 0x3000, "_dl_map_object_from_fd", 9,
               module_class="ld.so")
CERTS = Frame(0x4000, "/usr/lib/libcrypto.so.3", 0x4000, "CRYPTO_zalloc", 4,
              module_class="libcrypto.so")
STORE = Frame(0x4100, "/usr/lib/libcrypto.so.3", 0x4100, "X509_STORE_add_cert", 4,
              module_class="libcrypto.so")


def site(frames: list[Frame], nbytes: int, blocks: int, allocs: int, **kw: Any) -> Site:
    return Site("malloc", frames, nbytes, blocks, allocs, nbytes, **kw)


def test_growth_beats_size_and_startup_is_left_out() -> None:
    leak = site([LEAK], 2 << 20, 200, 200, per_minute=1 << 20, suspect=True)
    cache = site([CACHE], 64 << 20, 10, 10, per_minute=0.0)  # big, flat
    other = site([OTHER], 1 << 20, 10, 10)
    tiny = site([OTHER, LEAK], 1000, 1, 1)  # under 1% of the unfreed bytes
    churn = site([OTHER], 1 << 20, 10, 100_000)  # keeps 10 of 100,000
    certs = site([CERTS, STORE], 8 << 20, 5000, 5000)
    loader = Site("mmap", [LOADER], 80_000, 1)
    snap = Snapshot(1, "app", 0.0, 30.0, sites=[cache, certs, churn, leak, other, tiny, loader],
                    calls={"allocs": 105_230})
    assert is_startup(certs) and is_startup(loader) and not is_startup(cache)
    assert ranked_sites(snap) == [leak, other, churn, cache]
    lines = findings(snap)
    assert lines[0].startswith("leak_here+0x8 [app] holds 2.0 MiB in 200 blocks")
    assert "growing +1.0 MiB/min (leak suspect)" in lines[0]
    # the site's own figures, never its module's (app holds 67 MiB in 230 blocks)
    assert lines[1].startswith("small_buffer+0x8 [app] holds 1.0 MiB in 10 blocks")
    assert lines[3] == ("left out as one-off startup memory: 8.1 MiB at 2 call sites "
                        "(ld.so, libcrypto.so: loading libraries, initialisation), none of "
                        "it growing")


def test_small_loss_is_no_finding_and_sampled_figures_keep_their_tilde() -> None:
    leak = site([LEAK], 4096, 4, 4)
    snap = Snapshot(1, "app", 0.0, 1.0, sites=[leak], calls={"allocs": 1000},
                    loss={"untracked": 10, "untracked_bytes": 10})
    assert findings(snap)[0].startswith("leak_here")
    snap.loss["untracked"] = 11
    assert findings(snap)[0].startswith("NOT RECORDED: 11 of 1,000 allocations (1.1%")
    sampled = Snapshot(1, "app", 0.0, 1.0, sample_bytes=512 << 10, sites=[leak])
    assert "holds ~4,096 B in ~4 blocks" in findings(sampled)[0]
    counted = site([LEAK], 12 << 19, 12, 12, samples=12)  # 12 samples of 512 KiB
    in_process = Snapshot(1, "app", 0.0, 1.0, sample_bytes=512 << 10, in_process=True,
                          sites=[counted])
    assert findings(in_process)[0].startswith(
        "leak_here+0x8 [app] holds ~6.0 MiB (95% 2.6 MiB-9.4 MiB, 12 samples) in ~12 blocks")


def test_a_system_librarys_allocations_are_its_callers_in_its_module() -> None:
    """libpq's PGresults charged to the addon function that called PQexec: the finding
    names the function and the library, the module table counts them to libpq."""
    pq = "/usr/lib/x86_64-linux-gnu/libpq.so.5.15"
    frames = [Frame(0x7000, pq, 0x7000, None, module_class="libpq"),
              Frame(0x7100, pq, 0x7100, "PQexec", 0x30, module_class="libpq"),
              Frame(0x9000, "/app/vault.node", 0x900, "vault_keep_results", 0x42,
                    module_class="addon:vault")]
    held = site(frames, 1 << 20, 10, 10, charge_index=2, library_index=0, via="PQexec")
    own = site(frames[2:], 1 << 19, 5, 5)
    snap = Snapshot(1, "node", 0.0, 1.0, sites=[held, own])
    assert findings(snap)[0] == ("vault_keep_results+0x42 [addon:vault] holds 1.0 MiB in 10 "
                                 "blocks (66.7% of unfreed), 10 of its 10 allocations "
                                 "unfreed, allocated by libpq via PQexec")
    assert [(m, b) for m, b, _, _ in snap.by_module()] == [("libpq", 1 << 20),
                                                          ("addon:vault", 1 << 19)]
    assert held.key != own.key and held.library_via == " via PQexec" and own.library_via == ""


def test_from_names_the_way_in_not_a_threads_or_processs_start() -> None:
    """`via X, from Y`: Y is the frame that entered the charged module, named only when
    it says something: not a stripped runtime's thread trampoline or libc's start code."""
    stdcxx = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30"
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    construct = Frame(0x5000, "/opt/app", 0x500, "std::string::_M_construct", 0x20,
                      module_class="app")
    entry = Frame(0x5100, "/opt/app", 0x510, "cache_entry", 0x2c, module_class="app")
    trampoline = Frame(0x6000, stdcxx, 0xd44a3, None, module_class="libstdc++")
    start = Frame(0x6100, libc, 0x94ac3, "start_thread", 0x305, module_class="libc")
    plugin = Frame(0x6200, "/opt/libplug.so", 0x620, "plug_run", 0x11, module_class="libplug")
    threaded = site([construct, entry, trampoline, start], 1 << 20, 10, 10, charge_index=1,
                    via="_M_construct")
    called = site([construct, entry, plugin, start], 1 << 20, 10, 10, charge_index=1,
                  via="_M_construct")
    assert findings(Snapshot(1, "app", 0.0, 1.0, sites=[threaded]))[0].endswith(
        "10 of its 10 allocations unfreed via _M_construct")
    assert findings(Snapshot(1, "app", 0.0, 1.0, sites=[called]))[0].endswith(
        "unfreed via _M_construct, from plug_run [libplug]")

"""What natrace must show for the motivating case, whichever way it was run."""

from __future__ import annotations

from typing import Any

import scenario


def module_bytes(report: dict[str, Any], name: str) -> int:
    return next((m["bytes"] for m in report["modules"] if m["module"] == name), 0)


def check(report: dict[str, Any], truth: scenario.Truth) -> None:
    # the addon's leak, charged to addon:vault and its function
    stash = [s for s in report["sites"] if s["function"] == "vault_stash_blocks"]
    assert len(stash) == 1
    assert stash[0]["module_class"] == "addon:vault"
    assert abs(stash[0]["bytes"] - truth.addon_bytes) <= 0.05 * truth.addon_bytes
    assert abs(stash[0]["blocks"] - truth.addon_blocks) <= 0.05 * truth.addon_blocks
    # the kept PGresults, charged to libpq, through PQexec/PQgetResult
    assert truth.libpq_bytes > 0
    libpq = module_bytes(report, "libpq")
    assert abs(libpq - truth.libpq_bytes) <= 0.05 * truth.libpq_bytes, (libpq, truth)
    libpq_sites = [s for s in report["sites"] if s["module_class"] == "libpq"]
    paths = [" ".join(f["label"] for f in s["stack"]) for s in libpq_sites]
    assert any(("PQgetResult" in p or "PQexec" in p) and "vault_keep_results" in p
               for p in paths), paths
    # the same PGresults as live handles by creating site, though libpq was loaded (with
    # vault.node, by dlopen) after node started
    results = next(h for h in report["handles"] if h["name"] == "libpq PGresult")
    kept = {s["function"]: s["live"] for s in results["sites"]}
    assert kept.get("vault_keep_results") == truth.kept_results, kept
    # the addon's mutex is flagged, its locking function named
    contended = [lk for lk in report["locks"]["locks"] if lk["contended"]]
    waiters = {w["function"] for lk in contended for w in lk["waiters"]}
    assert "vault_locked_work" in waiters, [lk["waiters"] for lk in report["locks"]["locks"]]
    # nothing silently lost
    assert not any(report["loss"].values()), report["loss"]
    # process memory figures consistent with the process
    mem = report["memory"]
    assert mem["regions"]["count"] > 0 and mem["regions"]["writable"] > 0
    assert mem["timeline"] and mem["timeline"][-1]["rss"] > 0
    assert mem["arenas"]["arenas"] >= 1

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
    # the kept PGresults: libpq's bytes in the module table, the call site the addon's
    # function that called PQexec, libpq's own frames inside it in the stack
    assert truth.libpq_bytes > 0
    libpq = module_bytes(report, "libpq")
    assert abs(libpq - truth.libpq_bytes) <= 0.05 * truth.libpq_bytes, (libpq, truth)
    keep = [s for s in report["sites"] if s["function"] == "vault_keep_results"]
    assert [(s["module_class"], s["via"]) for s in keep] == [("libpq", "PQexec")], keep
    site = keep[0]
    assert abs(site["bytes"] - truth.libpq_bytes) <= 0.05 * truth.libpq_bytes, (site, truth)
    stack = site["stack"]
    assert stack[site["charge_index"]]["module_class"] == "addon:vault"
    inside = stack[site["library_index"]:site["charge_index"]]
    assert inside and {f["module_class"] for f in inside} == {"libpq"}, inside
    assert any(f["symbol"] in ("PQexec", "PQgetResult") for f in inside), inside
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

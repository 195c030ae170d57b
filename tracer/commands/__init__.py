"""One module per CLI verb; each exposes a click command named `command`.

Imported on demand (tracer/cli.py): a verb loads only its own module, so `natrace
snapshot` never pays for Textual (top) or prometheus_client (agent) before attaching.
"""

from __future__ import annotations

import importlib

import click

# Verb -> module, in the order `natrace --help` lists them.
VERBS: dict[str, str] = {
    "doctor": "doctor", "run": "run", "snapshot": "snapshot", "top": "top",
    "record": "record", "report": "report", "diff": "diff", "flamegraph": "flamegraph",
    "guard": "guard", "agent": "agent", "whatif": "whatif", "sampler-path": "sampler_path",
}


def load(verb: str) -> click.Command:
    command: click.Command = importlib.import_module(f"tracer.commands.{VERBS[verb]}").command
    return command

"""The e2e scenario's shared set-up: PostgreSQL server, addon, libpq ground truth."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("expect")

import scenario  # noqa: E402


@dataclass(frozen=True)
class Env:
    conninfo: str
    addon: Path
    libpq_per_call: tuple[int, int]


@pytest.fixture(scope="session")
def e2e() -> Iterator[Env]:
    if not scenario.node_modules_ready():
        pytest.fail("tests/e2e/app/node_modules is missing: run scripts/provision.sh")
    addon = scenario.build_addon()
    with scenario.private_server() as pg:
        yield Env(pg.conninfo, addon, scenario.libpq_bytes_per_call(pg.conninfo))

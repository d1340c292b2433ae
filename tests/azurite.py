"""pytest fixtures for Azurite's Table service (see devkit.azurite).

Enable them in a test module with `pytest_plugins = ["tests.azurite"]` (or from conftest.py).
One in-memory Azurite serves the whole session; each test gets its own table prefix, so tests
never see each other's rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devkit.azurite import Azurite
from rebalancer.store import StorageConnection, Store


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """One in-memory Azurite table service for the test session."""
    with Azurite() as server:
        yield server


@pytest.fixture
def azurite_on_disk(tmp_path: Path) -> Iterator[Azurite]:
    """A private on-disk Azurite that a test may restart (`restart()`), keeping its data."""
    with Azurite(location=tmp_path / "azurite") as server:
        yield server


@pytest.fixture
def table_prefix() -> str:
    return f"t{uuid.uuid4().hex[:16]}"


def in_fresh_process(script: str, azurite: Azurite, table_prefix: str) -> object:
    """Run `script` (python -c) in a fresh interpreter with the Azurite connection string and
    the table prefix as arguments; the JSON of its last output line."""
    done = subprocess.run(
        [sys.executable, "-c", script, azurite.connection_string, table_prefix],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_store(azurite: Azurite, table_prefix: str, **options: object) -> Store:
    """A Store on `azurite` that fails fast (no client retries) unless told otherwise."""
    options.setdefault("retry_total", 0)
    connection = StorageConnection("test", connection_string=azurite.connection_string)
    return Store(connection, table_prefix=table_prefix, **options)


@pytest.fixture
def store_factory(azurite: Azurite, table_prefix: str) -> Iterator[Callable[..., Store]]:
    """More Stores on the test's tables (one per simulated instance); closed at teardown.

    `store_factory(server=other_azurite, backoff=...)`: options go to `Store`.
    """
    opened: list[Store] = []

    def factory(*, server: Azurite | None = None, **options: object) -> Store:
        created = make_store(server or azurite, table_prefix, **options)
        opened.append(created)
        return created

    yield factory
    for created in opened:
        created.close()


@pytest.fixture
def store(store_factory: Callable[..., Store]) -> Store:
    """A Store with fresh tables (created on first write) on the session's Azurite."""
    return store_factory()

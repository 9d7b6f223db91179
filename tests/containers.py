"""testcontainers-backed servers, used by the harness only when a Docker engine is reachable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def docker_available() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@dataclass
class ContainerServer:
    """The harness's server interface on top of a running container."""

    container: Any
    port_in_container: int
    scheme: str
    suffix: str = ""

    @property
    def host(self) -> str:
        return str(self.container.get_container_host_ip())

    @property
    def port(self) -> int:
        return int(self.container.get_exposed_port(self.port_in_container))

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.suffix}"

    def stop(self) -> None:
        self.container.get_wrapped_container().stop()

    def kill(self) -> None:
        self.container.get_wrapped_container().kill()

    def start(self) -> None:
        self.container.get_wrapped_container().start()

    def restart(self) -> None:
        self.container.get_wrapped_container().restart()


@contextlib.contextmanager
def nats_container() -> Iterator[ContainerServer]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222)
    with container:
        wait_for_logs(container, "Server is ready", timeout=30)
        yield ContainerServer(container, 4222, "nats")


@contextlib.contextmanager
def redis_container() -> Iterator[ContainerServer]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = DockerContainer("redis:7").with_exposed_ports(6379)
    with container:
        wait_for_logs(container, "Ready to accept connections", timeout=30)
        yield ContainerServer(container, 6379, "redis", "/0")

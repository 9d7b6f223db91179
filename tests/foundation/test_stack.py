"""`sair up` starts the embedded infrastructure for real and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sair.stack import RedisServer, free_port, port_open

SAIR = [sys.executable, "-m", "sair.cli"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not a running server.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def _wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _start_up(workdir: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        [*SAIR, "up", "--infra-only", "--workdir", str(workdir), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "no output"
    return proc, json.loads(line)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_sair_up_starts_healthy_servers_and_stops_them(tmp_path: Path, sig: int) -> None:
    proc, info = _start_up(tmp_path / "stack")
    health = info["health"]
    assert isinstance(health, dict)
    assert health["nats"].startswith("ok (JetStream")
    assert health["redis"] == "ok"
    assert health["qdrant"].startswith("ok (local mode")
    pids = info["pids"]
    assert isinstance(pids, list) and len(pids) == 2
    nats_port, redis_port = _port(str(info["SAIR_NATS_URL"])), _port(str(info["SAIR_REDIS_URL"]))
    assert port_open("127.0.0.1", nats_port) and port_open("127.0.0.1", redis_port)

    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 0
    assert _wait_gone(pids) == []
    assert not port_open("127.0.0.1", nats_port)
    assert not port_open("127.0.0.1", redis_port)


def test_servers_die_with_a_killed_sair_up(tmp_path: Path) -> None:
    proc, info = _start_up(tmp_path / "stack")
    pids = info["pids"]
    assert isinstance(pids, list)
    proc.kill()  # SIGKILL: no chance to clean up; the servers must still go
    proc.wait(timeout=10)
    assert _wait_gone(pids) == []


def test_given_urls_are_used_instead_of_starting_servers(tmp_path: Path) -> None:
    redis = RedisServer("redis-server", "127.0.0.1", free_port(), tmp_path / "redis")
    redis.start()
    try:
        out = subprocess.run(
            [*SAIR, "up", "--infra-only", "--workdir", str(tmp_path / "s"), "--json", "--duration", "0.5",
             "--redis-url", redis.url],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        info = json.loads(out.stdout.splitlines()[0])
        assert info["SAIR_REDIS_URL"] == redis.url
        assert len(info["pids"]) == 1  # only NATS was started
        assert redis.running()  # and the given server was left alone
    finally:
        redis.stop()


def test_help_lists_commands() -> None:
    out = subprocess.run([*SAIR, "--help"], capture_output=True, text=True, timeout=30, check=True)
    assert "up" in out.stdout

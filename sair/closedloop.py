"""The whole closed loop on one machine: what `sair up` runs.

    cl = ClosedLoop(ClosedLoopConfig(pipeline="imgcls", workload="burst", duration_s=75))
    await cl.start(stop)          # stack, streams, services, supervisor; waits for ready workers
    await cl.run_load(stop)       # the load generator, until its arrivals end (or `stop` is set)
    summary = await cl.finish()   # ask the retriever, stop everything in order, write the outputs

Components, each a child process with its log in `workdir/logs/<name>.log`:
`monitor`, `retriever`, `actuator` (backend local), `policy`, `supervisor` (its workers log to
`workdir/logs/workers/`) and `loadgen`; plus the embedded servers `nats` and `redis` (unless
URLs are given). Every child runs in its own process group and gets PR_SET_PDEATHSIG, so a
SIGKILLed launcher still leaves nothing behind (the supervisor's workers die with the
supervisor the same way).

Fault injection for tests (all async, safe to call while the loop runs):
- `await cl.kill(name)`: SIGKILL, no clean-up (a crash); for `nats`/`redis`, the server dies.
- `await cl.stop_component(name)` / `await cl.start_component(name)`: graceful stop / start
  with the same arguments (a server keeps its port and, for NATS, its JetStream store).
- `await cl.restart(name)`: stop (or reap, if killed) then start again.
- `cl.pids()`: the live pid of each component; `cl.started_pids()`: every pid this loop
  started; `live_descendants()`: every process still running under this one.
Children are always forked from one long-lived thread owned by the loop: PR_SET_PDEATHSIG
fires when the *thread* that forked a child ends, so forking from a short-lived executor
thread would kill the child with it.

The parent follows the bus itself (`RunRecord`, see `sair.liveview`): telemetry, actions,
action results, replica status, episodes, the first stage's requests and the completions.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.js.errors
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import ValidationError

from schemas import subjects
from schemas.common import SairModel
from schemas.context import ENCODING_VERSION, context_dim
from schemas.messages import (
    ActionResult,
    Completion,
    PipelineTelemetry,
    ReplicaStatus,
    RetrieveReply,
    RetrieveRequest,
    ScalingAction,
)
from schemas.pipeline import PipelineSpec, load_pipeline_spec

from .hostcap import capped_spec_text
from .liveview import RunRecord, plot_timeline
from .runtime import ensure_core_streams, ensure_pipeline_streams
from .stack import EmbeddedStack, ManagedServer, StackUrls, _die_with_parent

log = logging.getLogger("sair.closedloop")

M = TypeVar("M", bound=SairModel)

WORKLOADS = ("poisson", "ramp", "burst", "trace")
SERVICES = ("monitor", "retriever", "actuator", "supervisor", "policy")
WATCHDOG_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
"""Started in this order; the policy once the workers are ready (its first decision then
sees the pipeline serving, not starting)."""
STOP_ORDER = ("warmup", "loadgen", "policy", "actuator", "supervisor", "monitor", "retriever")
SERVERS = ("nats", "redis")
RETRIEVER_ENGINES = ("auto", "numpy", "qdrant-local", "qdrant-server")
"""As `services.retriever.store.ENGINES` (not imported: that loads the Qdrant client)."""
SEGMENT_S = 3600.0
"""Without a duration the load runs in segments of this length (the arrivals of one segment
are computed up front by the load generator)."""


class ClosedLoopError(RuntimeError):
    """A component could not be started or a name is unknown."""


def default_params(
    workload: str, duration_s: float | None, capacity_rps: float | None = None
) -> dict[str, float]:
    """Load that makes the loop visibly act, sized to this machine.

    `capacity_rps` is what one replica of the first (CPU) stage serves here and now (see
    `measure_first_stage`: the handler alone; inside a worker, with the bus and the other
    processes around it, one replica serves about 0.6 of that). Base load is 0.2 of it (1..6
    requests/s, so that the GPU stage at its initial rho 0.2, 20 requests/s, is comfortable
    too): the initial replicas serve it. A burst is 1.0 of it (3..24 requests/s; more
    overloads a 2-core machine with the pipeline's own overheads): about 1.7 times what one
    replica serves, and above the GPU stage's initial share, so the loop has to act. With a
    duration of up to 150 s there is one burst, from 30% to 50% of the run, so the last half
    shows the recovery; longer or unbounded runs get a 20 s burst every 90 s.
    """
    cap = 20.0 if capacity_rps is None else capacity_rps
    base = round(min(6.0, max(1.0, 0.2 * cap)), 1)
    high = round(min(24.0, max(3.0, 1.0 * cap)), 1)
    if workload == "poisson":
        return {"rate_rps": base}
    if workload == "ramp":
        return {"low_rps": base, "high_rps": high, "peak_at": 0.4}
    if workload == "burst":
        if duration_s is not None and duration_s <= 150:
            return {
                "base_rps": base,
                "burst_rps": high,
                "first_at_s": round(0.3 * duration_s, 1),
                "width_s": round(0.2 * duration_s, 1),
                "period_s": float(duration_s) + 1.0,
            }
        return {"base_rps": base, "burst_rps": high, "first_at_s": 20.0, "width_s": 20.0,
                "period_s": 90.0}  # fmt: skip
    if workload == "trace":
        return {}
    raise ClosedLoopError(f"workload={workload!r}: must be one of {', '.join(WORKLOADS)}")


def measure_first_stage(spec: PipelineSpec, samples: int = 30) -> float | None:
    """The first stage's handler time on this machine now, in ms: the 75th percentile of
    `samples` calls (contention comes in bursts; the upper quartile does not bet on a quiet
    moment). Reference pipelines with a CPU first stage only; None otherwise."""
    from .pipelines import REFERENCE_PIPELINES, make_payload

    first = spec.stages[0]
    target = first.handler or ""
    if spec.name not in REFERENCE_PIPELINES or first.kind != "cpu" or ":" not in target:
        return None
    module, func = target.split(":", 1)
    handler = getattr(importlib.import_module(module), func)
    rng = np.random.default_rng(12345)
    times_ms: list[float] = []
    for i in range(samples + 2):
        payload = make_payload(spec.name, rng, i)
        t0 = time.perf_counter()
        handler(payload, dict(first.options))
        if i >= 2:  # the first calls warm caches and imports
            times_ms.append(1000.0 * (time.perf_counter() - t0))
    return float(np.percentile(times_ms, 75))


def spec_path(pipeline: str) -> Path:
    """The TOML file of a built-in pipeline name, or `pipeline` itself if it is a path."""
    if pipeline.endswith(".toml") or "/" in pipeline:
        path = Path(pipeline)
        if not path.is_file():
            raise ClosedLoopError(f"pipeline={pipeline!r}: no such spec file")
        return path.resolve()
    candidate = resources.files("sair.pipelines").joinpath("specs", f"{pipeline}.toml")
    path = Path(str(candidate))
    if not path.is_file():
        from .pipelines import spec_names

        raise ClosedLoopError(
            f"pipeline={pipeline!r}: no built-in spec (known: {', '.join(spec_names())})"
        )
    return path


@dataclass
class ClosedLoopConfig:
    pipeline: str = "imgcls"
    """Built-in pipeline name or spec TOML path."""
    workload: str = "burst"
    params: dict[str, float] = field(default_factory=dict)
    """Arrival-process parameters; missing ones come from `default_params`, sized by timing
    the first stage's handler here (`calibrate`)."""
    calibrate: bool = True
    trace: Path | None = None
    policy: str = "sair"
    duration_s: float | None = None
    """Seconds of load; None = until stopped."""
    seed: int = 0
    workdir: Path = Path(".sair")
    tick_s: float | None = None
    """Monitor tick; None = the spec's."""
    nats_url: str | None = None
    redis_url: str | None = None
    qdrant_url: str | None = None
    nats_port: int | None = None
    redis_port: int | None = None
    advisory: bool = False
    retriever_engine: str = "auto"
    """The retriever's episode store: auto (numpy under the workdir, or the Qdrant server
    when a URL is given), numpy, qdrant-local (Qdrant in-process) or qdrant-server."""
    reset_state: bool | None = None
    """Start the pipeline from its spec's initial replicas (desired state, actuator record and
    leftover queued requests cleared; learned episodes are kept). None = only when the NATS
    server is the embedded one."""
    warmup_s: float = 15.0
    """Base load for this long before the measured load (not counted in the summary). The
    policy starts a few seconds into it, so its first decision sees the pipeline serving,
    not cold, and that decision settles (spec.settle_s later) on base-load telemetry: the
    first episode can be learned before any burst. 0 = no warm-up; the policy then starts
    with the load."""
    ready_timeout_s: float = 120.0
    drain_timeout_s: float = 15.0
    """After the last arrival, how long the load generator waits for completions."""
    worker_drain_timeout_s: float = 10.0
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    """Extra command-line arguments per component name."""
    log_level: str = "INFO"
    host_cap: bool = True
    """Lower each CPU stage's max_replicas to what this host's cores can run side by side
    (sair/hostcap.py); the capped spec is written to the workdir and used by everyone."""
    host_cores: int | None = None
    """Cores for `host_cap`; None = the cores this process may run on."""

    def workload_params(self, capacity_rps: float | None = None) -> dict[str, float]:
        return {**default_params(self.workload, self.duration_s, capacity_rps), **self.params}


@dataclass
class Component:
    """One child process; `start()`/`stop()` may be repeated (same command each time)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    stop_timeout_s: float = 10.0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    pids: list[int] = field(default_factory=list)
    on_spawn: Callable[[int], None] | None = None
    wanted: bool = False
    """Started and not stopped or killed on purpose: if it exits, the watchdog restarts it."""
    crash_restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        """Fork the process (call from the loop's spawner thread)."""
        if self.running():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                self.argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.starts += 1
        self.pids.append(self.proc.pid)
        if self.on_spawn is not None:
            self.on_spawn(self.proc.pid)  # its own group: pgid == pid
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))

    def signal(self, sig: int, group: bool = False) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait, SIGKILL to the whole group after the timeout; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time: killed", self.name)
        # Whatever is left in its group (a supervisor's workers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        log.info("%s stopped (exit %s)", self.name, proc.returncode)
        return proc.returncode

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        log.info("%s killed", self.name)


REAPER_SCRIPT = r"""
import os, signal, sys, time
grace_s = float(sys.argv[1])
groups = set()
for line in sys.stdin:  # one process-group id per line; EOF: the launcher has gone
    line = line.strip()
    if line.lstrip("-").isdigit():
        (groups.discard if line.startswith("-") else groups.add)(abs(int(line)))
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except OSError:
        return False
for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
    live = [g for g in groups if alive(g)]
    for g in live:
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    while live and time.monotonic() < deadline and any(alive(g) for g in live):
        time.sleep(0.1)
"""
"""The reaper: a tiny process outside every group it watches. It learns the process groups of
the components (and servers) on its stdin; when the launcher dies, however it dies, the pipe
reaches EOF and the reaper stops whatever is left: SIGTERM to each group, SIGKILL after the
grace time. PR_SET_PDEATHSIG alone sends one SIGTERM to direct children only, and a child
whose shutdown hangs (e.g. closing a NATS connection to a server that died with the
launcher) would outlive it; a supervisor's workers are in the supervisor's group, so they
are covered too."""


class Reaper:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Call from the spawner thread (like every other child)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", REAPER_SCRIPT, f"{self.grace_s:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # no Ctrl-C from the terminal, no group of ours
        )  # fmt: skip

    def watch(self, pgid: int) -> None:
        self._send(str(pgid))

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def _send(self, line: str) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        """After a clean stop: EOF, so it checks (finds nothing left) and exits."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        self.proc = None


def _proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgid) of every process in /proc (those gone meanwhile skipped)."""
    out: list[tuple[int, str, int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.append((int(entry), rest[0], int(rest[1]), int(rest[2])))
    return out


def live_descendants(root: int | None = None) -> list[int]:
    """Pids of the running (non-zombie) processes below `root` (default: this process)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, state, ppid, _pgid in _proc_stats():
        if state != "Z":
            children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


def group_members(pgids: set[int]) -> list[int]:
    """Pids of the running (non-zombie) processes whose process group is one of `pgids`."""
    return sorted(
        pid for pid, state, _ppid, pgid in _proc_stats() if state != "Z" and pgid in pgids
    )


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ClosedLoop:
    """The stack, the four services, the supervisor and the load generator, as one unit."""

    def __init__(
        self,
        config: ClosedLoopConfig,
        on_telemetry: Callable[[PipelineTelemetry], None] | None = None,
    ) -> None:
        self.config = config
        self.workdir = config.workdir.resolve()
        self.spec_file = spec_path(config.pipeline)
        self.spec: PipelineSpec = load_pipeline_spec(self.spec_file)
        if config.workload not in WORKLOADS:
            raise ClosedLoopError(
                f"workload={config.workload!r}: must be one of {', '.join(WORKLOADS)}"
            )
        if config.workload == "trace" and config.trace is None:
            raise ClosedLoopError("workload='trace' needs a trace file (--trace)")
        if config.duration_s is not None and not config.duration_s > 0:
            raise ClosedLoopError(f"duration_s={config.duration_s!r}: must be > 0")
        if config.retriever_engine not in RETRIEVER_ENGINES:
            raise ClosedLoopError(
                f"retriever_engine={config.retriever_engine!r}: must be one of "
                f"{', '.join(RETRIEVER_ENGINES)}"
            )
        from services.policy.interface import POLICY_NAMES

        if config.policy not in POLICY_NAMES:
            raise ClosedLoopError(
                f"policy={config.policy!r}: must be one of {', '.join(POLICY_NAMES)}"
            )
        self.params = config.workload_params()
        # After every check above: a refused configuration writes nothing.
        self.host_cap: list[str] = []
        if config.host_cap:
            self._cap_to_host(config.host_cores or len(os.sched_getaffinity(0)))
        self.calibration: dict[str, Any] | None = None
        self.record = RunRecord(self.spec, t0_s=time.time())
        self.on_telemetry = on_telemetry
        self.stack = EmbeddedStack(
            self.workdir, nats_url=config.nats_url, redis_url=config.redis_url,
            qdrant_url=config.qdrant_url, nats_port=config.nats_port,
            redis_port=config.redis_port,
        )  # fmt: skip
        self.urls: StackUrls | None = None
        self.components: dict[str, Component] = {}
        self.interrupted = False
        self.started_at_s: float | None = None
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sair-spawner")
        self.reaper = Reaper(grace_s=config.worker_drain_timeout_s + 5.0)
        self._server_pids: list[int] = []
        self._nc: NatsClient | None = None
        self._segment = 0
        self._stopped = False
        self._watchdog: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ helpers

    def _cap_to_host(self, cores: int) -> None:
        """Use a copy of the spec whose CPU stages fit on this host (sair/hostcap.py)."""
        text, changes = capped_spec_text(self.spec_file.read_text(), self.spec, cores)
        if not changes:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        capped = self.workdir / f"{self.spec.name}.capped.toml"
        capped.write_text(
            f"# {self.spec_file} with CPU stages capped to this host's {cores} cores "
            f"(sair up --no-host-cap to keep the original)\n{text}"
        )
        self.spec_file, self.spec = capped, load_pipeline_spec(capped)
        self.host_cap = changes
        for line in changes:
            log.info("host cap: %s", line)

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    async def _in_spawner(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._spawner, fn)

    def _env(self) -> dict[str, str]:
        assert self.urls is not None
        env = {**os.environ, **self.urls.as_env(), "SAIR_METRICS_PORT": "0",
               "PYTHONUNBUFFERED": "1", **self.config.extra_env}  # fmt: skip
        if self.urls.qdrant_url is None:
            env.pop("SAIR_QDRANT_URL", None)
        return env

    def _argv(self, name: str) -> list[str]:
        spec = str(self.spec_file)
        py = [sys.executable, "-m"]
        lvl = ["--log-level", self.config.log_level]
        if name == "monitor":
            tick = [] if self.config.tick_s is None else ["--tick-s", str(self.config.tick_s)]
            argv = [*py, "services.monitor", "--pipeline-spec", spec, *tick, *lvl]
        elif name == "retriever":
            argv = [*py, "services.retriever", "--pipeline-spec", spec,
                    "--engine", self.config.retriever_engine, *lvl]  # fmt: skip
        elif name == "actuator":
            argv = [*py, "services.actuator", "--pipeline-spec", spec, "--backend", "local", *lvl]
        elif name == "policy":
            argv = [*py, "services.policy", "--pipeline-spec", spec, "--policy",
                    self.config.policy, "--seed", str(self.config.seed), *lvl]  # fmt: skip
            if self.config.advisory:
                argv.append("--advisory")
        elif name == "supervisor":
            argv = [*py, "sair.supervisor", "--pipeline", spec, "--supervisor-id", "up",
                    "--log-dir", str(self.log_dir / "workers"),
                    "--drain-timeout-s", str(self.config.worker_drain_timeout_s), *lvl]  # fmt: skip
        elif name in ("loadgen", "warmup"):
            argv = self._loadgen_argv()  # the warm-up's is replaced before it starts
        else:
            raise ClosedLoopError(f"component={name!r}: unknown")
        return argv + self.config.extra_args.get(name, [])

    def _loadgen_argv(self) -> list[str]:
        c = self.config
        seg_s = c.duration_s if c.duration_s is not None else SEGMENT_S
        argv = [sys.executable, "-m", "sair.loadgen", "--pipeline", str(self.spec_file),
                "--process", c.workload, "--duration-s", f"{seg_s:g}",
                "--seed", str(c.seed + self._segment),
                "--run-id", f"up{int(time.time())}s{self._segment}",
                "--drain-timeout-s", f"{c.drain_timeout_s:g}",
                # One row per request (times, e2e and per-stage ms) for looking at a run later.
                "--csv", str(self.workdir / f"requests-{self._segment}.csv")]  # fmt: skip
        for key, value in self.params.items():
            argv += ["--param", f"{key}={value:g}"]
        if c.trace is not None:
            argv += ["--trace", str(c.trace)]
        return argv

    def _component(self, name: str) -> Component:
        comp = self.components.get(name)
        if comp is None:
            timeout = {"supervisor": self.config.worker_drain_timeout_s + 10.0,
                       "loadgen": 5.0, "warmup": 5.0}.get(name, 10.0)  # fmt: skip
            comp = Component(name, self._argv(name), self._env(), self.log_dir / f"{name}.log",
                             stop_timeout_s=timeout, on_spawn=self.reaper.watch)  # fmt: skip
            self.components[name] = comp
        return comp

    def _server(self, name: str) -> ManagedServer:
        server = {"nats": self.stack.nats, "redis": self.stack.redis}.get(name)
        if server is None:
            raise ClosedLoopError(f"{name}: not started by this loop (given by URL?)")
        return server

    # ------------------------------------------------------------------ public: lifecycle

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Stack, streams, observer, services and supervisor; then wait for ready workers.
        Returns False if `stop` was set or the workers were not ready in time."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started_at_s = time.time()
        await self._in_spawner(self.reaper.start)
        self.urls = await self._in_spawner(self.stack.start)
        for pid in self.stack.pids():
            self.reaper.watch(pid)
            self._server_pids.append(pid)
        await self._prepare_bus()
        await self._observe()
        for name in SERVICES[:-1]:
            await self.start_component(name)
        ready = await self.wait_ready(self.config.ready_timeout_s, stop)
        if self.config.calibrate and self.config.workload != "trace":
            # Once our own processes have started (their imports would skew it) and before
            # the load: what one replica of the first stage can serve on this machine now.
            await asyncio.to_thread(self._calibrate)
        if self.config.warmup_s > 0 and (stop is None or not stop.is_set()):
            await self._warm_up(stop)
        if stop is None or not stop.is_set():
            await self.start_component("policy")  # (already running after a warm-up)
        self._watchdog = asyncio.create_task(self._watch_services(), name="sair-up-watchdog")
        return ready

    async def _watch_services(self) -> None:
        """Restart a service or the supervisor that exited by itself (as compose's `restart:
        on-failure` would), with a doubling back-off: one that starts while NATS is down, for
        instance, exits and comes back once the bus does. `stop_component` and `kill` are on
        purpose and not undone."""
        exited_at: dict[str, float] = {}
        while True:
            await asyncio.sleep(WATCHDOG_S)
            for name in SERVICES:
                comp = self.components.get(name)
                if comp is None or not comp.wanted or comp.proc is None or comp.running():
                    exited_at.pop(name, None)
                    continue
                now = time.monotonic()
                first = exited_at.setdefault(name, now)
                backoff_s = min(RESTART_BACKOFF_MAX_S, 2.0**comp.crash_restarts)
                if now - first < backoff_s:
                    continue
                log.warning("%s exited by itself (code %s); restarting it (restart %d); see %s",
                            name, comp.proc.returncode, comp.crash_restarts + 1,
                            comp.log_path)  # fmt: skip
                comp.crash_restarts += 1
                exited_at.pop(name, None)
                await self._in_spawner(comp.spawn)

    def base_rps(self) -> float:
        """The workload's quiet rate (what the warm-up sends)."""
        p = self.params
        for key in ("base_rps", "rate_rps", "low_rps"):
            if key in p:
                return max(0.5, float(p[key]))
        return max(0.5, default_params("poisson", None, self._capacity_rps())["rate_rps"])

    def _capacity_rps(self) -> float | None:
        return None if self.calibration is None else float(self.calibration["capacity_rps"])

    async def _warm_up(self, stop: asyncio.Event | None) -> None:
        c = self.config
        self.record.warmup_until_s = math.inf
        comp = self._component("warmup")
        comp.argv = [
            sys.executable, "-m", "sair.loadgen", "--pipeline", str(self.spec_file),
            "--process", "poisson", "--param", f"rate_rps={self.base_rps():g}",
            "--duration-s", f"{c.warmup_s:g}", "--seed", str(c.seed + 10_000),
            "--run-id", f"warmup{int(time.time())}", "--drain-timeout-s", "10",
        ]  # fmt: skip
        await self.start_component("warmup")
        t0 = time.monotonic()
        limit = t0 + c.warmup_s + 30.0
        # A few seconds of traffic (the load generator itself takes ~2 s to start) before the
        # policy's first look.
        policy_at = t0 + min(5.0, c.warmup_s / 3)
        while comp.running() and time.monotonic() < limit:
            if stop is not None and stop.is_set():
                break
            if time.monotonic() >= policy_at and "policy" not in self.components:
                await self.start_component("policy")
            await asyncio.sleep(0.2)
        await self.stop_component("warmup")

    def _calibrate(self) -> None:
        ms = measure_first_stage(self.spec)
        if ms is None or not ms > 0:
            return
        cap = 1000.0 / ms
        self.calibration = {"stage": self.spec.stages[0].name, "service_ms": round(ms, 2),
                            "capacity_rps": round(cap, 2)}  # fmt: skip
        self.params = self.config.workload_params(cap)
        log.info("first stage %s: %.1f ms here -> workload %s", self.spec.stages[0].name, ms,
                 self.params)  # fmt: skip

    async def wait_ready(self, timeout_s: float, stop: asyncio.Event | None = None) -> bool:
        """Until each stage has its desired replicas ready (per the supervisor) and the monitor
        has published telemetry."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            status = self.record.replicas
            if (
                status is not None
                and self.record.latest is not None
                and all(s.ready >= max(1, s.desired) for s in status.stages)
            ):
                return True
            for name in SERVICES[:-1]:
                comp = self.components.get(name)
                if comp is not None and comp.proc is not None and comp.proc.poll() is not None:
                    raise ClosedLoopError(
                        f"{name} exited with {comp.proc.returncode} during start; "
                        f"see {comp.log_path}"
                    )
            await asyncio.sleep(0.2)
        log.warning("workers not all ready after %.0f s; starting the load anyway", timeout_s)
        return False

    async def run_load(self, stop: asyncio.Event | None = None) -> None:
        """Run the load generator until its arrivals end and it has drained (with a duration),
        or until `stop` is set (without one, segment after segment)."""
        stop = stop or asyncio.Event()
        c = self.config
        started = self.record.load_started_s = time.time()
        if self.record.warmup_until_s is not None:
            self.record.warmup_until_s = started
        if c.workload == "burst" and "first_at_s" in self.params:
            self.record.baseline_until_s = started + self.params["first_at_s"]
        elif c.duration_s is not None:
            self.record.baseline_until_s = started + 0.2 * c.duration_s
        while not stop.is_set():
            comp = self._component("loadgen")
            comp.argv = self._loadgen_argv() + self.config.extra_args.get("loadgen", [])
            await self.start_component("loadgen")
            seg_s = c.duration_s if c.duration_s is not None else SEGMENT_S
            # Arrivals end after seg_s; the generator then waits up to drain_timeout_s.
            limit = time.monotonic() + seg_s + c.drain_timeout_s + 20.0
            while comp.running() and not stop.is_set() and time.monotonic() < limit:
                await asyncio.sleep(0.2)
            arrivals_end = min(time.time(), self.record.load_started_s + seg_s * (
                self._segment + 1))  # fmt: skip
            self.record.load_ended_s = arrivals_end
            if comp.running():
                await self.stop_component("loadgen")
            self._read_loadgen_result(comp)
            self._segment += 1
            if c.duration_s is not None:
                break
        if stop.is_set():
            self.interrupted = True

    async def finish(self) -> dict[str, Any]:
        """Count stored episodes, stop everything, write summary.json and timeline.png."""
        with contextlib.suppress(Exception):
            self.record.episodes_stored = await self.episodes_stored()
        await self.stop()
        summary = self.summary()
        summary_path = self.workdir / "summary.json"
        timeline_path = self.workdir / "timeline.png"
        try:
            await asyncio.to_thread(plot_timeline, self.record, timeline_path)
            summary["timeline_path"] = str(timeline_path)
        except Exception as exc:  # the run's figures matter more than its picture
            log.warning("timeline plot failed: %s", exc)
            summary["timeline_path"] = None
        summary["summary_path"] = str(summary_path)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    async def stop(self) -> None:
        """Ordered and bounded: load generator, policy, actuator, supervisor (drains workers),
        monitor and retriever, observer, servers. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for name in STOP_ORDER[:5]:
            await self.stop_component(name)
        await asyncio.gather(*(self.stop_component(n) for n in STOP_ORDER[5:]))
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 5)
        await self._in_spawner(self.stack.stop)
        await asyncio.to_thread(self.reaper.close)
        self._spawner.shutdown(wait=True)

    # ------------------------------------------------------------------ public: fault tests

    async def start_component(self, name: str) -> None:
        """Start a component (or a server this loop started) that is not running."""
        if name in SERVERS:
            server = self._server(name)
            await self._in_spawner(server.start)
            if server.pid is not None:
                self.reaper.watch(server.pid)
                self._server_pids.append(server.pid)
            return
        comp = self._component(name)
        comp.wanted = name in SERVICES
        await self._in_spawner(comp.spawn)

    async def stop_component(self, name: str) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after the component's timeout)."""
        if name in SERVERS:
            server = self._server(name)
            await asyncio.to_thread(server.stop)
            return
        comp = self.components.get(name)
        if comp is not None:
            comp.wanted = False
            await asyncio.to_thread(comp.stop)

    async def kill(self, name: str) -> None:
        """SIGKILL, as a crash: no clean-up. The supervisor's workers then get SIGTERM
        (PR_SET_PDEATHSIG) and drain by themselves."""
        if name in SERVERS:
            await asyncio.to_thread(self._server(name).kill)
            return
        comp = self.components.get(name)
        if comp is None:
            raise ClosedLoopError(f"component={name!r}: not started")
        comp.wanted = False  # a crash on purpose: the test restarts it when it wants
        await asyncio.to_thread(comp.kill)

    async def restart(self, name: str) -> None:
        """Stop (or reap, after `kill`) and start again with the same arguments."""
        await self.stop_component(name)
        await self.start_component(name)

    def pids(self) -> dict[str, int | None]:
        """The live pid of every component and server (None when not running)."""
        out: dict[str, int | None] = {n: c.pid for n, c in self.components.items()}
        for name in SERVERS:
            server = {"nats": self.stack.nats, "redis": self.stack.redis}[name]
            if server is not None:
                out[name] = server.pid if server.running() else None
        return out

    def processes(self) -> dict[int, str]:
        """Every live process of this loop, workers included (whatever is in the process
        group of a component, a server or the reaper it started): pid -> command line."""
        groups = set(self.started_pids())
        if self.reaper.proc is not None:
            groups.add(self.reaper.proc.pid)
        out: dict[int, str] = {}
        for pid in group_members(groups):
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                out[pid] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        return out

    def started_pids(self) -> list[int]:
        """Every pid this loop started directly (components over all restarts, servers)."""
        pids = [p for c in self.components.values() for p in c.pids]
        return sorted(set(pids + self.stack.pids() + self._server_pids))

    # ------------------------------------------------------------------ the bus

    async def _prepare_bus(self) -> None:
        assert self.urls is not None
        nc = await nats.connect(self.urls.nats_url, name="sair-up-setup")
        try:
            js = nc.jetstream()
            await ensure_core_streams(js)
            await ensure_pipeline_streams(js, self.spec)
            reset = self.config.reset_state
            if reset is None:
                reset = self.config.nats_url is None
            if reset:
                await self._reset_state(js)
        finally:
            await nc.close()

    async def _reset_state(self, js: Any) -> None:
        p = self.spec.name
        desired = await js.key_value(subjects.DESIRED_BUCKET)
        state = await js.key_value(subjects.STATE_BUCKET)
        for stage in self.spec.stage_names:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.NotFoundError):
                await desired.delete(subjects.desired_key(p, stage))
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.NotFoundError):
            await state.delete(f"actuator.{p}")
        await js.purge_stream(subjects.pipe_stream(p))

    async def _observe(self) -> None:
        assert self.urls is not None
        self._nc = nc = await nats.connect(
            self.urls.nats_url, name="sair-up", max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )  # fmt: skip
        p = self.spec.name
        rec = self.record

        def on_telemetry(t: PipelineTelemetry) -> None:
            rec.on_telemetry(t)
            if self.on_telemetry is not None:
                self.on_telemetry(t)

        await nc.subscribe(subjects.telemetry(p), cb=self._typed(PipelineTelemetry, on_telemetry))
        await nc.subscribe(subjects.actions(p), cb=self._typed(ScalingAction, rec.on_action))
        await nc.subscribe(subjects.action_results(p), cb=self._typed(ActionResult, rec.on_result))
        await nc.subscribe(subjects.replicas(p), cb=self._typed(ReplicaStatus, rec.on_replicas))
        await nc.subscribe(subjects.pipe_done(p), cb=self._typed(Completion, rec.on_completion))

        async def on_episode(_msg: Msg) -> None:
            rec.on_episode()

        await nc.subscribe(subjects.episodes(p), cb=on_episode)

        async def on_request(msg: Msg) -> None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                data = json.loads(msg.data)
                rec.on_request(str(data["request_id"]), float(data["created_ts_s"]))

        await nc.subscribe(subjects.pipe_stage(p, self.spec.stages[0].name), cb=on_request)
        await nc.flush()

    @staticmethod
    def _typed(model: type[M], handle: Callable[[M], None]) -> Callable[[Msg], Any]:
        async def cb(msg: Msg) -> None:
            try:
                parsed = model.model_validate_json(msg.data)
            except ValidationError as exc:
                log.debug("ignored malformed %s on %s: %s", model.__name__, msg.subject, exc)
                return
            handle(parsed)

        return cb

    async def episodes_stored(self, timeout_s: float = 5.0) -> int | None:
        """How many episodes the retriever holds for the pipeline (a real retrieval)."""
        if self._nc is None or self._nc.is_closed:
            return None
        req = RetrieveRequest(
            pipeline=self.spec.name, encoding_version=ENCODING_VERSION,
            context=[0.0] * context_dim(self.spec), m=1,
        )  # fmt: skip
        msg = await self._nc.request(
            subjects.retrieve(self.spec.name), req.model_dump_json().encode(), timeout=timeout_s
        )
        reply = RetrieveReply.model_validate_json(msg.data)
        return reply.stored

    def _read_loadgen_result(self, comp: Component) -> None:
        """The load generator prints its result as the last JSON line of its output."""
        try:
            lines = comp.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in reversed(lines[-50:]):
            if line.startswith("{") and '"sent"' in line:
                with contextlib.suppress(ValueError):
                    self.record.loadgen.append(json.loads(line))
                return

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        s = self.record.summary()
        s.update(
            workload=self.config.workload,
            workload_params=self.params,
            retriever_engine=self.config.retriever_engine,
            calibration=self.calibration,
            policy=self.config.policy,
            seed=self.config.seed,
            duration_s=self.config.duration_s,
            interrupted=self.interrupted,
            workdir=str(self.workdir),
            logs=str(self.log_dir),
            pids=self.started_pids(),
            host_cap=self.host_cap,
            service_restarts={n: c.crash_restarts for n, c in self.components.items()
                              if c.crash_restarts},
        )  # fmt: skip
        return s

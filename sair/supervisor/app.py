"""The `local` scaling backend's agent: worker processes per stage, matched to the KV desired state.

Every `poll_s` it reads `sair_desired/<pipeline>.<stage>` (`StageDesired`; absent = the
spec's initial_replicas), compares it with its live replicas and starts
`python -m sair.worker` processes or sends SIGTERM (the worker drains and exits). A worker
counts as `ready` once its own `WorkerReport` says so (readiness comes from the same reports
the monitor reads: no second channel to keep in sync). A replica that exits without being
asked is a crash: counted, and the next start waits an exponential backoff. Every second a
`ReplicaStatus` goes out on `sair.replicas.<pipeline>`.

Workers get PR_SET_PDEATHSIG (SIGTERM), so even a SIGKILLed supervisor leaves no workers
behind; on SIGTERM the supervisor drains all workers (SIGKILL after `drain_timeout_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from pydantic import ValidationError

from sair.runtime import ServiceRuntime
from sair.settings import Settings
from sair.stack import _die_with_parent
from sair.worker.app import ensure_pipeline_exists
from schemas import subjects
from schemas.messages import ReplicaStatus, StageDesired, StageReplicas, WorkerReport
from schemas.pipeline import PipelineSpec, StageSpec

from . import logic

log = logging.getLogger("sair.supervisor")

SERVICE = "supervisor"


@dataclass
class Replica:
    worker_id: str
    proc: asyncio.subprocess.Process
    started_s: float
    state: logic.ReplicaState = "starting"
    stop_sent_s: float | None = None
    log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.returncode is None


@dataclass
class StageSlot:
    pipeline: str
    source: str
    """What the worker gets as --pipeline (built-in name or spec path)."""
    spec: StageSpec
    desired: int
    replicas: list[Replica] = field(default_factory=list)
    crashed_total: int = 0
    recent_crashes: int = 0
    next_start_s: float = 0.0


class Supervisor:
    def __init__(
        self,
        specs: dict[str, PipelineSpec],
        settings: Settings,
        supervisor_id: str = "sup",
        stages: set[str] | None = None,
        worker_args: list[str] | None = None,
        log_dir: Path | None = None,
        poll_s: float = 0.25,
        drain_timeout_s: float = 30.0,
    ) -> None:
        """`specs` maps what a worker is told (--pipeline: a built-in name or a TOML path)
        to the spec; `stages` limits this supervisor to some stage names (multi-host)."""
        self.settings = settings
        self.supervisor_id = supervisor_id
        self.worker_args = list(worker_args or [])
        self.log_dir = log_dir
        self.poll_s = poll_s
        self.drain_timeout_s = drain_timeout_s
        self.specs = {spec.name: spec for spec in specs.values()}
        self.slots: dict[tuple[str, str], StageSlot] = {}
        for source, spec in specs.items():
            for st in spec.stages:
                if stages is None or st.name in stages:
                    self.slots[(spec.name, st.name)] = StageSlot(
                        spec.name, source, st, desired=st.initial_replicas
                    )
        self.rt = ServiceRuntime(SERVICE, settings)
        self._kv: KeyValue | None = None
        self._stopping = asyncio.Event()
        self._counter = 0
        self._by_id: dict[str, tuple[StageSlot, Replica]] = {}

    # ------------------------------------------------------------------ public

    def replicas(self, pipeline: str, stage: str) -> list[Replica]:
        return list(self.slots[(pipeline, stage)].replicas)

    def stop(self) -> None:
        self._stopping.set()

    async def start(self) -> None:
        await self.rt.start()
        for spec in self.specs.values():
            await ensure_pipeline_exists(self.rt.js, spec)
            await self.rt.nc.subscribe(subjects.reports_all(spec.name), cb=self._on_report)
        self._kv = await self.rt.js.key_value(subjects.DESIRED_BUCKET)

    async def run(self) -> None:
        """Reconcile until stop(); then drain every worker and close."""
        status = asyncio.create_task(self._status_loop(), name="replica-status")
        try:
            while not self._stopping.is_set():
                try:
                    await self.reconcile_once()
                except Exception:
                    log.exception("reconcile failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.poll_s)
        finally:
            status.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await status
            await self.shutdown()

    async def serve_forever(self) -> None:
        """start() + run(), stopping on SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
        await self.start()
        await self.run()

    # ------------------------------------------------------------------ reconcile

    async def reconcile_once(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            await self._read_desired(slot)
            self._reap(slot, now)
            plan = logic.reconcile(
                slot.desired,
                [logic.ReplicaView(r.worker_id, r.state, r.started_s) for r in slot.replicas],
                slot.spec.max_replicas,
                can_start=now >= slot.next_start_s,
            )
            for _ in range(plan.start):
                await self._start_worker(slot)
            for wid in plan.stop:
                self._stop_worker(slot, wid)
            self._enforce_drain_timeout(slot, now)

    async def _read_desired(self, slot: StageSlot) -> None:
        assert self._kv is not None
        key = subjects.desired_key(slot.pipeline, slot.spec.name)
        try:
            entry = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            slot.desired = slot.spec.initial_replicas
            return
        except Exception as exc:  # bus away: keep the last known desired count
            log.debug("desired %s unreadable: %s", key, exc)
            return
        if entry.value is None:
            return
        try:
            want = StageDesired.model_validate_json(entry.value)
        except ValidationError as exc:
            await self.rt.dead_letter(f"kv.{subjects.DESIRED_BUCKET}.{key}", entry.value,
                                      f"StageDesired: {exc.errors()[0]['msg']}")  # fmt: skip
            return
        if want.replicas > slot.spec.max_replicas and want.replicas != slot.desired:
            log.warning("%s desired %d > max_replicas %d: clamped", key, want.replicas,
                        slot.spec.max_replicas)  # fmt: skip
        slot.desired = logic.clamp_desired(want.replicas, slot.spec.max_replicas)

    def _reap(self, slot: StageSlot, now: float) -> None:
        for r in list(slot.replicas):
            if r.alive():
                if r.state == "ready" and now - r.started_s > logic.CRASH_FORGET_S:
                    slot.recent_crashes = 0
                continue
            slot.replicas.remove(r)
            self._by_id.pop(r.worker_id, None)
            if r.log_file is not None:
                r.log_file.close()
            if r.stop_sent_s is None:  # nobody asked it to go: a crash
                slot.crashed_total += 1
                slot.recent_crashes += 1
                delay = logic.restart_backoff_s(slot.recent_crashes)
                slot.next_start_s = now + delay
                log.warning("worker %s exited with %s; restart in %.1f s",
                            r.worker_id, r.proc.returncode, delay)  # fmt: skip

    async def _start_worker(self, slot: StageSlot) -> None:
        self._counter += 1
        wid = f"{slot.spec.name}-{self.supervisor_id}-{self._counter}"
        cmd = [sys.executable, "-m", "sair.worker", "--pipeline", slot.source,
               "--stage", slot.spec.name, "--worker-id", wid, *self.worker_args]  # fmt: skip
        env = {
            # One replica = one stage slot of cpu_cores; BLAS thread pools would fight the
            # other replicas for the same cores.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            **os.environ,
            "SAIR_NATS_URL": self.settings.nats_url,
            "SAIR_REDIS_URL": self.settings.redis_url,
            "SAIR_METRICS_PORT": "off",
        }
        preload = os.environ.get("SAIR_GPU_PRELOAD")
        if preload and slot.spec.kind == "gpu":
            # The interceptor throttles a real model's kernel launches to the stage's rho; it
            # reads its bucket key from SAIR_PIPELINE / SAIR_STAGE.
            env["LD_PRELOAD"] = " ".join(filter(None, (preload, env.get("LD_PRELOAD"))))
            env["SAIR_PIPELINE"] = slot.pipeline
            env["SAIR_STAGE"] = slot.spec.name
        log_file: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = (self.log_dir / f"{wid}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file, stderr=asyncio.subprocess.STDOUT if log_file else None,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        rep = Replica(wid, proc, started_s=time.monotonic(), log_file=log_file)
        slot.replicas.append(rep)
        self._by_id[wid] = (slot, rep)
        log.info("started %s (pid %d)", wid, proc.pid)

    def _stop_worker(self, slot: StageSlot, worker_id: str) -> None:
        for r in slot.replicas:
            if r.worker_id == worker_id and r.stop_sent_s is None:
                r.state = "draining"
                r.stop_sent_s = time.monotonic()
                with contextlib.suppress(ProcessLookupError):
                    r.proc.send_signal(signal.SIGTERM)
                log.info("draining %s", worker_id)

    def _enforce_drain_timeout(self, slot: StageSlot, now: float) -> None:
        for r in slot.replicas:
            overdue = r.stop_sent_s is not None and now - r.stop_sent_s > self.drain_timeout_s
            if overdue and r.alive():
                log.warning("worker %s did not drain in %.0f s: killed", r.worker_id,
                            self.drain_timeout_s)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    r.proc.kill()

    async def _on_report(self, msg: Msg) -> None:
        try:
            rep = WorkerReport.model_validate_json(msg.data)
        except ValidationError:
            return  # the monitor dead-letters malformed reports; here they are just ignored
        found = self._by_id.get(rep.worker_id)
        if found is None:
            return
        _, replica = found
        if replica.state == "draining":
            return
        if rep.state in ("ready", "draining"):
            replica.state = rep.state

    # ------------------------------------------------------------------ status and exit

    def status(self, pipeline: str) -> ReplicaStatus:
        stages = []
        for (p, _), slot in self.slots.items():
            if p != pipeline:
                continue
            live = [r for r in slot.replicas if r.alive()]
            stages.append(StageReplicas(
                stage=slot.spec.name, desired=slot.desired,
                starting=sum(1 for r in live if r.state == "starting"),
                ready=sum(1 for r in live if r.state == "ready"),
                draining=sum(1 for r in live if r.state == "draining"),
                crashed_total=slot.crashed_total,
            ))  # fmt: skip
        return ReplicaStatus(pipeline=pipeline, supervisor_id=self.supervisor_id,
                             ts_s=time.time(), stages=stages)  # fmt: skip

    async def _status_loop(self) -> None:
        while True:
            for name in self.specs:
                if any(p == name for p, _ in self.slots):
                    with contextlib.suppress(Exception):
                        await self.rt.publish(subjects.replicas(name), self.status(name))
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        """SIGTERM every worker, wait for them to drain, SIGKILL stragglers, close."""
        replicas = [r for slot in self.slots.values() for r in slot.replicas]
        for slot in self.slots.values():
            for r in slot.replicas:
                self._stop_worker(slot, r.worker_id)
        waits = [asyncio.create_task(r.proc.wait()) for r in replicas]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=self.drain_timeout_s)
            for r in replicas:
                if r.alive():
                    with contextlib.suppress(ProcessLookupError):
                        r.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for slot in self.slots.values():
            for r in slot.replicas:
                if r.log_file is not None:
                    r.log_file.close()
            slot.replicas.clear()
        self._by_id.clear()
        await self.rt.close()



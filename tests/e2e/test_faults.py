"""Fault tests on the running closed loop (what `sair up` runs), through the `ClosedLoop` API.

Real nats-server (JetStream on disk), Valkey, Qdrant in local mode, the four services, the
supervisor with real worker processes and the load generator, all as child processes:
1. NATS SIGKILLed and restarted mid-run (same port, same JetStream store): the services
   reconnect, no action is applied twice, every request sent goes through the pipeline
   and reaches the load generator (what core NATS did not bring it, it reads back from the
   pipeline's done stream).
2. The policy SIGKILLed mid-run: the actuator keeps the last state and requests keep
   completing; on restart the strategic loop and the reflex (both live in the policy
   service, docs/policy.md) resume.
3. The LLM endpoint unreachable: the `llm` policy falls back to the embedded one and its
   actions say so (`source="embedded"`, `fallback_reason` naming the failure).
Rates are modest and sized to this machine where it matters (the first stage is timed).
Each test leaves nothing running, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sair.closedloop import (
    ClosedLoop,
    ClosedLoopConfig,
    measure_first_stage,
    pid_alive,
    spec_path,
)
from sair.pipelines import load_spec
from sair.stack import free_port
from schemas import subjects
from schemas.messages import ActionResult, ScalingAction, StageAction, StageDesired
from schemas.pipeline import load_pipeline_spec
from services.actuator.state import ActuatorRecord, record_key
from tests.e2e.test_up import _all as read_stream

PIPELINE = "imgcls"
SERVICE_NAMES = ("monitor", "retriever", "actuator", "policy", "supervisor")
APPLIED = ("applied", "clamped")


# --------------------------------------------------------------------------- harness


class Harness:
    """A `ClosedLoop` that is always stopped, with whatever it left afterwards in `left`."""

    def __init__(self, tmp_path: Path, **config: Any) -> None:
        defaults: dict[str, Any] = {
            "workdir": tmp_path / "loop", "pipeline": PIPELINE, "calibrate": False,
            "warmup_s": 0.0, "retriever_engine": "qdrant-local", "drain_timeout_s": 45.0,
            "log_level": "INFO",
        }  # fmt: skip
        self.cl = ClosedLoop(ClosedLoopConfig(**{**defaults, **config}))
        self.seen: set[int] = set()
        self.left: list[int] = []
        self.load: asyncio.Task[None] | None = None
        self.probe: NatsClient | None = None
        self.retrieves: list[float] = []
        """Wall-clock times of the retrieval requests seen on `sair.retrieve.<p>` (the policy
        asks the retriever before each strategic decision of `sair`/`llm`)."""

    async def __aenter__(self) -> Harness:
        try:
            ready = await self.cl.start()
            assert ready, f"workers not ready\n{self.why()}"
            assert self.cl.urls is not None
            self.probe = await nats.connect(
                self.cl.urls.nats_url, name="fault-probe", max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )  # fmt: skip

            async def on_retrieve(_msg: Msg) -> None:
                self.retrieves.append(time.time())

            await self.probe.subscribe(subjects.retrieve(PIPELINE), cb=on_retrieve)
            await self.probe.flush()
        except BaseException:
            await self._cleanup()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._cleanup()

    def note_pids(self) -> None:
        self.seen.update(self.cl.processes())

    async def _cleanup(self) -> None:
        self.note_pids()
        if self.load is not None and not self.load.done():
            self.load.cancel()
            with contextlib.suppress(BaseException):
                await self.load
        if self.probe is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.probe.close(), 5)
        await self.cl.stop()
        self.left = await asyncio.to_thread(_wait_gone, self.seen | set(self.cl.started_pids()))
        for pid in self.left:  # never leave anything behind, even after a failed stop
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def start_load(self) -> None:
        self.load = asyncio.create_task(self.cl.run_load())

    async def finish_load(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the load generator to end; its own count (sent/completed/lost)."""
        assert self.load is not None
        await asyncio.wait_for(self.load, timeout_s)
        self.note_pids()
        assert self.cl.record.loadgen, f"no load generator result\n{self.why()}"
        return self.cl.record.loadgen[-1]

    def completed(self) -> int:
        return len(self.cl.record.completed_ids)

    def worker_pids(self) -> set[int]:
        return {p for p, cmd in self.cl.processes().items() if "sair.worker" in cmd}

    def why(self, *extra: Any) -> str:
        """The record a failed assertion shows: summary, recent actions, log tails."""
        rec = self.cl.record
        lines = [json.dumps(rec.summary(), default=str)]
        lines += [f"action {m.t_s:.1f}s {m.source} {m.action_id} {m.targets} "
                  f"-> {rec.result_of.get(m.action_id)}" for m in list(rec.marks)[-12:]]  # fmt: skip
        lines += [str(x) for x in extra]
        for name in ("actuator", "policy", "loadgen"):
            lines.append(f"--- {name}.log")
            lines.append(_tail(self.cl.log_dir / f"{name}.log", 15))
        return "\n".join(lines)


def _wait_gone(pids: set[int], timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return []
        time.sleep(0.2)
    return sorted(p for p in pids if pid_alive(p))


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


async def _wait(cond: Callable[[], bool], timeout_s: float, what: str, h: Harness) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{h.why()}")
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- the bus


async def _connect(h: Harness) -> NatsClient:
    assert h.cl.urls is not None
    return await nats.connect(h.cl.urls.nats_url, name="fault-check")


async def _stream(nc: NatsClient, stream: str, subject: str) -> list[bytes]:
    """Every message of `subject` in `stream`, from the start."""
    return await read_stream(nc.jetstream(), stream, subject)


async def _audit(nc: NatsClient) -> tuple[list[ScalingAction], dict[str, list[ActionResult]]]:
    """The audit log: every action, and every result per action id."""
    actions = [ScalingAction.model_validate_json(m) for m in
               await _stream(nc, subjects.ACTIONS_STREAM, subjects.actions(PIPELINE))]  # fmt: skip
    results: dict[str, list[ActionResult]] = {}
    for m in await _stream(nc, subjects.ACTIONS_STREAM, subjects.action_results(PIPELINE)):
        r = ActionResult.model_validate_json(m)
        results.setdefault(r.action_id, []).append(r)
    return actions, results


async def _state(nc: NatsClient, stages: tuple[str, ...]) -> tuple[
    dict[str, StageDesired], ActuatorRecord | None
]:  # fmt: skip
    """The desired replicas the supervisor follows (KV `sair_desired`) and the actuator's
    record (KV `sair_state`)."""
    js = nc.jetstream()
    desired_kv = await js.key_value(subjects.DESIRED_BUCKET)
    desired: dict[str, StageDesired] = {}
    for stage in stages:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await desired_kv.get(subjects.desired_key(PIPELINE, stage))
            if entry.value:
                desired[stage] = StageDesired.model_validate_json(entry.value)
    state_kv = await js.key_value(subjects.STATE_BUCKET)
    try:
        entry = await state_kv.get(record_key(PIPELINE))
    except nats.js.errors.KeyNotFoundError:
        return desired, None
    record = ActuatorRecord.model_validate_json(entry.value) if entry.value else None
    return desired, record


def _settled(h: Harness, desired: dict[str, StageDesired]) -> bool:
    """The supervisor runs each stage's desired replicas (from the KV, else the spec's
    initial count), all ready, none starting or draining."""
    status = h.cl.record.replicas
    if status is None:
        return False
    want = {st.name: desired[st.name].replicas if st.name in desired else st.initial_replicas
            for st in h.cl.spec.stages}  # fmt: skip
    steady = all(s.desired == want.get(s.stage) and s.ready == s.desired and not s.starting
                 and not s.draining for s in status.stages)  # fmt: skip
    return steady and len(h.worker_pids()) == sum(want.values())


def _spec_deciding_every(tmp_path: Path, interval_s: float) -> Path:
    """The reference imgcls spec with a strategic decision every `interval_s` (and rewards
    measured as soon), so that a short run holds several."""
    text = spec_path(PIPELINE).read_text()
    head = f"control_interval_s = {interval_s}\nsettle_s = {interval_s}\n"
    path = tmp_path / f"{PIPELINE}.toml"
    path.write_text(text.replace("slo_p99_ms = ", head + "slo_p99_ms = ", 1))
    assert load_pipeline_spec(path).control_interval_s == interval_s
    return path


def _first_stage_capacity_rps() -> float:
    """Requests/s the first stage's handler alone serves on this machine now."""
    ms = measure_first_stage(load_spec(PIPELINE))
    assert ms is not None and ms > 0, ms
    return 1000.0 / ms


def _policy_metric(h: Harness, name: str) -> float | None:
    """One of the policy's gauges, read from its Prometheus endpoint (the port it logged)."""
    text = (h.cl.log_dir / "policy.log").read_text(errors="replace")
    ports = re.findall(r"metrics on port (\d+)", text)
    if not ports:
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[-1]}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    found = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", body, re.MULTILINE)
    return float(found.group(1)) if found else None


def _manual_action(stages: dict[str, int]) -> ScalingAction:
    return ScalingAction(
        pipeline=PIPELINE, action_id=f"{PIPELINE}-fault-{uuid.uuid4().hex[:12]}",
        ts_s=time.time(), source="manual", policy="fault-test",
        rationale="fault test: an action around a NATS restart",
        stages=[StageAction(stage=s, target_replicas=n) for s, n in stages.items()],
    )  # fmt: skip


async def _publish_action(nc: NatsClient, action: ScalingAction) -> None:
    await nc.jetstream().publish(
        subjects.actions(PIPELINE), action.model_dump_json().encode(),
        headers={"Nats-Msg-Id": action.action_id}, timeout=5.0,
    )  # fmt: skip


async def _wait_result(h: Harness, action_id: str, what: str, timeout_s: float = 60.0) -> None:
    """Until the audit log holds a result for `action_id`."""
    deadline = time.monotonic() + timeout_s
    while True:
        nc = await _connect(h)
        try:
            _actions, results = await _audit(nc)
        finally:
            await nc.close()
        if results.get(action_id):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no result in {timeout_s} s for {what}\n{h.why()}")
        await asyncio.sleep(1.0)


def _applied_once(
    actions: list[ScalingAction], results: dict[str, list[ActionResult]]
) -> tuple[list[str], list[str]]:
    """(ids applied more than once, ids without any result)."""
    twice = [a.action_id for a in actions
             if sum(r.status in APPLIED for r in results.get(a.action_id, [])) > 1]  # fmt: skip
    unanswered = [a.action_id for a in actions if not results.get(a.action_id)]
    return twice, unanswered


async def _check_state_consistent(h: Harness, nc: NatsClient) -> None:
    """KV desired == the actuator's record == what the supervisor runs, and each desired
    value comes from an action that was applied (exactly once)."""
    stages = h.cl.spec.stage_names
    actions, results = await _audit(nc)
    desired, record = await _state(nc, stages)
    why = h.why(f"desired {desired}", f"record {record}")
    assert record is not None, why
    assert len(record.seen_ids) == len(set(record.seen_ids)), why
    assert {a.action_id for a in actions} <= set(record.seen_ids), why
    for s in record.desired:
        held = desired.get(s.stage)
        assert held is not None and held.replicas == s.target_replicas, (s, why)
    for stage, value in desired.items():
        if value.action_id is None:
            continue
        applied = [r for r in results.get(value.action_id, []) if r.status in APPLIED]
        assert len(applied) == 1, (stage, value, why)
        assert any(a.stage == stage and a.target_replicas == value.replicas
                   for a in applied[0].applied), (stage, value, applied, why)  # fmt: skip

    def supervisor_follows() -> bool:
        status = h.cl.record.replicas
        if status is None:
            return False
        by_stage = {s.stage: s.desired for s in status.stages}
        return all(by_stage.get(st) == v.replicas for st, v in desired.items())

    await _wait(supervisor_follows, 20, f"the supervisor to run the desired {desired}", h)


async def _captured_ids(nc: NatsClient, prefix: str) -> set[str]:
    """Request ids (of one load generator run) with a completion kept in the done stream (the
    completions the workers published on core NATS, as the server received them)."""
    out: set[str] = set()
    for data in await _stream(nc, subjects.done_stream(PIPELINE), subjects.pipe_done(PIPELINE)):
        request_id = str(json.loads(data).get("request_id", ""))
        if request_id.startswith(prefix):
            out.add(request_id)
    return out


def _run_id(h: Harness) -> str:
    argv = h.cl.components["loadgen"].argv
    return argv[argv.index("--run-id") + 1]


async def _pipe_backlog(nc: NatsClient) -> int:
    """Requests still in the pipeline's work queue (acked ones are removed)."""
    info = await nc.jetstream().stream_info(subjects.pipe_stream(PIPELINE))
    return int(info.state.messages)


# --------------------------------------------------------------------------- 1. NATS


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_nats_killed_and_restarted_mid_run(tmp_path: Path) -> None:
    """SIGKILL the NATS server under load with an action just published, restart it on the
    same port and store: everyone reconnects, every action is applied at most once and the
    state agrees everywhere, every request sent completes."""
    down_s = 5.0
    async with Harness(tmp_path, workload="poisson", params={"rate_rps": 5.0},
                       duration_s=45) as h:  # fmt: skip
        cl = h.cl
        h.start_load()
        await _wait(lambda: h.completed() >= 10, 60, "requests completing", h)
        # Every service is up before the bus dies (a crash during start-up is another test).
        await _wait(lambda: len(h.retrieves) >= 1, 60, "the policy's first decision", h)
        await _wait(lambda: "actuator started" in _tail(cl.log_dir / "actuator.log", 200), 30,
                    "the actuator's consumer", h)  # fmt: skip
        assert await cl.episodes_stored(timeout_s=10) is not None, h.why()
        services = {n: cl.pids()[n] for n in SERVICE_NAMES}
        workers = h.worker_pids()
        h.note_pids()

        nc = await _connect(h)
        in_flight = _manual_action({"pre": 2})
        try:
            await _publish_action(nc, in_flight)  # stored; the actuator is at it as NATS dies
        finally:
            await nc.close()
        await cl.kill("nats")
        killed_at = time.time()
        assert cl.pids()["nats"] is None
        await asyncio.sleep(down_s)
        await cl.restart("nats")
        restarted_at = time.time()

        # Telemetry resumes, with every stage's workers reporting again.
        def fresh_ticks() -> list[Any]:
            return [p for p in cl.record.timeline if p.t_s + cl.record.t0_s > restarted_at]

        await _wait(lambda: len(fresh_ticks()) >= 3, 60, "telemetry after the restart", h)
        await _wait(lambda: all(s.ready >= 1 for s in fresh_ticks()[-1].stages.values()), 30,
                    "every stage ready again in the telemetry", h)  # fmt: skip
        # The workers lived through it (none was restarted by the supervisor).
        assert workers <= h.worker_pids(), h.why(f"workers before {workers}")
        # The action in flight at the kill got its result; a new one does too.
        # (Read from the audit log: the parent's own observer is a core-NATS subscriber and
        # misses what is published before it has reconnected.)
        await _wait_result(h, in_flight.action_id, "the action published before the kill")
        nc = await _connect(h)
        after = _manual_action({"post": 2})
        try:
            await _publish_action(nc, after)
        finally:
            await nc.close()
        await _wait_result(h, after.action_id, "an action published after the restart")
        # The retriever answers again (a real retrieval over the restarted bus).
        assert await cl.episodes_stored(timeout_s=10) is not None, h.why()

        gen = await h.finish_load(cl.config.drain_timeout_s + 120)
        why = h.why(f"loadgen {gen}", f"killed at {killed_at:.1f}, back at {restarted_at:.1f}")
        # No component died with the bus: same processes, each reconnected by itself.
        assert {n: cl.pids()[n] for n in SERVICE_NAMES} == services, why
        for name in SERVICE_NAMES:
            text = (cl.log_dir / f"{name}.log").read_text(errors="replace")
            assert "reconnected to NATS" in text, (name, why)

        nc = await _connect(h)
        try:
            backlog = await _pipe_backlog(nc)
            actions, results = await _audit(nc)
            twice, unanswered = _applied_once(actions, results)
            statuses = {a.action_id: [r.status for r in results.get(a.action_id, [])]
                        for a in actions}  # fmt: skip
            assert twice == [] and unanswered == [], (statuses, why)
            for mine in (in_flight, after):
                assert sum(s in APPLIED for s in statuses[mine.action_id]) == 1, (statuses, why)
            await _check_state_consistent(h, nc)
            captured = await _captured_ids(nc, _run_id(h) + "-")
        finally:
            await nc.close()

        # The pipeline lost no request: JetStream kept the queued ones over the restart, every
        # request sent went through all stages (a completion reached the server for each) and
        # nothing is left in the queues.
        why = f"{why}\nbacklog {backlog}, completions at the server {len(captured)}"
        assert gen["sent"] > 0 and gen["publish_failures"] == 0, why
        assert backlog == 0 and len(captured) == gen["sent"], why
        # ... and the load generator got every result (those core NATS did not bring it while
        # it was disconnected, it read back from the done stream).
        assert gen["completed"] == gen["sent"] and gen["lost"] == 0, why
    assert h.left == [], h.left


# --------------------------------------------------------------------------- 2. policy


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_policy_killed_mid_run_then_restarted(tmp_path: Path) -> None:
    """While the policy is dead the actuator holds the last state and the pipeline serves;
    restarted, it decides again (strategic) and its reflex answers a burst."""
    down_s = 15.0
    # A short burst of twice what one replica of the first stage serves here (measured now),
    # after the restart: more than the pipeline then runs, so its queues grow at once.
    cap_rps = _first_stage_capacity_rps()
    params = {"base_rps": round(min(4.0, max(1.0, 0.15 * cap_rps)), 1),
              "burst_rps": round(min(40.0, max(10.0, 2.0 * cap_rps)), 1),
              "first_at_s": 36.0, "width_s": 8.0, "period_s": 1000.0}  # fmt: skip
    async with Harness(tmp_path, workload="burst", duration_s=58, params=params) as h:
        cl = h.cl
        h.start_load()
        await _wait(lambda: h.completed() >= 5, 60, "requests completing", h)
        await _wait(lambda: len(h.retrieves) >= 1, 30, "a strategic decision (retrieval)", h)
        await cl.kill("policy")
        killed_at = time.time()
        assert cl.pids()["policy"] is None
        # What the policy decided before it died is carried out and running ...
        await asyncio.sleep(1.0)  # an action published just before the kill reaches the observer
        rec = cl.record
        await _wait(lambda: all(m.action_id in rec.result_of for m in rec.marks), 30,
                    "results of the actions published before the kill", h)  # fmt: skip
        nc = await _connect(h)
        try:
            desired0, record0 = await _state(nc, cl.spec.stage_names)
        finally:
            await nc.close()
        await _wait(lambda: _settled(h, desired0), 60, f"the workers to run {desired0}", h)
        workers = h.worker_pids()
        h.note_pids()
        actions_before = rec.actions_total
        done_before = h.completed()
        await asyncio.sleep(down_s)

        nc = await _connect(h)
        try:
            desired1, record1 = await _state(nc, cl.spec.stage_names)
        finally:
            await nc.close()
        why = h.why(f"before {desired0}", f"after {desired1}", f"record {record1}")
        # ... and then the actuator holds that last state: nothing new decided or changed.
        assert [t for t in h.retrieves if t > killed_at + 1.0] == [], why
        assert rec.actions_total == actions_before, why
        assert desired1 == desired0 and record1 == record0, why
        # The pipeline keeps serving: same workers, requests completing.
        assert cl.pids()["actuator"] is not None and cl.pids()["supervisor"] is not None, why
        assert h.worker_pids() == workers, why
        assert h.completed() >= done_before + 10, why
        assert _settled(h, desired1), why

        await cl.restart("policy")
        restarted_at = time.time()
        # The strategic loop resumes: its first tick is a strategic decision.
        await _wait(lambda: any(t > restarted_at for t in h.retrieves), 30,
                    "a strategic decision after the restart", h)  # fmt: skip
        gen = await h.finish_load(cl.config.drain_timeout_s + 120)
        why = h.why(f"loadgen {gen}", f"policy killed {killed_at:.1f}, back {restarted_at:.1f}")
        later = [m for m in cl.record.marks if m.t_s + cl.record.t0_s > restarted_at]
        assert later, why
        # The reflex (in the policy service) answered the burst after the restart.
        assert any(m.source == "reflex" for m in later), why
        assert all(m.action_id in cl.record.result_of for m in later), why
        assert gen["lost"] == 0, why
        nc = await _connect(h)
        try:
            actions, results = await _audit(nc)
            twice, unanswered = _applied_once(actions, results)
            assert twice == [] and unanswered == [], why
            await _check_state_consistent(h, nc)
        finally:
            await nc.close()

        # A service that dies by itself (not through the loop's kill) is brought back by the
        # loop's watchdog: the monitor, SIGKILLed from outside, runs again and publishes.
        old = cl.pids()["monitor"]
        assert old is not None
        os.kill(old, signal.SIGKILL)
        crashed_at = time.time()
        await _wait(lambda: cl.pids()["monitor"] not in (None, old), 15,
                    "the watchdog to restart the monitor", h)  # fmt: skip
        await _wait(lambda: any(p.t_s + cl.record.t0_s > crashed_at + 1.0
                                for p in cl.record.timeline), 30,
                    "telemetry from the restarted monitor", h)  # fmt: skip
        assert cl.components["monitor"].crash_restarts == 1, h.why()
        assert cl.summary()["service_restarts"] == {"monitor": 1}, h.why()
    assert h.left == [], h.left


# --------------------------------------------------------------------------- 3. LLM


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_unreachable_llm_falls_back_to_the_embedded_policy(tmp_path: Path) -> None:
    """`--policy llm` with OPENAI_BASE_URL on a closed port: the decisions still come, from
    the embedded policy, and each strategic action names the LLM failure. A strategic
    decision every 10 s (not 30) and a burst: a short run holds several, some of them acting
    (a held decision publishes no action)."""
    closed = free_port()  # nothing listens there: every call is refused at once
    async with Harness(
        tmp_path, pipeline=str(_spec_deciding_every(tmp_path, 10.0)), policy="llm",
        workload="burst", calibrate=True, duration_s=45,
        params={"first_at_s": 12.0, "width_s": 10.0, "period_s": 1000.0},
        extra_env={"OPENAI_BASE_URL": f"http://127.0.0.1:{closed}/v1",
                   "OPENAI_API_KEY": "test-key", "SAIR_LLM_MODEL": "test-model"},
    ) as h:  # fmt: skip
        cl = h.cl
        h.start_load()
        gen = await h.finish_load(cl.config.drain_timeout_s + 150)
        # Most strategic decisions hold; on a loaded machine the one that acts may come after
        # the load ends, so wait (bounded) for one on the audit log before judging.
        deadline = time.monotonic() + 60.0
        nc = await _connect(h)
        try:
            while True:
                actions, results = await _audit(nc)
                if any(a.source == "embedded" for a in actions) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            # Fallbacks before decisions: a decision is counted when it starts and its
            # fallback after the failed call, so this order keeps fallbacks <= decided.
            fallbacks = await asyncio.to_thread(_policy_metric, h, "sair_policy_llm_fallbacks")
            decided = len(h.retrieves)  # strategic decisions so far (one may still be running)
            actions, results = await _audit(nc)
        finally:
            await nc.close()
        why = h.why(f"loadgen {gen}", f"llm fallbacks {fallbacks}, strategic decisions "
                    f"{decided}", *(f"{a.source} {a.fallback_reason} {a.rationale[:160]}"
                                             for a in actions))  # fmt: skip
        # Every strategic decision fell back (held ones publish no action, but are counted;
        # an exploratory one makes no call).
        explored = sum(a.source == "explore" for a in actions)
        assert decided >= 2 and fallbacks is not None, why
        assert decided - 1 - explored <= fallbacks <= decided, why
        assert actions, why
        assert all(a.policy == "llm" for a in actions), why
        assert not any(a.source == "llm" for a in actions), why
        strategic = [a for a in actions if a.source == "embedded"]
        assert strategic, why
        assert fallbacks >= len(strategic), why
        for a in strategic:
            reason = a.fallback_reason or ""
            assert reason.startswith("llm api error: connection"), (a, why)
            assert "llm fallback" in a.rationale, (a, why)
        counts = Counter(a.source for a in actions)
        assert set(counts) <= {"embedded", "reflex", "explore"}, (counts, why)
        twice, unanswered = _applied_once(actions, results)
        assert twice == [] and unanswered == [], why
        assert gen["lost"] == 0, why
        log = (cl.log_dir / "policy.log").read_text(errors="replace")
        assert "test-key" not in log, "the API key must not reach the logs"
    assert h.left == [], h.left

"""Swapping a service: `examples/custom_policy.py` runs in place of services.policy.

Real nats-server and Redis, the real monitor and actuator (local backend), the real supervisor
with real worker processes, load into the pipeline; no SAIR policy service runs. The example
sees P99 over the SLO in the monitor's telemetry, publishes a ScalingAction on the bottleneck
stage, the actuator applies it (ActionResult, desired replicas in KV) and the supervisor starts
the extra worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from sair.settings import Settings
from sair.stack import ManagedServer
from sair.supervisor.app import Supervisor
from schemas import subjects
from schemas.messages import ActionResult, ScalingAction, StageDesired, StageRequest
from schemas.pipeline import PipelineSpec, load_pipeline_spec
from services.actuator.app import start_actuator
from services.monitor.app import start_monitor
from tests.pipelines.helpers import make_streams, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_policy.py"
RATE_RPS = 35.0
"""The slow stage serves ~25 rps per replica (40 ms per request): one replica falls behind."""


def write_spec(tmp_path: Path, name: str) -> tuple[Path, PipelineSpec]:
    text = f"""
name = "{name}"
slo_p99_ms = 300.0
tick_s = 1.0

[[stages]]
name = "prep"
kind = "cpu"
handler = "sair.pipelines.testing:sleep"
initial_replicas = 1
max_replicas = 3
startup_s = 0.0
options = {{ sleep_ms = 2.0 }}

[[stages]]
name = "slow"
kind = "cpu"
handler = "sair.pipelines.testing:sleep"
initial_replicas = 1
max_replicas = 4
startup_s = 0.0
options = {{ sleep_ms = 40.0 }}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path, load_pipeline_spec(path)


async def send_load(js: JetStreamContext, pipeline: str, stop: asyncio.Event) -> int:
    """Requests into the first stage at RATE_RPS until `stop`; returns how many were sent."""
    subject = subjects.pipe_stage(pipeline, "prep")
    t0 = time.monotonic()
    sent = 0
    while not stop.is_set():
        now = time.time()
        req = StageRequest(request_id=f"{pipeline}-{sent}", pipeline=pipeline,
                           created_ts_s=now, enqueued_ts_s=now, payload={"seq": sent})  # fmt: skip
        with contextlib.suppress(Exception):  # a slow ack must not end the load
            await js.publish(subject, req.model_dump_json().encode(), timeout=5.0)
        sent += 1
        await asyncio.sleep(max(0.0, t0 + sent / RATE_RPS - time.monotonic()))
    return sent


async def test_example_policy_replaces_the_policy_service(
    nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient, tmp_path: Path
) -> None:
    name = f"swap-{uuid.uuid4().hex[:8]}"
    path, spec = write_spec(tmp_path, name)
    js = nc.jetstream()
    await make_streams(js, spec)
    settings = Settings(nats_url=nats_server.url, redis_url=redis_server.url, metrics_port=-1)

    actions: list[ScalingAction] = []
    results: list[ActionResult] = []

    async def on_action(msg: Msg) -> None:
        actions.append(ScalingAction.model_validate_json(msg.data))

    async def on_result(msg: Msg) -> None:
        results.append(ActionResult.model_validate_json(msg.data))

    await nc.subscribe(subjects.actions(name), cb=on_action)
    await nc.subscribe(subjects.action_results(name), cb=on_result)
    await nc.flush()

    sup = Supervisor({str(path): spec}, settings, supervisor_id=name, poll_s=0.2,
                     drain_timeout_s=10.0, log_dir=tmp_path / "logs")  # fmt: skip
    await sup.start()
    runner = asyncio.create_task(sup.run())
    actuator = await start_actuator(settings, [spec], backend="local")
    monitor = await start_monitor(settings, spec, window_s=5.0, tick_s=1.0)
    stop_load = asyncio.Event()
    load: asyncio.Task[int] | None = None
    example: asyncio.subprocess.Process | None = None

    def ready(stage: str) -> int:
        return sup.status(name).stages[spec.stage_names.index(stage)].ready

    def example_result() -> ActionResult | None:
        for r in results:
            if r.action_id.startswith(f"{name}-example-") and r.status in ("applied", "clamped"):
                return r
        return None

    try:
        await wait_for(lambda: ready("prep") == 1 and ready("slow") == 1, 60, "initial workers")
        example = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--pipeline", name, "--nats-url", nats_server.url,
            "--cooldown-s", "8", cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        load = asyncio.create_task(send_load(js, name, stop_load))

        await wait_for(lambda: example_result() is not None, 60, "an applied example action")
        result = example_result()
        assert result is not None
        # The example's action, validated by the actuator, on the bottleneck stage.
        action = next(a for a in actions if a.action_id == result.action_id)
        assert action.source == "baseline" and action.policy == "example-threshold"
        assert "P99" in action.rationale and "SLO" in action.rationale, action.rationale
        assert [a.stage for a in action.stages] == ["slow"], action
        assert result.backend == "local"
        target = result.applied[0].target_replicas
        assert target >= 2, result

        kv = await js.key_value(subjects.DESIRED_BUCKET)
        entry = await kv.get(subjects.desired_key(name, "slow"))
        assert entry.value is not None
        desired = StageDesired.model_validate_json(entry.value)
        assert desired.replicas >= 2  # a later example action may have raised it further

        await wait_for(lambda: ready("slow") >= 2, 45, "a second ready worker of the slow stage")
        # Nobody else decided: every action on the pipeline's subject came from the example.
        assert actions and all(a.policy == "example-threshold" for a in actions), actions
    finally:
        stop_load.set()
        if load is not None:
            await asyncio.wait_for(load, 15)
        if example is not None:
            with contextlib.suppress(ProcessLookupError):
                example.terminate()
            out, _ = await asyncio.wait_for(example.communicate(), 15)
            print(out.decode(errors="replace"))  # shown by pytest when the test fails
        await monitor.close()
        await actuator.close()
        sup.stop()
        await asyncio.wait_for(runner, 60)

"""End to end of the local backend: an action on the bus, the actuator writes the desired
state, the real supervisor starts and stops real worker processes to match."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.aio.client import Client as NatsClient

from sair.settings import Settings
from sair.stack import ManagedServer
from sair.supervisor.app import Supervisor
from schemas import subjects
from schemas.messages import ActionResult, ScalingAction, StageAction
from services.actuator.app import start_actuator
from tests.pipelines.helpers import make_streams, wait_for, write_spec


async def test_action_scales_workers_through_the_supervisor(
    nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient, tmp_path: Path
) -> None:
    path, spec = write_spec(
        tmp_path, "follow", [("a", "sair.pipelines.testing:noop", 1, ""), ("b", "sair.pipelines.testing:noop", 1, "")]
    )
    await make_streams(nc.jetstream(), spec)
    settings = Settings(nats_url=nats_server.url, redis_url=redis_server.url, metrics_port=-1)
    results: asyncio.Queue[ActionResult] = asyncio.Queue()

    async def on_result(msg: object) -> None:
        await results.put(ActionResult.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.action_results("follow"), cb=on_result)
    await nc.flush()
    sup = Supervisor({str(path): spec}, settings, supervisor_id="follow", poll_s=0.2,
                     drain_timeout_s=15.0, log_dir=tmp_path / "logs")  # fmt: skip
    await sup.start()
    runner = asyncio.create_task(sup.run())
    actuator = await start_actuator(settings, [spec], backend="local")

    def ready(stage: str) -> int:
        return sup.status("follow").stages[spec.stage_names.index(stage)].ready

    def running(stage: str) -> int:
        return len(sup.replicas("follow", stage))

    try:
        await wait_for(lambda: ready("a") == 1 and ready("b") == 1, 40, "initial workers")
        js = nc.jetstream()
        action = ScalingAction(
            pipeline="follow", action_id="follow-1", ts_s=time.time(), source="manual",
            policy="test", stages=[StageAction(stage="b", target_replicas=3)],
        )  # fmt: skip
        await js.publish(subjects.actions("follow"), action.model_dump_json().encode())
        result = await asyncio.wait_for(results.get(), 30)
        assert result.status == "applied", result
        await wait_for(lambda: ready("b") == 3, 60, "stage b at 3 ready workers")
        assert ready("a") == 1

        down = action.model_copy(update={"action_id": "follow-2", "ts_s": time.time(),
                                         "stages": [StageAction(stage="b", target_replicas=1)]})  # fmt: skip
        await js.publish(subjects.actions("follow"), down.model_dump_json().encode())
        result = await asyncio.wait_for(results.get(), 30)
        assert result.status == "applied", result
        await wait_for(lambda: running("b") == 1 and ready("b") == 1, 60, "stage b back to 1")
    finally:
        await actuator.close()
        sup.stop()
        await asyncio.wait_for(runner, 60)

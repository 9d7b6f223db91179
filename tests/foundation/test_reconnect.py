"""The harness can kill and restart NATS mid-test; a runtime reconnects and keeps its streams."""

from __future__ import annotations

import asyncio

import nats

from sair.runtime import ServiceRuntime
from sair.settings import Settings
from sair.stack import NatsServer, port_open
from schemas import StageAction, subjects


async def test_runtime_survives_a_nats_restart(nats_restartable: NatsServer) -> None:
    rt = ServiceRuntime("reconnect", Settings(nats_url=nats_restartable.url, metrics_port=-1))
    await rt.start()
    got: asyncio.Queue[StageAction] = asyncio.Queue()

    async def handle(a: StageAction) -> None:
        await got.put(a)

    await rt.subscribe("sair.test.reconnect", StageAction, handle)
    await rt.js_publish(subjects.actions("rc"), StageAction(stage="a", target_replicas=1))

    nats_restartable.kill()
    assert not port_open(nats_restartable.host, nats_restartable.port)
    await asyncio.sleep(0.5)
    nats_restartable.start()

    client = await nats.connect(nats_restartable.url)
    try:
        # Publish until the runtime has re-subscribed after its reconnect.
        for _ in range(100):
            await client.publish(
                "sair.test.reconnect", StageAction(stage="a", target_replicas=7).model_dump_json().encode()
            )
            try:
                a = await asyncio.wait_for(got.get(), 0.2)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("runtime did not receive after NATS restart")
        assert a.target_replicas == 7
        # JetStream data survived the restart (file storage in the same store_dir).
        js = client.jetstream()
        msg = await js.get_last_msg(subjects.ACTIONS_STREAM, subjects.actions("rc"))
        assert StageAction.model_validate_json(msg.data).target_replicas == 1
    finally:
        await client.close()
        await rt.close()

"""A 3-stage pipeline on a real nats-server under the real supervisor: every request completes
exactly once while a worker is SIGKILLed and a stage is scaled 1 -> 3 -> 1."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from sair.loadgen import LoadGenerator
from sair.settings import Settings
from sair.stack import ManagedServer
from sair.supervisor import Supervisor
from schemas import subjects
from schemas.messages import ReplicaStatus, StageDesired

from .helpers import make_streams, wait_for, write_spec

N_REQUESTS = 500
SEND_S = 10.0


@pytest.mark.timeout(150)
async def test_every_request_completes_exactly_once_through_kill_and_scaling(
    nats_server: ManagedServer, tmp_path: Path
) -> None:
    import nats

    path, spec = write_spec(tmp_path, "itest", [
        ("a", "sair.pipelines.testing:sleep", 2, "options = { sleep_ms = 2.0 }"),
        ("b", "sair.pipelines.testing:sleep", 2, "options = { sleep_ms = 2.0 }"),
        ("c", "sair.pipelines.testing:sleep", 2, "options = { sleep_ms = 1.0 }"),
    ])  # fmt: skip
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await make_streams(js, spec, ack_wait_s=4.0)
    kv = await js.key_value(subjects.DESIRED_BUCKET)

    async def desire(stage: str, n: int) -> None:
        value = StageDesired(replicas=n, ts_s=time.time()).model_dump_json().encode()
        await kv.put(subjects.desired_key(spec.name, stage), value)

    await desire("c", 1)
    statuses: list[ReplicaStatus] = []

    async def on_status(msg: object) -> None:
        statuses.append(ReplicaStatus.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.replicas(spec.name), cb=on_status)
    sup = Supervisor({str(path): spec}, Settings(nats_url=nats_server.url, metrics_port=-1),
                     supervisor_id="itest", poll_s=0.2, drain_timeout_s=20.0,
                     log_dir=tmp_path / "logs")  # fmt: skip
    await sup.start()
    runner = asyncio.create_task(sup.run())
    try:

        def ready(stage: str, n: int) -> bool:
            return sup.status(spec.name).stages[spec.stage_names.index(stage)].ready == n

        await wait_for(lambda: ready("a", 2) and ready("b", 2) and ready("c", 1), 40, "workers")
        killed: list[int] = []
        max_c_ready = 0

        async def scenario() -> None:
            nonlocal max_c_ready
            await asyncio.sleep(1.5)
            await desire("c", 3)
            await asyncio.sleep(2.0)
            victim = sup.replicas(spec.name, "b")[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)
            deadline = time.monotonic() + 40  # worker start-up is slow on a loaded machine
            while not ready("c", 3) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            max_c_ready = max(max_c_ready, sup.status(spec.name).stages[2].ready)
            await asyncio.sleep(1.0)
            await desire("c", 1)

        gen = LoadGenerator(nc, spec, "itest")
        offsets = np.linspace(0.0, SEND_S, N_REQUESTS, endpoint=False).tolist()
        result, _ = await asyncio.gather(gen.run(offsets, drain_timeout_s=30.0), scenario())

        assert result.sent == N_REQUESTS
        assert result.publish_failures == 0
        missing = [r for r in result.records.values() if r.completions == 0]
        assert not missing, f"{len(missing)} requests lost, e.g. {missing[0].request_id}"
        dups = [r.request_id for r in result.records.values() if r.completions > 1]
        assert not dups, f"{len(dups)} requests completed more than once: {dups[:5]}"
        assert all(set(r.stage_ms) == {"a", "b", "c"} for r in result.records.values())

        assert killed and sup.slots[(spec.name, "b")].crashed_total == 1
        assert max_c_ready == 3
        await wait_for(lambda: ready("c", 1) and ready("b", 2), 20, "scale-down and restart")
        await asyncio.sleep(1.5)  # the next ReplicaStatus (published every second)
        seen_c = [s.stages[2].ready for s in statuses]
        first_3 = seen_c.index(3)
        assert 1 in seen_c[:first_3] and 1 in seen_c[first_3:]  # 1 -> 3 -> 1 as published
        pids = [r.pid for st in spec.stage_names for r in sup.replicas(spec.name, st)]
    finally:
        sup.stop()
        await runner
        await nc.drain()
    for pid in pids:  # the supervisor left nothing behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

"""The actuator on a real nats-server and Redis: local backend, idempotency, clamping,
crash between apply and ack, reconcile on start, Redis outage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats.js.errors
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sair.settings import Settings
from sair.stack import ManagedServer, RedisServer, free_port
from schemas import subjects
from schemas.messages import ActionResult, DeadLetter, ScalingAction, StageDesired
from schemas.pipeline import PipelineSpec
from services.actuator.app import ActuatorApp, start_actuator
from services.actuator.state import ActuatorRecord, record_key
from tests.actuator.factories import make_action, make_spec, sa

WAIT_S = 20.0


class Results:
    """Every ActionResult published for one pipeline, in order."""

    def __init__(self) -> None:
        self.items: list[ActionResult] = []
        self.arrived = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.items.append(ActionResult.model_validate_json(msg.data))
        self.arrived.set()

    async def wait_for(
        self, pred: Callable[[ActionResult], bool], timeout_s: float = WAIT_S
    ) -> ActionResult:
        async def scan() -> ActionResult:
            while True:
                for item in self.items:
                    if pred(item):
                        return item
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(scan(), timeout_s)


@pytest_asyncio.fixture
async def redis_client(redis_server: ManagedServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def settings(nats_server: ManagedServer, redis_url: str) -> Settings:
    return Settings(nats_url=nats_server.url, redis_url=redis_url, metrics_port=-1)


async def results_of(nc: NatsClient, spec: PipelineSpec) -> Results:
    results = Results()
    await nc.subscribe(subjects.action_results(spec.name), cb=results.on_msg)
    await nc.flush()
    return results


async def send(nc: NatsClient, action: ScalingAction) -> None:
    await nc.jetstream().publish(
        subjects.actions(action.pipeline), action.model_dump_json().encode()
    )


async def desired(nc: NatsClient, pipeline: str, stage: str) -> StageDesired:
    kv = await nc.jetstream().key_value(subjects.DESIRED_BUCKET)
    entry = await kv.get(subjects.desired_key(pipeline, stage))
    assert entry.value is not None
    return StageDesired.model_validate_json(entry.value)


async def desired_history(nc: NatsClient, pipeline: str, stage: str) -> list[StageDesired]:
    kv = await nc.jetstream().key_value(subjects.DESIRED_BUCKET)
    try:
        entries = await kv.history(subjects.desired_key(pipeline, stage))
    except nats.js.errors.NoKeysError:
        return []
    return [StageDesired.model_validate_json(e.value) for e in entries if e.value]


async def record(nc: NatsClient, pipeline: str) -> ActuatorRecord:
    kv = await nc.jetstream().key_value(subjects.STATE_BUCKET)
    entry = await kv.get(record_key(pipeline))
    assert entry.value is not None
    return ActuatorRecord.model_validate_json(entry.value)


async def start(
    nats_server: ManagedServer, redis_url: str, spec: PipelineSpec, **kw: object
) -> ActuatorApp:
    return await start_actuator(settings(nats_server, redis_url), [spec], **kw)  # type: ignore[arg-type]


async def test_action_sets_desired_state_in_kv_and_gpu_token_rate(
    nats_server: ManagedServer,
    redis_server: ManagedServer,
    nc: NatsClient,
    redis_client: aioredis.Redis,
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    app = await start(nats_server, redis_server.url, spec)
    try:
        action = make_action(spec, sa("pre", 3), sa("infer", 2, 0.75))
        await send(nc, action)
        result = await results.wait_for(lambda r: r.action_id == action.action_id)
        assert result.status == "applied", result.reasons
        assert result.backend == "local"
        assert [(a.stage, a.target_replicas, a.rho) for a in result.applied] == [
            ("pre", 3, None),
            ("infer", 2, 0.75),
        ]
        pre = await desired(nc, spec.name, "pre")
        infer = await desired(nc, spec.name, "infer")
        assert (pre.replicas, pre.action_id) == (3, action.action_id)
        assert (infer.replicas, infer.rho) == (2, 0.75)
        # shared bucket: 2 replicas x rho 0.75 x 1000 launches/s = 1500 tokens/s, burst 0.25 s
        bucket = await redis_client.hgetall(subjects.gpu_bucket_key(spec.name, "infer"))
        assert float(bucket[b"rate"]) == pytest.approx(1500.0)
        assert float(bucket[b"burst"]) == 375
        assert float(bucket[b"rho"]) == pytest.approx(0.75)  # what each worker reports
        assert app.health[spec.name] == "ok"
    finally:
        await app.close()


async def test_duplicate_delivery_is_applied_once(
    nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    app = await start(nats_server, redis_server.url, spec)
    try:
        action = make_action(spec, sa("pre", 2))
        await send(nc, action)
        await send(nc, action)  # the same action id again, e.g. a policy retrying its publish
        dup = await results.wait_for(lambda r: r.status == "duplicate")
        assert "already handled (applied)" in dup.reasons[0]
        statuses = [r.status for r in results.items if r.action_id == action.action_id]
        assert statuses == ["applied", "duplicate"]
        history = await desired_history(nc, spec.name, "pre")
        assert [(h.replicas, h.action_id) for h in history] == [(2, action.action_id)]
        rec = await record(nc, spec.name)
        assert rec.seen_ids.count(action.action_id) == 1
    finally:
        await app.close()


async def test_action_beyond_bounds_is_clamped_with_reasons(
    nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    app = await start(nats_server, redis_server.url, spec)
    try:
        # pre: max 8 and step 2 from initial 1 -> 3; infer rho 0.6 -> 0.5; "decode" unknown
        action = make_action(spec, sa("pre", 50), sa("infer", 1, 0.6), sa("decode", 2))
        await send(nc, action)
        result = await results.wait_for(lambda r: r.action_id == action.action_id)
        assert result.status == "clamped"
        assert [(a.stage, a.target_replicas, a.rho) for a in result.applied] == [
            ("pre", 3, None),
            ("infer", 1, 0.5),
        ]
        text = " | ".join(result.reasons)
        assert "target_replicas=50 above max_replicas=8" in text
        assert "exceeds max_step=2, limited to 3" in text
        assert "rho=0.6 is not on rho_grid" in text
        assert "'decode': not in pipeline" in text
        assert (await desired(nc, spec.name, "pre")).replicas == 3
    finally:
        await app.close()


async def test_advisory_action_is_recorded_not_applied(
    nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    app = await start(nats_server, redis_server.url, spec)
    try:
        action = make_action(spec, sa("pre", 4), advisory=True)
        await send(nc, action)
        result = await results.wait_for(lambda r: r.action_id == action.action_id)
        assert result.status == "recorded" and result.applied == []
        assert any("step" in r for r in result.reasons)  # 1 -> 4 would be limited
        assert await desired_history(nc, spec.name, "pre") == []
    finally:
        await app.close()


async def test_malformed_action_is_dead_lettered_and_the_next_is_applied(
    nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    letters: asyncio.Queue[DeadLetter] = asyncio.Queue()

    async def on_letter(msg: Msg) -> None:
        await letters.put(DeadLetter.model_validate_json(msg.data))

    await nc.subscribe(subjects.dlq("actuator"), cb=on_letter)
    app = await start(nats_server, redis_server.url, spec)
    try:
        bad = json.loads(make_action(spec, sa("pre", 2)).model_dump_json())
        bad["stages"][0]["target_replicas"] = -1
        await nc.jetstream().publish(subjects.actions(spec.name), json.dumps(bad).encode())
        letter = await asyncio.wait_for(letters.get(), WAIT_S)
        assert "target_replicas=-1" in letter.reason
        good = make_action(spec, sa("pre", 2))
        await send(nc, good)
        assert (await results.wait_for(lambda r: r.action_id == good.action_id)).status == "applied"
    finally:
        await app.close()


@pytest.mark.parametrize("failpoint", ["after_apply", "after_record", "before_ack"])
async def test_killed_between_receive_and_ack_applies_exactly_once_after_restart(
    failpoint: str, nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    first = await start(nats_server, redis_server.url, spec, failpoint=failpoint, ack_wait_s=1.5)
    action = make_action(spec, sa("pre", 3), sa("infer", 2))
    try:
        await send(nc, action)
        await asyncio.wait_for(first.crashed.wait(), WAIT_S)
    finally:
        await first.close()  # the message was received and applied, never acked
    assert [(h.replicas, h.action_id) for h in await desired_history(nc, spec.name, "pre")] == [
        (3, action.action_id)
    ]

    second = await start(nats_server, redis_server.url, spec, ack_wait_s=1.5)
    try:
        # after_apply: the first run neither recorded nor published, so the redelivery
        # completes it without writing the KV again; after_record / before_ack: it recorded
        # the id, so the redelivery is a duplicate (after_record also publishes the result the
        # first run never sent).
        final = "applied" if failpoint == "after_apply" else "duplicate"
        await results.wait_for(lambda r: r.action_id == action.action_id and r.status == final)
        history = await desired_history(nc, spec.name, "pre")
        assert [(h.replicas, h.action_id) for h in history] == [(3, action.action_id)]
        assert len(await desired_history(nc, spec.name, "infer")) == 1
        rec = await record(nc, spec.name)
        assert rec.seen_ids.count(action.action_id) == 1
        applied = [
            r for r in results.items if r.action_id == action.action_id and r.status == "applied"
        ]
        assert len(applied) == 1  # one "applied" result, whichever run sent it
    finally:
        await second.close()


async def test_restart_reasserts_last_applied_settings(
    nats_server: ManagedServer,
    redis_server: ManagedServer,
    nc: NatsClient,
    redis_client: aioredis.Redis,
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    app = await start(nats_server, redis_server.url, spec)
    action = make_action(spec, sa("pre", 3), sa("infer", 2, 1.0))
    try:
        await send(nc, action)
        await results.wait_for(lambda r: r.action_id == action.action_id)
    finally:
        await app.close()
    # Lost while the actuator was down: the KV key and the Redis bucket.
    kv = await nc.jetstream().key_value(subjects.DESIRED_BUCKET)
    await kv.purge(subjects.desired_key(spec.name, "pre"))
    key = subjects.gpu_bucket_key(spec.name, "infer")
    await redis_client.delete(key)

    app = await start(nats_server, redis_server.url, spec)
    try:

        async def restored() -> None:
            while not (await redis_client.exists(key)) or app.health[spec.name] != "ok":
                await asyncio.sleep(0.1)

        await asyncio.wait_for(restored(), WAIT_S)
        pre = await desired(nc, spec.name, "pre")
        assert (pre.replicas, pre.action_id) == (3, action.action_id)
        assert float(await redis_client.hget(key, "rate") or 0) == pytest.approx(2000.0)
    finally:
        await app.close()


async def test_redis_unreachable_keeps_the_action_and_applies_it_when_back(
    nats_server: ManagedServer, nc: NatsClient, tmp_path: Path
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    redis = RedisServer("redis-late", "127.0.0.1", free_port(), tmp_path / "redis")
    app = await start(
        nats_server, redis.url, spec, retry_initial_s=0.1, retry_max_s=0.5, ack_wait_s=2.0
    )
    try:
        action = make_action(spec, sa("infer", 2, 0.25))
        await send(nc, action)

        async def retrying() -> None:
            while "retrying" not in app.health[spec.name]:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(retrying(), WAIT_S)
        assert "GPU token rate" in app.health[spec.name]
        await asyncio.sleep(2.5)  # longer than ack_wait: in_progress keeps it ours
        assert [r for r in results.items if r.action_id == action.action_id] == []
        redis.start()
        result = await results.wait_for(lambda r: r.action_id == action.action_id)
        assert result.status == "applied"
        client = aioredis.Redis.from_url(redis.url)
        try:
            rate = await client.hget(subjects.gpu_bucket_key(spec.name, "infer"), "rate")
        finally:
            await client.aclose()
        assert float(rate or 0) == pytest.approx(500.0)  # 2 x 0.25 x 1000
        assert [r.status for r in results.items if r.action_id == action.action_id] == ["applied"]
    finally:
        await app.close()
        redis.stop()


async def test_dry_run_backend_records_and_changes_nothing(
    nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient
) -> None:
    spec = make_spec()
    results = await results_of(nc, spec)
    app = await start(nats_server, redis_server.url, spec, backend="dry-run")
    try:
        action = make_action(spec, sa("pre", 3))
        await send(nc, action)
        result = await results.wait_for(lambda r: r.action_id == action.action_id)
        assert result.status == "recorded" and result.backend == "dry-run"
        assert any("would set" in r for r in result.reasons)
        assert await desired_history(nc, spec.name, "pre") == []
    finally:
        await app.close()

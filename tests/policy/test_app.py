"""The policy service on real NATS with the real retriever: telemetry in, actions and
episodes out, and retrieval used on the next strategic decision."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from sair.settings import Settings
from sair.stack import ManagedServer, free_port
from schemas import subjects
from schemas.messages import ScalingAction
from services.policy.app import PolicyApp, start_policy
from services.retriever.app import start_retriever
from tests.policy.factories import spec, stage, telemetry


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _until(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _overloaded(tick: int) -> bytes:
    t = telemetry(
        stages=[
            stage("pre"),
            stage("infer", utilisation=1.4, queue_depth=400, queue_growth_per_s=8.0,
                  arrival_rate_rps=40.0, throughput_rps=28.0),
            stage("post"),
        ],
        tick=tick, e2e_p99_ms=1400.0, bottleneck="infer", bottleneck_confidence=0.9,
        arrival_rate_rps=40.0, completed_rps=28.0,
    )  # fmt: skip
    return t.model_dump_json().encode()


def _healthy(tick: int, infer_replicas: int) -> bytes:
    t = telemetry(
        stages=[
            stage("pre"),
            stage("infer", replicas_ready=infer_replicas, utilisation=0.6, arrival_rate_rps=40.0,
                  throughput_rps=40.0),
            stage("post"),
        ],
        tick=tick, e2e_p99_ms=220.0, arrival_rate_rps=40.0, completed_rps=40.0,
    )  # fmt: skip
    return t.model_dump_json().encode()


async def _actions(nc: NatsClient) -> asyncio.Queue[ScalingAction]:
    q: asyncio.Queue[ScalingAction] = asyncio.Queue()

    async def on(msg: object) -> None:
        await q.put(ScalingAction.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.actions("imgcls"), cb=on)
    await nc.flush()
    return q


async def test_telemetry_to_action_episode_stored_and_retrieved_next_cycle(
    nats_server: ManagedServer, nc: NatsClient, qdrant_path: Path
) -> None:
    sp = spec()
    settings = Settings(nats_url=nats_server.url, qdrant_path=str(qdrant_path), metrics_port=-1)
    retriever = await start_retriever(settings, [sp])
    clock = Clock(1000.0)
    app: PolicyApp = await start_policy(settings, sp, "sair", clock=clock)
    actions = await _actions(nc)
    try:
        # Tick 1: infer overloaded, SLO broken -> a strategic decision that adds capacity.
        await nc.publish(subjects.telemetry("imgcls"), _overloaded(1))
        first = await asyncio.wait_for(actions.get(), 20)
        assert first.source in ("embedded", "reflex")
        assert first.bottleneck == "infer"
        infer = next(a for a in first.stages if a.stage == "infer")
        assert infer.target_replicas > 2 or (infer.rho or 0) > 0.5
        assert not first.advisory

        # Tick 2, after the settle time: healthy -> positive reward -> episode stored.
        clock.t += sp.settle_s + 1
        await nc.publish(subjects.telemetry("imgcls"), _healthy(2, infer.target_replicas))
        await _until(lambda: app.stats.decisions >= 2)
        assert app.stats.episodes == 1, app.stats
        await _until(lambda: retriever.store("imgcls").count() == 1)

        # Tick 3, next control interval: the retriever returns the stored episode.
        clock.t += sp.control_interval_s + 1
        await nc.publish(subjects.telemetry("imgcls"), _healthy(3, infer.target_replicas))
        await _until(lambda: app.stats.decisions >= 3)
        assert app.stats.retrievals >= 2
        assert app.stats.retrieval_failures == 0
        assert app.stats.last_retrieved == 1
    finally:
        await app.close()
        await retriever.close()


async def test_advisory_actions_and_missing_retriever(nats_server: ManagedServer, nc: NatsClient) -> None:
    sp = spec(name="advis")
    settings = Settings(nats_url=nats_server.url, metrics_port=-1)
    app = await start_policy(settings, sp, "sair", advisory=True, retrieval_timeout_s=0.3, clock=Clock(5.0))
    got: asyncio.Queue[ScalingAction] = asyncio.Queue()

    async def on(msg: object) -> None:
        await got.put(ScalingAction.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.actions("advis"), cb=on)
    await nc.flush()
    try:
        raw = json.loads(_overloaded(1))
        raw["pipeline"] = "advis"
        await nc.publish(subjects.telemetry("advis"), json.dumps(raw).encode())
        action = await asyncio.wait_for(got.get(), 20)
        assert action.advisory is True
        await _until(lambda: app.stats.decisions == 1)
        assert app.stats.retrieval_failures == 1  # no retriever runs for "advis"
    finally:
        await app.close()


async def test_bad_telemetry_is_dead_lettered_and_service_continues(
    nats_server: ManagedServer, nc: NatsClient
) -> None:
    sp = spec(name="badtel")
    app = await start_policy(Settings(nats_url=nats_server.url, metrics_port=-1), sp, "hpa", clock=Clock(1.0))
    letters: asyncio.Queue[bytes] = asyncio.Queue()

    async def on(msg: object) -> None:
        await letters.put(msg.data)  # type: ignore[attr-defined]

    await nc.subscribe(subjects.dlq("policy"), cb=on)
    await nc.flush()
    try:
        raw = json.loads(_healthy(1, 2))
        raw["pipeline"] = "badtel"
        raw["stages"][0]["stage"] = "unknown-stage"
        await nc.publish(subjects.telemetry("badtel"), json.dumps(raw).encode())
        letter = json.loads(await asyncio.wait_for(letters.get(), 10))
        assert "unknown stage 'unknown-stage'" in letter["reason"]
        raw["stages"][0]["stage"] = "pre"
        await nc.publish(subjects.telemetry("badtel"), json.dumps(raw).encode())
        await _until(lambda: app.stats.decisions == 1)
    finally:
        await app.close()


async def test_llm_endpoint_unreachable_falls_back_to_embedded(
    nats_server: ManagedServer, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    sp = spec(name="llmdown")
    app = await start_policy(
        Settings(nats_url=nats_server.url, metrics_port=-1), sp, "llm",
        retrieval_timeout_s=0.3, clock=Clock(1.0),
    )  # fmt: skip
    got: asyncio.Queue[ScalingAction] = asyncio.Queue()

    async def on(msg: object) -> None:
        await got.put(ScalingAction.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.actions("llmdown"), cb=on)
    await nc.flush()
    try:
        raw = json.loads(_overloaded(1))
        raw["pipeline"] = "llmdown"
        await nc.publish(subjects.telemetry("llmdown"), json.dumps(raw).encode())
        action = await asyncio.wait_for(got.get(), 30)
        assert action.fallback_reason is not None and "llm" in action.fallback_reason
        assert action.source == "embedded"
        await _until(lambda: app.stats.decisions == 1)
        assert app.stats.llm_fallbacks == 1
    finally:
        await app.close()

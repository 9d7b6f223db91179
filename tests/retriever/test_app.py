"""The retriever service in-process against a real nats-server and real stores."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from sair.runtime import ensure_core_streams
from sair.settings import Settings
from sair.stack import ManagedServer
from schemas import subjects
from schemas.context import ENCODING_VERSION, context_dim
from schemas.messages import DeadLetter, Episode, RetrieveReply, RetrieveRequest
from schemas.pipeline import PipelineSpec
from services.retriever.app import RetrieverApp, consumer_name, start_retriever
from services.retriever.store import NumpyEpisodeStore, collection_name

from .helpers import make_episode, make_spec

ENGINES = ["numpy", "qdrant-local"]


def _settings(nats_server: ManagedServer, path: Path) -> Settings:
    return Settings(nats_url=nats_server.url, qdrant_path=str(path), metrics_port=-1)


async def _publish(nc: NatsClient, episodes: list[Episode]) -> None:
    js = nc.jetstream()
    for e in episodes:
        await js.publish(subjects.episodes(e.pipeline), e.model_dump_json().encode())


async def _wait_for(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _drained(nc: NatsClient, spec: PipelineSpec, timeout_s: float = 20.0) -> None:
    """Every episode on the pipeline's subject was handled and acked by the retriever."""
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        info = await js.consumer_info(subjects.EPISODES_STREAM, consumer_name(spec.name))
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"consumer not drained: {info}")
        await asyncio.sleep(0.05)


async def _retrieve(nc: NatsClient, spec: PipelineSpec, context: list[float], m: int = 15,
                    encoding_version: int = ENCODING_VERSION) -> RetrieveReply:
    req = RetrieveRequest(pipeline=spec.name, encoding_version=encoding_version,
                          context=context, m=m)
    msg = await nc.request(subjects.retrieve(spec.name), req.model_dump_json().encode(), timeout=10)
    return RetrieveReply.model_validate_json(msg.data)


@pytest.mark.parametrize("engine", ENGINES)
async def test_episodes_survive_restart_and_arrive_while_stopped(
    engine: str, nats_server: ManagedServer, nc: NatsClient, qdrant_path: Path
) -> None:
    spec = make_spec()
    settings = _settings(nats_server, qdrant_path)
    # published before the retriever ever ran (the stream exists: any service creates it);
    # the durable consumer starts at the beginning of the stream
    await ensure_core_streams(nc.jetstream())
    await _publish(nc, [make_episode(spec, i) for i in range(3)])
    app = await start_retriever(settings, [spec], capacity=100, engine=engine)
    await _publish(nc, [make_episode(spec, i) for i in range(3, 6)])
    await _wait_for(lambda: app.store(spec.name).count() == 6)
    await _drained(nc, spec)
    await app.close()

    # published while it is stopped
    await _publish(nc, [make_episode(spec, i) for i in range(6, 10)])
    app2 = await start_retriever(settings, [spec], capacity=100, engine=engine)
    try:
        await _wait_for(lambda: app2.store(spec.name).count() == 10)
        await _drained(nc, spec)
        assert sorted(app2.store(spec.name).ids()) == sorted(f"ep-{i}" for i in range(10))
        reply = await _retrieve(nc, spec, make_episode(spec, 4).context, m=5)
        assert reply.error is None and reply.stored == 10 and not reply.cold_start
        assert len(reply.episodes) == 5
        # every reward is 1.0, so nothing is surprising: the nearest come first, and the
        # exact match (similarity 1) leads
        assert reply.episodes[0].episode.episode_id == "ep-4"
        assert reply.episodes[0].similarity == pytest.approx(1.0)
        assert all(r.surprisal == 0 and r.score == 0 for r in reply.episodes)
        sims = [r.similarity for r in reply.episodes]
        assert all(0 < s <= 1 for s in sims)
    finally:
        await app2.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_store_never_exceeds_its_bound_and_keeps_distinct_contexts(
    engine: str, nats_server: ManagedServer, nc: NatsClient, qdrant_path: Path
) -> None:
    spec = make_spec()
    dim = context_dim(spec)
    app = await start_retriever(_settings(nats_server, qdrant_path), [spec], capacity=5,
                                engine=engine)
    counts: list[int] = []
    store = app.store(spec.name)
    original_ingest = store.ingest

    def spy_ingest(eps: Sequence[Episode], capacity: int) -> tuple[int, list[str]]:
        out = original_ingest(eps, capacity)
        counts.append(store.count())  # what anyone (a retrieval) can see between ingests
        return out

    store.ingest = spy_ingest  # type: ignore[method-assign, assignment]
    try:
        distinct = [make_episode(spec, i, context=[i / 5] * dim) for i in range(5)]
        crowd = [make_episode(spec, 100 + j, context=[0.4 + 0.0001 * j] * dim) for j in range(15)]
        await _publish(nc, distinct + crowd)
        await _drained(nc, spec)
        assert store.count() == 5
        assert counts and max(counts) <= 5  # evicted inside the same ingest, after each add
        # the crowd of near-copies of one context collapsed; the distinct contexts stayed
        kept = set(store.ids())
        assert {"ep-0", "ep-1", "ep-3", "ep-4"} <= kept
        reply = await _retrieve(nc, spec, [0.0] * dim)
        assert reply.stored == 5 and reply.cold_start and len(reply.episodes) == 5
    finally:
        await app.close()


async def test_bad_input_is_answered_or_dead_lettered_and_service_continues(
    nats_server: ManagedServer, nc: NatsClient, qdrant_path: Path
) -> None:
    spec = make_spec()
    dim = context_dim(spec)
    app: RetrieverApp = await start_retriever(_settings(nats_server, qdrant_path), [spec])
    letters: asyncio.Queue[DeadLetter] = asyncio.Queue()

    async def on_dlq(msg: object) -> None:
        await letters.put(DeadLetter.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.dlq("retriever"), cb=on_dlq)
    await nc.flush()
    try:
        subject = subjects.episodes(spec.name)
        js = nc.jetstream()
        await js.publish(subject, b"{not json")
        bad_dim = make_episode(spec, 1, context=[0.5, 0.5])
        await js.publish(subject, bad_dim.model_dump_json().encode())
        wrong_pipe = json.loads(make_episode(spec, 2).model_dump_json())
        wrong_pipe["pipeline"] = "other"
        await js.publish(subject, json.dumps(wrong_pipe).encode())
        await _publish(nc, [make_episode(spec, 3, reward=-0.5), make_episode(spec, 4)])
        reasons = [(await asyncio.wait_for(letters.get(), 10)).reason for _ in range(3)]
        assert any("json" in r.lower() for r in reasons)
        assert any("context: 2 values" in r and f"dimension {dim}" in r for r in reasons)
        assert any("'other'" in r for r in reasons)
        await _drained(nc, spec)
        # the good positive episode is stored; the negative-reward one is not
        assert list(app.store(spec.name).ids()) == ["ep-4"]

        wrong_dim = await _retrieve(nc, spec, [0.1, 0.2, 0.3])
        assert wrong_dim.error is not None and "context: 3 values" in wrong_dim.error
        wrong_version = await _retrieve(nc, spec, [0.1] * dim, encoding_version=99)
        assert wrong_version.error is not None and "encoding_version=99" in wrong_version.error
        raw = await nc.request(subjects.retrieve(spec.name), b'{"pipeline": 5}', timeout=10)
        malformed = RetrieveReply.model_validate_json(raw.data)
        assert malformed.error is not None and "pipeline=5" in malformed.error
        ok = await _retrieve(nc, spec, [0.1] * dim)
        assert ok.error is None and ok.cold_start and [r.episode.episode_id for r in ok.episodes] == ["ep-4"]
    finally:
        await app.close()


async def test_acked_episodes_are_on_disk_before_any_close(
    nats_server: ManagedServer, nc: NatsClient, qdrant_path: Path, tmp_path: Path
) -> None:
    # a crash image: copy the data directory while the retriever still runs (no close, so no
    # snapshot): every acked episode must be in it
    spec = make_spec()
    dim = context_dim(spec)
    app = await start_retriever(_settings(nats_server, qdrant_path), [spec], capacity=150,
                                engine="numpy")
    try:
        await _publish(nc, [make_episode(spec, i, context=[(i % 97) / 97] * dim)
                            for i in range(200)])
        await _drained(nc, spec)
        image = tmp_path / "image"
        shutil.copytree(qdrant_path, image)
        live = sorted(app.store(spec.name).ids())
    finally:
        await app.close()
    assert len(live) == 150
    store = NumpyEpisodeStore(
        image / "sair-episodes" / collection_name(spec.name, ENCODING_VERSION), dim
    )
    assert sorted(store.ids()) == live
    store.close()

"""The retriever service: episodes in (JetStream), retrievals out (request/reply).

- `sair.episodes.<pipeline>`: durable pull consumer `retriever-<pipeline>` on stream
  `SAIR_EPISODES`, so episodes published while the retriever is down are stored when it
  returns. Each fetch (up to `FETCH_BATCH` messages) is stored in one `ingest` (one scan
  block, one log write; evicting to the bound after each episode), and its messages are
  acked only after that returns, so an acked episode is on disk. A malformed message is
  dead-lettered and terminated; an episode of the wrong encoding version or dimension is
  dead-lettered and acked; a failed store naks (JetStream redelivers).
- `sair.retrieve.<pipeline>`: RetrieveRequest -> RetrieveReply; a bad query gets a reply whose
  `error` names the field and value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.js import api as js_api
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from sair.runtime import ServiceRuntime, configure_logging
from sair.settings import Settings
from schemas import subjects
from schemas.common import describe_error
from schemas.context import ENCODING_VERSION, context_dim
from schemas.messages import Episode, RetrieveReply, RetrieveRequest
from schemas.pipeline import PipelineSpec, load_pipeline_spec

from .logic import episode_problem, request_problem, retrieve, should_store
from .scoring import DEFAULT_DIVERSITY
from .store import EpisodeStore, StoreFactory

SERVICE = "retriever"
DEFAULT_CAPACITY = 10_000
"""Episodes kept per pipeline: at one decision per 30 s, about 3.5 days of distinct contexts."""

FETCH_BATCH = 64
"""Episodes per JetStream fetch, stored together (one scan block and one log write)."""
NAK_DELAY_S = 1.0
CLOSE_STEP_TIMEOUT_S = 5.0

log = logging.getLogger("sair.retriever")


def consumer_name(pipeline: str) -> str:
    return f"retriever-{subjects.check_name(pipeline, 'pipeline')}"


@dataclass
class PipelineMemory:
    spec: PipelineSpec
    dim: int
    store: EpisodeStore
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class RetrieverApp:
    rt: ServiceRuntime
    factory: StoreFactory
    memories: dict[str, PipelineMemory]
    capacity: int
    _closed: bool = False

    def store(self, pipeline: str) -> EpisodeStore:
        return self.memories[pipeline].store

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then close."""
        try:
            await self.rt.run()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.rt.stop()
        await self.rt.close()
        # stores last: in-flight handlers have finished with them
        self.factory.close()


async def start_retriever(
    settings: Settings,
    pipelines: Sequence[PipelineSpec],
    capacity: int = DEFAULT_CAPACITY,
    engine: str = "auto",
    bandwidth: float | None = None,
    diversity: float = DEFAULT_DIVERSITY,
) -> RetrieverApp:
    """Open the stores, connect, subscribe; returns the running app (call `close()`)."""
    if capacity < 1:
        raise ValueError(f"capacity={capacity}: must be >= 1")
    factory = StoreFactory(engine, settings.qdrant_url, settings.qdrant_path)
    rt = ServiceRuntime(SERVICE, settings)
    try:
        memories = {
            spec.name: PipelineMemory(
                spec=spec,
                dim=context_dim(spec),
                store=factory.open(spec.name, ENCODING_VERSION, context_dim(spec)),
            )
            for spec in pipelines
        }
        await rt.start()
    except BaseException:
        factory.close()
        raise
    app = RetrieverApp(rt=rt, factory=factory, memories=memories, capacity=capacity)
    stored = Gauge(
        "sair_retriever_episodes", "Episodes stored", ["pipeline"], registry=rt.metrics.registry
    )
    skipped = Counter(
        "sair_retriever_episodes_skipped",
        "Episodes not stored (reward <= 0)",
        ["pipeline"],
        registry=rt.metrics.registry,
    )
    evicted = Counter(
        "sair_retriever_episodes_evicted",
        "Episodes evicted as redundant",
        ["pipeline"],
        registry=rt.metrics.registry,
    )
    bad_queries = Counter(
        "sair_retriever_bad_queries",
        "Retrievals answered with an error",
        ["pipeline"],
        registry=rt.metrics.registry,
    )
    for name, mem in memories.items():
        # the bound may be smaller than last run's
        gone = mem.store.evict(capacity)
        if gone:
            evicted.labels(name).inc(len(gone))
        stored.labels(name).set(mem.store.count())
        await _wire(app, mem, stored, skipped, evicted, bad_queries, bandwidth, diversity)
    log.info(
        "retriever serving %s with engine %s, capacity %d",
        ", ".join(memories) or "(no pipeline)",
        factory.engine,
        capacity,
    )
    return app


async def _wire(
    app: RetrieverApp,
    mem: PipelineMemory,
    stored: Gauge,
    skipped: Counter,
    evicted: Counter,
    bad_queries: Counter,
    bandwidth: float | None,
    diversity: float,
) -> None:
    rt = app.rt
    name = mem.spec.name
    subject = subjects.episodes(name)
    context = {"spec": mem.spec}

    async def on_batch(msgs: Sequence[Msg]) -> None:
        good: list[tuple[Msg, Episode]] = []
        for msg in msgs:
            rt.metrics.received.labels(SERVICE, msg.subject).inc()
            try:
                episode = Episode.model_validate_json(msg.data, context=context)
            except ValidationError as exc:
                await rt.dead_letter(msg.subject, msg.data, f"Episode: {describe_error(exc)}")
                await msg.term()
                continue
            problem = episode_problem(episode, mem.dim, ENCODING_VERSION)
            if problem is not None:
                # acked: a wrong-shaped episode never becomes right by redelivery
                await rt.dead_letter(subject, msg.data, f"Episode: {problem}")
                await msg.ack()
                continue
            if not should_store(episode):
                skipped.labels(name).inc()
                await msg.ack()
                continue
            good.append((msg, episode))
        if not good:
            return
        try:
            async with mem.lock:
                _, gone = mem.store.ingest([e for _, e in good], app.capacity)
            done = good
        except Exception:
            log.exception("storing %d episodes of %s failed; retrying one by one",
                          len(good), name)
            # one bad episode must not hold back the others of its fetch
            gone, done = [], []
            for msg, episode in good:
                try:
                    async with mem.lock:
                        gone += mem.store.ingest([episode], app.capacity)[1]
                    done.append((msg, episode))
                except Exception as exc:
                    rt.metrics.handler_errors.labels(SERVICE, msg.subject).inc()
                    log.warning("storing episode %s failed (%s); redelivering",
                                episode.episode_id, exc)
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=NAK_DELAY_S)
        # ack only now: the store has written them (numpy engine: log flushed; Qdrant: upsert
        # waited for), so a crash from here on loses nothing JetStream considers delivered
        for msg, _ in done:
            await msg.ack()
        if gone:
            evicted.labels(name).inc(len(gone))
        stored.labels(name).set(mem.store.count())

    async def on_retrieve(req: RetrieveRequest) -> RetrieveReply:
        problem = request_problem(req, mem.dim, ENCODING_VERSION)
        if problem is not None:
            bad_queries.labels(name).inc()
            log.warning("bad retrieval for %s: %s", name, problem)
            return RetrieveReply(pipeline=name, error=problem, stored=mem.store.count())
        async with mem.lock:
            return retrieve(mem.store, req, bandwidth=bandwidth, diversity=diversity)

    def error_reply(reason: str) -> RetrieveReply:
        bad_queries.labels(name).inc()
        return RetrieveReply(pipeline=name, error=reason)

    await rt.serve(
        subjects.retrieve(name), RetrieveRequest, on_retrieve, error_reply=error_reply,
        context=context,
    )
    psub = await rt.js.pull_subscribe(
        subject,
        durable=consumer_name(name),
        stream=subjects.EPISODES_STREAM,
        config=js_api.ConsumerConfig(
            durable_name=consumer_name(name),
            filter_subject=subject,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=-1,
        ),
    )

    async def consume() -> None:
        try:
            while True:
                try:
                    msgs = await psub.fetch(FETCH_BATCH, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except (nats.errors.ConnectionClosedError,
                        nats.errors.ConnectionReconnectingError):
                    await asyncio.sleep(0.5)
                    continue
                except Exception as exc:
                    log.warning("fetch on %s failed: %s", subject, exc)
                    await asyncio.sleep(0.5)
                    continue
                await on_batch(msgs)
        finally:
            # before the runtime drains the connection: a pull subscription whose fetch was
            # cancelled can otherwise hold the drain for its whole timeout
            with contextlib.suppress(Exception):
                await asyncio.wait_for(psub.unsubscribe(), CLOSE_STEP_TIMEOUT_S)

    rt.spawn(consume(), name=f"consume-{consumer_name(name)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.retriever", description=__doc__)
    p.add_argument(
        "--pipeline-spec", action="append", required=True, metavar="PATH",
        help="pipeline spec TOML (repeat for several pipelines)",
    )
    p.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY,
                   help="episodes kept per pipeline (default %(default)s)")
    p.add_argument("--engine", default="auto",
                   choices=("auto", "numpy", "qdrant-local", "qdrant-server"),
                   help="auto: Qdrant server if SAIR_QDRANT_URL, else the embedded numpy "
                        "engine under SAIR_QDRANT_PATH")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="fixed Gaussian kernel bandwidth (default: median heuristic)")
    p.add_argument("--diversity", type=float, default=DEFAULT_DIVERSITY,
                   help="diversity penalty weight in [0, 1] (default %(default)s)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def _amain(args: argparse.Namespace) -> None:
    specs = [load_pipeline_spec(path) for path in args.pipeline_spec]
    app = await start_retriever(
        Settings.from_env(), specs, capacity=args.capacity, engine=args.engine,
        bandwidth=args.bandwidth, diversity=args.diversity,
    )
    await app.run()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    asyncio.run(_amain(args))

"""The load generator reads back, from the pipeline's done stream, completions that core NATS
did not bring it (a subscriber disconnected over a NATS restart misses them), and counts a
completion it saw both ways once.

The test plays the pipeline's last stage itself. A completion the load generator can never
receive on core NATS is made by publishing it on the load generator's own connection opened
with `no_echo`: the server stores it in the done stream but does not deliver it back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient

from sair.loadgen import LoadGenerator
from sair.loadgen.app import LoadResult
from sair.stack import ManagedServer
from schemas import subjects
from schemas.messages import Completion, StageRequest
from schemas.pipeline import PipelineSpec

from .helpers import make_streams, write_spec


def _completion(req: StageRequest, done_ts_s: float) -> bytes:
    return Completion(
        request_id=req.request_id, pipeline=req.pipeline, created_ts_s=req.created_ts_s,
        done_ts_s=done_ts_s, e2e_ms=(done_ts_s - req.created_ts_s) * 1000.0,
    ).model_dump_json().encode()  # fmt: skip


async def _serve(peer: NatsClient, own: NatsClient, pipeline: str, n: int,
                 hidden: int) -> dict[str, float]:  # fmt: skip
    """Take the `n` requests from the (only) stage queue and complete them: request `hidden`
    on the load generator's own no-echo connection, the others on `peer`; request 0 is
    completed twice (a genuine duplicate, another done time). Returns e2e_ms per request."""
    sub = await peer.jetstream().pull_subscribe(
        subjects.pipe_stage(pipeline, "a"), durable=subjects.stage_consumer("a"),
        stream=subjects.pipe_stream(pipeline),
    )  # fmt: skip
    e2e: dict[str, float] = {}
    while len(e2e) < n:
        for msg in await sub.fetch(n, timeout=10.0):
            req = StageRequest.model_validate_json(msg.data)
            i = int(req.request_id.rsplit("-", 1)[1])
            done = time.time()
            e2e[req.request_id] = (done - req.created_ts_s) * 1000.0
            await (own if i == hidden else peer).publish(
                subjects.pipe_done(pipeline), _completion(req, done)
            )
            if i == 0:
                await peer.publish(subjects.pipe_done(pipeline), _completion(req, done + 0.5))
            await msg.ack()
    await peer.flush()
    await own.flush()
    return e2e


async def _run(url: str, spec: PipelineSpec, run_id: str,
               keep_stream: bool) -> tuple[LoadResult, dict[str, float]]:  # fmt: skip
    own = await nats.connect(url, no_echo=True)
    peer = await nats.connect(url)
    try:
        if not keep_stream:
            await peer.jetstream().delete_stream(subjects.done_stream(spec.name))
        gen = LoadGenerator(own, spec, run_id)
        served = asyncio.create_task(_serve(peer, own, spec.name, 3, hidden=2))
        result = await gen.run([0.0, 0.0, 0.0], drain_timeout_s=6.0)
        return result, await served
    finally:
        await own.drain()
        await peer.drain()


async def test_missed_completion_is_read_back_and_counted_once(
    nats_server: ManagedServer, tmp_path: Path
) -> None:
    _, spec = write_spec(tmp_path, "readback", [("a", "sair.pipelines.testing:noop", 1, "")])
    nc = await nats.connect(nats_server.url)
    await make_streams(nc.jetstream(), spec)
    await nc.close()

    result, e2e = await _run(nats_server.url, spec, "rb", keep_stream=True)
    assert result.sent == 3 and result.completed == 3, result.summary()
    assert result.read_back == 1
    # Request 0: two genuine completions (two done times) -> one duplicate; the core-NATS
    # copies read back again from the stream are not counted again.
    assert result.duplicates == 1
    hidden = result.records["rb-0000002"]
    assert hidden.completions == 1
    assert hidden.e2e_ms is not None and abs(hidden.e2e_ms - e2e["rb-0000002"]) < 1e-6

    # Without a done stream (a deployment that predates it) the same completion is lost,
    # and nothing else breaks.
    result, _ = await _run(nats_server.url, spec, "rb2", keep_stream=False)
    assert result.completed == 2 and result.read_back == 0
    assert result.records["rb2-0000002"].completions == 0

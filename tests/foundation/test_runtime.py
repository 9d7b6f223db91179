"""The service runtime against a real nats-server: typed handlers, dead letters, request/reply."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.client import Client as NatsClient

from sair.runtime import ServiceRuntime, ensure_pipeline_streams
from sair.settings import Settings
from sair.stack import ManagedServer
from schemas import StageAction, subjects
from schemas.messages import DeadLetter, RetrieveReply, RetrieveRequest
from schemas.pipeline import PipelineSpec, StageSpec


def _settings(server: ManagedServer) -> Settings:
    return Settings(nats_url=server.url, metrics_port=0)


async def _dlq_consumer(nc: NatsClient, service: str) -> asyncio.Queue[DeadLetter]:
    queue: asyncio.Queue[DeadLetter] = asyncio.Queue()

    async def on_msg(msg: object) -> None:
        await queue.put(DeadLetter.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.dlq(service), cb=on_msg)
    return queue


async def test_malformed_message_goes_to_dead_letter_and_next_good_one_is_handled(
    nats_server: ManagedServer, nc: NatsClient
) -> None:
    rt = ServiceRuntime("dlqtest", _settings(nats_server))
    await rt.start()
    handled: asyncio.Queue[StageAction] = asyncio.Queue()

    async def handle(action: StageAction) -> None:
        await handled.put(action)

    await rt.subscribe("sair.test.dlq", StageAction, handle)
    letters = await _dlq_consumer(nc, "dlqtest")
    await nc.flush()

    await nc.publish(
        "sair.test.dlq", json.dumps({"stage": "infer", "target_replicas": -3}).encode()
    )
    await nc.publish("sair.test.dlq", b"{not json")
    await nc.publish(
        "sair.test.dlq", StageAction(stage="infer", target_replicas=2).model_dump_json().encode()
    )

    first = await asyncio.wait_for(letters.get(), 5)
    assert first.subject == "sair.test.dlq"
    assert "target_replicas=-3" in first.reason
    assert '"target_replicas": -3' in first.payload
    second = await asyncio.wait_for(letters.get(), 5)
    assert "json" in second.reason.lower()
    good = await asyncio.wait_for(handled.get(), 5)
    assert good.target_replicas == 2
    assert handled.empty()
    rejected = rt.metrics.rejected.labels("dlqtest", "sair.test.dlq")._value.get()
    assert rejected == 2
    await rt.close()


async def test_dead_letters_are_kept_in_the_dlq_stream(nats_server: ManagedServer) -> None:
    rt = ServiceRuntime("dlqkeep", _settings(nats_server))
    await rt.start()
    await rt.dead_letter("sair.x", b"\xff\xfe broken", "because")
    msg = await rt.js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq("dlqkeep"))
    letter = DeadLetter.model_validate_json(msg.data)
    assert letter.reason == "because"
    assert "broken" in letter.payload
    await rt.close()


async def test_request_reply_with_error_reply_for_bad_request(nats_server: ManagedServer) -> None:
    rt = ServiceRuntime("rrtest", _settings(nats_server))
    await rt.start()

    async def answer(req: RetrieveRequest) -> RetrieveReply:
        return RetrieveReply(pipeline=req.pipeline, stored=len(req.context))

    await rt.serve(
        "sair.test.rr",
        RetrieveRequest,
        answer,
        error_reply=lambda reason: RetrieveReply(pipeline="unknown", error=reason),
    )
    ok = await rt.request(
        "sair.test.rr",
        RetrieveRequest(pipeline="p", encoding_version=1, context=[0.1, 0.2, 0.3]),
        RetrieveReply,
    )
    assert ok.stored == 3 and ok.error is None
    raw = await rt.nc.request(
        "sair.test.rr", b'{"pipeline": "p", "encoding_version": 0, "context": [1]}', timeout=5
    )
    bad = RetrieveReply.model_validate_json(raw.data)
    assert bad.error is not None and "encoding_version=0" in bad.error
    await rt.close()


async def test_jetstream_consumer_acks_after_handler_and_redelivers_on_error(
    nats_server: ManagedServer, nc: NatsClient
) -> None:
    spec = PipelineSpec(
        name="rtjs",
        slo_p99_ms=100,
        stages=[StageSpec(name="a", kind="cpu"), StageSpec(name="b", kind="cpu")],
    )
    rt = ServiceRuntime("jstest", _settings(nats_server))
    await rt.start()
    await ensure_pipeline_streams(rt.js, spec)
    await ensure_pipeline_streams(rt.js, spec)  # idempotent
    seen: list[int] = []
    failed_once: set[int] = set()
    done = asyncio.Event()

    async def handle(action: StageAction) -> None:
        n = action.target_replicas
        if n == 3 and n not in failed_once:
            failed_once.add(n)
            raise RuntimeError("transient")
        seen.append(n)
        if len(seen) == 5:
            done.set()

    await rt.consume(
        subjects.pipe_stream("rtjs"),
        subjects.stage_consumer("a"),
        subjects.pipe_stage("rtjs", "a"),
        StageAction,
        handle,
        nak_delay_s=0.1,
    )
    js = nc.jetstream()
    for i in range(5):
        await js.publish(
            subjects.pipe_stage("rtjs", "a"),
            StageAction(stage="a", target_replicas=i).model_dump_json().encode(),
        )
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    await asyncio.sleep(0.3)
    info = await js.consumer_info(subjects.pipe_stream("rtjs"), subjects.stage_consumer("a"))
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await rt.close()


async def test_metrics_endpoint_serves_counters(nats_server: ManagedServer) -> None:
    import urllib.request

    rt = ServiceRuntime("metricstest", _settings(nats_server))
    await rt.start()
    await rt.dead_letter("sair.y", b"x", "r")
    assert rt.metrics_port
    body = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{rt.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    )
    assert 'sair_messages_rejected_total{service="metricstest",subject="sair.y"} 1.0' in body
    await rt.close()


@pytest.mark.parametrize("bad", ["", "Upper", "-lead", "a.b", "x" * 65])
def test_service_name_is_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="service="):
        ServiceRuntime(bad, Settings())

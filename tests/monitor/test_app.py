"""The monitor service against a real nats-server with JetStream.

The test plays the workers (WorkerReports), the last stage (Completions) and the load
generator (requests into the stage queue). The imgcls end-to-end test with real workers
is left to the workers' task (sair/worker is being built separately).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from sair.settings import Settings
from sair.stack import ManagedServer
from schemas import subjects
from schemas.histogram import LatencyHistogram
from schemas.messages import Completion, PipelineTelemetry, StageRequest, WorkerReport
from schemas.pipeline import PipelineSpec, StageSpec
from services.monitor.app import MonitorApp, start_monitor

SPEC = PipelineSpec(
    name="montest",
    slo_p99_ms=100.0,
    tick_s=0.5,
    stages=[
        StageSpec(name="pre", kind="cpu"),
        StageSpec(name="infer", kind="gpu", rho_grid=[0.5, 1.0], initial_rho=0.5),
        StageSpec(name="post", kind="cpu"),
    ],
)


@pytest_asyncio.fixture
async def monitor(nats_server: ManagedServer) -> AsyncIterator[MonitorApp]:
    app = await start_monitor(
        Settings(nats_url=nats_server.url, metrics_port=0), SPEC, window_s=10, tick_s=0.5
    )
    yield app
    await app.close()


async def telemetry_feed(nc: NatsClient) -> asyncio.Queue[PipelineTelemetry]:
    queue: asyncio.Queue[PipelineTelemetry] = asyncio.Queue()

    async def on_msg(msg: object) -> None:
        await queue.put(PipelineTelemetry.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.telemetry(SPEC.name), cb=on_msg)
    await nc.flush()
    return queue


async def wait_for(
    queue: asyncio.Queue[PipelineTelemetry],
    ok: Callable[[PipelineTelemetry], bool],
    timeout_s: float = 20.0,
) -> PipelineTelemetry:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.wait_for(queue.get(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if ok(last):
            return last
    raise AssertionError(f"no matching telemetry within {timeout_s} s; last: {last}")


class Workers:
    """Two replicas per stage publishing a report every 0.25 s, as workers would."""

    def __init__(self, nc: NatsClient, stages: set[str]) -> None:
        self.nc = nc
        self.stages = set(stages)
        self.seq = 0

    async def run(self) -> None:
        while True:
            self.seq += 1
            for stage in sorted(self.stages):
                for w in ("a", "b"):
                    r = WorkerReport(
                        pipeline=SPEC.name, stage=stage, worker_id=f"{stage}-{w}", seq=self.seq,
                        state="ready", ts_s=time.time(), interval_s=0.25, processed=5,
                        busy_s=0.1, service_ms=LatencyHistogram.from_values([20.0] * 5),
                        queue_wait_ms=LatencyHistogram.from_values([5.0] * 5),
                        rho=0.5 if stage == "infer" else None,
                    )
                    await self.nc.publish(subjects.reports(SPEC.name, stage), r.model_dump_json().encode())
            await asyncio.sleep(0.25)


async def test_monitor_publishes_telemetry_from_real_bus(
    monitor: MonitorApp, nc: NatsClient
) -> None:
    feed = await telemetry_feed(nc)
    js = nc.jetstream()
    # Seven requests wait in the infer queue (no worker consumes them).
    for i in range(7):
        req = StageRequest(request_id=f"q{i}", pipeline=SPEC.name, created_ts_s=time.time(),
                           enqueued_ts_s=time.time())
        await js.publish(subjects.pipe_stage(SPEC.name, "infer"), req.model_dump_json().encode())
    # 98 fast completions and 2 slow ones: P99 is the slow one.
    for i in range(100):
        e2e = 400.0 if i >= 98 else 20.0
        c = Completion(request_id=f"c{i}", pipeline=SPEC.name, created_ts_s=0.0,
                       done_ts_s=e2e / 1000, e2e_ms=e2e)
        await nc.publish(subjects.pipe_done(SPEC.name), c.model_dump_json().encode())
    workers = Workers(nc, {"pre", "infer", "post"})
    task = asyncio.create_task(workers.run())
    try:
        t = await wait_for(
            feed,
            lambda t: not t.stale_stages
            and t.stage("infer").queue_depth == 7
            and t.e2e_p99_ms is not None,
        )
        infer = t.stage("infer")
        assert infer.reporting_replicas == 2 and infer.replicas_ready == 2
        assert infer.rho == 0.5
        assert infer.throughput_rps is not None and infer.throughput_rps > 0
        assert infer.service_ms is not None
        assert infer.service_ms.p50_ms == pytest.approx(20.0, rel=0.07)
        assert t.e2e_p99_ms == pytest.approx(400.0, rel=0.07)
        assert t.slo_attainment == pytest.approx(0.98)
        assert t.stage("pre").queue_depth == 0
        assert t.bottleneck in SPEC.stage_names
        assert t.cost_per_h < t.whole_gpu_cost_per_h

        # /metrics carries the same figures.
        port = monitor.rt.metrics_port
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert 'sair_monitor_stage_queue_depth{pipeline="montest",stage="infer"} 7.0' in body
        assert 'sair_monitor_e2e_p99_ms{pipeline="montest"}' in body

        # A malformed report is dead-lettered; the monitor keeps going.
        await nc.publish(subjects.reports(SPEC.name, "pre"), json.dumps({"seq": -1}).encode())
        await nc.publish(subjects.reports(SPEC.name, "pre"), b"{not json")

        # post goes silent: after > 3 s it is stale, its rates unknown, the telemetry degraded.
        workers.stages.discard("post")
        t = await wait_for(feed, lambda t: t.stale_stages == ["post"])
        post = t.stage("post")
        assert post.stale and t.degraded
        assert post.throughput_rps is None and "throughput_rps" in post.missing_fields
        assert post.queue_depth == 0  # the queue is still read from JetStream
        assert not t.stage("pre").stale
        rejected = monitor.rt.metrics.rejected.labels(
            "monitor", subjects.reports(SPEC.name, "pre")
        )._value.get()
        assert rejected == 2
        assert monitor.max_lateness_s < 2.0
    finally:
        task.cancel()

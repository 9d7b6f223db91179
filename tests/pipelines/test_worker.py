"""Stage workers against a real nats-server: dead letters, reports, histograms, draining."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import nats
import numpy as np
from nats.aio.msg import Msg

from sair.loadgen import LoadGenerator
from sair.settings import Settings
from sair.stack import ManagedServer
from sair.worker import StageWorker, WorkerConfig
from schemas import subjects
from schemas.histogram import LatencyHistogram, bucket_bounds_ms, merge
from schemas.messages import DeadLetter, WorkerReport
from schemas.pipeline import PipelineSpec

from .helpers import make_streams, wait_for, write_spec


def _worker(server: ManagedServer, spec: PipelineSpec, stage: str, wid: str,
            **kw: float) -> StageWorker:  # fmt: skip
    cfg = WorkerConfig(spec=spec, stage=stage, worker_id=wid, install_signals=False, **kw)  # type: ignore[arg-type]
    return StageWorker(cfg, Settings(nats_url=server.url, metrics_port=-1))


async def test_failing_request_goes_to_dead_letter_and_others_flow(
    nats_server: ManagedServer, tmp_path: Path
) -> None:
    _, spec = write_spec(tmp_path, "dlqpipe", [
        ("a", "sair.pipelines.testing:fail_when_poisoned", 1, "options = { sleep_ms = 1.0 }"),
        ("b", "sair.pipelines.testing:noop", 1, ""),
    ])  # fmt: skip
    nc = await nats.connect(nats_server.url)
    await make_streams(nc.jetstream(), spec)
    letters: list[DeadLetter] = []

    async def on_letter(msg: Msg) -> None:
        letters.append(DeadLetter.model_validate_json(msg.data))

    await nc.subscribe(subjects.pipe_dlq(spec.name, "a"), cb=on_letter)
    workers = [_worker(nats_server, spec, "a", "dlq-a", max_failures=3),
               _worker(nats_server, spec, "b", "dlq-b")]  # fmt: skip
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        gen = LoadGenerator(
            nc, spec, "dlq", payload_fn=lambda rng, i: {"seq": i, "poison": i == 5}
        )
        result = await gen.run([i * 0.02 for i in range(20)], drain_timeout_s=4.0)
        await wait_for(lambda: bool(letters), 10, "the dead letter")
        assert result.completed == 19
        assert result.records["dlq-0000005"].completions == 0
        letter = letters[0]
        assert "failed 3 times" in letter.reason
        assert "poisoned payload seq=5" in letter.reason
        assert '"request_id":"dlq-0000005"' in letter.payload
        assert len(letters) == 1
        kept = await nc.jetstream().get_last_msg(
            subjects.DLQ_STREAM, subjects.pipe_dlq(spec.name, "a")
        )
        assert DeadLetter.model_validate_json(kept.data or b"").reason == letter.reason
        assert workers[0].dead_lettered_total == 1
        assert not tasks[0].done()  # the worker kept running
        # The request left the work queue (termed), nothing is pending for the stage.
        info = await nc.jetstream().consumer_info(subjects.pipe_stream(spec.name), "stage-a")
        assert info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        await nc.drain()


async def test_reports_are_well_formed_and_merge_to_the_request_latencies(
    nats_server: ManagedServer, tmp_path: Path
) -> None:
    _, spec = write_spec(tmp_path, "reppipe", [
        ("a", "sair.pipelines.testing:sleep", 2, "options = { sleep_ms = 3.0 }"),
        ("b", "sair.pipelines.testing:noop", 1, ""),
    ])  # fmt: skip
    nc = await nats.connect(nats_server.url)
    await make_streams(nc.jetstream(), spec)
    reports: list[WorkerReport] = []

    async def on_report(msg: Msg) -> None:
        reports.append(WorkerReport.model_validate_json(msg.data, context={"spec": spec}))

    await nc.subscribe(subjects.reports_all(spec.name), cb=on_report)
    workers = [
        _worker(nats_server, spec, "a", "rep-a1", report_interval_s=0.2, startup_s=0.3),
        _worker(nats_server, spec, "a", "rep-a2", report_interval_s=0.2, startup_s=0.3),
        _worker(nats_server, spec, "b", "rep-b1", report_interval_s=0.2),
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    n = 120
    try:
        await wait_for(lambda: {r.worker_id for r in reports if r.state == "ready"}
                       >= {"rep-a1", "rep-a2", "rep-b1"}, 15, "ready workers")  # fmt: skip
        gen = LoadGenerator(nc, spec, "rep")
        result = await gen.run(np.linspace(0, 2.0, n, endpoint=False).tolist(), drain_timeout_s=10)
        assert result.completed == n

        def processed(stage: str) -> int:
            return sum(r.processed for r in reports if r.stage == stage)

        await wait_for(lambda: processed("a") == n and processed("b") == n, 5, "reports")
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        await nc.drain()

    by_worker: dict[str, list[WorkerReport]] = defaultdict(list)
    for r in reports:
        by_worker[r.worker_id].append(r)
    for wid, reps in by_worker.items():
        assert [r.seq for r in reps] == list(range(len(reps))), wid
        states = [r.state for r in reps]
        assert states[0] == "starting" and "ready" in states and states[-1] == "draining", wid
        # starting comes before ready, ready before draining, never back
        order = {"starting": 0, "ready": 1, "draining": 2}
        assert [order[s] for s in states] == sorted(order[s] for s in states), wid
        for r in reps:
            assert r.service_ms.total == r.processed
            assert r.queue_wait_ms.total == r.processed
            assert r.busy_s >= r.service_ms.sum_ms / 1000.0 - 1e-9
            assert r.rho is None and r.gpu_tokens_used == 0
    # Both replicas of stage a took part.
    assert all(sum(r.processed for r in by_worker[w]) > 0 for w in ("rep-a1", "rep-a2"))

    merged = merge(r.service_ms for r in reports if r.stage == "a")
    exact = [rec.stage_ms["a"] for rec in result.records.values()]
    assert merged.counts == LatencyHistogram.from_values(exact).counts
    assert abs(merged.sum_ms - sum(exact)) < 1e-6 * n
    for q in (0.5, 0.9, 0.99):
        est = merged.quantile_ms(q)
        assert est is not None
        true = float(np.quantile(exact, q, method="inverted_cdf"))
        low, high = bucket_bounds_ms(LatencyHistogram.from_values([true]).counts.popitem()[0])
        assert low <= est <= high * 1.0001, (q, est, true)
    assert all(3.0 <= v < 200 for v in exact)  # the handler slept 3 ms

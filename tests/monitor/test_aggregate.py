"""WindowAggregator on hand-made report sequences (pure, clock passed in)."""

from __future__ import annotations

from typing import Literal

import pytest

from schemas.histogram import LatencyHistogram
from schemas.messages import Completion, ReplicaStatus, StageReplicas, WorkerReport
from schemas.pipeline import PipelineSpec, StageSpec
from services.monitor.aggregate import QueueObservation, WindowAggregator
from services.monitor.histo import convolve, percentiles

SPEC = PipelineSpec(
    name="p",
    slo_p99_ms=200.0,
    stages=[
        StageSpec(name="pre", kind="cpu"),
        StageSpec(name="infer", kind="gpu", rho_grid=[0.25, 0.5, 1.0], initial_rho=0.5),
        StageSpec(name="post", kind="cpu"),
    ],
)


def report(
    stage: str,
    worker: str,
    seq: int,
    ts: float,
    processed: int = 10,
    busy_s: float = 0.5,
    service: list[float] | None = None,
    wait: list[float] | None = None,
    state: Literal["starting", "ready", "draining"] = "ready",
    rho: float | None = None,
    token_wait_s: float = 0.0,
) -> WorkerReport:
    return WorkerReport(
        pipeline="p",
        stage=stage,
        worker_id=worker,
        seq=seq,
        state=state,
        ts_s=ts,
        interval_s=1.0,
        processed=processed,
        busy_s=busy_s,
        service_ms=LatencyHistogram.from_values(service or []),
        queue_wait_ms=LatencyHistogram.from_values(wait or []),
        rho=rho,
        gpu_token_wait_s=token_wait_s,
    )


def feed_steady(agg: WindowAggregator, t0: float, t1: int, stages: tuple[str, ...]) -> None:
    """Every stage: two replicas, each 10 requests of 20 ms per second, half busy."""
    for k in range(t0.__int__(), t1):
        for stage in stages:
            for w in ("a", "b"):
                rho = 0.5 if stage == "infer" else None
                agg.add_report(
                    report(stage, f"{stage}-{w}", k, float(k), service=[20.0] * 10, rho=rho),
                    float(k) + 0.1,
                )


def test_steady_state_figures() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    feed_steady(agg, 0, 30, ("pre", "infer", "post"))
    t = agg.snapshot(30.0, {"pre": QueueObservation(5, 1000)})
    pre = t.stage("pre")
    assert pre.replicas_ready == 2 and pre.reporting_replicas == 2
    assert pre.throughput_rps == pytest.approx(20.0, rel=0.1)
    assert pre.utilisation == pytest.approx(0.5)
    assert pre.service_ms is not None
    assert pre.service_ms.p50_ms == pytest.approx(20.0, rel=0.07)
    assert pre.queue_depth == 5
    assert not pre.stale and not t.degraded and t.stale_stages == []
    # GPU stage: busy 0.5 of the time with no token waits, quota rho = 0.5 -> utilisation 1.0.
    infer = t.stage("infer")
    assert infer.rho == 0.5
    assert infer.utilisation == pytest.approx(1.0)
    assert infer.gpu_token_wait_s == 0.0


def test_histograms_from_replicas_with_different_counts_are_merged_not_averaged() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    for k in range(5):
        # a: 2 fast requests/s; b: 18 slow ones. The stage P50 is b's latency.
        agg.add_report(report("pre", "a", k, k, processed=2, service=[10.0] * 2), k + 0.1)
        agg.add_report(report("pre", "b", k, k, processed=18, service=[100.0] * 18), k + 0.2)
    pre = agg.snapshot(5.0).stage("pre")
    assert pre.service_ms is not None
    assert pre.service_ms.p50_ms == pytest.approx(100.0, rel=0.07)
    assert pre.service_ms.p99_ms == pytest.approx(100.0, rel=0.07)


def test_stage_going_silent_is_stale_and_unknown_not_zero() -> None:
    agg = WindowAggregator(SPEC, window_s=30)
    feed_steady(agg, 0, 10, ("pre", "infer", "post"))
    feed_steady(agg, 10, 20, ("pre", "post"))  # infer stops reporting at t=10
    t = agg.snapshot(20.0, {"infer": QueueObservation(40, 500)})
    infer = t.stage("infer")
    assert infer.stale
    assert t.stale_stages == ["infer"] and t.degraded
    assert infer.throughput_rps is None and infer.utilisation is None
    assert {"throughput_rps", "utilisation", "service_ms"} <= set(infer.missing_fields)
    assert infer.queue_depth == 40  # JetStream still answers
    assert not t.stage("pre").stale
    # A stage that never reported: unknown, with its replica count flagged as missing.
    fresh = WindowAggregator(SPEC).snapshot(1.0)
    assert all(m.stale and m.throughput_rps is None for m in fresh.stages)
    assert "replicas_ready" in fresh.stage("pre").missing_fields


def test_idle_is_told_apart_from_unknown() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    for k in range(10):
        agg.add_report(report("pre", "a", k, k, processed=0, busy_s=0.0), k + 0.1)
    t = agg.snapshot(10.0)
    pre, infer = t.stage("pre"), t.stage("infer")
    assert pre.throughput_rps == 0.0 and pre.utilisation == 0.0 and not pre.stale
    assert pre.service_ms is None and "service_ms" in pre.missing_fields
    assert infer.throughput_rps is None and infer.stale


def test_restart_seq_drop_and_duplicates() -> None:
    agg = WindowAggregator(SPEC, window_s=30)
    for k in range(1, 11):
        agg.add_report(report("pre", "w", k, k), k + 0.1)
    assert not agg.add_report(report("pre", "w", 10, 10), 10.2)  # duplicate, ignored
    for k in range(1, 11):  # same worker id, counter back to 1: a restart
        agg.add_report(report("pre", "w", k, 10 + k), 10 + k + 0.1)
    assert agg.restarts_total == 1 and agg.duplicates_total == 1
    pre = agg.snapshot(21.0).stage("pre")
    assert pre.throughput_rps == pytest.approx(200 / 21.0, rel=0.06)
    assert "throughput_rps" not in pre.estimated_fields
    assert pre.reporting_replicas == 1


def test_lost_reports_are_compensated_and_flagged() -> None:
    agg = WindowAggregator(SPEC, window_s=30)
    for k in (1, 2, 3, 6, 7, 8, 9, 10):  # seq 4 and 5 never arrived
        agg.add_report(report("pre", "w", k, k), k + 0.1)
    pre = agg.snapshot(10.5).stage("pre")
    assert agg.lost_reports_total == 2
    assert pre.throughput_rps == pytest.approx(10.0, rel=0.06)
    assert "throughput_rps" in pre.estimated_fields


def test_fewer_replicas_than_expected_is_flagged() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    feed_steady(agg, 0, 10, ("pre", "infer", "post"))
    status = ReplicaStatus(
        pipeline="p",
        supervisor_id="sup",
        ts_s=10.0,
        stages=[
            StageReplicas(stage="pre", desired=3, ready=3),
            StageReplicas(stage="infer", desired=2, ready=2),
            StageReplicas(stage="post", desired=2, ready=2),
        ],
    )
    t = agg.snapshot(10.0, replica_status=status)
    pre = t.stage("pre")
    assert pre.replicas_ready == 3 and pre.replicas_desired == 3 and pre.reporting_replicas == 2
    assert "throughput_rps" in pre.estimated_fields
    assert t.degraded and t.stale_stages == []
    assert (
        not t.stage("infer").estimated_fields
        or "throughput_rps" not in t.stage("infer").estimated_fields
    )
    # Without a supervisor: a replica that vanished without draining is also missed.
    agg2 = WindowAggregator(SPEC, window_s=30)
    for k in range(10):
        agg2.add_report(report("post", "x", k, k), k + 0.1)
        if k < 5:
            agg2.add_report(report("post", "y", k, k), k + 0.1)
    t2 = agg2.snapshot(10.0)
    assert t2.stage("post").reporting_replicas == 1 and t2.degraded


def test_queue_growth_and_arrival_rate() -> None:
    agg = WindowAggregator(SPEC, window_s=30)
    for i in range(8):
        now = 2.0 * i
        agg.add_report(report("pre", "a", i, now, processed=20), now)
        # 25 requests/s arrive, the depth grows by 5/s.
        agg.snapshot(now, {"pre": QueueObservation(depth=10 + 10 * i, arrived_total=50 * i)})
    pre = agg.snapshot(16.0, {"pre": QueueObservation(depth=90, arrived_total=400)}).stage("pre")
    assert pre.queue_growth_per_s == pytest.approx(5.0)
    assert pre.arrival_rate_rps == pytest.approx(25.0)
    assert pre.arrived_total == 400  # the counter as read this tick, for fresh differences
    assert "arrival_rate_rps" not in pre.estimated_fields
    # Consumer recreated: the counter goes back and only the part after the reset counts.
    agg.snapshot(18.0, {"pre": QueueObservation(depth=90, arrived_total=0)})
    pre = agg.snapshot(20.0, {"pre": QueueObservation(depth=90, arrived_total=60)}).stage("pre")
    assert pre.arrival_rate_rps == pytest.approx(30.0)
    assert pre.arrived_total == 60
    # A queue not read this tick: no depth and no counter (unknown, not 0).
    assert agg.snapshot(22.0, {"pre": None}).stage("pre").arrived_total is None


def test_arrival_rate_estimated_from_flow_conservation_without_counter() -> None:
    agg = WindowAggregator(SPEC, window_s=30)
    for k in range(10):
        agg.add_report(report("post", "a", k, k, processed=10), k + 0.1)
        agg.snapshot(k + 0.5, {"post": QueueObservation(depth=2 * k)})
    post = agg.snapshot(10.5, {"post": QueueObservation(depth=20)}).stage("post")
    assert post.arrival_rate_rps is not None
    assert post.arrival_rate_rps == pytest.approx(12.0, rel=0.15)  # ~10/s out + 2/s growth
    assert "arrival_rate_rps" in post.estimated_fields


def test_window_forgets_old_reports() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    for k in range(30):
        processed = 100 if k < 15 else 10
        agg.add_report(report("pre", "a", k, k, processed=processed), k + 0.1)
    pre = agg.snapshot(30.0).stage("pre")
    assert pre.throughput_rps == pytest.approx(10.0, rel=0.11)


def test_completions_p99_slo_attainment_and_failures() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    for i in range(100):
        e2e = 50.0 if i < 90 else 500.0  # 10% above the 200 ms SLO
        agg.add_completion(
            Completion(request_id=f"r{i}", pipeline="p", created_ts_s=0, done_ts_s=1, e2e_ms=e2e),
            i * 0.1,
        )
    agg.add_completion(
        Completion(
            request_id="bad",
            pipeline="p",
            created_ts_s=0,
            done_ts_s=1,
            e2e_ms=1.0,
            ok=False,
            error="boom",
        ),
        9.95,
    )
    t = agg.snapshot(10.0)
    assert t.e2e_p99_ms == pytest.approx(500.0, rel=0.07)
    assert t.e2e_p50_ms == pytest.approx(50.0, rel=0.07)
    assert t.slo_attainment == pytest.approx(90 / 101)
    assert t.completed_rps == pytest.approx(10.1, rel=0.01)
    empty = WindowAggregator(SPEC).snapshot(5.0)
    assert empty.e2e_p99_ms is None and empty.slo_attainment is None


def test_costs_effective_and_whole_gpu() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    feed_steady(agg, 0, 5, ("pre", "infer", "post"))
    t = agg.snapshot(5.0)
    infer_spec = SPEC.stage("infer")
    per_replica = SPEC.replica_cost_per_h(infer_spec, 0.5)
    assert t.stage("infer").cost_per_h == pytest.approx(2 * per_replica)
    gpu_saving = 2 * 0.5 * SPEC.prices.gpu_per_h
    assert t.whole_gpu_cost_per_h - t.cost_per_h == pytest.approx(gpu_saving)


def test_gpu_utilisation_excludes_token_waits_then_divides_by_rho() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    for k in range(10):
        # Saturated on a 0.25 quota: busy all the time, 75% of it blocked on tokens.
        agg.add_report(
            report("infer", "g", k, k, busy_s=1.0, rho=0.25, token_wait_s=0.75, service=[40.0]),
            k + 0.1,
        )
    infer = agg.snapshot(10.0).stage("infer")
    assert infer.utilisation == pytest.approx(1.0)
    assert infer.gpu_token_wait_s == pytest.approx(7.5)


def test_sojourn_is_wait_plus_service() -> None:
    agg = WindowAggregator(SPEC, window_s=10)
    for k in range(5):
        agg.add_report(report("pre", "a", k, k, service=[20.0] * 10, wait=[10.0] * 10), k + 0.1)
    pre = agg.snapshot(5.0).stage("pre")
    assert pre.sojourn_ms is not None
    assert pre.sojourn_ms.p50_ms == pytest.approx(30.0, rel=0.07)
    assert "sojourn_ms" in pre.estimated_fields


def test_foreign_report_is_rejected() -> None:
    agg = WindowAggregator(SPEC)
    other = WorkerReport(
        pipeline="q", stage="pre", worker_id="w", seq=1, state="ready", ts_s=0, interval_s=1
    )
    with pytest.raises(ValueError, match="does not belong"):
        agg.add_report(other, 1.0)
    with pytest.raises(ValueError, match="window_s"):
        WindowAggregator(SPEC, window_s=0)


def test_histogram_helpers() -> None:
    assert percentiles({}) is None
    counts = LatencyHistogram.from_values([5.0] * 50).counts
    conv = convolve(counts, counts)
    pct = percentiles(conv)
    assert pct is not None and pct.p50_ms == pytest.approx(10.0, rel=0.07)
    assert sum(conv.values()) == 2500


def test_rho_cut_moves_the_bottleneck_at_the_next_report() -> None:
    """pre is the bottleneck; then infer's quota drops 10x. The window's infer samples are
    still fast ones, but the detector scales them to the rho the replicas report now."""
    agg = WindowAggregator(SPEC, window_s=10)
    for k in range(10):
        agg.add_report(report("pre", "pre-a", k, k, processed=8, busy_s=0.48,
                              service=[60.0] * 8), k + 0.1)  # fmt: skip
        agg.add_report(report("infer", "inf-a", k, k, processed=8, busy_s=0.08,
                              service=[10.0] * 8, rho=1.0), k + 0.2)  # fmt: skip
        agg.add_report(report("post", "post-a", k, k, processed=8, busy_s=0.01,
                              service=[1.0] * 8), k + 0.3)  # fmt: skip

    def queues(t: float) -> dict[str, QueueObservation | None]:
        return {s: QueueObservation(1, int(8 * t)) for s in ("pre", "infer", "post")}

    for t in (8.0, 9.0):
        agg.snapshot(t, queues(t))
    before = agg.snapshot(10.0, queues(10.0))
    assert before.bottleneck == "pre"
    # One more second: infer now runs at rho 0.1, 100 ms a request (0.8 of its capacity at
    # 8 rps); only one slow request has completed yet.
    agg.add_report(report("infer", "inf-a", 10, 10.0, processed=1, busy_s=1.0,
                          service=[100.0], rho=0.1, token_wait_s=0.9), 10.2)  # fmt: skip
    after = agg.snapshot(11.0, queues(11.0))
    assert after.bottleneck == "infer"
    rho = after.stage("infer").rho  # the window's mean, still mostly the old value
    assert rho is not None and 0.1 < rho < 1.0


def test_last_detector_inputs_and_answer_are_kept_for_diagnostics() -> None:
    """The snapshot keeps what it fed the detector (service times rescaled to the current
    rho, queue depths) and the detector's full answer, whose stage the telemetry names."""
    agg = WindowAggregator(SPEC, window_s=10)
    fresh = WindowAggregator(SPEC)
    assert fresh.last_loads == () and fresh.last_bottleneck is None
    for k in range(10):
        agg.add_report(report("pre", "pre-a", k, k, processed=8, busy_s=0.48,
                              service=[60.0] * 8), k + 0.1)  # fmt: skip
        agg.add_report(report("infer", "inf-a", k, k, processed=8, busy_s=0.4,
                              service=[50.0] * 8, rho=0.5), k + 0.2)  # fmt: skip
        agg.add_report(report("post", "post-a", k, k, processed=8, busy_s=0.01,
                              service=[1.0] * 8), k + 0.3)  # fmt: skip
    queues = {s: QueueObservation(d, 80) for s, d in (("pre", 3), ("infer", 1), ("post", 0))}
    agg.snapshot(9.0, {s: QueueObservation(q.depth, 72) for s, q in queues.items()})
    t = agg.snapshot(10.0, queues)
    loads = {ld.name: ld for ld in agg.last_loads}
    assert list(loads) == ["pre", "infer", "post"]
    assert loads["pre"].service_s == pytest.approx(0.060)
    assert loads["infer"].service_s == pytest.approx(0.050)  # rho unchanged: as measured
    assert loads["pre"].queue_depth == 3 and loads["post"].queue_depth == 0
    assert loads["pre"].arrival_rps == pytest.approx(8.0)
    assert agg.last_bottleneck is not None
    assert agg.last_bottleneck.stage == t.bottleneck == "pre"
    assert agg.last_bottleneck.confidence == t.bottleneck_confidence
    assert set(agg.last_bottleneck.gains_ms) == {"pre", "infer", "post"}
    assert agg.last_bottleneck.gains_ms["pre"] > agg.last_bottleneck.gains_ms["post"]

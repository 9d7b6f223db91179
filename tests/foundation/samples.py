"""One valid instance of every message, for round-trip and mutation tests."""

from __future__ import annotations

from schemas.common import SairModel
from schemas.histogram import LatencyHistogram
from schemas.messages import (
    ActionResult,
    Completion,
    DeadLetter,
    Episode,
    EpisodeOutcome,
    Percentiles,
    PipelineTelemetry,
    ReplicaStatus,
    RetrievedEpisode,
    RetrieveReply,
    RetrieveRequest,
    ScalingAction,
    StageAction,
    StageDesired,
    StageMetrics,
    StageReplicas,
    StageRequest,
    WorkerReport,
)
from schemas.pipeline import KubernetesTarget, PipelineSpec, StageSpec

SPEC = PipelineSpec(
    name="imgcls",
    slo_p99_ms=250.0,
    stages=[
        StageSpec(name="pre", kind="cpu", max_replicas=8, startup_s=1.0),
        StageSpec(
            name="infer",
            kind="gpu",
            rho_grid=[0.25, 0.5, 0.75, 1.0],
            initial_rho=0.5,
            full_speed_launch_rate=2000.0,
            kubernetes=KubernetesTarget(namespace="ml", deployment="imgcls-infer"),
        ),
        StageSpec(name="post", kind="cpu", options={"top_k": 5}),
    ],
)

HIST = LatencyHistogram.from_values([1.0, 2.5, 2.6, 40.0])

REPORT = WorkerReport(
    pipeline="imgcls",
    stage="infer",
    worker_id="infer-7f3a",
    seq=12,
    state="ready",
    ts_s=1_700_000_000.0,
    interval_s=1.0,
    processed=40,
    failed=1,
    in_flight=2,
    busy_s=0.8,
    service_ms=HIST,
    queue_wait_ms=HIST,
    rho=0.5,
    gpu_tokens_used=320,
    gpu_token_wait_s=0.05,
)

STAGE_METRICS = StageMetrics(
    stage="infer",
    kind="gpu",
    replicas_ready=2,
    replicas_starting=1,
    replicas_desired=3,
    reporting_replicas=2,
    arrival_rate_rps=35.0,
    throughput_rps=33.5,
    queue_depth=12,
    queue_growth_per_s=0.4,
    utilisation=0.92,
    service_ms=Percentiles(p50_ms=20, p95_ms=40, p99_ms=55),
    sojourn_ms=Percentiles(p50_ms=30, p95_ms=70, p99_ms=110),
    rho=0.5,
    cost_per_h=0.9,
    estimated_fields=["arrival_rate_rps"],
)

TELEMETRY = PipelineTelemetry(
    pipeline="imgcls",
    tick=7,
    ts_s=1_700_000_002.0,
    window_s=30.0,
    stages=[
        STAGE_METRICS.model_copy(update={"stage": "pre", "kind": "cpu", "rho": None}),
        STAGE_METRICS,
        StageMetrics(
            stage="post",
            kind="cpu",
            replicas_ready=1,
            stale=True,
            missing_fields=["throughput_rps"],
        ),
    ],
    arrival_rate_rps=35.0,
    completed_rps=33.0,
    e2e_p50_ms=80.0,
    e2e_p99_ms=240.0,
    slo_p99_ms=250.0,
    slo_attainment=0.991,
    cost_per_h=1.4,
    whole_gpu_cost_per_h=2.2,
    bottleneck="infer",
    bottleneck_confidence=0.8,
    stale_stages=["post"],
    degraded=True,
)

ACTION = ScalingAction(
    pipeline="imgcls",
    action_id="act-000042",
    ts_s=1_700_000_030.0,
    stages=[
        StageAction(stage="infer", target_replicas=3, rho=0.75),
        StageAction(stage="pre", target_replicas=2),
    ],
    source="embedded",
    policy="sair",
    rationale="infer is the bottleneck (utilisation 0.92 of its quota)",
    bottleneck="infer",
    predicted_p99_ms=180.0,
    predicted_reward=1.2,
    based_on_tick=7,
)

EPISODE = Episode(
    pipeline="imgcls",
    episode_id="ep-1",
    ts_s=1_700_000_060.0,
    encoding_version=1,
    context=[0.1, 0.5, 0.0, 0.25],
    action=[StageAction(stage="infer", target_replicas=3, rho=0.75)],
    reward=1.3,
    outcome=EpisodeOutcome(p99_ms=180.0, cost_per_h=1.6, slo_attainment=0.995, throughput_rps=35.0),
    source="embedded",
    action_id="act-000042",
)

SAMPLES: dict[str, SairModel] = {
    "PipelineSpec": SPEC,
    "WorkerReport": REPORT,
    "StageRequest": StageRequest(
        request_id="req-1",
        pipeline="imgcls",
        created_ts_s=1.0,
        enqueued_ts_s=1.5,
        payload={"seed": 3, "size": 224, "mean": [0.5, 0.4]},
        stage_ms={"pre": 3.5},
    ),
    "Completion": Completion(
        request_id="req-1",
        pipeline="imgcls",
        created_ts_s=1.0,
        done_ts_s=1.2,
        e2e_ms=200.0,
        stage_ms={"pre": 3.5, "infer": 20.0, "post": 1.0},
    ),
    "StageMetrics": STAGE_METRICS,
    "PipelineTelemetry": TELEMETRY,
    "StageAction": StageAction(stage="infer", target_replicas=2, rho=0.25),
    "ScalingAction": ACTION,
    "ActionResult": ActionResult(
        pipeline="imgcls",
        action_id="act-000042",
        ts_s=1.0,
        status="clamped",
        backend="local",
        applied=[StageAction(stage="infer", target_replicas=3, rho=0.75)],
        reasons=["infer: step limited 1 -> 3"],
    ),
    "Episode": EPISODE,
    "RetrieveRequest": RetrieveRequest(
        pipeline="imgcls", encoding_version=1, context=[0.1, 0.2], m=15
    ),
    "RetrieveReply": RetrieveReply(
        pipeline="imgcls",
        episodes=[RetrievedEpisode(episode=EPISODE, similarity=0.9, surprisal=0.3, score=0.27)],
        stored=1,
        cold_start=True,
    ),
    "DeadLetter": DeadLetter(
        service="monitor", subject="sair.reports.x.y", reason="bad", ts_s=1.0, payload="{}"
    ),
    "StageDesired": StageDesired(replicas=3, rho=0.5, action_id="act-1", ts_s=1.0),
    "ReplicaStatus": ReplicaStatus(
        pipeline="imgcls",
        supervisor_id="host-a",
        ts_s=1.0,
        stages=[StageReplicas(stage="pre", desired=2, starting=1, ready=1)],
    ),
}

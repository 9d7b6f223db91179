"""Small factories for policy tests: defaults plus `model_copy(update=...)`."""

from __future__ import annotations

from typing import Any

from schemas.messages import (
    Episode,
    EpisodeOutcome,
    Percentiles,
    PipelineTelemetry,
    RetrievedEpisode,
    StageAction,
    StageMetrics,
)
from schemas.pipeline import PipelineSpec, StageSpec

GRID = [0.25, 0.5, 0.75, 1.0]


def spec(**update: Any) -> PipelineSpec:
    """pre (cpu) -> infer (gpu) -> post (cpu), SLO 500 ms."""
    base = PipelineSpec(
        name="imgcls",
        slo_p99_ms=500.0,
        stages=[
            StageSpec(name="pre", kind="cpu", max_replicas=8, max_step=2),
            StageSpec(
                name="infer", kind="gpu", max_replicas=8, max_step=2, rho_grid=GRID,
                initial_rho=0.5, startup_s=10.0,
            ),
            StageSpec(name="post", kind="cpu", max_replicas=8, max_step=2),
        ],
    )
    return base.model_copy(update=update) if update else base


def spec4(**update: Any) -> PipelineSpec:
    """Four stages (for the prompt budget and the benchmark)."""
    base = spec()
    stages = [*base.stages[:2], StageSpec(name="agg", kind="cpu", max_replicas=8), base.stages[2]]
    return base.model_copy(update={"stages": stages, **update})


def stage(name: str = "pre", **update: Any) -> StageMetrics:
    kind = "gpu" if name == "infer" else "cpu"
    base = StageMetrics(
        stage=name,
        kind=kind,
        replicas_ready=2,
        reporting_replicas=2,
        arrival_rate_rps=20.0,
        throughput_rps=20.0,
        queue_depth=0,
        queue_growth_per_s=0.0,
        utilisation=0.5,
        service_ms=Percentiles(p50_ms=40.0, p95_ms=80.0, p99_ms=100.0),
        sojourn_ms=Percentiles(p50_ms=50.0, p95_ms=100.0, p99_ms=120.0),
        rho=0.5 if kind == "gpu" else None,
    )
    return base.model_copy(update=update) if update else base


def telemetry(
    stages: list[StageMetrics] | None = None, sp: PipelineSpec | None = None, **update: Any
) -> PipelineTelemetry:
    sp = sp or spec()
    if stages is None:
        stages = [stage(s.name) for s in sp.stages]
    base = PipelineTelemetry(
        pipeline=sp.name,
        tick=10,
        ts_s=100.0,
        window_s=10.0,
        stages=stages,
        arrival_rate_rps=20.0,
        completed_rps=20.0,
        e2e_p50_ms=150.0,
        e2e_p99_ms=300.0,
        slo_p99_ms=sp.slo_p99_ms,
        cost_per_h=1.0,
        whole_gpu_cost_per_h=1.5,
    )
    return base.model_copy(update=update) if update else base


def with_stage(t: PipelineTelemetry, name: str, **update: Any) -> PipelineTelemetry:
    return t.model_copy(
        update={"stages": [s.model_copy(update=update) if s.stage == name else s for s in t.stages]}
    )


def episode(
    sp: PipelineSpec,
    context: list[float],
    action: dict[str, tuple[int, float | None]],
    reward: float,
    i: int = 0,
    similarity: float = 0.9,
) -> RetrievedEpisode:
    acts = [StageAction(stage=k, target_replicas=n, rho=r) for k, (n, r) in action.items()]
    ep = Episode(
        pipeline=sp.name,
        episode_id=f"ep-{i}",
        ts_s=float(i),
        encoding_version=1,
        context=context,
        action=acts,
        reward=reward,
        outcome=EpisodeOutcome(p99_ms=300.0, cost_per_h=1.0),
        source="embedded",
    )
    return RetrievedEpisode(episode=ep, similarity=similarity, surprisal=0.1, score=0.1)

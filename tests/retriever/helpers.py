"""Shared builders for the retriever tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from schemas.context import ENCODING_VERSION, context_dim
from schemas.messages import Episode, EpisodeOutcome, StageAction
from schemas.pipeline import PipelineSpec, StageSpec


def make_spec(name: str | None = None) -> PipelineSpec:
    return PipelineSpec(
        name=name or f"rt-{uuid.uuid4().hex[:10]}",
        slo_p99_ms=200,
        stages=[
            StageSpec(name="pre", kind="cpu"),
            StageSpec(name="infer", kind="gpu", rho_grid=[0.25, 0.5, 1.0]),
        ],
    )


def make_episode(
    spec: PipelineSpec,
    n: int,
    reward: float = 1.0,
    context: Sequence[float] | None = None,
    ts_s: float | None = None,
    encoding_version: int = ENCODING_VERSION,
) -> Episode:
    dim = context_dim(spec)
    ctx = list(context) if context is not None else [((n * 7 + i * 3) % 11) / 10 for i in range(dim)]
    return Episode(
        pipeline=spec.name,
        episode_id=f"ep-{n}",
        ts_s=float(n) if ts_s is None else ts_s,
        encoding_version=encoding_version,
        context=ctx,
        action=[StageAction(stage="pre", target_replicas=1 + n % 3),
                StageAction(stage="infer", target_replicas=1, rho=0.5)],
        reward=reward,
        outcome=EpisodeOutcome(p99_ms=100.0 + n, cost_per_h=1.0),
        source="embedded",
    )

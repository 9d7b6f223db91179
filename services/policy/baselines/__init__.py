"""Baseline autoscalers behind the policy interface, reimplemented from
/work/shared/reference/autoscaler-baselines.md (configurations in docs/policy.md).

Every baseline is per stage (none sees the pipeline), reads only its own signal from
`StageMetrics`, evaluates at its own period, keeps its history in an explicit state, and is
wrapped by the validator with `guardrails="bounds"` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from schemas.messages import PipelineTelemetry, StageAction, StageMetrics
from schemas.pipeline import PipelineSpec, StageSpec

from ..interface import Decision, current_replicas, current_rho, current_targets, stage_metrics

T = TypeVar("T")


@dataclass(frozen=True)
class PerStage(Generic[T]):
    """An immutable stage-name -> state map (a tuple of pairs, so it stays hashable)."""

    items: tuple[tuple[str, T], ...] = ()

    def get(self, stage: str, default: T) -> T:
        for name, v in self.items:
            if name == stage:
                return v
        return default

    def set(self, stage: str, value: T) -> PerStage[T]:
        d = dict(self.items)
        d[stage] = value
        return PerStage(tuple(sorted(d.items(), key=lambda kv: kv[0])))


def baseline_decision(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    policy: str,
    replicas: Mapping[str, int],
    rationale: Sequence[str],
    rho: Mapping[str, float] | None = None,
) -> Decision:
    """Full targets: replicas (and rho) of the named stages changed, the rest as they are.

    A GPU stage whose rho the baseline does not set carries rho None ("keep the current
    share"): the validator fills in the share last applied. Telemetry's rho is a window
    average, and echoing it back would move the share after every change."""
    cur = current_targets(spec, telemetry)
    rho = rho or {}
    out: list[StageAction] = []
    for a in cur:
        out.append(
            StageAction(
                stage=a.stage,
                target_replicas=replicas.get(a.stage, a.target_replicas),
                rho=rho.get(a.stage),
            )
        )
    hold = all(
        a.target_replicas == c.target_replicas and (a.rho is None or a.rho == c.rho)
        for a, c in zip(out, cur, strict=True)
    )
    return Decision(
        targets=tuple(out), source="baseline", policy=policy, rationale=tuple(rationale), hold=hold
    )


def per_stage(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    fn: Callable[[StageSpec, StageMetrics | None, int, float | None], T],
) -> list[tuple[StageSpec, T]]:
    """Apply fn(stage spec, metrics, current replicas, current rho) to every stage."""
    out: list[tuple[StageSpec, T]] = []
    for st in spec.stages:
        m = stage_metrics(telemetry, st.name)
        out.append((st, fn(st, m, current_replicas(m, st), current_rho(m, st))))
    return out


__all__ = ["PerStage", "baseline_decision", "per_stage"]

"""The shaped reward of one action, measured after the settle time (pure).

    R = w_L * gain - w_C * cost - w_S * slo + w_P * proactive + w_Pareto * pareto

with weights from `PipelineSpec.reward` (schemas.pipeline.RewardWeights; defaults 1.0, 0.5,
2.0, 0.2, 1.0) and

- gain      = clip((max(p99_before, F) - max(p99_after, F)) / SLO, -1, 1)   latency gain,
              with F = LATENCY_FLOOR x SLO
- cost      = cost_after / max_cost                                in [0, 1]
- slo       = min(max(0, p99_after / SLO - 1), SLO_EXCESS_CAP)^2   quadratic SLO penalty
- proactive = 1 if the action added capacity while the SLO still held but was at risk
              (p99_before >= RISK_FRACTION x SLO, or the reflex predicted a breach) and the
              SLO still held afterwards; else 0
- pareto    = pareto.pareto_term((p99_after / SLO, cost_after / max_cost), front)

max_cost is the cost of every stage at max_replicas and rho = 1. An unknown P99 (no
completions) counts as no gain and as the worst P99 on the Pareto axis (REF), never as 0.

The latency floor (our choice, not the paper's): a P99 below LATENCY_FLOOR x SLO (0.8, the
planner's headroom) counts as that floor, in the gain and on the Pareto axis. The objective
is the SLO at the least cost; without the floor both terms keep paying for latency nobody
asked for (a 25 ms lower P99 was worth more than a rho step of GPU), so the learned and the
planned actions over-provision. Above the floor a lower P99 is worth as much as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schemas.pipeline import PipelineSpec

from . import pareto
from .pareto import Point

RISK_FRACTION = 0.8
LATENCY_FLOOR = 0.8
"""P99 below this fraction of the SLO earns nothing more (module doc)."""
SLO_EXCESS_CAP = 2.0
"""P99 three times the SLO or worse earns the same (maximal) penalty: keeps rewards bounded."""


@dataclass(frozen=True)
class Outcome:
    p99_ms: float | None
    cost_per_h: float


@dataclass(frozen=True)
class RewardBreakdown:
    gain: float
    cost: float
    slo: float
    proactive: float
    pareto: float
    total: float
    point: Point
    """The outcome on the normalised Pareto axes (p99 / SLO, cost / max cost)."""


def max_cost_per_h(spec: PipelineSpec) -> float:
    """Effective cost of the largest configuration: every stage at max_replicas, rho = 1."""
    total = sum(st.max_replicas * spec.replica_cost_per_h(st, 1.0) for st in spec.stages)
    return max(total, 1e-9)


def normalise(spec: PipelineSpec, p99_ms: float | None, cost_per_h: float) -> Point:
    if p99_ms is None:
        p = pareto.REF[0]
    else:
        p = min(max(p99_ms / spec.slo_p99_ms, LATENCY_FLOOR), pareto.REF[0])
    c = min(cost_per_h / max_cost_per_h(spec), pareto.REF[1])
    return (p, c)


def shaped_reward(
    spec: PipelineSpec,
    before: Outcome,
    after: Outcome,
    front: Sequence[Point],
    *,
    added_capacity: bool = False,
    breach_predicted: bool = False,
) -> RewardBreakdown:
    """Reward of moving from `before` to `after`, scored against the current Pareto front."""
    w = spec.reward
    slo_ms = spec.slo_p99_ms
    if before.p99_ms is None or after.p99_ms is None:
        gain = 0.0
    else:
        floor = LATENCY_FLOOR * slo_ms
        gain = (max(before.p99_ms, floor) - max(after.p99_ms, floor)) / slo_ms
        gain = max(-1.0, min(1.0, gain))
    point = normalise(spec, after.p99_ms, after.cost_per_h)
    cost = point[1]
    excess = SLO_EXCESS_CAP if after.p99_ms is None else max(0.0, after.p99_ms / slo_ms - 1.0)
    slo = min(excess, SLO_EXCESS_CAP) ** 2
    held_before = before.p99_ms is not None and before.p99_ms <= slo_ms
    held_after = after.p99_ms is not None and after.p99_ms <= slo_ms
    at_risk = breach_predicted or (
        before.p99_ms is not None and before.p99_ms >= RISK_FRACTION * slo_ms
    )
    proactive = 1.0 if added_capacity and held_before and held_after and at_risk else 0.0
    par = pareto.pareto_term(point, front)
    total = (
        w.latency_gain * gain
        - w.cost * cost
        - w.slo_penalty * slo
        + w.proactive_bonus * proactive
        + w.pareto * par
    )
    return RewardBreakdown(
        gain=gain, cost=cost, slo=slo, proactive=proactive, pareto=par, total=total, point=point
    )

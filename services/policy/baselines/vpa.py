"""VPA-style right-sizing (baselines.md §2), mapped onto our action space.

Our actions have no per-replica CPU or memory, only replicas and, for GPU stages, rho. VPA
never changes the replica count, so:
- GPU stages: VPA right-sizes the GPU share. Each evaluation (recommender interval 60 s)
  adds a sample of the share one replica actually uses, `utilisation x rho` (the monitor's
  utilisation is of the quota), to a decaying histogram (first bucket 0.01, buckets 5%
  wider, weight max(rho, 0.1) x 2^(age / half-life)). Recommendation, with margin 1.15:
  target = p90, lower = p50, upper = p95 x (1 + 1/confidence); lower x (1 + 0.001/c)^-2.
  The updater (in place, as `InPlaceOrRecreate`; rho changes at run time) moves rho to the
  target, rounded up to the grid, when the current rho is outside [lower, upper], or when
  the last change is older than `min_update_age_s` and rho differs from the target by
  >= 10%. Confidence c = min(history span, samples x interval) / confidence_unit.
- CPU stages: nothing (no per-replica CPU to right-size): replicas stay as they are.
Windows shortened for 30-minute experiments (documented in docs/policy.md): half-life
24 h -> 300 s, confidence unit 24 h -> 600 s, minimum age before a target-drift update
12 h -> 120 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.messages import PipelineTelemetry, RetrievedEpisode
from schemas.pipeline import PipelineSpec, StageSpec

from ..interface import (
    Decision,
    Periodic,
    current_rho,
    hold_decision,
    measured_rho,
    stage_metrics,
)
from . import PerStage, baseline_decision

FIRST_BUCKET = 0.01
BUCKET_GROWTH = 1.05
N_BUCKETS = math.ceil(math.log(1.0 / FIRST_BUCKET) / math.log(BUCKET_GROWTH)) + 1


@dataclass(frozen=True)
class VPAConfig:
    recommender_interval_s: float = 60.0
    half_life_s: float = 300.0
    margin: float = 0.15
    target_quantile: float = 0.90
    lower_quantile: float = 0.50
    upper_quantile: float = 0.95
    confidence_unit_s: float = 600.0
    min_update_age_s: float = 120.0
    drift_fraction: float = 0.10


@dataclass(frozen=True)
class VPAStageState:
    weights: tuple[float, ...] = ()
    ref_s: float | None = None
    first_s: float | None = None
    samples: int = 0
    last_update_s: float | None = None


@dataclass(frozen=True)
class VPAState:
    clock: Periodic = field(default_factory=Periodic)
    stages: PerStage[VPAStageState] = field(default_factory=PerStage)


def bucket_of(value: float) -> int:
    if value <= FIRST_BUCKET:
        return 0
    return min(N_BUCKETS - 1, math.ceil(math.log(value / FIRST_BUCKET) / math.log(BUCKET_GROWTH)))


def bucket_upper(i: int) -> float:
    return FIRST_BUCKET * BUCKET_GROWTH**i


def add_sample(
    s: VPAStageState, value: float, weight: float, now: float, half_life_s: float
) -> VPAStageState:
    ref = s.ref_s if s.ref_s is not None else now
    w = list(s.weights) if s.weights else [0.0] * N_BUCKETS
    # Newer samples weigh more: 2^((t - ref) / half-life). Re-base when the factor grows.
    factor = 2.0 ** ((now - ref) / half_life_s)
    if factor > 1e6:
        w = [x / factor for x in w]
        ref, factor = now, 1.0
    w[bucket_of(value)] += weight * factor
    return VPAStageState(
        weights=tuple(w),
        ref_s=ref,
        first_s=s.first_s if s.first_s is not None else now,
        samples=s.samples + 1,
        last_update_s=s.last_update_s,
    )


def percentile(weights: Sequence[float], q: float) -> float:
    total = sum(weights)
    if total <= 0:
        return 0.0
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if acc >= q * total - 1e-12:
            return bucket_upper(i)
    return bucket_upper(len(weights) - 1)


@dataclass(frozen=True)
class Recommendation:
    target: float
    lower: float
    upper: float
    confidence: float


def recommend(cfg: VPAConfig, s: VPAStageState, now: float) -> Recommendation:
    m = 1.0 + cfg.margin
    span = 0.0 if s.first_s is None else now - s.first_s
    c = min(span, s.samples * cfg.recommender_interval_s) / cfg.confidence_unit_s
    c = max(c, 1e-6)
    target = percentile(s.weights, cfg.target_quantile) * m
    lower = percentile(s.weights, cfg.lower_quantile) * m * (1 + 0.001 / c) ** -2
    upper = percentile(s.weights, cfg.upper_quantile) * m * (1 + 1 / c)
    return Recommendation(target, lower, upper, c)


def grid_at_least(st: StageSpec, value: float) -> float:
    for g in st.rho_grid:
        if g >= value - 1e-12:
            return g
    return st.rho_grid[-1]


class VPAPolicy:
    is_baseline = True

    def __init__(self, config: VPAConfig | None = None, name: str = "vpa") -> None:
        self.config = config or VPAConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> VPAState:
        return VPAState()

    def period_s(self, spec: PipelineSpec) -> float:
        return self.config.recommender_interval_s

    def wants_retrieval(self, spec: PipelineSpec, state: VPAState, now: float) -> bool:
        return False

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: VPAState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, VPAState]:
        cfg = self.config
        if not state.clock.due(now, cfg.recommender_interval_s):
            return hold_decision(spec, telemetry, self.name, "baseline", "vpa: not due"), state
        stages = state.stages
        rho_out: dict[str, float] = {}
        why: list[str] = []
        for st in spec.stages:
            if st.kind != "gpu":
                why.append(f"{st.name}: cpu stage, no per-replica resource to right-size")
                continue
            m = stage_metrics(telemetry, st.name)
            rho = current_rho(m, st) or 1.0
            s = stages.get(st.name, VPAStageState())
            if m is None or m.stale or m.utilisation is None:
                why.append(f"{st.name}: utilisation unknown: no sample")
                continue
            # utilisation is of the window's average quota: pair it with that average
            used = m.utilisation * (measured_rho(m, st) or 1.0)
            s = add_sample(s, used, max(rho, 0.1), now, cfg.half_life_s)
            rec = recommend(cfg, s, now)
            target = grid_at_least(st, rec.target)
            outside = not rec.lower <= rho <= rec.upper
            drift = (
                (s.last_update_s is None or now - s.last_update_s >= cfg.min_update_age_s)
                and abs(rho - rec.target) >= cfg.drift_fraction * max(rec.target, 1e-9)
            )
            why.append(
                f"{st.name}: used share {used:.3f}; target {rec.target:.3f} "
                f"[{rec.lower:.3f}, {rec.upper:.3f}] c={rec.confidence:.2f}"
            )
            if (outside or drift) and target != rho:
                rho_out[st.name] = target
                why.append(f"{st.name}: rho {rho:g} -> {target:g}")
                s = VPAStageState(s.weights, s.ref_s, s.first_s, s.samples, now)
            stages = stages.set(st.name, s)
        return (
            baseline_decision(spec, telemetry, self.name, {}, why, rho_out),
            VPAState(Periodic(now), stages),
        )

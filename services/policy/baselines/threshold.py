"""Threshold (rule-based) scaler, per stage (baselines.md §3; our definition, logged).

Every T = 30 s, metric m of the stage:
- `utilisation` (default, both kinds; for a GPU stage the utilisation of its rho quota), or
- `queue_per_replica` = queue_depth / ready replicas (compared with U and L as given).
If m > U for k_up consecutive evaluations and the last scale-up is older than the up
cooldown: replicas += s_up. If m < L for k_down consecutive evaluations and the last scaling
action is older than the down cooldown: replicas -= 1. Clamp to [min, max]. Acting resets
that direction's counter. Defaults: U = 0.8, L = 0.3, k_up = 2, k_down = 4, s_up = 1,
cooldowns 60 s up / 300 s down. An unknown metric resets both counters (no evidence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageMetrics
from schemas.pipeline import PipelineSpec

from ..interface import Decision, Periodic, current_replicas, hold_decision, stage_metrics
from . import PerStage, baseline_decision


@dataclass(frozen=True)
class ThresholdConfig:
    period_s: float = 30.0
    upper: float = 0.8
    lower: float = 0.3
    k_up: int = 2
    k_down: int = 4
    step_up: int = 1
    up_cooldown_s: float = 60.0
    down_cooldown_s: float = 300.0
    metric: Literal["utilisation", "queue_per_replica"] = "utilisation"


@dataclass(frozen=True)
class ThresholdStageState:
    above: int = 0
    below: int = 0
    last_up_s: float | None = None
    last_scale_s: float | None = None


@dataclass(frozen=True)
class ThresholdState:
    clock: Periodic = field(default_factory=Periodic)
    stages: PerStage[ThresholdStageState] = field(default_factory=PerStage)


def metric_value(m: StageMetrics, metric: str) -> float | None:
    if metric == "utilisation":
        return m.utilisation
    if m.queue_depth is None or m.replicas_ready <= 0:
        return None
    return m.queue_depth / m.replicas_ready


def threshold_step(
    cfg: ThresholdConfig,
    s: ThresholdStageState,
    value: float | None,
    current: int,
    lo: int,
    hi: int,
    now: float,
) -> tuple[int, ThresholdStageState, str]:
    """One evaluation of one stage: (desired, new state, why)."""
    if value is None:
        return current, ThresholdStageState(0, 0, s.last_up_s, s.last_scale_s), "metric unknown"
    above = s.above + 1 if value > cfg.upper else 0
    below = s.below + 1 if value < cfg.lower else 0
    s = replace(s, above=above, below=below)
    if above >= cfg.k_up:
        if s.last_up_s is not None and now - s.last_up_s < cfg.up_cooldown_s:
            return current, s, f"{value:.2f} > U for {above}, up cooldown"
        n = min(current + cfg.step_up, hi)
        if n == current:
            return current, s, f"{value:.2f} > U for {above}, at max {hi}"
        return n, replace(s, above=0, last_up_s=now, last_scale_s=now), (
            f"{value:.2f} > U={cfg.upper} for {above} evaluations: +{cfg.step_up}"
        )
    if below >= cfg.k_down:
        if s.last_scale_s is not None and now - s.last_scale_s < cfg.down_cooldown_s:
            return current, s, f"{value:.2f} < L for {below}, down cooldown"
        n = max(current - 1, lo)
        if n == current:
            return current, s, f"{value:.2f} < L for {below}, at min {lo}"
        return n, replace(s, below=0, last_scale_s=now), (
            f"{value:.2f} < L={cfg.lower} for {below} evaluations: -1"
        )
    return current, s, f"{value:.2f} (above {above}/{cfg.k_up}, below {below}/{cfg.k_down})"


class ThresholdPolicy:
    is_baseline = True

    def __init__(self, config: ThresholdConfig | None = None, name: str = "threshold") -> None:
        self.config = config or ThresholdConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> ThresholdState:
        return ThresholdState()

    def period_s(self, spec: PipelineSpec) -> float:
        return self.config.period_s

    def wants_retrieval(self, spec: PipelineSpec, state: ThresholdState, now: float) -> bool:
        return False

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: ThresholdState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, ThresholdState]:
        cfg = self.config
        if not state.clock.due(now, cfg.period_s):
            return (
                hold_decision(spec, telemetry, self.name, "baseline", "threshold: not due"),
                state,
            )
        stages = state.stages
        desired: dict[str, int] = {}
        why: list[str] = []
        for st in spec.stages:
            m = stage_metrics(telemetry, st.name)
            value = None if m is None or m.stale else metric_value(m, cfg.metric)
            current = current_replicas(m, st)
            n, s, w = threshold_step(
                cfg,
                stages.get(st.name, ThresholdStageState()),
                value,
                current,
                st.min_replicas,
                st.max_replicas,
                now,
            )
            stages = stages.set(st.name, s)
            why.append(f"{st.name}: {w}")
            if n != current:
                desired[st.name] = n
        return (
            baseline_decision(spec, telemetry, self.name, desired, why),
            ThresholdState(Periodic(now), stages),
        )

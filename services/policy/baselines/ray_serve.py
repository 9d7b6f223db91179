"""Ray Serve's default autoscaling policy, per stage (baselines.md §6).

Signal: ongoing requests = queue_depth + busy slots (utilisation x ready x concurrency),
averaged over look_back_period_s = 30 s of samples (one per call). Then
    error_ratio = ongoing / (target_ongoing_requests x running)      target 2
    desired     = ceil(running x (1 + (error_ratio - 1) x factor))   factor 1
and, if smoothing keeps a downscale stuck at the current count although
ceil(running x error_ratio) < running, one less. Clamp to [min, max] (the stage's bounds).
Delays count time, not loop iterations (Ray's counter overshot ~6x when loops were slow):
a scale-up must be proposed continuously for upscale_delay_s = 30 s, a scale-down for
downscale_delay_s = 600 s; any other proposal resets the clock. 0 -> 1 is immediate when
requests are waiting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.messages import PipelineTelemetry, RetrievedEpisode
from schemas.pipeline import PipelineSpec

from ..interface import Decision, current_replicas, stage_metrics
from . import PerStage, baseline_decision
from .kpa import concurrency


@dataclass(frozen=True)
class RayServeConfig:
    target_ongoing_requests: float = 2.0
    look_back_period_s: float = 30.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    loop_period_s: float = 0.1


@dataclass(frozen=True)
class RayStageState:
    samples: tuple[tuple[float, float], ...] = ()
    direction: int = 0
    since_s: float | None = None


@dataclass(frozen=True)
class RayServeState:
    stages: PerStage[RayStageState] = field(default_factory=PerStage)


def ray_desired(cfg: RayServeConfig, running: int, ongoing: float) -> int:
    """The scaling-factor step (before bounds and delays)."""
    if running == 0:
        return 1 if ongoing > 0 else 0
    error_ratio = ongoing / (cfg.target_ongoing_requests * running)
    factor = cfg.upscaling_factor if error_ratio >= 1 else cfg.downscaling_factor
    desired = math.ceil(running * (1 + (error_ratio - 1) * factor))
    # Smoothing can keep a scale-down at `running` forever: step down by one.
    if error_ratio < 1 and desired == running and math.ceil(running * error_ratio) < running:
        desired -= 1
    return desired


def apply_delay(
    cfg: RayServeConfig, s: RayStageState, current: int, desired: int, now: float
) -> tuple[int, RayStageState, str]:
    if current == 0 and desired > 0:
        return desired, RayStageState(s.samples), "cold start: immediate"
    direction = (desired > current) - (desired < current)
    if direction == 0:
        return current, RayStageState(s.samples), "no change"
    since = s.since_s if s.direction == direction and s.since_s is not None else now
    delay = cfg.upscale_delay_s if direction > 0 else cfg.downscale_delay_s
    if now - since >= delay - 1e-9:
        return desired, RayStageState(s.samples), f"{current} -> {desired} after {delay:.0f} s"
    return current, RayStageState(s.samples, direction, since), (
        f"{current} -> {desired} pending ({now - since:.0f}/{delay:.0f} s)"
    )


class RayServePolicy:
    is_baseline = True

    def __init__(self, config: RayServeConfig | None = None, name: str = "ray") -> None:
        self.config = config or RayServeConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> RayServeState:
        return RayServeState()

    def period_s(self, spec: PipelineSpec) -> float:
        return self.config.loop_period_s

    def wants_retrieval(self, spec: PipelineSpec, state: RayServeState, now: float) -> bool:
        return False

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: RayServeState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, RayServeState]:
        cfg = self.config
        stages = state.stages
        desired: dict[str, int] = {}
        why: list[str] = []
        for st in spec.stages:
            m = stage_metrics(telemetry, st.name)
            c = None if m is None or m.stale else concurrency(st, m)
            if m is None or c is None:
                why.append(f"{st.name}: ongoing requests unknown: hold")
                continue
            s = stages.get(st.name, RayStageState())
            samples = (
                *tuple(x for x in s.samples if now - x[0] < cfg.look_back_period_s),
                (now, c),
            )
            avg = sum(v for _, v in samples) / len(samples)
            current = current_replicas(m, st)
            raw = ray_desired(cfg, m.replicas_ready, avg)
            raw = min(max(raw, st.min_replicas), st.max_replicas)
            s = RayStageState(samples, s.direction, s.since_s)
            n, s, w = apply_delay(cfg, s, current, raw, now)
            stages = stages.set(st.name, s)
            why.append(f"{st.name}: ongoing {avg:.1f} over {m.replicas_ready} running: {w}")
            if n != current:
                desired[st.name] = n
        return (
            baseline_decision(spec, telemetry, self.name, desired, why),
            RayServeState(stages),
        )

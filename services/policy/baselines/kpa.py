"""Knative Pod Autoscaler (KPA), concurrency mode, per stage (baselines.md §5).

Signal: concurrency = requests in the stage now = queue_depth + busy slots
(utilisation x ready x concurrency); the queue-proxy's view of a queue-fed worker.
Target per pod = containerConcurrency (the stage's `concurrency`) x 70%. Every 2 s tick:
desired_stable = ceil(mean over the 60 s stable window / target), desired_panic = the same
over the 6 s panic window; both limited to [floor(ready / 2), ceil(1000 x ready)]. Panic
starts when desired_panic / ready >= 2.0; in panic the count follows the panic value and
never decreases; panic ends after a full stable window without the condition.
Scale to zero is not modelled (the stage's min_replicas applies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageMetrics
from schemas.pipeline import PipelineSpec, StageSpec

from ..interface import Decision, Periodic, current_replicas, hold_decision, stage_metrics
from . import PerStage, baseline_decision


@dataclass(frozen=True)
class KPAConfig:
    tick_s: float = 2.0
    stable_window_s: float = 60.0
    panic_window_fraction: float = 0.10
    target_percentage: float = 0.70
    container_concurrency: int | None = None
    """None: the stage's concurrency."""
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0


@dataclass(frozen=True)
class KPAStageState:
    samples: tuple[tuple[float, float], ...] = ()
    panic_since_s: float | None = None
    max_panic_pods: int = 0


@dataclass(frozen=True)
class KPAState:
    clock: Periodic = field(default_factory=Periodic)
    stages: PerStage[KPAStageState] = field(default_factory=PerStage)


def concurrency(st: StageSpec, m: StageMetrics) -> float | None:
    if m.queue_depth is None and m.utilisation is None:
        return None
    busy = (m.utilisation or 0.0) * m.replicas_ready * st.concurrency
    return float(m.queue_depth or 0) + min(busy, m.replicas_ready * st.concurrency)


def kpa_step(
    cfg: KPAConfig,
    s: KPAStageState,
    target: float,
    sample: float,
    ready: int,
    now: float,
) -> tuple[int, KPAStageState, str]:
    samples = (*tuple(x for x in s.samples if now - x[0] < cfg.stable_window_s), (now, sample))
    panic_w = cfg.stable_window_s * cfg.panic_window_fraction
    stable = [v for t, v in samples]
    panic = [v for t, v in samples if now - t < panic_w]
    avg_stable = sum(stable) / len(stable)
    avg_panic = sum(panic) / len(panic)
    ready_eff = max(ready, 1)
    up_limit = math.ceil(cfg.max_scale_up_rate * ready_eff)
    down_limit = math.floor(ready_eff / cfg.max_scale_down_rate)
    d_stable = min(max(math.ceil(avg_stable / target), down_limit), up_limit)
    d_panic = min(max(math.ceil(avg_panic / target), down_limit), up_limit)
    over = d_panic / ready_eff >= cfg.panic_threshold
    panic_since = s.panic_since_s
    max_panic = s.max_panic_pods
    if over:
        if panic_since is None:
            max_panic = ready
        panic_since = now
    elif panic_since is not None and now - panic_since >= cfg.stable_window_s:
        panic_since, max_panic = None, 0
    if panic_since is not None:
        max_panic = max(max_panic, d_panic)
        desired = max_panic
        why = f"panic: {avg_panic:.1f} concurrent / target {target:.2f} -> {desired}"
    else:
        desired = d_stable
        why = f"stable: {avg_stable:.1f} concurrent / target {target:.2f} -> {desired}"
    return desired, KPAStageState(samples, panic_since, max_panic), why


class KPAPolicy:
    is_baseline = True

    def __init__(self, config: KPAConfig | None = None, name: str = "kpa") -> None:
        self.config = config or KPAConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> KPAState:
        return KPAState()

    def period_s(self, spec: PipelineSpec) -> float:
        return self.config.tick_s

    def wants_retrieval(self, spec: PipelineSpec, state: KPAState, now: float) -> bool:
        return False

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: KPAState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, KPAState]:
        cfg = self.config
        if not state.clock.due(now, cfg.tick_s):
            return hold_decision(spec, telemetry, self.name, "baseline", "kpa: not due"), state
        stages = state.stages
        desired: dict[str, int] = {}
        why: list[str] = []
        for st in spec.stages:
            m = stage_metrics(telemetry, st.name)
            c = None if m is None or m.stale else concurrency(st, m)
            if m is None or c is None:
                why.append(f"{st.name}: concurrency unknown: hold")
                continue
            cc = cfg.container_concurrency or st.concurrency
            target = cc * cfg.target_percentage
            n, s, w = kpa_step(
                cfg, stages.get(st.name, KPAStageState()), target, c, m.replicas_ready, now
            )
            stages = stages.set(st.name, s)
            why.append(f"{st.name}: {w}")
            n = min(max(n, st.min_replicas), st.max_replicas)
            if n != current_replicas(m, st):
                desired[st.name] = n
        return (
            baseline_decision(spec, telemetry, self.name, desired, why),
            KPAState(Periodic(now), stages),
        )

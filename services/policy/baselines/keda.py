"""KEDA with the NATS JetStream scaler, per stage (baselines.md §4).

Signal: lag = the stage consumer's `queue_depth` (the monitor's pending messages; KEDA reads
num_pending + num_ack_pending). KEDA feeds the lag to an HPA as an External metric with
target type AverageValue = lagThreshold (10), so desired = ceil(lag / 10), with the HPA's
tolerance, 300 s down-stabilisation and rate policies (hpa.py). HPA syncs every 15 s;
KEDA polls activation every pollingInterval = 30 s: active while lag > activationLagThreshold
(0); with no activity for cooldownPeriod = 300 s it scales to minReplicaCount (0); 0 -> 1 is
KEDA's own step (the HPA cannot leave 0). A stage whose min_replicas is > 0 is then held
at its minimum by the validator's bounds.
Unknown lag: we hold and say so. The real scaler returns the stream's last sequence as lag
and scales to max when the consumer is missing (kedacore/keda #7657); set
`missing_consumer_scales_to_max=True` to reproduce that quirk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.messages import PipelineTelemetry, RetrievedEpisode
from schemas.pipeline import PipelineSpec

from ..interface import Decision, Periodic, current_replicas, hold_decision, stage_metrics
from . import PerStage, baseline_decision
from .hpa import Behavior, HPAStageState, normalise, replicas_for_average_value


@dataclass(frozen=True)
class KEDAConfig:
    lag_threshold: float = 10.0
    activation_lag_threshold: float = 0.0
    polling_interval_s: float = 30.0
    cooldown_period_s: float = 300.0
    min_replica_count: int = 0
    max_replica_count: int | None = None
    """None: the stage's max_replicas (KEDA's default is 100)."""
    hpa_sync_period_s: float = 15.0
    behavior: Behavior = field(default_factory=Behavior)
    missing_consumer_scales_to_max: bool = False


@dataclass(frozen=True)
class KEDAStageState:
    hpa: HPAStageState = field(default_factory=HPAStageState)
    last_active_s: float | None = None


@dataclass(frozen=True)
class KEDAState:
    hpa_clock: Periodic = field(default_factory=Periodic)
    poll_clock: Periodic = field(default_factory=Periodic)
    stages: PerStage[KEDAStageState] = field(default_factory=PerStage)


class KEDAPolicy:
    is_baseline = True

    def __init__(self, config: KEDAConfig | None = None, name: str = "keda") -> None:
        self.config = config or KEDAConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> KEDAState:
        return KEDAState()

    def period_s(self, spec: PipelineSpec) -> float:
        return self.config.hpa_sync_period_s

    def wants_retrieval(self, spec: PipelineSpec, state: KEDAState, now: float) -> bool:
        return False

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: KEDAState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, KEDAState]:
        cfg = self.config
        hpa_due = state.hpa_clock.due(now, cfg.hpa_sync_period_s)
        poll_due = state.poll_clock.due(now, cfg.polling_interval_s)
        if not hpa_due and not poll_due:
            return hold_decision(spec, telemetry, self.name, "baseline", "keda: not due"), state
        stages = state.stages
        desired: dict[str, int] = {}
        why: list[str] = []
        for st in spec.stages:
            m = stage_metrics(telemetry, st.name)
            s = stages.get(st.name, KEDAStageState())
            current = current_replicas(m, st)
            hi = cfg.max_replica_count if cfg.max_replica_count is not None else st.max_replicas
            lag = None if m is None or m.stale or m.queue_depth is None else float(m.queue_depth)
            if lag is None:
                if cfg.missing_consumer_scales_to_max:
                    desired[st.name] = hi
                    why.append(f"{st.name}: consumer lag missing: scale to max (#7657 quirk)")
                else:
                    why.append(f"{st.name}: lag unknown: hold")
                continue
            if poll_due:
                active = lag > cfg.activation_lag_threshold
                if active:
                    s = KEDAStageState(s.hpa, now)
                    if current == 0:
                        desired[st.name] = 1
                        why.append(f"{st.name}: lag {lag:g} > activation: 0 -> 1")
                        stages = stages.set(st.name, s)
                        continue
                elif (
                    current > cfg.min_replica_count
                    and (s.last_active_s is None or now - s.last_active_s >= cfg.cooldown_period_s)
                ):
                    desired[st.name] = cfg.min_replica_count
                    why.append(
                        f"{st.name}: inactive for >= {cfg.cooldown_period_s:.0f} s: "
                        f"-> {cfg.min_replica_count}"
                    )
                    stages = stages.set(st.name, KEDAStageState(s.hpa, s.last_active_s))
                    continue
            if hpa_due and current > 0:
                raw, w = replicas_for_average_value(
                    current,
                    lag,
                    cfg.lag_threshold,
                    cfg.behavior.up_tolerance,
                    cfg.behavior.down_tolerance,
                )
                lo = max(1, cfg.min_replica_count)
                out, hstate, extra = normalise(s.hpa, now, current, raw, lo, hi, cfg.behavior)
                s = KEDAStageState(hstate, s.last_active_s)
                why.append(f"{st.name}: lag {lag:g}, threshold {cfg.lag_threshold:g}: {w}")
                why.extend(f"{st.name}: {x}" for x in extra)
                if out != current:
                    desired[st.name] = out
            stages = stages.set(st.name, s)
        new_state = KEDAState(
            hpa_clock=Periodic(now) if hpa_due else state.hpa_clock,
            poll_clock=Periodic(now) if poll_due else state.poll_clock,
            stages=stages,
        )
        return baseline_decision(spec, telemetry, self.name, desired, why), new_state

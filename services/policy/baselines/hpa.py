"""Kubernetes HPA (autoscaling/v2) on utilisation, per stage (baselines.md §1).

Signal (what HPA reads from `StageMetrics`): the stage's utilisation as a share of what one
replica has, averaged over the replicas that report (`reporting_replicas`):
- CPU stage: `utilisation` (busy / (replicas x window)), HPA on CPU;
- GPU stage: `utilisation x gpu_cpu_factor`, where `utilisation` is the busy share of the
  replica's rho quota. With the default factor 1.0 this is HPA on a GPU utilisation metric
  (DCGM exporter `DCGM_FI_DEV_GPU_UTIL` through the Prometheus adapter as a Pods metric),
  which is what people run for GPU inference. A factor below 1 models HPA on the host CPU
  of a GPU worker; at 0.5 the signal can never reach the 0.5 target plus tolerance, so
  HPA would never scale the GPU stage (a strawman, not a baseline).
Pods: ready = replicas_ready that report, missing = ready ones that do not report, unready =
replicas_starting (HPA's initialisation/readiness rules reduce to "starting" here).

Steps, each a function: replica calculation (ratio, tolerance, missing/unready
re-balancing) -> stabilisation (up: min over 0 s, down: max over 300 s of the recorded raw
recommendations) -> rate policies (up: max(100%, 4 pods) per 15 s; down: 100% per 15 s)
-> [minReplicas, maxReplicas]. Sync period 15 s; target 50% (the Kubernetes walkthrough's
value; the paper's is unpublished).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageMetrics
from schemas.pipeline import PipelineSpec, StageSpec

from ..interface import Decision, Periodic, current_replicas, hold_decision, stage_metrics
from . import PerStage, baseline_decision

PolicyType = Literal["Pods", "Percent"]
Select = Literal["Max", "Min", "Disabled"]


@dataclass(frozen=True)
class RatePolicy:
    type: PolicyType
    value: int
    period_s: float


@dataclass(frozen=True)
class Behavior:
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    up_policies: tuple[RatePolicy, ...] = (
        RatePolicy("Percent", 100, 15.0),
        RatePolicy("Pods", 4, 15.0),
    )
    up_select: Select = "Max"
    down_policies: tuple[RatePolicy, ...] = (RatePolicy("Percent", 100, 15.0),)
    down_select: Select = "Max"
    up_tolerance: float = 0.1
    down_tolerance: float = 0.1


@dataclass(frozen=True)
class HPAConfig:
    target_utilisation: float = 0.5
    sync_period_s: float = 15.0
    behavior: Behavior = field(default_factory=Behavior)
    gpu_cpu_factor: float = 1.0
    """GPU stages: 1.0 = HPA on GPU utilisation (module doc); < 1 models host-CPU HPA."""
    min_replicas: int | None = None
    """None: the stage's min_replicas, at least 1 (HPA cannot scale to zero)."""
    max_replicas: int | None = None


@dataclass(frozen=True)
class HPAStageState:
    recommendations: tuple[tuple[float, int], ...] = ()
    """(timestamp, raw desired) of every sync inside the longest window."""
    events: tuple[tuple[float, int], ...] = ()
    """(timestamp, replica change) of the scalings this HPA made."""


@dataclass(frozen=True)
class HPAState:
    clock: Periodic = field(default_factory=Periodic)
    stages: PerStage[HPAStageState] = field(default_factory=PerStage)


# --------------------------------------------------------------------------- step 1: ratio


def within_tolerance(ratio: float, up_tol: float, down_tol: float) -> bool:
    return 1.0 - down_tol <= ratio <= 1.0 + up_tol


def replicas_for_utilisation(
    current: int,
    ready: int,
    unready: int,
    missing: int,
    utilisation: float,
    target: float,
    up_tol: float = 0.1,
    down_tol: float = 0.1,
) -> tuple[int, str]:
    """Kubernetes' resource-utilisation replica calculation; `utilisation` averages the ready
    pods with a sample. Returns (desired, why)."""
    if ready <= 0:
        return current, "no metrics for any ready pod: hold"
    ratio = utilisation / target
    rebalance_unready = unready > 0 and ratio > 1.0
    if not rebalance_unready and missing == 0:
        if within_tolerance(ratio, up_tol, down_tol):
            return current, f"ratio {ratio:.3f} within tolerance: hold"
        desired = math.ceil(ratio * ready)
        return desired, f"ratio {ratio:.3f} x {ready} ready -> {desired}"
    # Re-fill: missing pods count 100% (or the target if above) on a scale-down, 0% on a
    # scale-up; unready pods count 0% when they would otherwise drive a scale-up.
    total = utilisation * ready
    pods = ready
    if missing > 0:
        total += (max(target, 1.0) if ratio < 1.0 else 0.0) * missing
        pods += missing
    if rebalance_unready:
        pods += unready
    new_ratio = (total / pods) / target
    if (
        within_tolerance(new_ratio, up_tol, down_tol)
        or (ratio < 1.0 < new_ratio)
        or (ratio > 1.0 > new_ratio)
    ):
        return current, f"rebalanced ratio {new_ratio:.3f} (raw {ratio:.3f}): hold"
    desired = math.ceil(new_ratio * pods)
    if (new_ratio < 1.0 and desired > current) or (new_ratio > 1.0 and desired < current):
        return current, f"rebalanced {desired} would move against ratio {new_ratio:.3f}: hold"
    return desired, f"rebalanced ratio {new_ratio:.3f} x {pods} pods -> {desired}"


def replicas_for_average_value(
    current: int, total: float, target_per_pod: float, up_tol: float = 0.1, down_tol: float = 0.1
) -> tuple[int, str]:
    """External metric with target AverageValue: desired = ceil(total / target)."""
    if current <= 0:
        return math.ceil(total / target_per_pod), "current 0: no tolerance test"
    ratio = total / (target_per_pod * current)
    if within_tolerance(ratio, up_tol, down_tol):
        return current, f"ratio {ratio:.3f} within tolerance: hold"
    desired = math.ceil(total / target_per_pod)
    return desired, f"{total:g} / {target_per_pod:g} -> {desired}"


# --------------------------------------------------------------------------- step 2: stabilise


def stabilise(
    state: HPAStageState, now: float, current: int, raw: int, behavior: Behavior
) -> tuple[int, HPAStageState, str | None]:
    horizon = max(behavior.up_window_s, behavior.down_window_s)
    kept = tuple((ts, n) for ts, n in state.recommendations if now - ts <= horizon)
    recs = (*kept, (now, raw))
    up = min(n for ts, n in recs if now - ts <= behavior.up_window_s)
    down = max(n for ts, n in recs if now - ts <= behavior.down_window_s)
    out = current
    if out < up:
        out = up
    if out > down:
        out = down
    why = None
    if out != raw:
        why = f"stabilised {raw} -> {out} (up window min {up}, down window max {down})"
    return out, replace(state, recommendations=recs), why


# --------------------------------------------------------------------------- step 3: rate


def _period_start(current: int, events: Sequence[tuple[float, int]], now: float, p: float) -> int:
    added = sum(d for ts, d in events if d > 0 and now - ts < p)
    removed = -sum(d for ts, d in events if d < 0 and now - ts < p)
    return current - added + removed


def scale_up_limit(
    current: int, events: Sequence[tuple[float, int]], now: float, behavior: Behavior
) -> int:
    if behavior.up_select == "Disabled":
        return current
    limits: list[int] = []
    for pol in behavior.up_policies:
        start = _period_start(current, events, now, pol.period_s)
        if pol.type == "Pods":
            limits.append(start + pol.value)
        else:
            limits.append(math.ceil(start * (1 + pol.value / 100)))
    return max(limits) if behavior.up_select == "Max" else min(limits)


def scale_down_limit(
    current: int, events: Sequence[tuple[float, int]], now: float, behavior: Behavior
) -> int:
    if behavior.down_select == "Disabled":
        return current
    limits: list[int] = []
    for pol in behavior.down_policies:
        start = _period_start(current, events, now, pol.period_s)
        if pol.type == "Pods":
            limits.append(start - pol.value)
        else:
            limits.append(math.floor(start * (1 - pol.value / 100)))
    # "Max" picks the policy allowing the largest change: the lowest count.
    return min(limits) if behavior.down_select == "Max" else max(limits)


def rate_limit(
    state: HPAStageState,
    now: float,
    current: int,
    stabilised: int,
    lo: int,
    hi: int,
    behavior: Behavior,
) -> tuple[int, str | None]:
    if stabilised > current:
        limit = max(current, scale_up_limit(current, state.events, now, behavior))
        allowed = min(limit, hi)
        out = min(stabilised, allowed)
    elif stabilised < current:
        limit = min(current, scale_down_limit(current, state.events, now, behavior))
        allowed = max(limit, lo)
        out = max(stabilised, allowed)
    else:
        out = min(max(stabilised, lo), hi)
    why = None if out == stabilised else f"rate/bounds limit {stabilised} -> {out}"
    return out, why


def normalise(
    state: HPAStageState, now: float, current: int, raw: int, lo: int, hi: int, behavior: Behavior
) -> tuple[int, HPAStageState, list[str]]:
    """Stabilisation, rate policies and bounds; records the scale event if any."""
    why: list[str] = []
    stab, state, w = stabilise(state, now, current, raw, behavior)
    if w:
        why.append(w)
    out, w = rate_limit(state, now, current, stab, lo, hi, behavior)
    if w:
        why.append(w)
    if out != current:
        longest = max(
            [p.period_s for p in behavior.up_policies + behavior.down_policies] or [0.0]
        )
        events = tuple((ts, d) for ts, d in state.events if now - ts < longest)
        state = replace(state, events=(*events, (now, out - current)))
    return out, state, why


# --------------------------------------------------------------------------- signal


def cpu_utilisation(st: StageSpec, m: StageMetrics, gpu_cpu_factor: float) -> float | None:
    """What HPA sees of this stage: CPU utilisation, or GPU utilisation x factor (module doc)."""
    if m.utilisation is None:
        return None
    if st.kind == "gpu":
        return m.utilisation * gpu_cpu_factor
    return m.utilisation


class HPAPolicy:
    is_baseline = True

    def __init__(self, config: HPAConfig | None = None, name: str = "hpa") -> None:
        self.config = config or HPAConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> HPAState:
        return HPAState()

    def period_s(self, spec: PipelineSpec) -> float:
        return self.config.sync_period_s

    def wants_retrieval(self, spec: PipelineSpec, state: HPAState, now: float) -> bool:
        return False

    def bounds(self, st: StageSpec) -> tuple[int, int]:
        lo = self.config.min_replicas if self.config.min_replicas is not None else st.min_replicas
        hi = self.config.max_replicas if self.config.max_replicas is not None else st.max_replicas
        return max(lo, 1), hi

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: HPAState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, HPAState]:
        cfg = self.config
        if not state.clock.due(now, cfg.sync_period_s):
            return hold_decision(spec, telemetry, self.name, "baseline", "hpa: sync not due"), state
        stages = state.stages
        desired: dict[str, int] = {}
        why: list[str] = []
        for st in spec.stages:
            m = stage_metrics(telemetry, st.name)
            if m is None:
                why.append(f"{st.name}: no metrics: hold")
                continue
            current = current_replicas(m, st)
            if current == 0:
                why.append(f"{st.name}: scaled to 0, HPA disabled")
                continue
            util = cpu_utilisation(st, m, cfg.gpu_cpu_factor)
            ready_with_sample = min(m.reporting_replicas, m.replicas_ready)
            missing = m.replicas_ready - ready_with_sample
            if util is None or m.stale:
                why.append(f"{st.name}: cpu utilisation unknown: hold")
                continue
            raw, w = replicas_for_utilisation(
                current,
                ready_with_sample,
                m.replicas_starting,
                missing,
                util,
                cfg.target_utilisation,
                cfg.behavior.up_tolerance,
                cfg.behavior.down_tolerance,
            )
            lo, hi = self.bounds(st)
            sstate = stages.get(st.name, HPAStageState())
            out, sstate, extra = normalise(sstate, now, current, raw, lo, hi, cfg.behavior)
            stages = stages.set(st.name, sstate)
            why.append(f"{st.name}: cpu {util:.2f} vs target {cfg.target_utilisation:.2f}: {w}")
            why.extend(f"{st.name}: {x}" for x in extra)
            if out != current:
                desired[st.name] = out
        new_state = HPAState(clock=Periodic(now), stages=stages)
        return baseline_decision(spec, telemetry, self.name, desired, why), new_state

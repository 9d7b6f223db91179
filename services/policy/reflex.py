"""The reflex: every tick, add capacity at once when the queues say a burst has arrived.

A strategic decision comes every control interval (30 s) and its replicas need `startup_s`
to become ready, so a burst can blow the SLO long before the next decision lands (the
paper's P99 was 47% worse than HPA's under one burst). The reflex closes that gap. It is an
emergency scale-up path only: it never removes capacity (that is the strategic step's job,
after a stabilisation window).

Signals are the freshest there are (`demand.py`): the queue depth of this tick against the
last one, and the arrival a saturated stage implies (capacity + queue growth). The monitor's
windowed rates lag a burst by tens of seconds and are not used to size it.

It fires when some stage
- has a backlog of at least max(QUEUE_MIN, 2 x servers) requests that grew fast: per-tick
  growth >= max(MIN_GROWTH_PER_S, SPIKE_FRACTION x its capacity) (a burst), or
- keeps growing (the monitor's 10 s slope > MIN_GROWTH_PER_S) with a backlog (two requests
  or one per server, at least) that already takes more than BACKLOG_FRACTION x SLO to drain
  (a slow stage overloaded by a rising load).
A false alarm costs little: the sizing below uses the robust demand estimate, and a few
requests waiting add a few requests/s at most.
It then sizes *every* stage, not only the one that fired, for the pipeline's demand D (a
burst that saturates the first stage reaches the next one as soon as that one is scaled):
    needed_i = D / TARGET_UTILISATION + (backlog of stages 1..i) / DRAIN_S
first by raising rho on a GPU stage (the token bucket follows at once), then by adding
replicas (counting those already starting: no cascading scale-ups, cf. AIBrix #2670), at
most max_step. Rho increases are never held back; a stage's replicas are not raised again
within its startup_s + one tick (the ones added are still starting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from schemas.messages import PipelineTelemetry, StageAction, StageMetrics
from schemas.pipeline import PipelineSpec, StageSpec

from .demand import (
    MIN_GROWTH_PER_S,
    SPIKE_FRACTION,
    Demand,
    DemandState,
    observe,
)
from .interface import (
    Decision,
    current_targets,
    measured_rho,
    stage_metrics,
    targets_from,
)

BACKLOG_FRACTION = 0.5
"""A backlog whose drain takes this share of the SLO is a breach in the making."""
TARGET_UTILISATION = 0.8
DRAIN_S = 2.0
"""The backlog found at the burst's onset is drained within this long."""


@dataclass(frozen=True)
class ReflexState:
    last_fired: tuple[tuple[str, float], ...] = ()
    """When each stage last got replicas from the reflex."""

    def fired_at(self, stage: str) -> float | None:
        for name, ts in self.last_fired:
            if name == stage:
                return ts
        return None


def per_replica_rate(
    st: StageSpec, m: StageMetrics | None, mu1: Mapping[str, float]
) -> float | None:
    """Requests/s one replica drains at rho = 1 (planner estimate, else throughput / ready)."""
    if st.name in mu1:
        return mu1[st.name]
    if m is None:
        return None
    rho = measured_rho(m, st) or 1.0
    if m.throughput_rps and m.replicas_ready > 0 and m.utilisation:
        return m.throughput_rps / (m.utilisation * m.replicas_ready * rho)
    if m.service_ms is not None and m.service_ms.p50_ms > 0:
        return 1000.0 / m.service_ms.p50_ms * st.concurrency / rho
    return None


def rates(
    spec: PipelineSpec, telemetry: PipelineTelemetry, mu1: Mapping[str, float]
) -> dict[str, float]:
    """mu_1 of every stage that has one (the planner's, else a direct estimate)."""
    out: dict[str, float] = {}
    for st in spec.stages:
        r = per_replica_rate(st, stage_metrics(telemetry, st.name), mu1)
        if r is not None and r > 0 and math.isfinite(r):
            out[st.name] = r
    return out


def _trigger(spec: PipelineSpec, demand: Demand, telemetry: PipelineTelemetry) -> str | None:
    """Why the reflex fires (the first stage that says so), or None."""
    slo_s = spec.slo_p99_ms / 1000.0
    for st in spec.stages:
        s = demand.stages.get(st.name)
        m = stage_metrics(telemetry, st.name)
        if s is None or m is None:
            continue
        cap = s.capacity_rps
        g = s.growth_rps if s.growth_rps is not None else 0.0
        if (
            cap is not None
            and s.queue_depth >= s.backlog_min
            and g >= max(MIN_GROWTH_PER_S, SPIKE_FRACTION * cap)
        ):
            return f"{st.name} queue {s.queue_depth} growing {g:.1f}/s (capacity {cap:.1f} rps)"
        servers = max(1, m.replicas_ready) * st.concurrency
        slope = m.queue_growth_per_s
        drain_s = s.queue_depth / cap if cap else math.inf
        if (
            s.queue_depth >= max(2, servers)
            and slope is not None
            and slope > MIN_GROWTH_PER_S
            and drain_s > BACKLOG_FRACTION * slo_s
        ):
            return (
                f"{st.name} queue {s.queue_depth} still growing ({slope:.1f}/s over 10 s), "
                f"{1000 * drain_s:.0f} ms to drain"
            )
    return None


def rho_for(st: StageSpec, needed_rps: float, mu1_rps: float, replicas: int, rho: float) -> float:
    """The lowest grid rho, not below `rho`, at which `replicas` serve `needed_rps` (else the
    top of the grid)."""
    for g in st.rho_grid:
        if g >= rho - 1e-12 and replicas * g * mu1_rps >= needed_rps:
            return g
    return max(st.rho_grid[-1], rho)


def size_stage(
    st: StageSpec,
    needed_rps: float,
    mu1_rps: float,
    ready: int,
    replicas: int,
    rho: float | None,
    *,
    add_replicas: bool = True,
) -> tuple[int, float | None]:
    """The smallest scale, at or above (replicas, rho), that serves `needed_rps`: rho first
    (instant), replicas when even the top rho is short. `replicas` counts the starting
    ones; a GPU stage's bucket serves replicas x rho x mu_1, each ready replica at most mu_1
    (full speed)."""
    short = replicas * mu1_rps < needed_rps
    if st.kind == "gpu":
        short = short or ready * mu1_rps < needed_rps
    n = replicas
    if short and add_replicas:
        n = max(replicas, math.ceil(needed_rps / mu1_rps - 1e-9))
        n = min(n, st.max_replicas, replicas + st.max_step)
    if st.kind != "gpu" or rho is None:
        return n, None
    return n, rho_for(st, needed_rps, mu1_rps, n, rho)


def reflex_check(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: ReflexState,
    now: float,
    next_decision_s: float,
    mu1: Mapping[str, float] | None = None,
    policy: str = "sair",
    *,
    demand: Demand | None = None,
    current: Sequence[StageAction] | None = None,
) -> tuple[Decision | None, ReflexState]:
    """A reflex decision, or None (with the state unchanged) when nothing is needed.

    `current`: the scale as the policy set it (last targets); `demand`: this tick's
    estimate (`demand.observe`); without it only the monitor's queue slope is known."""
    current = tuple(current) if current is not None else current_targets(spec, telemetry)
    mu = rates(spec, telemetry, mu1 or {})
    if demand is None:
        demand, _ = observe(
            spec, telemetry, DemandState(), now, mu, current, spec.control_interval_s
        )
    why = _trigger(spec, demand, telemetry)
    if why is None:
        return None, state
    d_rps = demand.demand_rps
    reasons = [
        f"reflex: {why}; pipeline demand {d_rps:.1f} rps "
        f"(next decision in {max(0.0, next_decision_s - now):.0f} s)"
    ]
    cur = {a.stage: a for a in current}
    changes: dict[str, tuple[int, float | None]] = {}
    fired = dict(state.last_fired)
    backlog = 0
    for st in spec.stages:
        m = stage_metrics(telemetry, st.name)
        s = demand.stages.get(st.name)
        backlog += s.queue_depth if s is not None else 0
        rate = mu.get(st.name)
        if m is None or m.stale or rate is None:
            continue
        needed = d_rps / TARGET_UTILISATION + backlog / DRAIN_S
        a = cur[st.name]
        last = state.fired_at(st.name)
        # Replicas it added are still starting: no more of them; rho may still rise.
        cooling = last is not None and now - last < st.startup_s + spec.tick_s
        n, rho = size_stage(
            st, needed, rate, m.replicas_ready, a.target_replicas, a.rho,
            add_replicas=not cooling,
        )
        if (n, rho) == (a.target_replicas, a.rho):
            continue
        changes[st.name] = (n, rho)
        parts = []
        if rho != a.rho:
            parts.append(f"rho {a.rho:g} -> {rho:g}")
        if n != a.target_replicas:
            parts.append(f"{a.target_replicas} -> {n} replicas ({m.replicas_starting} starting)")
            fired[st.name] = now
        reasons.append(f"{st.name}: {', '.join(parts)} for {needed:.1f} rps")
    if not changes:
        return None, state
    targets = targets_from(spec, current, changes)
    bottleneck = max(
        changes,
        key=lambda name: (demand.stages[name].queue_depth if name in demand.stages else 0),
    )
    decision = Decision(
        targets=targets,
        source="reflex",
        policy=policy,
        rationale=tuple(reasons),
        bottleneck=bottleneck,
        predicted_p99_ms=telemetry.e2e_p99_ms,
    )
    return decision, ReflexState(tuple(sorted(fired.items())))


__all__ = ["ReflexState", "per_replica_rate", "rates", "reflex_check", "size_stage"]

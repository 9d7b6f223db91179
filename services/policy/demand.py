"""Fresh load signals for SAIR, pure: what the pipeline is asked to serve *now*.

The monitor's rates (arrival, throughput, utilisation) average a 30 s window: at the onset of
a burst they lag the truth by tens of seconds (imgcls: 16 rps seen against 59 rps offered).
The queue depth is read every tick, so it is the freshest signal there is. Per stage, with
q the depth now and q' the depth one tick earlier (kept in `DemandState`):

    growth   g = (q - q') / dt                     (else the monitor's 10 s slope)
    capacity C = what the stage serves at its present scale (ready replicas x mu_1, and for a
                 GPU stage at most replicas x rho x mu_1: the shared token bucket's rate)
    arrival  a = (n - n') / dt  when the stage is surging and the monitor gives its queue's
                          arrival counter n (`arrived_total`, JetStream's count of what
                          entered the queue; n' one tick earlier): what actually arrived
                          this tick, exact and as fresh as the depth;
               = C' + g   when surging without that counter (C' the capacity at the previous
                          tick, what served during this one: replicas that became ready at
                          the tick's end did not drain its queue). C' is a model: on a host
                          whose CPUs are saturated the replicas serve less than ready x mu_1,
                          and C' + g overstates the load (seen live: 54 rps for 24 offered),
                          which is why the counter comes first.
               Surging: a backlog of at least max(QUEUE_MIN, 2 x servers) that grew by
                          SPIKE_FRACTION x C or more this tick, or that was there a tick ago
                          too (busy all tick long);
               = the monitor's windowed arrival otherwise (a few requests waiting at a busy
                 stage are ordinary queueing, and C + g would overstate the load)

Every request passes every stage once, so by flow conservation a stage's arrival plus the
growth of every queue upstream of it is the pipeline's arrival (what piles up upstream has
not reached it yet; what drains upstream reaches it on top). The pipeline's demand is the
largest of the monitor's windowed pipeline arrival and these per-stage values of the
surging stages.

For planning, `peak_rps` is the largest demand over the stabilisation window (scale-down
never plans below a load seen that recently, as HPA's downscale stabilisation does with its
recommendations). Bursts get a longer memory: a surge (a stage whose backlog grew by
SPIKE_FRACTION of its capacity in one tick) records the demand it implied, and
`burst_floor_rps` keeps the largest of those for `burst_memory_s` (default 300 s, HPA's
downscale stabilisation). Only a burst counts: a surge whose demand is at least BURST_RATIO
times the windowed arrival (a stage merely short of capacity at a steady load is the
reflex's business, not a reason to hold capacity for minutes). A load that comes back to
BURST_RECUR of that level renews the memory. The capacity that absorbs a recurring burst is
kept because a burst caught only by the reflex has already queued a tick's worth of
requests (2 s of a 6x load) before anything can react, and those blow the P99.

`trend_rps_per_s` is a sustained slope of the windowed arrival (ramps): its least-squares
slope over the last TREND_WINDOW_S when the one over the span before was rising too (at a
fresh start, with no span before yet, the last one alone), and 0
while a burst is remembered (a burst's echo in the window rises while the burst is inside
it, then falls; the burst floor covers it anyway).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from schemas.messages import PipelineTelemetry, StageAction
from schemas.pipeline import PipelineSpec, StageSpec

from .interface import stage_metrics

TREND_WINDOW_S = 30.0
"""The slope of the windowed arrival is fitted over two spans of this long."""
QUEUE_MIN = 8
"""A backlog smaller than this is ordinary queueing (a stage at 70% keeps a few waiting)."""
SPIKE_FRACTION = 0.25
"""Growth of this share of the stage's capacity in one tick is a burst, not queueing noise."""
MIN_GROWTH_PER_S = 0.5
"""Queue growth below this (requests/s) is noise."""
BURST_MEMORY_S = 300.0
BURST_RATIO = 2.0
"""A surge is a burst when its demand is this multiple of the windowed arrival."""
BURST_RECUR = 0.6
"""A demand at this share of the remembered burst level renews the memory."""
BURST_MARGIN = 1.1
"""The remembered burst is planned for at 110% of its level: a burst arrives all at once, and
a stage planned to 90% of it queues at onset (video extract). Measured on the full burst
grid: 1.25 costs 10% more for the same P99; 1.0 lets imgcls queue (P99 418 -> 533 ms)."""
MAX_TICK_GAP = 3.0
"""A previous depth older than this many ticks is not used for the growth."""


@dataclass(frozen=True)
class DemandState:
    queues: tuple[tuple[str, float, int], ...] = ()
    """(stage, ts, depth) at the last call."""
    arrived: tuple[tuple[str, float, int], ...] = ()
    """(stage, ts, arrived_total) at the last call, where the monitor gave the counter."""
    capacities: tuple[tuple[str, float], ...] = ()
    """(stage, capacity rps) at the last call: what served during the tick since."""
    history: tuple[tuple[float, float], ...] = ()
    """(ts, pipeline demand rps), inside the stabilisation window."""
    windowed: tuple[tuple[float, float], ...] = ()
    """(ts, the monitor's windowed pipeline arrival rps), inside 2 x TREND_WINDOW_S."""
    burst: tuple[float, float] | None = None
    """(last seen ts, demand rps) of the remembered burst level."""
    last_surge_s: float | None = None
    """When a stage last surged (its backlog grew by a burst's share in one tick)."""


@dataclass(frozen=True)
class StageNow:
    stage: str
    capacity_rps: float | None
    """What the stage serves at its present scale; None when its rate is unknown."""
    queue_depth: int
    growth_rps: float | None
    arrival_rps: float | None
    saturated: bool
    """Surging (module doc): the arrival is capacity + growth."""
    backlog_min: int = QUEUE_MIN
    """The backlog that counts as one for this stage: max(QUEUE_MIN, 2 x servers)."""


@dataclass(frozen=True)
class Demand:
    stages: Mapping[str, StageNow]
    demand_rps: float
    """The pipeline's offered load now (freshest estimate, requests/s)."""
    peak_rps: float
    """The largest demand over the stabilisation window, this one included."""
    trend_rps_per_s: float
    """Sustained slope of the windowed arrival (module doc; 0 when none)."""
    burst_floor_rps: float = 0.0
    """The remembered burst level (0: none within the burst memory)."""
    last_surge_s: float | None = None

    def plan_rps(self, lookahead_s: float) -> float:
        """Load to plan for: never below the window's peak nor the remembered burst (with
        its margin); a rising trend extrapolated."""
        ahead = self.demand_rps + max(0.0, self.trend_rps_per_s) * lookahead_s
        return max(self.peak_rps, ahead, BURST_MARGIN * self.burst_floor_rps)


def capacity_rps(
    st: StageSpec, mu1_rps: float | None, ready: int, active: int, rho: float | None
) -> float | None:
    """Requests/s the stage completes when busy: each ready replica at most mu_1 (full speed);
    a GPU stage also at most active x rho x mu_1 (the bucket the actuator sets from the
    replicas it was told to run, starting ones included)."""
    if mu1_rps is None or mu1_rps <= 0:
        return None
    cap = ready * mu1_rps
    if st.kind == "gpu":
        cap = min(cap, active * (rho if rho is not None else 1.0) * mu1_rps)
    return cap


def _slope(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var <= 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / var


def sustained_trend(points: Sequence[tuple[float, float]], now: float) -> float:
    """The slope over the last TREND_WINDOW_S when the span before it rose too (module
    doc), or, while there is no span before yet (a fresh start), when it covers at least
    two thirds of a window; 0 otherwise."""
    last = [(t, v) for t, v in points if now - t <= TREND_WINDOW_S + 1e-9]
    before = [
        (t, v) for t, v in points if TREND_WINDOW_S - 1e-9 <= now - t <= 2 * TREND_WINDOW_S + 1e-9
    ]
    a = _slope(last)
    if len(before) < 3:
        span = last[-1][0] - last[0][0] if last else 0.0
        return a if a > 0 and span >= 2 * TREND_WINDOW_S / 3 - 1e-9 else 0.0
    b = _slope(before)
    return a if a > 0 and b > 0 else 0.0


def observe(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: DemandState,
    now: float,
    mu1: Mapping[str, float],
    current: Sequence[StageAction],
    stabilisation_s: float,
    burst_memory_s: float = BURST_MEMORY_S,
) -> tuple[Demand, DemandState]:
    """This tick's demand estimate, and the state for the next tick (see the module doc)."""
    prev = {name: (ts, q) for name, ts, q in state.queues}
    prev_arrived = {name: (ts, n) for name, ts, n in state.arrived}
    arrived: list[tuple[str, float, int]] = []
    prev_cap = dict(state.capacities)
    caps: list[tuple[str, float]] = []
    cur = {a.stage: a for a in current}
    stages: dict[str, StageNow] = {}
    queues: list[tuple[str, float, int]] = []
    demand = telemetry.arrival_rate_rps or 0.0
    surge = False
    upstream_growth = 0.0
    for st in spec.stages:
        m = stage_metrics(telemetry, st.name)
        if m is None or m.stale:
            continue
        q = m.queue_depth or 0
        queues.append((st.name, now, q))
        growth = m.queue_growth_per_s
        p = prev.get(st.name)
        if (
            p is not None
            and m.queue_depth is not None
            and 0 < now - p[0] <= MAX_TICK_GAP * spec.tick_s
        ):
            growth = (q - p[1]) / (now - p[0])
        counted: float | None = None
        if m.arrived_total is not None:
            arrived.append((st.name, now, m.arrived_total))
            pa = prev_arrived.get(st.name)
            if pa is not None and 0 < now - pa[0] <= MAX_TICK_GAP * spec.tick_s:
                counted = max(0, m.arrived_total - pa[1]) / (now - pa[0])
        active = m.replicas_ready + m.replicas_starting
        a = cur.get(st.name)
        cap = capacity_rps(
            st, mu1.get(st.name), m.replicas_ready, active, a.rho if a is not None else None
        )
        servers = max(1, m.replicas_ready) * st.concurrency
        backlog_min = max(QUEUE_MIN, 2 * servers)
        g = growth if growth is not None else 0.0
        onset = (
            cap is not None
            and q >= backlog_min
            and g >= max(MIN_GROWTH_PER_S, SPIKE_FRACTION * cap)
        )
        surge = surge or onset
        saturated = onset or (
            cap is not None and q >= backlog_min and p is not None and p[1] >= backlog_min
        )
        arrival = m.arrival_rate_rps
        if cap is not None:
            caps.append((st.name, cap))
        served = prev_cap.get(st.name, cap) if p is not None else cap
        surging_arrival: float | None = None
        if saturated:
            if counted is not None:
                surging_arrival = counted
            elif served is not None:
                surging_arrival = max(0.0, served + g)
        if surging_arrival is not None:
            arrival = surging_arrival
            if math.isfinite(arrival):
                demand = max(demand, arrival + upstream_growth)
        stages[st.name] = StageNow(st.name, cap, q, growth, arrival, saturated, backlog_min)
        upstream_growth += g
    kept = [(t, d) for t, d in state.history if now - t < stabilisation_s - 1e-9 and t < now]
    history = (*kept, (now, demand))
    windowed = state.windowed
    if telemetry.arrival_rate_rps is not None:
        recent = [(t, v) for t, v in windowed if now - t <= 2 * TREND_WINDOW_S + 1e-9 and t < now]
        windowed = (*recent, (now, telemetry.arrival_rate_rps))
    burst = state.burst
    if burst is not None and now - burst[0] > burst_memory_s:
        burst = None
    windowed_now = telemetry.arrival_rate_rps
    if surge and windowed_now is not None and demand >= BURST_RATIO * windowed_now:
        burst = (now, max(demand, burst[1] if burst is not None else 0.0))
    elif burst is not None and demand >= BURST_RECUR * burst[1]:
        burst = (now, burst[1])  # the burst came back: remember it for longer
    last_surge = now if surge else state.last_surge_s
    new_state = DemandState(
        queues=tuple(queues),
        arrived=tuple(arrived),
        capacities=tuple(caps),
        history=history,
        windowed=windowed,
        burst=burst,
        last_surge_s=last_surge,
    )
    return (
        Demand(
            stages=stages,
            demand_rps=demand,
            peak_rps=max(d for _, d in history),
            trend_rps_per_s=sustained_trend(windowed, now) if burst is None else 0.0,
            burst_floor_rps=burst[1] if burst is not None else 0.0,
            last_surge_s=last_surge,
        ),
        new_state,
    )


__all__ = ["Demand", "DemandState", "StageNow", "capacity_rps", "observe"]

"""Ground-truth bottleneck of a simulated pipeline, for scoring only (never shown to a policy).

Definition (the paper's tandem-queue lemma made concrete): the bottleneck is the stage whose
one extra replica, ready at once, cuts the pipeline's mean end-to-end latency over the next
`horizon_s` the most. It is computed from what the simulator knows exactly and the monitor
can only estimate: the true arrival rate of the workload, each stage's true mean service time
and its variability (from the profile, at the stage's true rho), the true number of ready
servers and the true number of requests in each stage.

Per stage, with inflow `a`, `c` servers of rate `mu` (capacity C = c mu) and `n0` requests in
the stage:
- stable (a < C): G/G/c waiting time by Allen-Cunneen, W_q = ErlangC(c, a/mu) / (C - a) x
  (ca^2 + cs^2) / 2, plus the service time; a backlog above the steady-state number in system
  drains at C - a, and arrivals during the drain wait behind it (fluid);
- overloaded (a >= C): the backlog grows at a - C; the mean wait over the horizon is
  (n0 + (a - C) H / 2) / C (fluid);
- the next stage sees min(C, a + backlog / H), with the departure variability of Whitt's
  linking equation (cd^2 = 1 + (1 - u^2)(ca^2 - 1) + u^2 (cs^2 - 1) / sqrt(c)).
A tick is "clear" when the best gain is at least `CLEAR_MIN_GAIN_MS` and at least
`CLEAR_RATIO` times the second best: accuracy is reported on all ticks and on clear ticks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import TrueStage

DEFAULT_HORIZON_S = 30.0
CLEAR_MIN_GAIN_MS = 1.0
CLEAR_RATIO = 1.5


@dataclass(frozen=True)
class TrueBottleneck:
    stage: str | None
    gains_ms: dict[str, float]
    """Cut of mean end-to-end latency by one more replica, per stage."""
    clear: bool


def erlang_c(servers: int, offered: float) -> float:
    """P(wait) in M/M/c with offered load `offered` = lambda / mu (1 when unstable)."""
    if offered <= 0:
        return 0.0
    if servers <= 0 or offered >= servers:
        return 1.0
    inv_b = 1.0  # 1 / Erlang B, by the recursion 1/B(k) = 1 + k / (a B(k-1))
    for k in range(1, servers + 1):
        inv_b = 1.0 + inv_b * k / offered
    b = 1.0 / inv_b
    util = offered / servers
    return b / (1.0 - util + util * b)


def ggc_wait_s(arrival_rps: float, mu_rps: float, servers: int, ca2: float, cs2: float) -> float:
    """Mean queue wait of G/G/c (Allen-Cunneen); exact for M/M/c (ca2 = cs2 = 1)."""
    if arrival_rps <= 0:
        return 0.0
    capacity = servers * mu_rps
    if servers <= 0 or arrival_rps >= capacity:
        return math.inf
    return erlang_c(servers, arrival_rps / mu_rps) / (capacity - arrival_rps) * (ca2 + cs2) / 2


def _stage(
    inflow: float, ca2: float, st: TrueStage, servers: int, horizon_s: float
) -> tuple[float, float, float]:
    """(mean sojourn s, outflow rps, outflow scv) of one stage over the horizon."""
    service = st.mean_service_s
    mu = 1.0 / service
    n0 = float(st.in_system)
    if servers <= 0:
        return horizon_s + service, 0.0, 1.0
    capacity = servers * mu
    if inflow >= capacity:
        wait = (n0 + (inflow - capacity) * horizon_s / 2.0) / capacity
        return wait + service, capacity, st.service_scv
    wq = min(ggc_wait_s(inflow, mu, servers, ca2, st.service_scv), horizon_s)
    excess = max(0.0, n0 - inflow * (wq + service))
    rate = capacity - inflow
    drain_s = excess / rate
    if drain_s >= horizon_s:
        area = excess * horizon_s - rate * horizon_s * horizon_s / 2.0
    else:
        area = excess * drain_s / 2.0
    extra = area / horizon_s / capacity
    out = min(capacity, inflow + excess / horizon_s)
    u = out / capacity
    cd2 = 1.0 + (1.0 - u * u) * (ca2 - 1.0) + u * u * (st.service_scv - 1.0) / math.sqrt(servers)
    return wq + service + extra, out, max(0.0, cd2)


def pipeline_latency_s(
    stages: Sequence[TrueStage],
    demand_rps: float,
    extra_stage: int | None = None,
    extra_servers: int = 1,
    horizon_s: float = DEFAULT_HORIZON_S,
) -> float:
    """Modelled mean end-to-end latency with `extra_servers` more on stage `extra_stage`."""
    flow, ca2, total = demand_rps, 1.0, 0.0
    for i, st in enumerate(stages):
        servers = st.ready_servers + (extra_servers if i == extra_stage else 0)
        latency, flow, ca2 = _stage(flow, ca2, st, servers, horizon_s)
        total += latency
    return total


def true_bottleneck(
    stages: Sequence[TrueStage],
    demand_rps: float,
    concurrency: Sequence[int] | None = None,
    horizon_s: float = DEFAULT_HORIZON_S,
) -> TrueBottleneck:
    """The stage whose +1 replica (ready at once) cuts latency most; see the module docstring."""
    if not stages or demand_rps <= 0:
        return TrueBottleneck(None, {}, False)
    conc = list(concurrency) if concurrency is not None else [1] * len(stages)
    base = pipeline_latency_s(stages, demand_rps, None, 1, horizon_s)
    gains = {
        st.name: 1000.0 * (base - pipeline_latency_s(stages, demand_rps, i, conc[i], horizon_s))
        for i, st in enumerate(stages)
    }
    ranked = sorted(gains.items(), key=lambda kv: kv[1], reverse=True)
    best_name, best = ranked[0]
    second = max(0.0, ranked[1][1]) if len(ranked) > 1 else 0.0
    clear = best >= CLEAR_MIN_GAIN_MS and best >= CLEAR_RATIO * second
    return TrueBottleneck(best_name, gains, clear)

"""Bottleneck detection: which stage's extra replica would cut end-to-end latency most.

Pure functions. The pipeline is modelled as a tandem of M/M/c queues: stage i has `servers`
= ready replicas x concurrency, each serving at mu_i = 1 / mean service time (measured, so a
GPU stage's rho quota is already in it), and receives the flow that leaves stage i-1. For
every stage we compute the pipeline's mean latency over a decision horizon with one more
replica on that stage, and pick the stage with the largest reduction. The confidence is the
margin between the best and the second-best reduction, relative to the best.

- A stable stage (offered load a < c mu) contributes the Erlang-C sojourn W_q + S (capped
  by what random fluctuation can build up within a finite horizon H, which matters near
  rho = 1), plus the wait behind its current backlog while it drains.
- An overloaded stage (a >= c mu, where the steady-state formulas fail) contributes a fluid
  estimate: its backlog grows at a - c mu over the horizon, so the mean wait is about
  (Q0 + (a - c mu) H / 2) / (c mu). Downstream stages then see only c mu.
- Queue growth corrects the model: a stage whose queue grows significantly is saturated,
  whatever its service-time estimate says, and its capacity is its measured throughput.

`max_utilisation_bottleneck` is the naive rule (highest quota-normalised utilisation), kept
for comparison in `bench/bottleneck_accuracy.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_HORIZON_S = 30.0
GROWTH_MIN_PER_S = 0.5
"""Queue growth below this (requests/s) is noise, not saturation."""
GROWTH_MIN_SHARE = 0.05
"""...and so is growth below this share of the stage's arrival rate."""


@dataclass(frozen=True)
class StageLoad:
    """What the detector needs to know about one stage (None = unknown)."""

    name: str
    servers: int
    """Ready replicas x concurrency."""
    service_s: float | None
    """Mean service time of one request on one server."""
    arrival_rps: float | None = None
    throughput_rps: float | None = None
    queue_depth: float | None = None
    """Waiting plus in service."""
    queue_growth_per_s: float | None = None
    utilisation: float | None = None
    """Quota-normalised utilisation (for the naive rule only)."""
    servers_per_replica: int = 1
    """Concurrency: the servers one more replica adds."""


@dataclass(frozen=True)
class Bottleneck:
    stage: str | None
    confidence: float
    gains_ms: dict[str, float] = field(default_factory=dict)
    """Modelled cut of mean end-to-end latency by one more replica, per stage."""
    method: str = "counterfactual"


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in M/M/c with `offered` = lambda / mu < servers."""
    if servers <= 0:
        return 1.0
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0  # Erlang B by the stable recursion B(k) = a B(k-1) / (k + a B(k-1))
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1.0 - rho + rho * b)


def mmc_wait_s(arrival_rps: float, mu_rps: float, servers: int) -> float:
    """Mean queue wait W_q of M/M/c; inf when the queue is unstable."""
    if arrival_rps <= 0:
        return 0.0
    capacity = servers * mu_rps
    if servers <= 0 or arrival_rps >= capacity:
        return math.inf
    return erlang_c(servers, arrival_rps / mu_rps) / (capacity - arrival_rps)


def _mean_backlog(queue0: float, drift: float, horizon_s: float) -> float:
    """Mean of the fluid queue max(Q0 + drift t, 0) over [0, H]."""
    if drift >= 0:
        return queue0 + drift * horizon_s / 2.0
    empty_at = queue0 / -drift
    if empty_at >= horizon_s:
        return queue0 + drift * horizon_s / 2.0
    return queue0 * empty_at / (2.0 * horizon_s)


def _stage_latency_s(
    inflow: float, mu: float, servers: int, queue0: float, horizon_s: float
) -> tuple[float, float]:
    """(mean sojourn over the horizon, mean outflow over the horizon) of one stage.

    The queue over the horizon is its fluid path from the current depth (drift = inflow -
    capacity) plus a random-walk term: Poisson in and out move it by about sqrt(2 sigma^2 t
    / pi) with sigma^2 = inflow + capacity, i.e. (2/3) sqrt(2 sigma^2 H / pi) on average over
    the horizon. For a stable stage the random part is the smaller of that and the Erlang-C
    steady state: near rho = 1 the steady state is too far away to be reached within H.
    """
    service = 1.0 / mu
    capacity = servers * mu
    if servers <= 0:
        # Nothing serves: everything waits the whole horizon (and the queue keeps what it has).
        return horizon_s + queue0 / max(inflow, 1e-9) + service, 0.0
    drift = inflow - capacity
    diffusion = (2.0 / 3.0) * math.sqrt(2.0 * (inflow + capacity) * horizon_s / math.pi)
    waiting = queue0 - min(queue0, float(servers))  # those in service do not wait
    backlog = _mean_backlog(waiting, drift, horizon_s)
    if drift >= 0:
        return (backlog + diffusion) / capacity + service, capacity
    wq = min(mmc_wait_s(inflow, mu, servers), diffusion / capacity)
    # A drained backlog is not gone: it leaves at full capacity and loads the next stage.
    outflow = min(capacity, inflow + waiting / horizon_s)
    return wq + backlog / capacity + service, outflow


@dataclass(frozen=True)
class _Model:
    name: str
    mu: float
    servers: int
    queue0: float
    step: int
    """Servers added by one more replica."""


def _saturated(s: StageLoad) -> bool:
    g = s.queue_growth_per_s
    if g is None or g <= GROWTH_MIN_PER_S:
        return False
    base = s.arrival_rps if s.arrival_rps is not None else s.throughput_rps
    return base is None or g > GROWTH_MIN_SHARE * base


def _pipeline_latency_s(
    models: Sequence[_Model],
    demand: float,
    extra: int | None,
    horizon_s: float,
    memo: dict[tuple[int, float, int], tuple[float, float]] | None = None,
) -> float:
    """Mean end-to-end latency with `extra` (a stage's index) given one more replica.

    `memo` keeps `_stage_latency_s` answers by (stage, inflow, servers) across the calls of
    one detection: the stages upstream of the extra replica, and those downstream whose
    inflow it does not change, are the base case's (a pure function: the same numbers)."""
    flow = demand
    total = 0.0
    for i, m in enumerate(models):
        servers = m.servers + (m.step if i == extra else 0)
        key = (i, flow, servers)
        hit = memo.get(key) if memo is not None else None
        if hit is None:
            hit = _stage_latency_s(flow, m.mu, servers, m.queue0, horizon_s)
            if memo is not None:
                memo[key] = hit
        latency, flow = hit
        total += latency
    return total


def detect_bottleneck(
    stages: Sequence[StageLoad], horizon_s: float = DEFAULT_HORIZON_S
) -> Bottleneck:
    """The stage whose +1 replica cuts modelled end-to-end latency most, with a confidence."""
    if not stages:
        return Bottleneck(None, 0.0)
    models: list[_Model] = []
    unknown = 0
    for s in stages:
        mu = 1.0 / s.service_s if s.service_s and s.service_s > 0 else None
        servers = max(0, s.servers)
        if mu is None and _saturated(s) and s.throughput_rps and s.throughput_rps > 0:
            # No service times, but a growing queue says the stage is at capacity, and its
            # capacity is what it delivers.
            mu = s.throughput_rps / max(servers, 1)
        if mu is None:
            unknown += 1
            # Unknown speed: neutral (fast) stage, so it neither wins nor distorts the flow.
            mu = 1e9
        queue0 = max(0.0, s.queue_depth or 0.0)
        models.append(_Model(s.name, mu, servers, queue0, max(1, s.servers_per_replica)))
    demand = _demand(stages)
    if demand is None:
        return Bottleneck(None, 0.0)
    memo: dict[tuple[int, float, int], tuple[float, float]] = {}
    base = _pipeline_latency_s(models, demand, None, horizon_s, memo)
    gains: dict[str, float] = {}
    for i, s in enumerate(stages):
        if models[i].mu >= 1e9:
            continue
        gains[s.name] = 1000.0 * (base - _pipeline_latency_s(models, demand, i, horizon_s, memo))
    if not gains:
        return Bottleneck(None, 0.0, gains)
    ranked = sorted(gains.items(), key=lambda kv: kv[1], reverse=True)
    best_name, best = ranked[0]
    second = ranked[1][1] if len(ranked) > 1 else 0.0
    if best <= 0:
        return Bottleneck(best_name, 0.0, gains)
    confidence = max(0.0, min(1.0, (best - max(second, 0.0)) / best))
    # Stages we could not model might hide the real bottleneck.
    confidence *= (len(stages) - unknown) / len(stages)
    return Bottleneck(best_name, confidence, gains)


def _demand(stages: Sequence[StageLoad]) -> float | None:
    """Offered load at the pipeline's entrance (requests/s)."""
    first = stages[0]
    if first.arrival_rps is not None:
        return first.arrival_rps
    if first.throughput_rps is not None:
        return first.throughput_rps + max(0.0, first.queue_growth_per_s or 0.0)
    known = [s.arrival_rps for s in stages if s.arrival_rps is not None]
    return max(known) if known else None


def max_utilisation_bottleneck(stages: Sequence[StageLoad]) -> Bottleneck:
    """Naive rule: the stage with the highest (quota-normalised) utilisation."""
    known = [(s.name, s.utilisation) for s in stages if s.utilisation is not None]
    if not known:
        return Bottleneck(None, 0.0, method="max_utilisation")
    ranked = sorted(known, key=lambda kv: kv[1], reverse=True)
    best = ranked[0][1]
    second = ranked[1][1] if len(ranked) > 1 else 0.0
    confidence = (best - second) / best if best > 0 else 0.0
    return Bottleneck(ranked[0][0], max(0.0, min(1.0, confidence)), method="max_utilisation")

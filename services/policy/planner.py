"""Queueing-model planner: the cheapest (replicas, rho) per stage that meets the P99 SLO.

No offline profiles: each stage's service rate is estimated online from telemetry.

- Service rate of one replica at rho = 1. The monitor's utilisation is occupied time /
  (replicas x window x concurrency), divided by the window's average rho for GPU stages
  (occupied GPU time excludes token waits). Hence
      mu_1 = throughput / (utilisation x replicas x rho)        (rho = 1 for CPU stages)
  with rho the *measured* (window-average) share, the one the utilisation was divided by.
  A GPU replica limited to rho' serves mu_1 x rho' (the token bucket grants rho' of the GPU).
  Smoothed by an EWMA across decisions (the estimate lives in the policy's state). Not
  re-measured when the load is too small (utilisation < MIN_UTIL or throughput <
  MIN_THROUGHPUT_RPS) or when the stage's replica count changed inside the window (the
  window's throughput then belongs to another count): the previous estimate is kept, else
  concurrency x 1000 / (service p50 x rho).
- Each stage is a G/G/c queue (Allen-Cunneen): c = replicas x concurrency servers of rate
  mu = mu_1 / concurrency each, arrival rate lambda = arrival + queue_depth / drain_s (the
  standing backlog must drain within one control interval). Its sojourn is a wait W plus
  the execution S, two parts:
      P(W > 0) = Erlang C(c, lambda / mu),  W | W > 0 ~ Exp(theta),
      theta = (c mu - lambda) x 2 / (1 + scv)        (Poisson arrivals, service SCV scv)
  A GPU stage's servers run at full speed, but one token bucket per stage paces them all
  at replicas x rho x mu_1: below rho = 1 its wait is the longer of the wait for a server
  and the wait for tokens (one paced server, nearly deterministic: GPU_SCV), and the bucket
  holds GPU_BUCKET_S of its rate (the actuator's burst), so that much work runs ahead of
  the pacing and the token wait's tail shifts by it. Two replicas at rho / 2 are thus paced
  like one at rho, and serve a burst at twice the full speed once rho is raised. S's P99
  is that of a lognormal with the stage's SCV (CPU: from the measured service p50 and p99;
  GPU: GPU_SCV).
- End to end: the P99 of the sum of the parts of every stage, approximated without a
  convolution as  sum_i mean_i + sqrt(sum_i (p99_i - mean_i)^2)  (means add; tail excesses
  add in quadrature). It is the part's P99 when one part dominates and far closer to the
  true P99 of a sum than the sum of P99s (4 i.i.d. Exp(1): true 10.0, this 11.2, sum of
  P99s 18.4). Then times a correction factor = observed e2e P99 / model P99 at the current
  configuration, clipped to [CORRECTION_MIN, CORRECTION_MAX] (absorbs what the model
  misses: transport, the shape of the service times); the SAIR policy smooths it across
  decisions and measures it only over windows in which nothing was rescaled.
- Search: per stage, the options (replicas, rho) on its cost/P99 efficient frontier, none
  loaded above MAX_PLAN_LOAD (0.8) whatever the model says; start
  from each stage's cheapest stable option and upgrade greedily the stage with the largest
  end-to-end P99 reduction per extra $/h until the predicted P99 <= headroom x SLO.
  Infeasible: every stage at its best option, reported as such.

The M/M/c closed forms (`mmc_sojourn_quantile_ms`, `mmc_mean_sojourn_ms`) are kept as the
reference the tests check the approximations against.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from schemas.messages import PipelineTelemetry, StageAction, StageMetrics
from schemas.pipeline import PipelineSpec, StageSpec

from .interface import measured_rho, stage_metrics

MIN_UTIL = 0.05
MIN_THROUGHPUT_RPS = 0.2
EWMA_ALPHA = 0.5
CORRECTION_MIN = 0.25
CORRECTION_MAX = 4.0
QUANTILE = 0.99
DEFAULT_HEADROOM = 0.8
"""Plan for 80% of the SLO: the model is an approximation and load moves within an interval."""
DEFAULT_SCV = 0.5
"""Service-time SCV of a CPU stage whose percentiles are unknown."""
GPU_SCV = 0.1
"""A paced GPU stage serves at the token rate: close to deterministic."""
GPU_BUCKET_S = 0.25
"""Seconds of its rate the GPU token bucket holds (services/actuator/tokens.py's burst)."""
MAX_PLAN_LOAD = 0.8
"""The planner never plans a stage above this load (arrival / capacity): near saturation
the P99 model and its correction (calibrated at the present load) are least reliable and a
load forecast that is a little short is amplified most (seen on ramps: planned at 0.83,
met 0.95, P99 x2)."""
Z99 = 2.3263
"""Standard normal 99th percentile."""


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    mu1_rps: float | None
    """Service rate of one replica at rho = 1 (CPU: its rate); None = unknown."""
    arrival_rps: float
    queue_depth: int
    source: str
    """measured / previous / service_ms / unknown."""
    scv: float = DEFAULT_SCV
    """Squared coefficient of variation of the service time."""


@dataclass(frozen=True)
class Prediction:
    p99_ms: float
    """End-to-end, corrected; math.inf when some stage is unstable."""
    cost_per_h: float
    stage_p99_ms: tuple[tuple[str, float], ...]
    bottleneck: str | None
    """Stage with the highest load lambda_eff / (c mu)."""
    max_load: float = 0.0
    """That stage's load."""


@dataclass(frozen=True)
class Plan:
    targets: tuple[StageAction, ...]
    prediction: Prediction
    feasible: bool
    reasons: tuple[str, ...]


# --------------------------------------------------------------------------- estimation


def _arrival(telemetry: PipelineTelemetry, stage: str) -> float:
    m = stage_metrics(telemetry, stage)
    for v in (
        None if m is None else m.arrival_rate_rps,
        telemetry.arrival_rate_rps,
        None if m is None else m.throughput_rps,
    ):
        if v is not None:
            return v
    return 0.0


def service_scv(st: StageSpec, m: StageMetrics | None) -> float:
    """SCV of the stage's service time: a lognormal through its measured p50 and p99 (CPU);
    GPU_SCV for GPU stages (their reported time includes token waits)."""
    if st.kind == "gpu":
        return GPU_SCV
    if m is None or m.service_ms is None:
        return DEFAULT_SCV
    p50, p99 = m.service_ms.p50_ms, m.service_ms.p99_ms
    if p50 <= 0 or p99 <= p50:
        return DEFAULT_SCV
    sigma = math.log(p99 / p50) / Z99
    return min(4.0, max(0.01, math.exp(sigma * sigma) - 1.0))


def estimate_rates(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    previous: Mapping[str, float],
    alpha: float = EWMA_ALPHA,
    *,
    skip: Collection[str] = (),
    demand: Mapping[str, float] | None = None,
) -> dict[str, StageEstimate]:
    """Per-stage service-rate estimates, smoothed with the previous ones.

    `skip`: stages whose window straddles a rescale (keep the previous estimate if any).
    `demand`: arrival rates to plan for; a stage's arrival is the larger of it and the
    telemetry's."""
    out: dict[str, StageEstimate] = {}
    for st in spec.stages:
        m = stage_metrics(telemetry, st.name)
        prev = previous.get(st.name)
        measured: float | None = None
        source = "unknown"
        if m is not None and not m.stale and not (st.name in skip and prev is not None):
            rho = measured_rho(m, st) or 1.0
            n = m.replicas_ready
            if (
                m.utilisation is not None
                and m.throughput_rps is not None
                and m.utilisation >= MIN_UTIL
                and m.throughput_rps >= MIN_THROUGHPUT_RPS
                and n > 0
                and rho > 0
            ):
                measured = m.throughput_rps / (m.utilisation * n * rho)
                source = "measured"
        if measured is not None:
            mu = measured if prev is None else (1 - alpha) * prev + alpha * measured
        elif prev is not None:
            mu, source = prev, "previous"
        elif m is not None and m.service_ms is not None and m.service_ms.p50_ms > 0:
            # p50 of the service time; a GPU replica at rho ran that slowly, so scale to rho=1.
            rho = measured_rho(m, st) or 1.0
            mu = 1000.0 / m.service_ms.p50_ms * st.concurrency / max(rho, 1e-6)
            source = "service_ms"
        else:
            mu = None
        arrival = _arrival(telemetry, st.name)
        if demand is not None and st.name in demand:
            arrival = max(arrival, demand[st.name])
        out[st.name] = StageEstimate(
            stage=st.name,
            mu1_rps=mu,
            arrival_rps=arrival,
            queue_depth=(m.queue_depth or 0) if m is not None else 0,
            source=source,
            scv=service_scv(st, m),
        )
    return out


# --------------------------------------------------------------------------- queueing model


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in M/M/c with offered load a = lambda / mu < c."""
    if c <= 0 or a >= c:
        return 1.0
    if a <= 0:
        return 0.0
    b = 1.0  # Erlang B by the stable recursion B(k) = a B(k-1) / (k + a B(k-1)).
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return c * b / (c - a * (1.0 - b))


def _sojourn_tail(t: float, mu: float, theta: float, pw: float) -> float:
    no_wait = math.exp(-mu * t)
    if abs(mu - theta) < 1e-9 * mu:
        hypo = (1.0 + mu * t) * math.exp(-mu * t)
    else:
        hypo = (mu * math.exp(-theta * t) - theta * math.exp(-mu * t)) / (mu - theta)
    return (1.0 - pw) * no_wait + pw * hypo


def mmc_mean_sojourn_ms(lam: float, mu: float, c: int) -> float:
    """Mean M/M/c sojourn time in ms: C / (c mu - lambda) + 1 / mu."""
    if lam <= 0:
        return 0.0
    if c <= 0 or mu <= 0 or lam >= c * mu:
        return math.inf
    return 1000.0 * (erlang_c(c, lam / mu) / (c * mu - lam) + 1.0 / mu)


def combine_ms(parts: Sequence[tuple[float, float]]) -> float:
    """End-to-end P99 from per-stage (p99, mean): sum of means + RSS of the tail excesses."""
    total_mean = 0.0
    excess_sq = 0.0
    for p99, mean in parts:
        if math.isinf(p99):
            return math.inf
        total_mean += mean
        excess_sq += max(p99 - mean, 0.0) ** 2
    return total_mean + math.sqrt(excess_sq)


@lru_cache(maxsize=8192)
def mmc_sojourn_quantile_ms(lam: float, mu: float, c: int, q: float = QUANTILE) -> float:
    """q-quantile of the M/M/c sojourn time in ms; inf when unstable, 0 when idle.

    Bisection to 1e-4 relative (well under a millisecond at SLO scale). Memoised: a pure
    function of its arguments, evaluated for the same stage configurations by many
    candidates of one decision."""
    if lam <= 0:
        return 0.0
    if c <= 0 or mu <= 0 or lam >= c * mu:
        return math.inf
    theta = c * mu - lam
    pw = erlang_c(c, lam / mu)
    target = 1.0 - q
    slow = min(mu, theta)
    # The tail decays at least as fast as e^{-slow t} times a constant <= 2: start there.
    hi = math.log(2.0 / target) / slow
    while _sojourn_tail(hi, mu, theta, pw) > target:
        hi *= 2.0
    lo = 0.0
    while hi - lo > 1e-4 * hi:
        mid = 0.5 * (lo + hi)
        if _sojourn_tail(mid, mu, theta, pw) > target:
            lo = mid
        else:
            hi = mid
    return 1000.0 * hi


Part = tuple[float, float]
"""(p99 ms, mean ms) of one additive part of a request's latency."""


def _lognormal_p99_factor(scv: float) -> float:
    """P99 / mean of a lognormal with this SCV."""
    s2 = math.log1p(max(scv, 0.0))
    return math.exp(Z99 * math.sqrt(s2) - s2 / 2.0)


def _lam(est: StageEstimate, drain_s: float) -> float:
    return est.arrival_rps + est.queue_depth / max(drain_s, 1e-6)


def _wait(lam: float, mu: float, servers: int, scv: float, shift_s: float = 0.0) -> Part:
    """(p99, mean) ms of the wait in a G/G/c queue (module doc); `shift_s` of work runs
    ahead of the queue (a token bucket's burst)."""
    pw = erlang_c(servers, lam / mu)
    theta = (servers * mu - lam) * 2.0 / (1.0 + scv)
    w99 = math.log(pw / (1.0 - QUANTILE)) / theta - shift_s if pw > 1.0 - QUANTILE else 0.0
    return 1000.0 * max(w99, 0.0), 1000.0 * pw / theta * math.exp(-theta * shift_s)


def stage_parts(
    st: StageSpec, est: StageEstimate, n: int, rho: float | None, drain_s: float
) -> tuple[Part, Part] | None:
    """(wait, execution) parts of the stage's sojourn (module doc); None when the rate is
    unknown; infinite P99s when the stage cannot keep up.

    CPU stage: c = replicas x concurrency servers of rate mu_1 / concurrency.
    GPU stage: the same servers run at full speed, and the shared token bucket paces them
    all at replicas x rho x mu_1 (one bucket per stage, services/actuator/tokens.py): the
    wait is the longer of the wait for a server and the wait for tokens (a single paced
    server, nearly deterministic, whose bucket runs GPU_BUCKET_S ahead)."""
    if est.mu1_rps is None:
        return None
    lam = _lam(est, drain_s)
    if lam <= 0:
        return (0.0, 0.0), (0.0, 0.0)
    k = st.concurrency
    mu1 = est.mu1_rps
    servers = n * k
    share = rho if st.kind == "gpu" and rho is not None else 1.0
    paced = st.kind == "gpu" and share < 1.0
    if servers <= 0 or mu1 <= 0 or lam >= n * mu1 * (share if paced else 1.0):
        return (math.inf, math.inf), (math.inf, math.inf)
    exec_s = k / mu1
    execution = (1000.0 * exec_s * _lognormal_p99_factor(est.scv), 1000.0 * exec_s)
    wait = _wait(lam, mu1 / k, servers, est.scv)
    if paced:
        tokens = _wait(lam, n * share * mu1, 1, min(est.scv, GPU_SCV), GPU_BUCKET_S)
        if tokens[0] > wait[0]:
            wait = tokens
    return wait, execution


def _stage_tail(
    st: StageSpec, est: StageEstimate, n: int, rho: float | None, drain_s: float
) -> tuple[float, float]:
    """(p99 ms, mean ms) of the stage's sojourn; (nan, nan) when its rate is unknown."""
    parts = stage_parts(st, est, n, rho, drain_s)
    if parts is None:
        return math.nan, math.nan
    return combine_ms(parts), parts[0][1] + parts[1][1]


def _load(st: StageSpec, est: StageEstimate, n: int, rho: float | None, drain_s: float) -> float:
    if est.mu1_rps is None:
        return 0.0
    lam = _lam(est, drain_s)
    mu = est.mu1_rps * (rho if st.kind == "gpu" and rho is not None else 1.0)
    return math.inf if n <= 0 or mu <= 0 else lam / (n * mu)  # GPU: of the bucket's rate


def predict(
    spec: PipelineSpec,
    estimates: Mapping[str, StageEstimate],
    targets: Sequence[StageAction],
    *,
    drain_s: float | None = None,
    correction: float = 1.0,
) -> Prediction:
    """Predicted end-to-end P99 and effective cost of `targets` (stages unknown to the model
    contribute 0 ms: the model cannot say)."""
    drain = spec.control_interval_s if drain_s is None else drain_s
    by_name = {a.stage: a for a in targets}
    parts: list[Part] = []
    cost = 0.0
    per: list[tuple[str, float]] = []
    worst, worst_load = None, -1.0
    for st in spec.stages:
        a = by_name[st.name]
        rho = a.rho if st.kind == "gpu" else None
        cost += a.target_replicas * spec.replica_cost_per_h(st, rho)
        sp = stage_parts(st, estimates[st.name], a.target_replicas, rho, drain)
        if sp is None:
            per.append((st.name, 0.0))
        else:
            per.append((st.name, combine_ms(sp)))
            parts.extend(sp)
        load = _load(st, estimates[st.name], a.target_replicas, rho, drain)
        if load > worst_load:
            worst, worst_load = st.name, load
    return Prediction(
        p99_ms=combine_ms(parts) * correction,
        cost_per_h=cost,
        stage_p99_ms=tuple(per),
        bottleneck=worst,
        max_load=max(worst_load, 0.0),
    )


def correction_factor(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    estimates: Mapping[str, StageEstimate],
    current: Sequence[StageAction],
) -> float:
    """Observed e2e P99 / model P99 at the current configuration, clipped; 1 if unknown."""
    observed = telemetry.e2e_p99_ms
    if observed is None or observed <= 0:
        return 1.0
    model = predict(spec, estimates, current).p99_ms
    if not math.isfinite(model) or model <= 0:
        return 1.0
    return min(CORRECTION_MAX, max(CORRECTION_MIN, observed / model))


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _Option:
    replicas: int
    rho: float | None
    parts: tuple[Part, Part]
    cost_per_h: float

    @property
    def p99_ms(self) -> float:
        return combine_ms(self.parts)


def _stage_options(
    spec: PipelineSpec, st: StageSpec, est: StageEstimate, drain_s: float
) -> list[_Option]:
    """The stage's efficient options: cost ascending, P99 strictly falling."""
    rhos: Sequence[float | None] = st.rho_grid if st.kind == "gpu" else [None]
    opts: list[_Option] = []
    slo = spec.slo_p99_ms
    for rho in rhos:
        unit = spec.replica_cost_per_h(st, rho)
        prev = math.inf
        for n in range(st.min_replicas, st.max_replicas + 1):
            parts = stage_parts(st, est, n, rho, drain_s)
            if parts is None or math.isinf(parts[0][0]):
                continue
            if _load(st, est, n, rho, drain_s) > MAX_PLAN_LOAD:
                continue
            o = _Option(n, rho, parts, n * unit)
            opts.append(o)
            # Past stability, stop once one more replica buys under 0.5% of the SLO.
            p = o.p99_ms
            if prev - p < 0.005 * slo:
                break
            prev = p
    opts.sort(key=lambda o: (o.cost_per_h, o.p99_ms))
    frontier: list[_Option] = []
    for o in opts:
        if not frontier or o.p99_ms < frontier[-1].p99_ms - 1e-9:
            frontier.append(o)
    return frontier


def plans(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    estimates: Mapping[str, StageEstimate],
    current: Sequence[StageAction],
    *,
    headrooms: Sequence[float] = (DEFAULT_HEADROOM,),
    drain_s: float | None = None,
    correction: float | None = None,
) -> list[Plan]:
    """One plan per headroom: the cheapest targets whose predicted e2e P99 <= headroom x SLO
    (see the module doc). The per-stage options are computed once for all headrooms.
    `correction`: the model's correction factor (None: measured from this telemetry)."""
    drain = spec.control_interval_s if drain_s is None else drain_s
    corr = (
        correction_factor(spec, telemetry, estimates, current)
        if correction is None
        else correction
    )
    cur = {a.stage: a for a in current}
    base_reasons: list[str] = []
    frontiers: dict[str, list[_Option]] = {}
    fixed: dict[str, StageAction] = {}
    unstable = False
    for st in spec.stages:
        est = estimates[st.name]
        if est.mu1_rps is None:
            fixed[st.name] = cur[st.name]
            base_reasons.append(f"{st.name}: service rate unknown, held")
            continue
        front = _stage_options(spec, st, est, drain)
        if not front:
            # Even max replicas at the top rho cannot keep up: go there, flagged infeasible.
            top = st.rho_grid[-1] if st.kind == "gpu" else None
            fixed[st.name] = StageAction(stage=st.name, target_replicas=st.max_replicas, rho=top)
            base_reasons.append(f"{st.name}: unstable even at max_replicas={st.max_replicas}")
            unstable = True
            continue
        frontiers[st.name] = front
    out: list[Plan] = []
    for headroom in headrooms:
        budget_ms = headroom * spec.slo_p99_ms / corr
        idx = {name: 0 for name in frontiers}

        def total_ms(idx: dict[str, int] = idx, bump: str | None = None) -> float:
            parts: list[Part] = []
            for n, i in idx.items():
                parts.extend(frontiers[n][i + (1 if n == bump else 0)].parts)
            return combine_ms(parts)

        while (now_ms := total_ms()) > budget_ms:
            best, best_gain = None, -1.0
            for name, i in idx.items():
                fr = frontiers[name]
                if i + 1 >= len(fr):
                    continue
                d_ms = now_ms - total_ms(bump=name)
                d_cost = max(fr[i + 1].cost_per_h - fr[i].cost_per_h, 1e-12)
                if d_ms / d_cost > best_gain:
                    best, best_gain = name, d_ms / d_cost
            if best is None:
                break
            idx[best] += 1
        feasible = total_ms() <= budget_ms and not unstable
        targets: list[StageAction] = []
        for st in spec.stages:
            if st.name in fixed:
                targets.append(fixed[st.name])
            else:
                o = frontiers[st.name][idx[st.name]]
                targets.append(StageAction(stage=st.name, target_replicas=o.replicas, rho=o.rho))
        pred = predict(spec, estimates, targets, drain_s=drain, correction=corr)
        reasons = [
            *base_reasons,
            f"planner@{headroom:.2f}: predicted p99 {pred.p99_ms:.0f} ms vs "
            f"{headroom:.2f} x SLO {spec.slo_p99_ms:.0f} ms (model x{corr:.2f}), "
            f"cost ${pred.cost_per_h:.3f}/h" + ("" if feasible else ", infeasible"),
        ]
        out.append(
            Plan(targets=tuple(targets), prediction=pred, feasible=feasible, reasons=tuple(reasons))
        )
    return out


def plan(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    estimates: Mapping[str, StageEstimate],
    current: Sequence[StageAction],
    *,
    headroom: float = DEFAULT_HEADROOM,
    drain_s: float | None = None,
) -> Plan:
    """The plan for one headroom (see `plans`)."""
    return plans(
        spec, telemetry, estimates, current, headrooms=(headroom,), drain_s=drain_s
    )[0]

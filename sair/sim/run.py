"""The run loop: a workload through the simulated pipeline, under a policy, scored.

    result = run_simulation(spec, profile, Workload("burst", {...}), policy, seed=1,
                            duration_s=600)

Every tick (`spec.tick_s`) the engine advances, its worker reports, completions and queue
depths go to the injected telemetry producer (by default the monitor's `WindowAggregator`,
`sair.sim.adapters.MonitorTelemetry`), and the policy gets exactly what it would get live:
`decide(spec, telemetry, state, now, retrieved)`. A decision that changes the targets is
applied at once (`Engine.set_targets`). The ground truth (true rates, true bottleneck) is
computed beside it for scoring and never passed to the policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageAction, WorkerReport
from schemas.pipeline import PipelineSpec

from .engine import CompletionBatch, Engine, QueueState
from .profiles import PipelineProfile
from .truth import DEFAULT_HORIZON_S, true_bottleneck


class DecisionLike(Protocol):
    """What the run loop reads from a decision (`services.policy.interface.Decision`)."""

    @property
    def targets(self) -> Sequence[StageAction]: ...

    @property
    def hold(self) -> bool: ...


class PolicyLike(Protocol):
    """A pure policy (`services.policy.interface.Policy`)."""

    name: str

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> Any: ...

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: Any,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[DecisionLike, Any]: ...


class TelemetryProducer(Protocol):
    """Turns what the workers and queues report into the telemetry a policy sees."""

    def observe(
        self,
        now: float,
        reports: Sequence[WorkerReport],
        completions: Sequence[CompletionBatch],
        queues: Mapping[str, QueueState],
    ) -> PipelineTelemetry: ...


Retriever = Callable[[PipelineSpec, PipelineTelemetry, Any, float], Sequence[RetrievedEpisode]]


@dataclass(frozen=True)
class Workload:
    """A seeded arrival process of `sair.loadgen.arrivals` (poisson, ramp, burst, trace)."""

    process: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def arrivals(self, duration_s: float, seed: int) -> np.ndarray:
        from sair.loadgen.arrivals import arrivals

        return arrivals(self.process, self.params, duration_s, seed)

    def rate_at(self, t_s: float, duration_s: float) -> float | None:
        """True instantaneous rate, None where the process has none (timestamp traces)."""
        from sair.loadgen.arrivals import rate_at

        if self.process == "trace" and "rates_rps" not in self.params:
            return None
        scale = float(self.params.get("scale", 1.0)) if self.process == "trace" else 1.0
        return rate_at(self.process, self.params, t_s, duration_s) * scale

    @property
    def label(self) -> str:
        return self.process


def poisson(rate_rps: float) -> Workload:
    return Workload("poisson", {"rate_rps": rate_rps})


def ramp(low_rps: float, high_rps: float, peak_at: float = 0.5) -> Workload:
    return Workload("ramp", {"low_rps": low_rps, "high_rps": high_rps, "peak_at": peak_at})


def burst(base_rps: float, burst_rps: float, width_s: float, period_s: float) -> Workload:
    params = {"base_rps": base_rps, "burst_rps": burst_rps, "width_s": width_s,
              "period_s": period_s}  # fmt: skip
    return Workload("burst", params)


@dataclass(frozen=True)
class TickRecord:
    """One tick of the timeline."""

    t_s: float
    load_rps: float | None
    """True offered rate of the workload at t (None for timestamp traces)."""
    arrived_rps: float
    completed_rps: float
    replicas: dict[str, int]
    """Target replicas per stage (ready + starting) after this tick's decision."""
    ready: dict[str, int]
    rho: dict[str, float | None]
    queue_depth: dict[str, int]
    p99_ms: float | None
    """True P99 of the requests completed during this tick."""
    telemetry_p99_ms: float | None
    """What the monitor reported (its window)."""
    cost_per_h: float
    bottleneck_true: str | None
    bottleneck_clear: bool
    bottleneck_detected: str | None
    action: bool


@dataclass(frozen=True)
class RunResult:
    pipeline: str
    policy: str
    workload: str
    seed: int
    duration_s: float
    warmup_s: float
    requests: int
    completed: int
    incomplete: int
    p50_ms: float | None
    p99_ms: float | None
    slo_p99_ms: float
    slo_violation_rate: float | None
    """Share of requests (created after warm-up) slower than the SLO; unfinished ones count
    when already older than the SLO."""
    slo_window_violation_rate: float | None
    """Share of control intervals whose P99 exceeded the SLO."""
    cost_usd: float
    """Effective cost over the scored period: GPU billed at its rho share."""
    whole_gpu_cost_usd: float
    cost_per_1k_usd: float | None
    whole_gpu_cost_per_1k_usd: float | None
    scaling_actions: int
    oscillations: int
    bottleneck_accuracy: float | None
    bottleneck_accuracy_clear: float | None
    bottleneck_ticks: int
    clear_ticks: int
    wall_s: float
    speedup: float
    timeline: tuple[TickRecord, ...] = ()

    def summary(self) -> dict[str, Any]:
        """Everything but the timeline, JSON-ready."""
        d = asdict(self)
        d.pop("timeline")
        return d


def derive_seed(seed: int, stream: int) -> int:
    """Independent sub-seeds of one run seed (arrivals, service times)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def run_simulation(
    spec: PipelineSpec,
    profile: PipelineProfile,
    workload: Workload,
    policy: PolicyLike,
    seed: int,
    duration_s: float,
    *,
    telemetry: Callable[[PipelineSpec], TelemetryProducer] | None = None,
    retriever: Retriever | None = None,
    warmup_s: float = 0.0,
    report_interval_s: float | None = None,
    truth_horizon_s: float = DEFAULT_HORIZON_S,
    record_timeline: bool = True,
    arrivals_s: np.ndarray | None = None,
) -> RunResult:
    """Simulate `duration_s` seconds; see the module docstring.

    `report_interval_s` defaults to the tick (one report per replica per tick; live workers
    report every second, pass 1.0 for that). `arrivals_s` overrides the workload's arrivals.
    """
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration_s={duration_s!r} must be finite and > 0")
    if not 0 <= warmup_s < duration_s:
        raise ValueError(f"warmup_s={warmup_s!r} must lie in [0, duration_s)")
    wall0 = time.perf_counter()
    tick_s = spec.tick_s
    arr = (
        np.asarray(arrivals_s, dtype=np.float64)
        if arrivals_s is not None
        else workload.arrivals(duration_s, derive_seed(seed, 1))
    )
    engine = Engine(
        spec, profile, arr, derive_seed(seed, 2),
        report_interval_s=report_interval_s if report_interval_s is not None else tick_s,
    )  # fmt: skip
    if telemetry is None:
        from .adapters import MonitorTelemetry

        producer: TelemetryProducer = MonitorTelemetry(spec)
    else:
        producer = telemetry(spec)
    state = policy.initial_state(spec, seed)
    wants = getattr(policy, "wants_retrieval", None)
    conc = [st.concurrency for st in spec.stages]

    timeline: list[TickRecord] = []
    actions = 0
    oscillations = 0
    last_change: dict[tuple[str, str], tuple[float, int]] = {}
    flap_window_s = 2.0 * spec.control_interval_s
    bn_ticks = bn_hits = clear_ticks = clear_hits = 0
    cost_at_warmup = (0.0, 0.0)
    n_ticks = math.ceil(duration_s / tick_s - 1e-9)
    prev_arrived = 0
    for k in range(1, n_ticks + 1):
        now = min(k * tick_s, duration_s)
        dt = now - engine.now
        reports: list[WorkerReport] = []
        batches: list[CompletionBatch] = []
        if engine.now < warmup_s <= now:
            early = engine.advance(warmup_s)
            reports += early.reports
            batches += early.completions
            cost_at_warmup = (engine.cost_usd, engine.whole_gpu_cost_usd)
        out = engine.advance(now)
        reports += out.reports
        batches += out.completions
        queues = engine.queues()
        tel = producer.observe(now, reports, batches, queues)

        # Ground truth, for scoring only.
        load = workload.rate_at(now, duration_s) if arrivals_s is None else None
        arrived = int(np.searchsorted(arr, now, side="left"))
        arrived_rps = (arrived - prev_arrived) / dt if dt > 0 else 0.0
        prev_arrived = arrived
        demand = load if load is not None else arrived_rps
        truth = true_bottleneck(engine.true_stages(queues), demand, conc, truth_horizon_s)

        retrieved: Sequence[RetrievedEpisode] = ()
        if retriever is not None and (wants is None or wants(spec, state, now)):
            retrieved = retriever(spec, tel, state, now)
        decision, state = policy.decide(spec, tel, state, now, retrieved)

        acted = False
        if not decision.hold:
            current = engine.targets()
            changes: dict[str, tuple[int, float | None]] = {}
            for a in decision.targets:
                cur_n, cur_rho = current[a.stage]
                rho = a.rho if a.rho is not None else cur_rho
                if a.target_replicas != cur_n or rho != cur_rho:
                    changes[a.stage] = (a.target_replicas, rho)
                    for dim, new, old in (
                        ("replicas", float(a.target_replicas), float(cur_n)),
                        ("rho", rho or 0.0, cur_rho or 0.0),
                    ):
                        if new == old:
                            continue
                        direction = 1 if new > old else -1
                        prev = last_change.get((a.stage, dim))
                        if (
                            prev is not None
                            and prev[1] == -direction
                            and now - prev[0] <= flap_window_s
                            and now > warmup_s
                        ):
                            oscillations += 1
                        last_change[(a.stage, dim)] = (now, direction)
            if changes:
                engine.set_targets(changes)
                acted = True
                if now > warmup_s:
                    actions += 1

        if now > warmup_s and truth.stage is not None:
            bn_ticks += 1
            hit = tel.bottleneck == truth.stage
            bn_hits += hit
            if truth.clear:
                clear_ticks += 1
                clear_hits += hit
        if record_timeline:
            timeline.append(_tick_record(engine, now, dt, load, arrived_rps, batches,
                                         queues, tel, truth.stage, truth.clear, acted))  # fmt: skip

    return _score(
        spec, engine, policy, workload, seed, duration_s, warmup_s, cost_at_warmup, actions,
        oscillations, (bn_ticks, bn_hits, clear_ticks, clear_hits), tuple(timeline),
        time.perf_counter() - wall0,
    )  # fmt: skip


def _tick_record(
    engine: Engine,
    now: float,
    dt: float,
    load: float | None,
    arrived_rps: float,
    completions: Sequence[CompletionBatch],
    queues: Mapping[str, QueueState],
    tel: PipelineTelemetry,
    truth: str | None,
    clear: bool,
    acted: bool,
) -> TickRecord:
    done = [c.e2e_ms for c in completions if len(c)]
    e2e = np.concatenate(done) if done else np.zeros(0)
    counts = engine.replica_counts()
    targets = engine.targets()
    return TickRecord(
        t_s=now,
        load_rps=load,
        arrived_rps=arrived_rps,
        completed_rps=e2e.size / dt if dt > 0 else 0.0,
        replicas={n: t[0] for n, t in targets.items()},
        ready={n: c[0] for n, c in counts.items()},
        rho={n: t[1] for n, t in targets.items()},
        queue_depth={n: q.depth for n, q in queues.items()},
        p99_ms=float(np.quantile(e2e, 0.99)) if e2e.size else None,
        telemetry_p99_ms=tel.e2e_p99_ms,
        cost_per_h=engine.cost_rate_per_h(),
        bottleneck_true=truth,
        bottleneck_clear=clear,
        bottleneck_detected=tel.bottleneck,
        action=acted,
    )


def _score(
    spec: PipelineSpec,
    engine: Engine,
    policy: PolicyLike,
    workload: Workload,
    seed: int,
    duration_s: float,
    warmup_s: float,
    cost_at_warmup: tuple[float, float],
    actions: int,
    oscillations: int,
    bn: tuple[int, int, int, int],
    timeline: tuple[TickRecord, ...],
    wall_s: float,
) -> RunResult:
    created = engine.arrivals_s
    done = engine.done_s
    scored = created >= warmup_s
    finished = scored & ~np.isnan(done)
    unfinished = scored & np.isnan(done)
    # Unfinished requests are censored at the end of the run: their latency is at least that.
    lat_ms = np.where(np.isnan(done), duration_s - created, done - created)[scored] * 1000.0
    slo = spec.slo_p99_ms
    p50 = float(np.quantile(lat_ms, 0.5)) if lat_ms.size else None
    p99 = float(np.quantile(lat_ms, 0.99)) if lat_ms.size else None
    over = lat_ms > slo
    known = ~np.isnan(done[scored]) | over  # an unfinished request younger than the SLO: unknown
    violation = float(over[known].mean()) if known.any() else None

    windows = 0
    bad = 0
    ci = spec.control_interval_s
    fin_done = done[finished]
    fin_lat = (done - created)[finished] * 1000.0
    t0 = warmup_s
    while t0 < duration_s - 1e-9:
        t1 = min(t0 + ci, duration_s)
        sel = (fin_done >= t0) & (fin_done < t1)
        if sel.any():
            windows += 1
            bad += float(np.quantile(fin_lat[sel], 0.99)) > slo
        t0 = t1
    cost = engine.cost_usd - cost_at_warmup[0]
    whole = engine.whole_gpu_cost_usd - cost_at_warmup[1]
    n_done = int(np.count_nonzero((done >= warmup_s) & (done <= duration_s)))
    bn_ticks, bn_hits, clear_ticks, clear_hits = bn
    sim_s = duration_s
    return RunResult(
        pipeline=spec.name,
        policy=getattr(policy, "name", type(policy).__name__),
        workload=workload.label,
        seed=seed,
        duration_s=duration_s,
        warmup_s=warmup_s,
        requests=int(scored.sum()),
        completed=int(finished.sum()),
        incomplete=int(unfinished.sum()),
        p50_ms=p50,
        p99_ms=p99,
        slo_p99_ms=slo,
        slo_violation_rate=violation,
        slo_window_violation_rate=bad / windows if windows else None,
        cost_usd=cost,
        whole_gpu_cost_usd=whole,
        cost_per_1k_usd=cost / n_done * 1000.0 if n_done else None,
        whole_gpu_cost_per_1k_usd=whole / n_done * 1000.0 if n_done else None,
        scaling_actions=actions,
        oscillations=oscillations,
        bottleneck_accuracy=bn_hits / bn_ticks if bn_ticks else None,
        bottleneck_accuracy_clear=clear_hits / clear_ticks if clear_ticks else None,
        bottleneck_ticks=bn_ticks,
        clear_ticks=clear_ticks,
        wall_s=wall_s,
        speedup=sim_s / wall_s if wall_s > 0 else math.inf,
        timeline=timeline,
    )

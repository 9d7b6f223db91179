"""Bottleneck detection accuracy on labelled tandem-queue scenarios.

Each scenario is a three-stage pipeline (cpu pre -> gpu infer -> cpu post), every stage an
M/M/c queue with random arrival rate, replicas, per-replica speed and (GPU) rho. A small
discrete-event simulation of our own (FCFS, c servers per stage, common random numbers):

1. runs the pipeline for a warm-up and a 30 s window, and turns what happened into the
   WorkerReports each replica would have sent every second plus the JetStream queue depth /
   arrival counters the monitor reads every 2 s tick; these go through the real
   `WindowAggregator`, whose telemetry names the suspected bottleneck (the detector sees only
   noisy, windowed telemetry, never the true rates);
2. labels the scenario independently of the detector's formulas: from the decision instant on
   it re-simulates the next `horizon` seconds once per stage with one more replica on that
   stage (same arrivals and service draws), and the ground truth is the stage whose extra
   replica cuts mean end-to-end latency of the requests arriving in the horizon most.

Also reported in the same run: the naive "max utilisation" rule on the same telemetry, and
accuracy on the clear-cut scenarios (best cut >= 10% above the runner-up).
Last line: {"scenarios": N, "accuracy": A, ...}.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.histogram import LatencyHistogram
from schemas.messages import WorkerReport
from schemas.pipeline import PipelineSpec, StageSpec
from services.monitor.aggregate import QueueObservation, WindowAggregator
from services.monitor.bottleneck import StageLoad, max_utilisation_bottleneck

WARMUP_S = 30.0
WINDOW_S = 30.0
TICK_S = 2.0
STAGES = (("pre", "cpu"), ("infer", "gpu"), ("post", "cpu"))
RHO_GRID = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Scenario:
    seed: int
    arrival_rps: float
    servers: tuple[int, ...]
    service_s: tuple[float, ...]
    """Mean service time per request per server (GPU: full-speed time / rho)."""
    rho: float
    family: str


@dataclass
class StageRun:
    arrive: list[float]
    start: list[float]
    end: list[float]
    server: list[int]


def make_scenario(seed: int) -> Scenario:
    """Two families, alternating: "wide" (each stage's utilisation 0.3-1.1, overload
    included) and "close" (all stable, 0.6-0.95, where replica counts decide: one server at
    0.8 queues far more than four at 0.9, which a max-utilisation rule cannot see)."""
    rng = random.Random(seed)
    family = "wide" if seed % 2 == 0 else "close"
    lo, hi = (0.3, 1.1) if family == "wide" else (0.6, 0.95)
    lam = rng.uniform(5.0, 60.0)
    servers = tuple(rng.randint(1, 4) for _ in STAGES)
    rho = rng.choice(RHO_GRID)
    service: list[float] = []
    for c in servers:
        util = rng.uniform(lo, hi)
        service.append(util * c / lam)  # mean service time so that lam * S / c = util
    return Scenario(seed, lam, servers, tuple(service), rho, family)


def simulate(
    sc: Scenario, end_s: float, extra_stage: int | None, extra_at_s: float, rep: int
) -> list[StageRun]:
    """FCFS tandem; an extra server on `extra_stage` becomes free at `extra_at_s`."""
    rng = random.Random(sc.seed * 1000 + rep)
    arrivals: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(sc.arrival_rps)
        if t > end_s:
            break
        arrivals.append(t)
    n = len(arrivals)
    draws = [[rng.expovariate(1.0) for _ in range(n)] for _ in STAGES]
    runs: list[StageRun] = []
    current = arrivals
    order = list(range(n))
    for i, c in enumerate(sc.servers):
        free: list[tuple[float, int]] = [(0.0, k) for k in range(c)]
        if extra_stage == i:
            free.append((extra_at_s, c))
        heapq.heapify(free)
        start = [0.0] * n
        end = [0.0] * n
        server = [0] * n
        for j in order:
            a = current[j]
            f, k = heapq.heappop(free)
            s = max(a, f)
            d = s + draws[i][j] * sc.service_s[i]
            start[j], end[j], server[j] = s, d, k
            heapq.heappush(free, (d, k))
        runs.append(StageRun(list(current), start, end, server))
        current = end
        order = sorted(range(n), key=lambda j: current[j])
    return runs


def mean_e2e_s(sc: Scenario, runs: list[StageRun], t0: float, t1: float) -> float:
    first, last = runs[0], runs[-1]
    lat = [
        last.end[j] - first.arrive[j]
        for j in range(len(first.arrive))
        if t0 <= first.arrive[j] < t1
    ]
    return sum(lat) / max(1, len(lat))


def spec_for(sc: Scenario) -> PipelineSpec:
    stages = []
    for (name, kind), c in zip(STAGES, sc.servers, strict=True):
        if kind == "gpu":
            stages.append(
                StageSpec(name=name, kind="gpu", rho_grid=list(RHO_GRID), initial_rho=sc.rho,
                          initial_replicas=c, max_replicas=16)
            )
        else:
            stages.append(StageSpec(name=name, kind="cpu", initial_replicas=c, max_replicas=16))
    return PipelineSpec(
        name="bench", stages=stages, slo_p99_ms=1000.0, tick_s=TICK_S,
        control_interval_s=30.0, settle_s=30.0,
    )


def telemetry_bottleneck(sc: Scenario, runs: list[StageRun]) -> tuple[str | None, str | None]:
    """Feed the window's reports and queue samples through the real aggregator."""
    spec = spec_for(sc)
    agg = WindowAggregator(spec, window_s=WINDOW_S)
    t_dec = WARMUP_S + WINDOW_S
    rng = random.Random(sc.seed + 7)
    events: list[tuple[float, int, object]] = []  # (time, order, payload)
    for i, ((name, kind), run) in enumerate(zip(STAGES, runs, strict=True)):
        for k in range(sc.servers[i]):
            offset = rng.random()
            jobs = [j for j in range(len(run.arrive)) if run.server[j] == k]
            t = WARMUP_S + offset - 1.0
            seq = 0
            while t + 1.0 <= t_dec:
                lo, hi = t, t + 1.0
                done = [j for j in jobs if lo <= run.end[j] < hi]
                busy = sum(max(0.0, min(hi, run.end[j]) - max(lo, run.start[j])) for j in jobs
                           if run.start[j] < hi and run.end[j] > lo)
                service = LatencyHistogram.from_values(
                    (run.end[j] - run.start[j]) * 1000 for j in done
                )
                wait = LatencyHistogram.from_values(
                    (run.start[j] - run.arrive[j]) * 1000 for j in done
                )
                seq += 1
                report = WorkerReport(
                    pipeline=spec.name, stage=name, worker_id=f"{name}-{k}", seq=seq,
                    state="ready", ts_s=hi, interval_s=1.0, processed=len(done), busy_s=busy,
                    service_ms=service, queue_wait_ms=wait,
                    rho=sc.rho if kind == "gpu" else None,
                    # Under a rho quota the replica is blocked on launch tokens (1 - rho) of
                    # its busy time; the rest is GPU time.
                    gpu_token_wait_s=busy * (1 - sc.rho) if kind == "gpu" else 0.0,
                )
                events.append((hi + 0.01, 1, report))
                t = hi
    tick = WARMUP_S + TICK_S
    while tick <= t_dec + 1e-9:
        events.append((tick, 2, None))
        tick += TICK_S
    events.sort(key=lambda e: (e[0], e[1]))
    final = None
    for t, kind_, payload in events:
        if kind_ == 1:
            assert isinstance(payload, WorkerReport)
            agg.add_report(payload, t)
        else:
            queues = {}
            for (name, _), run in zip(STAGES, runs, strict=True):
                arrived = sum(1 for a in run.arrive if a <= t)
                departed = sum(1 for d in run.end if d <= t)
                queues[name] = QueueObservation(depth=arrived - departed, arrived_total=arrived)
            final = agg.snapshot(t, queues)
    assert final is not None
    naive = max_utilisation_bottleneck(
        [StageLoad(name=m.stage, servers=m.replicas_ready, service_s=None,
                   utilisation=m.utilisation) for m in final.stages]
    )
    return final.bottleneck, naive.stage


def label(sc: Scenario, horizon_s: float, reps: int) -> tuple[str, float, list[float]]:
    t_dec = WARMUP_S + WINDOW_S
    end = t_dec + horizon_s
    gains = [0.0] * len(STAGES)
    for rep in range(reps):
        base = mean_e2e_s(sc, simulate(sc, end, None, t_dec, rep), t_dec, end)
        for i in range(len(STAGES)):
            alt = mean_e2e_s(sc, simulate(sc, end, i, t_dec, rep), t_dec, end)
            gains[i] += (base - alt) / reps
    best = max(range(len(STAGES)), key=lambda i: gains[i])
    ranked = sorted(gains, reverse=True)
    margin = (ranked[0] - ranked[1]) / ranked[0] if ranked[0] > 0 else 0.0
    return STAGES[best][0], margin, gains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=int, default=200)
    ap.add_argument("--horizon-s", type=float, default=60.0)
    ap.add_argument("--reps", type=int, default=3, help="simulation replications per label")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="40 scenarios, 1 replication")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--label-cache", default=None, help="JSON file to keep/reuse labels in")
    args = ap.parse_args()
    n = 40 if args.quick else args.scenarios
    reps = 1 if args.quick else args.reps
    started = time.perf_counter()
    hits = naive_hits = clear = clear_hits = clear_naive = 0
    fam: dict[str, list[int]] = {}
    cache: dict[str, list[object]] = {}
    cache_path = Path(args.label_cache) if args.label_cache else None
    if cache_path is not None and cache_path.exists():
        cache = json.loads(cache_path.read_text())
    for s in range(n):
        sc = make_scenario(args.seed * 100_000 + s)
        key = f"{sc.seed}:{args.horizon_s}:{reps}"
        if key in cache:
            c_truth, c_margin, c_gains = cache[key]
            truth, margin = str(c_truth), float(c_margin)  # type: ignore[arg-type]
            gains = [float(g) for g in c_gains]  # type: ignore[attr-defined]
        else:
            truth, margin, gains = label(sc, args.horizon_s, reps)
            cache[key] = [truth, margin, gains]
        runs = simulate(sc, WARMUP_S + WINDOW_S + args.horizon_s, None, 0.0, 0)
        got, naive = telemetry_bottleneck(sc, runs)
        hits += got == truth
        naive_hits += naive == truth
        f = fam.setdefault(sc.family, [0, 0, 0])
        f[0] += 1
        f[1] += got == truth
        f[2] += naive == truth
        if margin >= 0.10:
            clear += 1
            clear_hits += got == truth
            clear_naive += naive == truth
        if args.verbose and got != truth:
            utils = [
                round(sc.arrival_rps * s_ / c, 2)
                for s_, c in zip(sc.service_s, sc.servers, strict=True)
            ]
            print(f"miss seed={sc.seed} truth={truth} got={got} naive={naive} "
                  f"margin={margin:.2f} gains_ms={[round(g * 1000, 1) for g in gains]} "
                  f"lam={sc.arrival_rps:.1f} c={sc.servers} "
                  f"util={utils}")
    if cache_path is not None:
        cache_path.write_text(json.dumps(cache))
    out = {
        "scenarios": n,
        "accuracy": round(hits / n, 4),
        "naive_max_utilisation_accuracy": round(naive_hits / n, 4),
        "clear_scenarios": clear,
        "clear_accuracy": round(clear_hits / clear, 4) if clear else None,
        "clear_naive_accuracy": round(clear_naive / clear, 4) if clear else None,
        "families": {k: {"scenarios": v[0], "accuracy": round(v[1] / v[0], 4),
                         "naive_accuracy": round(v[2] / v[0], 4)} for k, v in fam.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"detector {hits}/{n}, naive max-utilisation {naive_hits}/{n}; "
          f"clear-cut (margin >= 10%) {clear_hits}/{clear} vs naive {clear_naive}/{clear}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

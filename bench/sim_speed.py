"""How many times faster than real time the simulator runs a 3-stage pipeline at 200 rps.

Three measurements on the same workload (imgcls, Poisson 200 rps, pre 6 / infer 3 at rho 1 /
post 1 replicas, utilisation about 0.7 on pre and infer):
- `engine`: `Engine.advance` tick by tick, with worker reports and queue views;
- `full`: `run_simulation` with the monitor's WindowAggregator and a policy called every
  tick (what a policy comparison runs) - the headline `speedup`;
- `baseline`: a textbook event-by-event DES (one heap event per arrival and per service
  completion, same service draws model), the approach the engine replaces.
Mean end-to-end latency of engine and baseline are printed side by side as a sanity check.
A second `full` run times the telemetry producer (the monitor's aggregator) on its own:
`monitor_s`, and `rest_s` = that run's wall time less it (engine, ground truth, policy).

    .venv/bin/python bench/sim_speed.py [--quick] [--duration-s 600] [--rate 200]

Last line: {"speedup": ..., "engine_speedup": ..., "baseline_speedup": ..., ...}
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sair.loadgen.arrivals import arrivals
from sair.sim.adapters import MonitorTelemetry
from sair.sim.engine import CompletionBatch, Engine, QueueState
from sair.sim.profiles import PipelineProfile, reference_profile
from sair.sim.run import derive_seed, poisson, run_simulation
from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageAction, WorkerReport
from schemas.pipeline import PipelineSpec, load_pipeline_spec

SCALE: dict[str, tuple[int, float | None]] = {
    "pre": (6, None),
    "infer": (3, 1.0),
    "post": (1, None),
}


@dataclass(frozen=True)
class _Decision:
    targets: tuple[StageAction, ...]
    hold: bool


class FixedScale:
    """Sets SCALE at the first tick, then holds (reads the telemetry like any policy)."""

    name = "fixed"

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> bool:
        return False

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: bool,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[_Decision, bool]:
        _ = telemetry.e2e_p99_ms
        if state:
            return _Decision((), True), True
        targets = tuple(StageAction(stage=s, target_replicas=n, rho=r) for s, (n, r) in
                        SCALE.items())  # fmt: skip
        return _Decision(targets, False), True


class TimedTelemetry:
    """The run's default telemetry producer, timed (for the breakdown only)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.inner = MonitorTelemetry(spec)
        self.seconds = 0.0

    def observe(
        self,
        now: float,
        reports: Sequence[WorkerReport],
        completions: Sequence[CompletionBatch],
        queues: Mapping[str, QueueState],
    ) -> PipelineTelemetry:
        t0 = time.perf_counter()
        out = self.inner.observe(now, reports, completions, queues)
        self.seconds += time.perf_counter() - t0
        return out


def steady_spec(spec: PipelineSpec) -> PipelineSpec:
    """The spec started at SCALE with no start-up delay, so all three runs see one system."""
    data = spec.model_dump()
    for st in data["stages"]:
        n, rho = SCALE[st["name"]]
        st["initial_replicas"], st["startup_s"] = n, 0.0
        if rho is not None:
            st["initial_rho"] = rho
    return PipelineSpec.model_validate(data)


def bench_engine(
    spec: PipelineSpec, prof: PipelineProfile, arr: np.ndarray, duration_s: float
) -> tuple[float, float]:
    eng = Engine(spec, prof, arr, seed=2, report_interval_s=spec.tick_s)
    eng.set_targets(SCALE)
    t0 = time.perf_counter()
    k = 1
    while k * spec.tick_s <= duration_s:
        eng.advance(k * spec.tick_s)
        eng.queues()
        eng.true_stages()
        k += 1
    wall = time.perf_counter() - t0
    done = ~np.isnan(eng.done_s)
    return wall, float(np.mean(eng.done_s[done] - arr[done]) * 1000)


def bench_baseline(
    spec: PipelineSpec, prof: PipelineProfile, arr: np.ndarray, duration_s: float
) -> tuple[float, float]:
    """Classic DES: a global event heap (time, seq, kind, stage, job), FIFO queues."""
    rng = np.random.default_rng(3)
    stages = spec.stages
    servers = [SCALE[s.name][0] for s in stages]
    factors = [prof.stage(s.name).scale(SCALE[s.name][1]) for s in stages]
    t0 = time.perf_counter()
    draws = [(prof.stage(s.name).draw_s(rng, arr.size) * f).tolist()
             for s, f in zip(stages, factors, strict=True)]  # fmt: skip
    events: list[tuple[float, int, int, int, int]] = []
    seq = 0
    for j, t in enumerate(arr.tolist()):
        events.append((t, seq, 0, 0, j))
        seq += 1
    heapq.heapify(events)
    queues: list[list[int]] = [[] for _ in stages]
    heads = [0] * len(stages)
    free = list(servers)
    done = np.full(arr.size, np.nan)
    last = len(stages) - 1
    while events:
        t, _, kind, k, j = heapq.heappop(events)
        if t > duration_s:
            break
        if kind == 1:  # service completion at stage k
            free[k] += 1
            if k == last:
                done[j] = t
            else:
                heapq.heappush(events, (t, seq, 0, k + 1, j))
                seq += 1
        else:  # arrival at stage k
            queues[k].append(j)
        if free[k] > 0 and heads[k] < len(queues[k]):
            nxt = queues[k][heads[k]]
            heads[k] += 1
            free[k] -= 1
            heapq.heappush(events, (t + draws[k][nxt], seq, 1, k, nxt))
            seq += 1
    wall = time.perf_counter() - t0
    ok = ~np.isnan(done)
    return wall, float(np.mean(done[ok] - arr[ok]) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="120 simulated seconds")
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args()
    duration = 120.0 if args.quick else args.duration_s
    spec = steady_spec(load_pipeline_spec("sair/pipelines/specs/imgcls.toml"))
    prof = reference_profile("imgcls")
    arr = arrivals("poisson", {"rate_rps": args.rate}, duration, derive_seed(1, 1))

    # Warm imports and caches (the monitor and policy modules load lazily on the first run).
    run_simulation(spec, prof, poisson(args.rate), FixedScale(), seed=1, duration_s=4.0)
    c0 = time.process_time()
    e_wall, e_mean = bench_engine(spec, prof, arr, duration)
    c1 = time.process_time()
    b_wall, b_mean = bench_baseline(spec, prof, arr, duration)
    c2 = time.process_time()
    res = run_simulation(spec, prof, poisson(args.rate), FixedScale(), seed=1,
                         duration_s=duration, record_timeline=False)  # fmt: skip
    c3 = time.process_time()
    timed: list[TimedTelemetry] = []

    def producer(s: PipelineSpec) -> TimedTelemetry:
        timed.append(TimedTelemetry(s))
        return timed[-1]

    res2 = run_simulation(
        spec, prof, poisson(args.rate), FixedScale(), seed=1, duration_s=duration,
        record_timeline=False, telemetry=producer,
    )  # fmt: skip
    monitor_s = timed[0].seconds
    out = {
        "speedup": round(duration / res.wall_s, 1),
        "engine_speedup": round(duration / e_wall, 1),
        "baseline_speedup": round(duration / b_wall, 1),
        "engine_vs_baseline": round(b_wall / e_wall, 2),
        "cpu_speedup": round(duration / (c3 - c2), 1),
        "cpu_engine_speedup": round(duration / (c1 - c0), 1),
        "cpu_baseline_speedup": round(duration / (c2 - c1), 1),
        "requests": int(arr.size),
        "sim_s": duration,
        "rate_rps": args.rate,
        "mean_e2e_ms_engine": round(e_mean, 2),
        "mean_e2e_ms_baseline": round(b_mean, 2),
        "p99_ms_full": None if res.p99_ms is None else round(res.p99_ms, 2),
        "monitor_s": round(monitor_s, 3),
        "rest_s": round(res2.wall_s - monitor_s, 3),
    }
    print(f"engine   {e_wall:7.3f} s wall  {out['engine_speedup']:>8}x  mean e2e {e_mean:.2f} ms")
    print(f"baseline {b_wall:7.3f} s wall  {out['baseline_speedup']:>8}x  mean e2e {b_mean:.2f} ms")
    print(f"full     {res.wall_s:7.3f} s wall  {out['speedup']:>8}x  (monitor + policy each tick)")
    print(f"cpu time: engine {c1 - c0:.3f} s, baseline {c2 - c1:.3f} s, full {c3 - c2:.3f} s")
    print(f"full again {res2.wall_s:.3f} s wall: monitor {monitor_s:.3f} s, "
          f"engine + truth + policy {res2.wall_s - monitor_s:.3f} s")  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()

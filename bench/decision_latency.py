"""Time of one strategic decision of the embedded policy (15 episodes, 4 stages) and of one
reflex check, against one Kubernetes-HPA decision in the same run.

    .venv/bin/python bench/decision_latency.py [--quick] [--n N]

Last line: {"embedded_p50_ms", "embedded_p99_ms", "reflex_p99_ms", "hpa_p99_ms", ...}.
Target: embedded p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.context import encode_context
from schemas.messages import (
    Episode,
    EpisodeOutcome,
    Percentiles,
    PipelineTelemetry,
    RetrievedEpisode,
    StageAction,
    StageMetrics,
)
from schemas.pipeline import PipelineSpec, StageSpec
from services.policy import planner
from services.policy.baselines.hpa import HPAPolicy
from services.policy.embedded import SairConfig, SairState, strategic_decide
from services.policy.reflex import ReflexState, reflex_check


def build() -> tuple[PipelineSpec, list[PipelineTelemetry], list[RetrievedEpisode]]:
    grid = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    spec = PipelineSpec(
        name="bench",
        slo_p99_ms=500.0,
        stages=[
            StageSpec(name="pre", kind="cpu", max_replicas=16),
            StageSpec(
                name="infer", kind="gpu", max_replicas=8, rho_grid=grid, initial_rho=0.5,
                startup_s=10.0,
            ),
            StageSpec(name="agg", kind="cpu", max_replicas=16),
            StageSpec(name="post", kind="cpu", max_replicas=16),
        ],
    )
    rng = random.Random(1)
    snaps: list[PipelineTelemetry] = []
    for k in range(50):
        rate = rng.uniform(10, 80)
        stages = []
        for st in spec.stages:
            util = rng.uniform(0.2, 1.0)
            stages.append(
                StageMetrics(
                    stage=st.name, kind=st.kind, replicas_ready=2, reporting_replicas=2,
                    arrival_rate_rps=rate, throughput_rps=rate * rng.uniform(0.8, 1.0),
                    queue_depth=rng.randint(0, 200), queue_growth_per_s=rng.uniform(-5, 20),
                    utilisation=util,
                    service_ms=Percentiles(p50_ms=20, p95_ms=50, p99_ms=80),
                    sojourn_ms=Percentiles(p50_ms=30, p95_ms=90, p99_ms=150),
                    rho=0.5 if st.kind == "gpu" else None,
                )
            )
        snaps.append(
            PipelineTelemetry(
                pipeline="bench", tick=k, ts_s=float(k), window_s=10.0, stages=stages,
                arrival_rate_rps=rate, e2e_p99_ms=rng.uniform(200, 900), slo_p99_ms=500.0,
                cost_per_h=1.0, whole_gpu_cost_per_h=2.0,
            )
        )
    episodes = []
    for i in range(15):
        t = snaps[i]
        action = [
            StageAction(
                stage=st.name, target_replicas=rng.randint(1, 6),
                rho=rng.choice(grid) if st.kind == "gpu" else None,
            )
            for st in spec.stages
        ]
        ep = Episode(
            pipeline="bench", episode_id=f"e{i}", ts_s=float(i), encoding_version=1,
            context=encode_context(t, spec), action=action, reward=rng.uniform(0.1, 2.0),
            outcome=EpisodeOutcome(p99_ms=300.0, cost_per_h=1.0), source="embedded",
        )
        episodes.append(RetrievedEpisode(episode=ep, similarity=0.8, surprisal=0.1, score=0.1))
    return spec, snaps, episodes


def timed(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000.0)
    return sorted(out)


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200 decisions instead of 2000")
    ap.add_argument("--n", type=int, default=None)
    args = ap.parse_args()
    n = args.n or (200 if args.quick else 2000)
    spec, snaps, eps = build()
    cfg = SairConfig(explore=False)
    state = SairState(mu1=())
    hpa = HPAPolicy()
    hstate = hpa.initial_state(spec)
    mu1 = {"pre": 30.0, "infer": 60.0, "agg": 40.0, "post": 50.0}

    def embedded(i: int) -> object:
        # Cold memo each time: measure one decision alone, not a cache warmed by the last.
        planner.mmc_sojourn_quantile_ms.cache_clear()
        return strategic_decide(spec, snaps[i % len(snaps)], state, 0.0, eps, cfg)

    def reflex(i: int) -> object:
        return reflex_check(spec, snaps[i % len(snaps)], ReflexState(), 2.0, 30.0, mu1)

    def hpa_once(i: int) -> object:
        # a fresh HPA state each time: every call is a full sync (never "not due")
        return hpa.decide(spec, snaps[i % len(snaps)], hstate, float(i))

    for fn in (embedded, reflex, hpa_once):  # warm-up
        timed(fn, 20)
    emb = timed(embedded, n)
    ref = timed(reflex, n)
    hp = timed(hpa_once, n)
    print(f"decisions: {n} each; 4 stages, 15 episodes, rho grid of 8")
    for name, xs in (("embedded", emb), ("reflex", ref), ("hpa", hp)):
        print(f"{name:9s} p50 {pct(xs, 0.5):7.3f} ms  p99 {pct(xs, 0.99):7.3f} ms")
    print(
        json.dumps(
            {
                "embedded_p50_ms": round(pct(emb, 0.5), 3),
                "embedded_p99_ms": round(pct(emb, 0.99), 3),
                "reflex_p99_ms": round(pct(ref, 0.99), 3),
                "hpa_p99_ms": round(pct(hp, 0.99), 3),
                "reflex_p50_ms": round(pct(ref, 0.5), 3),
                "hpa_p50_ms": round(pct(hp, 0.5), 3),
                "n": n,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Retrieval latency and ingest rate of the retriever's stores.

One retrieval = nearest 128 candidates from the store, surprisal scoring, greedy selection
of M = 15, episodes fetched and the reply serialised (everything the service does per request
except the NATS hop). Measured with 1k, 10k and 100k stored episodes on the embedded engine,
against a brute-force numpy scan of the same data in the same run (full-precision distances
to every episode and a full sort, then the same scoring). qdrant-client local mode is measured
too (1k and 10k; its per-point SQLite commit makes 100k impractical to fill), and a Qdrant
server when SAIR_QDRANT_URL is set.

Ingest = the service's path: `store.ingest(batch, capacity)` (add each episode, evict to
the bound after each, one log write per batch), at steady state (the store full, so every
add also evicts). Measured per JetStream fetch of FETCH_BATCH = 64 episodes (what the service
stores at once when episodes arrive faster than it handles them: `ingest_per_s`), and one
episode at a time (`ingest_single_per_s`, a fetch of one); each as the median of 8 timed
windows (`*_mean_per_s_*`: all windows together), so that a burst of other jobs on a shared
machine does not decide the figure. The snapshot the numpy engine
writes every ~n/8 episodes is timed on its own and amortised into `ingest_per_s_*_amortised`.
Contexts: 20-d, around 40 fixed operating points (every store and query of a run shares them).

    .venv/bin/python bench/retrieval.py [--quick]

Last line: {"p99_ms_1k", "p99_ms_10k", "p99_ms_100k", "bruteforce_p99_ms_100k", "ingest_per_s",
...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.context import ENCODING_VERSION, context_dim
from schemas.messages import (
    Episode,
    EpisodeOutcome,
    RetrievedEpisode,
    RetrieveReply,
    RetrieveRequest,
    StageAction,
)
from schemas.pipeline import PipelineSpec, StageSpec
from services.retriever.logic import retrieve
from services.retriever.scoring import select
from services.retriever.store import (
    COMPACT_FRACTION,
    COMPACT_MIN_LINES,
    EpisodeStore,
    StoreFactory,
)

SPEC = PipelineSpec(
    name="bench",
    slo_p99_ms=200,
    stages=[
        StageSpec(name="pre", kind="cpu"),
        StageSpec(name="infer", kind="gpu", rho_grid=[0.25, 0.5, 1.0]),
        StageSpec(name="post", kind="cpu"),
    ],
)
DIM = context_dim(SPEC)
M = 15
CANDIDATES = 128
FETCH_BATCH = 64  # services/retriever/app.py FETCH_BATCH (not imported: keeps the bench light)
CENTRES = np.random.default_rng(2024).random((40, DIM))
"""The operating points a pipeline keeps revisiting (one set per run: queries and stored
episodes come from the same situations)."""


def make_contexts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Contexts in [0, 1]^d around the operating points."""
    which = rng.integers(0, len(CENTRES), n)
    return np.clip(CENTRES[which] + rng.normal(0, 0.05, (n, DIM)), 0, 1)


def make_episodes(rng: np.random.Generator, start: int, n: int) -> list[Episode]:
    ctx = make_contexts(rng, n)
    rewards = rng.uniform(0.01, 2.0, n)
    action = [
        StageAction(stage="pre", target_replicas=2),
        StageAction(stage="infer", target_replicas=1, rho=0.5),
        StageAction(stage="post", target_replicas=1),
    ]
    outcome = EpisodeOutcome(p99_ms=120.0, cost_per_h=1.5)
    return [
        Episode(
            pipeline=SPEC.name,
            episode_id=f"ep-{start + i}",
            ts_s=float(start + i),
            encoding_version=ENCODING_VERSION,
            context=ctx[i].tolist(),
            action=action,
            reward=float(rewards[i]),
            outcome=outcome,
            source="embedded",
        )
        for i in range(n)
    ]


def fill(store: EpisodeStore, rng: np.random.Generator, n: int, chunk: int = 5000) -> None:
    done = store.count()
    while done < n:
        k = min(chunk, n - done)
        store.add(make_episodes(rng, done, k))
        done += k


def requests(rng: np.random.Generator, n: int) -> list[RetrieveRequest]:
    return [
        RetrieveRequest(pipeline=SPEC.name, encoding_version=ENCODING_VERSION,
                        context=c.tolist(), m=M, candidates=CANDIDATES)
        for c in make_contexts(rng, n)
    ]


def pcts(lat_s: list[float]) -> dict[str, float]:
    a = np.array(lat_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def time_store(store: EpisodeStore, reqs: list[RetrieveRequest]) -> dict[str, float]:
    lat: list[float] = []
    for req in reqs[:5]:
        retrieve(store, req).model_dump_json()  # warm-up
    for req in reqs:
        t = time.perf_counter()
        retrieve(store, req).model_dump_json()
        lat.append(time.perf_counter() - t)
    return pcts(lat)


def time_side_by_side(
    store: EpisodeStore, reqs: list[RetrieveRequest]
) -> tuple[dict[str, float], dict[str, float]]:
    """The store's retrieval, and the same retrieval with the candidates found by a plain
    scan over every episode (full-precision distances, a full sort), alternating per query."""
    ids = list(store.ids())
    got = store.get(ids)
    x = np.array([e.context for e in got])
    r = np.array([e.reward for e in got])

    def brute(req: RetrieveRequest) -> None:
        q = np.asarray(req.context)
        dist = np.sqrt(((x - q) ** 2).sum(axis=1))
        cand = np.argsort(dist)[:CANDIDATES]
        sel = select(q, x[cand], r[cand], M)
        picked = [got[int(cand[i])] for i in sel.indices]
        RetrieveReply(
            pipeline=SPEC.name,
            stored=len(ids),
            episodes=[
                RetrievedEpisode(episode=e, similarity=float(s), surprisal=float(u),
                                 score=float(v))
                for e, s, u, v in zip(picked, sel.similarity, sel.surprisal, sel.score,
                                      strict=True)
            ],
        ).model_dump_json()

    for req in reqs[:5]:  # warm-up
        retrieve(store, req).model_dump_json()
        brute(req)
    lat_store: list[float] = []
    lat_brute: list[float] = []
    cpu_store: list[float] = []
    cpu_brute: list[float] = []
    for req in reqs:
        c = time.thread_time()
        t = time.perf_counter()
        retrieve(store, req).model_dump_json()
        lat_store.append(time.perf_counter() - t)
        cpu_store.append(time.thread_time() - c)
        c = time.thread_time()
        t = time.perf_counter()
        brute(req)
        lat_brute.append(time.perf_counter() - t)
        cpu_brute.append(time.thread_time() - c)
    emb, bf = pcts(lat_store), pcts(lat_brute)
    # the same percentiles of CPU time: what the query costs without other jobs' share
    emb.update({f"cpu_{k}": v for k, v in pcts(cpu_store).items()})
    bf.update({f"cpu_{k}": v for k, v in pcts(cpu_brute).items()})
    return emb, bf


_next_id = [time.time_ns() // 1000]
"""Ids of ingested episodes: unique per run, so a reused store (--store-dir) stores them."""


def ingest_rate(store: EpisodeStore, rng: np.random.Generator, n: int, capacity: int,
                batch: int, windows: int = 8) -> tuple[float, float, float]:
    """Episodes/s through the service's path, `ingest` per fetch of `batch` episodes, timed
    in `windows` equal windows: (median of the windows' rates, overall rate, episodes per
    second of this process's CPU time). The median discounts windows in which other jobs on
    this shared machine took the CPU; the CPU-time rate leaves them out altogether (one
    thread: on an idle machine it equals the wall-clock rate, less the flush waits)."""
    per = max(batch, n // windows)
    rates: list[float] = []
    total_s = 0.0
    cpu_s = 0.0
    for _ in range(windows):
        eps = make_episodes(rng, _next_id[0], per)
        _next_id[0] += per
        c = time.process_time()
        t = time.perf_counter()
        for i in range(0, per, batch):
            store.ingest(eps[i : i + batch], capacity)
        dt = time.perf_counter() - t
        cpu_s += time.process_time() - c
        rates.append(per / dt)
        total_s += dt
    return float(np.median(rates)), per * windows / total_s, per * windows / max(cpu_s, 1e-9)


def snapshot_s(store: EpisodeStore) -> float:
    snap = getattr(store, "snapshot", None)
    if snap is None:
        return 0.0
    t = time.perf_counter()
    snap()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer queries, smaller local-mode run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                    help="stored episodes per run (default: 1000 10000 100000); the summary "
                         "keys are complete only with the default")
    ap.add_argument("--no-qdrant-local", action="store_true",
                    help="skip the qdrant-client local-mode rows")
    ap.add_argument("--store-dir", default=None,
                    help="keep the numpy-engine stores here and reuse them (skips the fill on "
                         "later runs; default: a temporary directory)")
    args = ap.parse_args()
    rng = np.random.default_rng(42)
    n_queries = 100 if args.quick else 500
    sizes = sorted(args.sizes)
    out: dict[str, Any] = {}
    rows: list[tuple[str, int, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        factory = StoreFactory("numpy", None, args.store_dir or tmp)
        for n in sizes:
            store = factory.open(f"n{n}", ENCODING_VERSION, DIM)
            t = time.perf_counter()
            fill(store, rng, n)
            fill_s = time.perf_counter() - t
            reqs = requests(rng, n_queries)
            # interleaved, so that a burst of load from other jobs hits both alike
            emb, brute = time_side_by_side(store, reqs)
            n_ing = 512 if args.quick else 2048
            single, single_mean, single_cpu = ingest_rate(store, rng, n_ing // 2, capacity=n,
                                                          batch=1)
            ing, ing_mean, ing_cpu = ingest_rate(store, rng, n_ing, capacity=n,
                                                 batch=FETCH_BATCH)
            snap_s = snapshot_s(store)
            # the engine snapshots when its log passes max(2000, n/4) lines; an ingested
            # episode writes two (its add, and the eviction it causes)
            per_snapshot = max(COMPACT_MIN_LINES, COMPACT_FRACTION * n) / 2
            amortised = 1.0 / (1.0 / ing + snap_s / per_snapshot)
            tag = f"{n // 1000}k"
            out[f"p50_ms_{tag}"] = round(emb["p50_ms"], 3)
            out[f"p99_ms_{tag}"] = round(emb["p99_ms"], 3)
            out[f"bruteforce_p50_ms_{tag}"] = round(brute["p50_ms"], 3)
            out[f"bruteforce_p99_ms_{tag}"] = round(brute["p99_ms"], 3)
            out[f"cpu_p99_ms_{tag}"] = round(emb["cpu_p99_ms"], 3)
            out[f"bruteforce_cpu_p99_ms_{tag}"] = round(brute["cpu_p99_ms"], 3)
            out[f"ingest_per_s_{tag}"] = round(ing, 1)
            out[f"ingest_mean_per_s_{tag}"] = round(ing_mean, 1)
            out[f"ingest_cpu_per_s_{tag}"] = round(ing_cpu, 1)
            out[f"ingest_single_per_s_{tag}"] = round(single, 1)
            out[f"ingest_single_mean_per_s_{tag}"] = round(single_mean, 1)
            out[f"ingest_single_cpu_per_s_{tag}"] = round(single_cpu, 1)
            out[f"snapshot_s_{tag}"] = round(snap_s, 3)
            out[f"ingest_per_s_{tag}_amortised"] = round(amortised, 1)
            out[f"fill_s_{tag}"] = round(fill_s, 1)
            rows.append(("numpy engine", n, f"{emb['p50_ms']:.2f}", f"{emb['p99_ms']:.2f}",
                         f"{ing:.0f} ({single:.0f})"))
            rows.append(("brute-force scan", n, f"{brute['p50_ms']:.2f}",
                         f"{brute['p99_ms']:.2f}", "-"))
            print(f"# numpy engine n={n}: filled in {fill_s:.1f} s, snapshot {snap_s:.2f} s, "
                  f"ingest amortising snapshots {amortised:.0f}/s", file=sys.stderr)
        factory.close()
        # worst case of the required sizes: the steady-state rate at the largest store
        top = f"{sizes[-1] // 1000}k"
        out["ingest_per_s"] = out[f"ingest_per_s_{top}"]
        out["ingest_mean_per_s"] = out[f"ingest_mean_per_s_{top}"]
        out["ingest_single_per_s"] = out[f"ingest_single_per_s_{top}"]

        local_sizes = [] if args.no_qdrant_local else [1_000] if args.quick else [1_000, 10_000]
        for n in local_sizes:
            path = Path(tmp) / f"qdrant-{n}"
            lf = StoreFactory("qdrant-local", None, str(path))
            store = lf.open("bench", ENCODING_VERSION, DIM)
            t = time.perf_counter()
            fill(store, rng, n, chunk=1000)
            fill_rate = n / (time.perf_counter() - t)
            reqs = requests(rng, min(n_queries, 100))
            res = time_store(store, reqs)
            ing = ingest_rate(store, rng, 256, capacity=n, batch=FETCH_BATCH, windows=1)[1]
            tag = f"{n // 1000}k"
            out[f"qdrant_local_p99_ms_{tag}"] = round(res["p99_ms"], 3)
            out[f"qdrant_local_ingest_per_s_{tag}"] = round(ing, 1)
            out[f"qdrant_local_batch_fill_per_s_{tag}"] = round(fill_rate, 1)
            rows.append(("qdrant local mode", n, f"{res['p50_ms']:.2f}", f"{res['p99_ms']:.2f}",
                         f"{ing:.0f}"))
            lf.close()

        url = os.environ.get("SAIR_QDRANT_URL")
        if url:
            sf = StoreFactory("qdrant-server", url, None)
            for n in sizes:
                store = sf.open(f"bench{n}", ENCODING_VERSION + int(time.time()) % 1000, DIM)
                fill(store, rng, n, chunk=1000)
                res = time_store(store, requests(rng, n_queries))
                out[f"server_p99_ms_{n // 1000}k"] = round(res["p99_ms"], 3)
                rows.append(("qdrant server", n, f"{res['p50_ms']:.2f}",
                             f"{res['p99_ms']:.2f}", "-"))
            sf.close()

    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs)")
    out["loadavg_1m_end"] = round(load[0], 2)
    print(f"{'backend':<20}{'stored':>8}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'ingest/s per fetch of 64 (of 1)':>34}")
    for name, n, p50, p99, ing_s in rows:
        print(f"{name:<20}{n:>8}{p50:>10}{p99:>10}{ing_s:>34}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Retrieval latency and ingest rate of the retriever's stores.

One retrieval = nearest 128 candidates from the store, surprisal scoring, greedy selection
of M = 15, episodes fetched and the reply serialised (everything the service does per request
except the NATS hop). Measured with 1k, 10k and 100k stored episodes on the embedded engine,
against a brute-force numpy scan of the same data in the same run (full-precision distances
to every episode and a full sort, then the same scoring). qdrant-client local mode is measured
too (1k and 10k; its per-point SQLite commit makes 100k impractical to fill), and a Qdrant
server when SAIR_QDRANT_URL is set.

Ingest = the service's path per episode: add one, evict to the bound; measured at steady
state (the store full, so every add also evicts).

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
from services.retriever.store import EpisodeStore, StoreFactory

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


def make_contexts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Contexts in [0, 1]^d around a few dozen operating points (a pipeline revisits states)."""
    centres = rng.random((40, DIM))
    which = rng.integers(0, 40, n)
    return np.clip(centres[which] + rng.normal(0, 0.05, (n, DIM)), 0, 1)


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


def time_bruteforce(store: EpisodeStore, reqs: list[RetrieveRequest]) -> dict[str, float]:
    """The same retrieval with the candidates found by a plain scan over every episode."""
    ids = list(store.ids())
    got = store.get(ids)
    x = np.array([e.context for e in got])
    r = np.array([e.reward for e in got])
    lat: list[float] = []
    for req in reqs:
        t = time.perf_counter()
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
        lat.append(time.perf_counter() - t)
    return pcts(lat)


def ingest_rate(store: EpisodeStore, rng: np.random.Generator, n: int, capacity: int) -> float:
    """Episodes/s through the service's path: add one, evict to the bound."""
    eps = make_episodes(rng, 10_000_000, n)
    t = time.perf_counter()
    for e in eps:
        store.add([e])
        store.evict(capacity)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer queries, smaller local-mode run")
    args = ap.parse_args()
    rng = np.random.default_rng(42)
    n_queries = 100 if args.quick else 500
    sizes = [1_000, 10_000, 100_000]
    out: dict[str, Any] = {}
    rows: list[tuple[str, int, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        factory = StoreFactory("numpy", None, tmp)
        for n in sizes:
            store = factory.open(f"n{n}", ENCODING_VERSION, DIM)
            t = time.perf_counter()
            fill(store, rng, n)
            fill_s = time.perf_counter() - t
            reqs = requests(rng, n_queries)
            emb = time_store(store, reqs)
            brute = time_bruteforce(store, reqs)
            ing = ingest_rate(store, rng, 500 if args.quick else 2000, capacity=n)
            tag = f"{n // 1000}k"
            out[f"p50_ms_{tag}"] = round(emb["p50_ms"], 3)
            out[f"p99_ms_{tag}"] = round(emb["p99_ms"], 3)
            out[f"bruteforce_p50_ms_{tag}"] = round(brute["p50_ms"], 3)
            out[f"bruteforce_p99_ms_{tag}"] = round(brute["p99_ms"], 3)
            out[f"ingest_per_s_{tag}"] = round(ing, 1)
            rows.append(("numpy engine", n, f"{emb['p50_ms']:.2f}", f"{emb['p99_ms']:.2f}",
                         f"{ing:.0f}"))
            rows.append(("brute-force scan", n, f"{brute['p50_ms']:.2f}",
                         f"{brute['p99_ms']:.2f}", "-"))
            print(f"# numpy engine n={n}: filled in {fill_s:.1f} s", file=sys.stderr)
        factory.close()
        # worst case of the required sizes: the steady-state rate at the largest store
        out["ingest_per_s"] = out["ingest_per_s_100k"]

        local_sizes = [1_000] if args.quick else [1_000, 10_000]
        for n in local_sizes:
            path = Path(tmp) / f"qdrant-{n}"
            lf = StoreFactory("qdrant-local", None, str(path))
            store = lf.open("bench", ENCODING_VERSION, DIM)
            t = time.perf_counter()
            fill(store, rng, n, chunk=1000)
            fill_rate = n / (time.perf_counter() - t)
            reqs = requests(rng, min(n_queries, 100))
            res = time_store(store, reqs)
            ing = ingest_rate(store, rng, 200, capacity=n)
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

    print(f"{'backend':<20}{'stored':>8}{'p50 ms':>10}{'p99 ms':>10}{'ingest/s':>10}")
    for name, n, p50, p99, ing_s in rows:
        print(f"{name:<20}{n:>8}{p50:>10}{p99:>10}{ing_s:>10}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

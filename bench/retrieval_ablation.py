"""Ablation: does surprisal-guided retrieval help a retrieval-based chooser?

A contextual bandit: contexts x ~ U[0, 1]^d, K actions, each with a centre c_a; the mean
reward of action a in context x is exp(-|x - c_a|^2 / (2 * 0.3^2)), so the best action is
the one whose centre is nearest, and it changes across the context space. Rewards carry
Gaussian noise; as in the retriever, only positive-reward episodes are stored.

Each round the chooser retrieves M = 15 episodes for the current context with one of:
- surprisal: the retriever's rule (128 nearest candidates, sim x leave-one-out residual,
  greedy with the diversity penalty; services/retriever/scoring.py);
- nearest-k: the 15 nearest episodes;
- random: 15 episodes drawn uniformly from the memory;
- two ablations of the rule: surprisal-nodiv (no diversity penalty) and similar-diverse
  (similarity alone as the score, with the diversity penalty);
- surprisal-medianbw: the rule with its former bandwidth (the median distance to all
  candidates instead of the distance to the M-th nearest), for comparison;
then picks, among the actions of the retrieved episodes, the one with the best
kernel-weighted mean reward (the same Gaussian kernel for every method, median-heuristic
bandwidth over the retrieved set). Exploration is the same for all (epsilon-greedy,
epsilon <- max(0.05, 0.95 epsilon) per round, from one shared random stream per seed), so
the methods differ only in which episodes the chooser sees.

Diagnostics (not the default setting): `--candidates N` changes the candidate pool of the
surprisal rules; `--chooser-bandwidth H` fixes the chooser's kernel for every method (by
default it adapts to the spread of what was retrieved, so a method that retrieves farther
episodes also gets a smoother, more biased chooser).

    .venv/bin/python bench/retrieval_ablation.py [--quick] [--rounds T] [--seeds S]
        [--candidates N] [--chooser-bandwidth H]

Prints a table of cumulative regret over T rounds, then one JSON line of mean regrets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.retriever.scoring import (
    gaussian_kernel,
    greedy_select,
    median_bandwidth,
    score_candidates,
    select,
)

DIM = 3
ACTIONS = 4
M = 15
CANDIDATES = 128
REWARD_WIDTH = 0.3
NOISE_SD = 0.1
settings: dict[str, float | None] = {"candidates": CANDIDATES, "chooser_bandwidth": None}

Retriever = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def mean_reward(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Mean reward of every action in context x: (K,)."""
    d2 = ((centres - x) ** 2).sum(axis=1)
    return np.exp(-d2 / (2 * REWARD_WIDTH**2))


def nearest_idx(x: np.ndarray, mem_x: np.ndarray, k: int) -> np.ndarray:
    d = ((mem_x - x) ** 2).sum(axis=1)
    if k >= d.size:
        return np.argsort(d, kind="stable")
    part = np.argpartition(d, k - 1)[:k]
    return part[np.argsort(d[part], kind="stable")]


def _pool(x: np.ndarray, mem_x: np.ndarray) -> np.ndarray:
    return nearest_idx(x, mem_x, int(settings["candidates"] or CANDIDATES))


def retrieve_surprisal(
    x: np.ndarray, mem_x: np.ndarray, mem_r: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    cand = _pool(x, mem_x)
    sel = select(x, mem_x[cand], mem_r[cand], M)
    return cand[sel.indices]


def retrieve_surprisal_nodiv(
    x: np.ndarray, mem_x: np.ndarray, mem_r: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    cand = _pool(x, mem_x)
    sel = select(x, mem_x[cand], mem_r[cand], M, diversity=0.0)
    return cand[sel.indices]


def retrieve_surprisal_medianbw(
    x: np.ndarray, mem_x: np.ndarray, mem_r: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The rule with its former bandwidth: the median distance to all candidates."""
    cand = _pool(x, mem_x)
    d2 = ((mem_x[cand] - x) ** 2).sum(axis=1)
    sel = select(x, mem_x[cand], mem_r[cand], M, bandwidth=median_bandwidth(d2))
    return cand[sel.indices]


def retrieve_similar_diverse(
    x: np.ndarray, mem_x: np.ndarray, mem_r: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Ablates the surprisal factor: score = similarity alone, same diversity penalty."""
    cand = _pool(x, mem_x)
    s = score_candidates(x, mem_x[cand], mem_r[cand], m=M)
    return cand[greedy_select(s.similarity, s.kernel, M, tie_break=s.similarity)]


def retrieve_nearest(
    x: np.ndarray, mem_x: np.ndarray, mem_r: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    return nearest_idx(x, mem_x, M)


def retrieve_random(
    x: np.ndarray, mem_x: np.ndarray, mem_r: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    n = mem_x.shape[0]
    return rng.choice(n, size=min(M, n), replace=False)


METHODS: dict[str, Retriever] = {
    "surprisal": retrieve_surprisal,
    "surprisal-nodiv": retrieve_surprisal_nodiv,
    "surprisal-medianbw": retrieve_surprisal_medianbw,
    "similar-diverse": retrieve_similar_diverse,
    "nearest-k": retrieve_nearest,
    "random": retrieve_random,
}


def choose(x: np.ndarray, ex: np.ndarray, ea: np.ndarray, er: np.ndarray) -> int | None:
    """Action of the retrieved episodes with the best kernel-weighted mean reward."""
    if ex.shape[0] == 0:
        return None
    d2 = ((ex - x) ** 2).sum(axis=1)
    fixed = settings["chooser_bandwidth"]
    w = gaussian_kernel(d2, median_bandwidth(d2) if fixed is None else fixed)
    best, best_value = None, -np.inf
    for a in np.unique(ea):
        mask = ea == a
        total = w[mask].sum()
        value = float((w[mask] * er[mask]).sum() / total) if total > 1e-300 else float(
            er[mask].mean()
        )
        if value > best_value:
            best, best_value = int(a), value
    return best


def run(method: str, seed: int, rounds: int) -> float:
    env = np.random.default_rng(seed)
    centres = env.random((ACTIONS, DIM))
    contexts = env.random((rounds, DIM))
    noise = env.normal(0, NOISE_SD, rounds)
    explore_u = env.random(rounds)
    explore_a = env.integers(0, ACTIONS, rounds)
    retr_rng = np.random.default_rng(seed + 10_000)
    mem_x = np.zeros((rounds, DIM))
    mem_a = np.zeros(rounds, dtype=np.int64)
    mem_r = np.zeros(rounds)
    n = 0
    eps = 1.0
    regret = 0.0
    retriever = METHODS[method]
    for t in range(rounds):
        x = contexts[t]
        mu = mean_reward(x, centres)
        action: int | None = None
        if explore_u[t] >= eps and n > 0:
            idx = retriever(x, mem_x[:n], mem_r[:n], retr_rng)
            action = choose(x, mem_x[idx], mem_a[idx], mem_r[idx])
        if action is None:
            action = int(explore_a[t])
        eps = max(0.05, 0.95 * eps)
        regret += float(mu.max() - mu[action])
        r = float(mu[action] + noise[t])
        if r > 0:  # the paper's rule: only positive-reward episodes are stored
            mem_x[n], mem_a[n], mem_r[n] = x, action, r
            n += 1
    return regret


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 rounds, 3 seeds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=CANDIDATES,
                    help="candidate pool of the surprisal rules (diagnostic)")
    ap.add_argument("--chooser-bandwidth", type=float, default=None,
                    help="fixed chooser kernel for every method (diagnostic)")
    args = ap.parse_args()
    settings["candidates"] = args.candidates
    settings["chooser_bandwidth"] = args.chooser_bandwidth
    rounds = args.rounds or (500 if args.quick else 2000)
    seeds = args.seeds or (3 if args.quick else 8)
    results: dict[str, list[float]] = {
        m: [run(m, s, rounds) for s in range(seeds)] for m in METHODS
    }
    print(f"contextual bandit: d={DIM}, K={ACTIONS} actions, T={rounds} rounds, {seeds} seeds, "
          f"M={M}, candidates={args.candidates}, chooser bandwidth="
          f"{args.chooser_bandwidth or 'median of retrieved'}")
    print(f"{'retrieval':<20}{'mean regret':>14}{'sd':>10}{'min':>10}{'max':>10}  per seed")
    for m, regs in results.items():
        a = np.array(regs)
        per = " ".join(f"{v:.1f}" for v in regs)
        print(f"{m:<20}{a.mean():>14.1f}{a.std(ddof=1) if a.size > 1 else 0.0:>10.1f}"
              f"{a.min():>10.1f}{a.max():>10.1f}  {per}")
    wins = sum(
        s < n for s, n in zip(results["surprisal"], results["nearest-k"], strict=True)
    )
    print(f"surprisal beats nearest-k on {wins}/{seeds} seeds")
    print(json.dumps({
        "regret_surprisal": round(float(np.mean(results["surprisal"])), 2),
        "regret_nearest_k": round(float(np.mean(results["nearest-k"])), 2),
        "regret_random": round(float(np.mean(results["random"])), 2),
        "regret_surprisal_nodiv": round(float(np.mean(results["surprisal-nodiv"])), 2),
        "regret_surprisal_medianbw": round(float(np.mean(results["surprisal-medianbw"])), 2),
        "regret_similar_diverse": round(float(np.mean(results["similar-diverse"])), 2),
        "rounds": rounds,
        "seeds": seeds,
        "candidates": args.candidates,
    }))


if __name__ == "__main__":
    main()

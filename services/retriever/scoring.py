"""Surprisal-guided retrieval scores (pure numpy, no I/O).

score(e) = k(x_e, x) * |r_e - E[r | D without e]|

- k: Gaussian kernel exp(-|a - b|^2 / (2 h^2)) on the context vectors.
- E[r | D without e]: leave-one-out Nadaraya-Watson estimate of e's reward from the other
  candidates, weighted by the same kernel. An episode whose reward its neighbours already
  predict carries little information (surprisal ~ 0); a surprising one carries much.
- Selection: greedy, up to m, with a diversity penalty: the gain of e given the selected set S
  is score(e) * (1 - lam * max_{s in S} k(x_e, x_s)), so an exact duplicate of a chosen episode
  gains nothing (lam = 1) while a distinct one keeps its score.
- Bandwidth: the scale of the neighbourhood the m selected episodes stand for, h = the
  distance from the query to its m-th nearest candidate, floored at `MIN_BANDWIDTH` so
  identical candidates do not produce a zero bandwidth. A fixed bandwidth can be passed
  instead. (It was the median distance to all candidates, which tied the kernel to the
  candidate-pool size, a search setting: with 512 candidates instead of 128 the kernel
  widened, the diversity penalty pushed the picks further out, and the ablation's regret
  almost doubled. See docs/retriever.md.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

MIN_BANDWIDTH = 0.05
"""Contexts live in [0, 1]^d; below this two contexts are 'the same situation'."""
DEFAULT_DIVERSITY = 1.0
DEFAULT_M = 15
ROUNDING = 1e-12
ZERO_SQ = 1e-12
"""Squared distances below this are rounding noise of a duplicate (distance < 1e-6)."""
_TINY = 1e-300


def sq_distances(a: FloatArray, b: FloatArray) -> FloatArray:
    """Squared Euclidean distances between the rows of a (n, d) and b (m, d): (n, m).

    |a|^2 + |b|^2 - 2 a.b (one matrix product); values within rounding of 0 are set to
    exactly 0 so that duplicates get kernel 1 (the diversity penalty relies on it)."""
    d = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    d[d < ZERO_SQ] = 0.0
    return d


def gaussian_kernel(sq_dist: FloatArray, bandwidth: float) -> FloatArray:
    if not bandwidth > 0:
        raise ValueError(f"bandwidth={bandwidth!r}: must be > 0")
    return np.exp(-sq_dist / (2.0 * bandwidth * bandwidth))


def median_bandwidth(query_sq_dist: FloatArray, floor: float = MIN_BANDWIDTH) -> float:
    """Median heuristic: the median distance from the query to the candidates."""
    if query_sq_dist.size == 0:
        return floor
    return max(floor, float(np.sqrt(np.median(query_sq_dist))))


def neighbourhood_bandwidth(
    query_sq_dist: FloatArray, m: int = DEFAULT_M, floor: float = MIN_BANDWIDTH
) -> float:
    """Distance from the query to its m-th nearest candidate (the farthest, with fewer)."""
    if query_sq_dist.size == 0:
        return floor
    k = min(max(m, 1), query_sq_dist.size)
    kth = float(np.partition(query_sq_dist, k - 1)[k - 1])
    return max(floor, float(np.sqrt(kth)))


def loo_estimates(kernel: FloatArray, rewards: FloatArray) -> FloatArray:
    """Leave-one-out Nadaraya-Watson estimate of each reward from the others.

    E_i = sum_{j != i} K_ij r_j / sum_{j != i} K_ij, computed from the full sums minus the
    diagonal term (the identity the tests check against the explicit loop). Where the others
    carry no weight (an isolated episode) the estimate is the mean of the other rewards, and
    with no other episode at all it is 0 (nothing known, so the whole reward is surprise).
    """
    n = rewards.shape[0]
    if kernel.shape != (n, n):
        raise ValueError(f"kernel shape {kernel.shape} does not match {n} rewards")
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.zeros(1)
    diag = np.diag(kernel)
    num = kernel @ rewards - diag * rewards
    den = kernel.sum(axis=1) - diag
    others_mean = (rewards.sum() - rewards) / (n - 1)
    ok = den > 1e-12
    est = np.where(ok, num / np.where(ok, den, 1.0), others_mean)
    return est


@dataclass(frozen=True)
class Scored:
    """Per-candidate values, in candidate order."""

    similarity: FloatArray
    surprisal: FloatArray
    score: FloatArray
    kernel: FloatArray
    """Candidate-candidate kernel matrix (n, n), reused by the diversity penalty."""
    bandwidth: float


def score_candidates(
    query: FloatArray,
    vectors: FloatArray,
    rewards: FloatArray,
    bandwidth: float | None = None,
    m: int = DEFAULT_M,
) -> Scored:
    """Similarity, leave-one-out surprisal and score of each candidate for `query`; without
    a fixed bandwidth, the distance to the m-th nearest candidate sets it."""
    vectors = np.asarray(vectors, dtype=np.float64)
    rewards = np.asarray(rewards, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    n = vectors.shape[0]
    if vectors.ndim != 2 or rewards.shape != (n,):
        raise ValueError(f"vectors {vectors.shape} and rewards {rewards.shape} do not match")
    if n and query.shape != (vectors.shape[1],):
        raise ValueError(f"query dimension {query.shape} is not {vectors.shape[1]}")
    q_sq = sq_distances(query[None, :], vectors)[0] if n else np.zeros(0)
    h = neighbourhood_bandwidth(q_sq, m) if bandwidth is None else float(bandwidth)
    sim = gaussian_kernel(q_sq, h)
    kernel = gaussian_kernel(sq_distances(vectors, vectors), h)
    surprisal = np.abs(rewards - loo_estimates(kernel, rewards))
    # rounding noise of the weighted mean is not surprise: equal rewards give exact zeros,
    # so ties fall to the similarity order instead of to noise
    scale = float(np.abs(rewards).max()) if n else 0.0
    surprisal[surprisal <= ROUNDING * max(scale, 1.0)] = 0.0
    return Scored(similarity=sim, surprisal=surprisal, score=sim * surprisal, kernel=kernel,
                  bandwidth=h)


def greedy_select(
    score: FloatArray,
    kernel: FloatArray,
    m: int,
    diversity: float = DEFAULT_DIVERSITY,
    tie_break: FloatArray | None = None,
) -> list[int]:
    """Indices of up to m candidates, chosen greedily by score * (1 - diversity * max k to
    the chosen). Equal gains (e.g. all scores 0) fall back to `tie_break` (higher first,
    typically the similarity), then to the lower index."""
    n = score.shape[0]
    if m < 0:
        raise ValueError(f"m={m}: must be >= 0")
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity={diversity}: must lie in [0, 1]")
    tb = np.zeros(n) if tie_break is None else np.asarray(tie_break, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    chosen: list[int] = []
    max_k = np.zeros(n)
    keep = np.ones(n)
    gain = np.empty(n)
    for _ in range(min(m, n)):
        np.multiply(score, keep, out=gain)
        gain[chosen] = -np.inf
        best_gain = gain.max()
        # exact comparison is intended: ties are gains that are equal as computed
        tied = np.flatnonzero(gain >= best_gain)
        pick = int(tied[0]) if tied.size == 1 else int(tied[np.argmax(tb[tied] * keep[tied])])
        chosen.append(pick)
        np.maximum(max_k, kernel[pick], out=max_k)
        np.multiply(max_k, -diversity, out=keep)
        keep += 1.0
    return chosen


@dataclass(frozen=True)
class Selection:
    indices: list[int]
    """Candidate indices in selection order."""
    similarity: FloatArray
    surprisal: FloatArray
    score: FloatArray
    bandwidth: float


def select(
    query: FloatArray,
    vectors: FloatArray,
    rewards: FloatArray,
    m: int,
    bandwidth: float | None = None,
    diversity: float = DEFAULT_DIVERSITY,
) -> Selection:
    """Score the candidates and pick up to m of them (the retriever's whole decision)."""
    s = score_candidates(query, vectors, rewards, bandwidth, m=m)
    idx = greedy_select(s.score, s.kernel, m, diversity, tie_break=s.similarity)
    return Selection(
        indices=idx,
        similarity=s.similarity[idx],
        surprisal=s.surprisal[idx],
        score=s.score[idx],
        bandwidth=s.bandwidth,
    )

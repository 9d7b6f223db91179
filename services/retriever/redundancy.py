"""Nearest-neighbour bookkeeping for coverage-keeping eviction (pure numpy, no I/O).

The bounded episode store drops the most *redundant* episode, not the oldest: the one whose
nearest stored neighbour is closest (it adds the least coverage of the context space), ties
going to the older one (so of two duplicates the newer observation stays). Keeping each
point's nearest-neighbour distance up to date makes that an O(n) pick instead of an O(n^2)
scan: an insert compares the new point with every stored one (one matrix product), and a
removal recomputes only the points whose nearest neighbour it was.

The same arrays double as the embedded engine's search index (`nearest`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

TIE_SQ = 1e-12
"""Squared distances this close are equal (float rounding of |a|^2 + |b|^2 - 2 a.b)."""
_CHUNK_ELEMENTS = 4_000_000
"""Bound on the temporary distance block (n x batch), ~32 MB of float64."""


class RedundancyIndex:
    """Vectors with ids and timestamps, each with its nearest neighbour's squared distance."""

    def __init__(self, dim: int, initial_capacity: int = 1024) -> None:
        if dim < 1:
            raise ValueError(f"dim={dim}: must be >= 1")
        self.dim = dim
        cap = max(1, initial_capacity)
        self.n = 0
        self.vectors = np.zeros((cap, dim))
        self.sqnorm = np.zeros(cap)
        self.ts = np.zeros(cap)
        self.nn_sq = np.full(cap, np.inf)
        self.nn_idx = np.full(cap, -1, dtype=np.int64)
        self.ids: list[str] = []
        self.slot: dict[str, int] = {}

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return self.n

    def __contains__(self, episode_id: object) -> bool:
        return episode_id in self.slot

    def sq_dist_to(self, query: FloatArray) -> FloatArray:
        """Squared distances from `query` to every stored vector (slot order)."""
        n = self.n
        d = self.sqnorm[:n] - 2.0 * (self.vectors[:n] @ query) + float(query @ query)
        return np.maximum(d, 0.0)

    def nearest(self, query: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
        """Slots and squared distances of the k nearest stored vectors, nearest first."""
        q = np.asarray(query, dtype=np.float64)
        if q.shape != (self.dim,):
            raise ValueError(f"query dimension {q.shape} is not ({self.dim},)")
        if self.n == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        d = self.sq_dist_to(q)
        if k >= self.n:
            order = np.argsort(d, kind="stable")
        else:
            part = np.argpartition(d, k - 1)[:k]
            order = part[np.argsort(d[part], kind="stable")]
        return order.astype(np.int64), d[order]

    def most_redundant(self) -> str | None:
        """Id of the episode whose nearest neighbour is closest; ties to the older one."""
        n = self.n
        if n == 0:
            return None
        nn = self.nn_sq[:n]
        tied = np.flatnonzero(nn <= nn.min() + TIE_SQ)
        pick = int(tied[np.argmin(self.ts[:n][tied])])
        return self.ids[pick]

    # ------------------------------------------------------------------ updates

    def _grow(self, need: int) -> None:
        cap = self.vectors.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        self.vectors = _resized(self.vectors, new_cap, 0.0)
        self.sqnorm = _resized(self.sqnorm, new_cap, 0.0)
        self.ts = _resized(self.ts, new_cap, 0.0)
        self.nn_sq = _resized(self.nn_sq, new_cap, np.inf)
        self.nn_idx = _resized(self.nn_idx, new_cap, -1)

    def add_many(self, ids: Sequence[str], vectors: FloatArray, ts: FloatArray) -> list[int]:
        """Insert new points (ids already stored, or repeated in the batch, are skipped).
        Returns the positions within the batch that were inserted."""
        vectors = np.asarray(vectors, dtype=np.float64).reshape(len(ids), self.dim)
        ts = np.asarray(ts, dtype=np.float64).reshape(len(ids))
        keep: list[int] = []
        seen: set[str] = set()
        for i, eid in enumerate(ids):
            if eid not in self.slot and eid not in seen:
                keep.append(i)
                seen.add(eid)
        if not keep:
            return []
        new_v = vectors[keep]
        b = len(keep)
        n0 = self.n
        self._grow(n0 + b)
        sl = slice(n0, n0 + b)
        self.vectors[sl] = new_v
        self.sqnorm[sl] = np.einsum("ij,ij->i", new_v, new_v)
        self.ts[sl] = ts[keep]
        self.nn_sq[sl] = np.inf
        self.nn_idx[sl] = -1
        for j, i in enumerate(keep):
            self.ids.append(ids[i])
            self.slot[ids[i]] = n0 + j
        self.n = n0 + b
        # each new point against every stored point (full rows, so its own nearest neighbour
        # is exact), and every older point against the new ones, in row blocks so the
        # temporary matrix stays bounded
        step = max(1, _CHUNK_ELEMENTS // self.n)
        for start in range(0, b, step):
            rows = np.arange(n0 + start, n0 + min(b, start + step))
            d = self._row_nn(rows)
            if n0:
                sub = d[:, :n0]
                best = sub.argmin(axis=0)
                best_sq = np.maximum(sub[best, np.arange(n0)], 0.0)
                upd = np.flatnonzero(best_sq < self.nn_sq[:n0])
                self.nn_sq[upd] = best_sq[upd]
                self.nn_idx[upd] = rows[best[upd]]
        return keep

    def _row_nn(self, rows: IntArray) -> FloatArray:
        """Set the nearest neighbour of `rows` from a full scan; returns the (rows, n) block of
        squared distances (self-distances set to inf) for the caller to reuse."""
        n = self.n
        # (n, d) @ (d, k) then transpose: the stored matrix is read row-major once (the other
        # orientation made numpy copy or stride through all n rows, ~10x slower for k = 1)
        d = (self.vectors[:n] @ self.vectors[rows].T).T
        d *= -2.0
        d += self.sqnorm[None, :n]
        d += self.sqnorm[rows, None]
        ar = np.arange(rows.size)
        d[ar, rows] = np.inf
        if n <= 1:
            self.nn_sq[rows] = np.inf
            self.nn_idx[rows] = -1
            return d
        best = d.argmin(axis=1)
        self.nn_sq[rows] = np.maximum(d[ar, best], 0.0)
        self.nn_idx[rows] = best
        return d

    def remove(self, episode_id: str) -> None:
        """Delete one point; points that had it as nearest neighbour find a new one."""
        s = self.slot.pop(episode_id)
        last = self.n - 1
        affected = np.flatnonzero(self.nn_idx[: self.n] == s)
        if s != last:
            moved_id = self.ids[last]
            self.vectors[s] = self.vectors[last]
            self.sqnorm[s] = self.sqnorm[last]
            self.ts[s] = self.ts[last]
            self.nn_sq[s] = self.nn_sq[last]
            self.nn_idx[s] = self.nn_idx[last]
            self.ids[s] = moved_id
            self.slot[moved_id] = s
            self.nn_idx[: self.n][self.nn_idx[: self.n] == last] = s
            affected = np.where(affected == last, s, affected)
        self.ids.pop()
        self.n = last
        self.nn_sq[last] = np.inf
        self.nn_idx[last] = -1
        affected = affected[affected < self.n]
        if affected.size:
            self._recompute(affected)

    def _recompute(self, slots: IntArray) -> None:
        step = max(1, _CHUNK_ELEMENTS // max(self.n, 1))
        for start in range(0, slots.size, step):
            self._row_nn(slots[start : start + step])

    # ------------------------------------------------------------------ persistence

    def arrays(self) -> dict[str, NDArray[np.generic]]:
        n = self.n
        return {
            "vectors": self.vectors[:n].copy(),
            "ts": self.ts[:n].copy(),
            "nn_sq": self.nn_sq[:n].copy(),
            "nn_idx": self.nn_idx[:n].copy(),
        }

    @classmethod
    def from_arrays(
        cls, dim: int, ids: list[str], arrays: dict[str, NDArray[np.generic]]
    ) -> RedundancyIndex:
        n = len(ids)
        idx = cls(dim, initial_capacity=max(1024, n))
        vectors = np.asarray(arrays["vectors"], dtype=np.float64).reshape(n, dim)
        idx.vectors[:n] = vectors
        idx.sqnorm[:n] = np.einsum("ij,ij->i", vectors, vectors)
        idx.ts[:n] = arrays["ts"]
        idx.nn_sq[:n] = arrays["nn_sq"]
        idx.nn_idx[:n] = arrays["nn_idx"]
        idx.ids = list(ids)
        idx.slot = {eid: i for i, eid in enumerate(ids)}
        idx.n = n
        return idx


def _resized(a: Any, cap: int, fill: float) -> Any:
    out = np.full((cap, *a.shape[1:]), fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out

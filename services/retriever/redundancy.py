"""Nearest-neighbour bookkeeping for coverage-keeping eviction (pure numpy, no I/O).

The bounded episode store drops the most *redundant* episode, not the oldest: the one whose
nearest stored neighbour is closest (it adds the least coverage of the context space), ties
going to the older one (by `ts`, then by insertion order), so of two duplicates the newer
observation stays.

Incremental, so an insert costs about one scan of the stored vectors and an eviction usually
none (the earlier version rescanned the store for every point that lost its nearest
neighbour: two or three full float64 passes per add-and-evict, 83 episodes/s at 100k):

- Each point keeps a short sorted list of its nearest neighbours (up to `neighbours`, exact
  float64 squared distances, by insertion number). Invariant: every live point *not* in the
  list is at least as far as the list's last entry. So the first live entry is the exact
  nearest neighbour.
- An insert scans once, on a float32 mirror of the vectors (half the bytes; numpy's float32
  product is several times faster here), a block of up to 16 inserts per matrix product. The
  scan finds the points whose list the new point enters (closer than their last entry) and
  builds its own list (the k nearest within a radius that holds about k points; any radius
  at least its nearest distance keeps the invariant). Every float32 comparison is widened by
  a bound on its rounding error and the survivors are re-checked in float64, so the result
  is exact, not approximate.
- A removal is lazy: the entries naming the removed point go stale, and `nn_sq` of a point
  is then a lower bound of its true nearest-neighbour distance. The eviction pick takes the
  minimum from a heap and refreshes only the points tied at it: drop their dead heads, and
  rescan a point only when its whole list is dead. Values only grow on refresh, so the pick
  is exact.

`insert` with a capacity evicts after each inserted point, exactly as "add one, evict to the
bound" per episode, but with one matrix product per block of the batch. The test
`test_incremental_eviction_matches_recomputation_from_scratch` checks the eviction choices
against a from-scratch recomputation of every nearest-neighbour distance.

The same arrays are the embedded engine's search index (`nearest`, exact top k).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
F32Array = NDArray[np.float32]

TIE_SQ = 1e-12
"""Squared distances this close are equal (eviction ties go to the older point)."""
DEFAULT_NEIGHBOURS = 12
"""List length: a point survives this many evictions of its neighbours before a rescan
(measured on clustered 20-d data at a steady 20k: 0.23 rescans per insert with 8, 0.12 with
12, 0.07 with 16, where the longer lists began to cost more than they saved)."""
_CHUNK_ELEMENTS = 4_000_000
"""Bound on the temporary float32 distance block (batch x stored), ~16 MB."""
_BLOCK_ROWS = 16
"""Rows per block: a (16 x 100k) float32 block still fits the cache its rows are read from;
measured here, larger blocks were slower per row, smaller ones lose the matrix product."""
_CAND_CAP = 64
"""More candidates than this for a new list: select among them in float32 first."""
_U32 = float(np.finfo(np.float32).eps) / 2.0
_FORMAT = 2
"""Snapshot layout of `arrays()`: 2 = neighbour lists (1 = nn_sq/nn_idx, rebuilt on load)."""

_PER_SLOT = ("vectors", "_sq32", "ts", "seq", "nn_sq", "_nb_sq", "_nb_seq", "_nb_len",
             "_thr", "_thr_tol32")


class InsertResult(NamedTuple):
    kept: list[int]
    """Positions within the batch that were inserted (new ids)."""
    evicted: list[str]
    """Ids evicted to keep the bound, in order (may include ids inserted by this call)."""


class RedundancyIndex:
    """Vectors with ids and timestamps, each with its nearest neighbours' squared distances."""

    def __init__(self, dim: int, initial_capacity: int = 1024,
                 neighbours: int = DEFAULT_NEIGHBOURS) -> None:
        if dim < 1:
            raise ValueError(f"dim={dim}: must be >= 1")
        if neighbours < 1:
            raise ValueError(f"neighbours={neighbours}: must be >= 1")
        self.dim = dim
        self.k = neighbours
        cap = max(1, initial_capacity)
        self.n = 0
        """Slots in use (live points, plus tombstones only in the middle of an `insert`)."""
        self.vectors = np.zeros((cap, dim))
        self._aug: F32Array = np.zeros((dim + 1, cap), dtype=np.float32)
        """float32 scan matrix, one column per slot: -2 x, then |x|^2 (+inf for a
        tombstone). [q, 1] times it is |x|^2 - 2 x.q in one product. Transposed, so the
        product streams dim + 1 contiguous rows (the (n, dim) layout made numpy's
        matrix-vector product about twice as slow here)."""
        self._sq32: F32Array = np.zeros(cap, dtype=np.float32)
        """|x|^2 in float32; +inf for a tombstone, so every scan skips it."""
        self.ts = np.zeros(cap)
        self.seq = np.zeros(cap, dtype=np.int64)
        """Insertion number of the point in each slot (lists refer to points by it)."""
        self.nn_sq = np.full(cap, np.inf)
        """Squared distance to the head of the list: exact, or a lower bound if it is dead."""
        self._nb_sq = np.full((cap, self.k), np.inf)
        self._nb_seq = np.full((cap, self.k), -1, dtype=np.int64)
        self._nb_len = np.zeros(cap, dtype=np.int64)
        self._thr = np.full(cap, np.inf)
        """Last listed squared distance (inf for an empty list): a new point closer enters."""
        self._thr_tol32: F32Array = np.full(cap, np.inf, dtype=np.float32)
        """`_thr` widened by this point's share of the float32 rounding bound."""
        self.ids: list[str] = []
        self.slot: dict[str, int] = {}
        self._slot_of_seq: dict[int, int] = {}
        self._next_seq = 0
        self._dead: list[int] = []
        self._heap: list[tuple[float, int]] = []
        """(nn_sq, seq) pushed on every change of a head; stale entries are skipped lazily."""
        self._max_sq = 0.0
        # |fl32(|a|^2 + |b|^2 - 2 a.b) - |a - b|^2| <= _tol * (|a|^2 + |b|^2): roundings of the
        # vectors, the norms and a float32 dot product of dim + 1 terms, with a factor 2 of slack
        self._tol = 4.0 * (dim + 8) * _U32

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return self.n - len(self._dead)

    def __contains__(self, episode_id: object) -> bool:
        return episode_id in self.slot

    def _exact_sq(self, slots: IntArray | int, q: FloatArray) -> Any:
        diff = self.vectors[slots] - q
        return np.einsum("...i,...i->...", diff, diff)

    def _scan(self, q32: F32Array) -> F32Array:
        """float32 |x|^2 - 2 x.q for every slot x (tombstones +inf): the squared distance
        to q less |q|^2, which the callers fold into their thresholds (one pass fewer)."""
        n = self.n
        row: F32Array = np.empty(n, dtype=np.float32)
        np.matmul(np.append(q32, np.float32(1.0)), self._aug[:, :n], out=row)
        return row

    def nearest(self, query: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
        """Slots and exact squared distances of the k nearest stored vectors, nearest first
        (equal distances: lower slot first)."""
        q = np.asarray(query, dtype=np.float64)
        if q.shape != (self.dim,):
            raise ValueError(f"query dimension {q.shape} is not ({self.dim},)")
        if len(self) == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        q_sq = float(q @ q)
        row = self._scan(q.astype(np.float32))
        if k >= len(self):
            cand = np.flatnonzero(np.isfinite(self._sq32[: self.n]))
        else:
            part = np.argpartition(row, k - 1)[:k]
            # the true k nearest all have float32 distance <= the float32 k-th + 2 x the bound
            bound = float(row[part].max()) + 2.0 * self._tol * (self._max_sq + q_sq)
            cand = np.flatnonzero(row <= bound)
        d = self._exact_sq(cand, q)
        order = np.lexsort((cand, d))[:k]
        return cand[order].astype(np.int64), d[order]

    def most_redundant(self) -> str | None:
        """Id of the point whose nearest neighbour is closest; ties to the older (ts, then
        insertion order)."""
        slot = self._most_redundant_slot(keep_entry=True)
        return None if slot is None else self.ids[slot]

    def _most_redundant_slot(self, keep_entry: bool) -> int | None:
        """`most_redundant`'s slot; without keep_entry, the caller removes it at once, so
        its heap entry is not pushed back."""
        if len(self) == 0:
            return None
        heap = self._heap
        sos = self._slot_of_seq
        nn_sq = self.nn_sq
        while True:
            if len(heap) > 2 * self.n + 1024:
                self._rebuild_heap()
            # every live point at the minimum (within TIE_SQ); entries whose point is gone or
            # whose value has changed since they were pushed are dropped on the way
            tied: dict[int, float] = {}
            low = np.inf
            while heap and heap[0][0] <= low + TIE_SQ:
                val, seq = heapq.heappop(heap)
                slot = sos.get(seq)
                if slot is None or nn_sq[slot] != val or slot in tied:
                    continue
                low = min(low, val)
                tied[slot] = val
            if not tied:  # no point has a neighbour: a lone point
                live = np.flatnonzero(np.isfinite(self._sq32[: self.n]))
                return int(live[np.lexsort((self.seq[live], self.ts[live]))[0]])
            # a stale lower bound at the minimum (its head is dead): refresh it; values only
            # grow, so once every tied point is exact the minimum is exact too
            stale = [p for p in tied if int(self._nb_seq[p, 0]) not in sos]
            if not stale:
                break
            for p, val in tied.items():
                if p not in stale:
                    heapq.heappush(heap, (val, int(self.seq[p])))
            for p in stale:
                self._refresh(p)
        if len(tied) == 1:
            pick = next(iter(tied))
        else:
            slots = np.fromiter(tied, dtype=np.int64, count=len(tied))
            pick = int(slots[np.lexsort((self.seq[slots], self.ts[slots]))[0]])
        for p, val in tied.items():
            if keep_entry or p != pick:
                heapq.heappush(heap, (val, int(self.seq[p])))
        return pick

    def _rebuild_heap(self) -> None:
        n = self.n
        live = np.flatnonzero(np.isfinite(self.nn_sq[:n]) & np.isfinite(self._sq32[:n]))
        self._heap = list(zip(self.nn_sq[live].tolist(), self.seq[live].tolist(), strict=True))
        heapq.heapify(self._heap)

    def nn_distances(self) -> FloatArray:
        """Exact squared nearest-neighbour distance of every slot (stale entries refreshed);
        inf for a point alone."""
        sos = self._slot_of_seq
        for p in range(self.n):
            if self._nb_len[p] and int(self._nb_seq[p, 0]) not in sos:
                self._refresh(p)
        return self.nn_sq[: self.n].copy()

    # ------------------------------------------------------------------ updates

    def _grow(self, need: int) -> None:
        cap = self.vectors.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        fills: dict[str, float] = {"nn_sq": np.inf, "_nb_sq": np.inf, "_nb_seq": -1,
                                   "_thr": np.inf, "_thr_tol32": np.inf}
        for name in _PER_SLOT:
            setattr(self, name, _resized(getattr(self, name), new_cap, fills.get(name, 0.0)))
        aug = np.zeros((self.dim + 1, new_cap), dtype=np.float32)
        aug[:, :cap] = self._aug
        self._aug = aug

    def add_many(self, ids: Sequence[str], vectors: FloatArray, ts: FloatArray) -> list[int]:
        """Insert new points (ids already stored, or repeated in the batch, are skipped).
        Returns the positions within the batch that were inserted."""
        return self.insert(ids, vectors, ts).kept

    def insert(self, ids: Sequence[str], vectors: FloatArray, ts: FloatArray,
               capacity: int | None = None) -> InsertResult:
        """Insert new points one after the other; with a capacity, after each one evict the
        most redundant points until at most `capacity` remain (so the store never holds more
        than capacity + 1, and the outcome is that of one add-then-evict per point)."""
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        vectors = np.asarray(vectors, dtype=np.float64).reshape(len(ids), self.dim)
        ts = np.asarray(ts, dtype=np.float64).reshape(len(ids))
        keep: list[int] = []
        seen: set[str] = set()
        for i, eid in enumerate(ids):
            if eid not in self.slot and eid not in seen:
                keep.append(i)
                seen.add(eid)
        evicted: list[str] = []
        if keep:
            new_v = vectors[keep]
            new_v32 = new_v.astype(np.float32)
            new_sq = np.einsum("ij,ij->i", new_v, new_v)
            new_sq32 = new_sq.astype(np.float32)
            b = len(keep)
            step = max(1, min(_BLOCK_ROWS, _CHUNK_ELEMENTS // max(self.n + b, 1)))
            for start in range(0, b, step):
                stop = min(b, start + step)
                m0 = self.n
                bb = stop - start
                self._grow(m0 + bb)
                if bb == 1:
                    # one point: a matrix-vector product (faster than a 1-row matrix product)
                    row = self._scan(new_v32[start])
                    pos = keep[start]
                    self._insert_one(ids[pos], new_v[start], new_v32[start],
                                     float(new_sq[start]), new_sq32[start], float(ts[pos]), row)
                    if capacity is not None:
                        self._evict_to(capacity, evicted)
                    continue
                # one float32 product for the block: columns [0, m0) are the stored points,
                # [m0, m0 + bb) the block's own points, which take those slots in order
                # (each row less its own |q|^2, as `_scan`)
                q_aug = np.ones((bb, self.dim + 1), dtype=np.float32)
                q_aug[:, : self.dim] = new_v32[start:stop]
                block = np.empty((bb, m0 + bb), dtype=np.float32)
                np.matmul(q_aug, self._aug[:, :m0], out=block[:, :m0])  # no temporary copy
                block[:, m0:] = (new_v32[start:stop] * np.float32(-2.0)) @ new_v32[start:stop].T
                block[:, m0:] += new_sq32[start:stop]
                for i in range(bb):
                    j = start + i
                    row = block[i, : m0 + i]
                    if self._dead:
                        dead = np.array(self._dead)
                        row[dead[dead < row.size]] = np.inf
                    pos = keep[j]
                    self._insert_one(ids[pos], new_v[j], new_v32[j], float(new_sq[j]),
                                     new_sq32[j], float(ts[pos]), row)
                    if capacity is not None:
                        self._evict_to(capacity, evicted)
        elif capacity is not None:
            self._evict_to(capacity, evicted)
        self._flush()
        return InsertResult(keep, evicted)

    def _insert_one(self, eid: str, v: FloatArray, v32: F32Array, sq: float,
                    sq32: np.float32, ts: float, row: F32Array) -> None:
        """Append one point at slot n; `row` = its float32 squared distances to slots [0, n)
        less |v|^2 (`_scan`)."""
        m = self.n
        s = m
        seq = self._next_seq
        self._next_seq += 1
        self.vectors[s] = v
        self._aug[: self.dim, s] = v32 * np.float32(-2.0)
        self._aug[self.dim, s] = sq32
        self._sq32[s] = sq32
        self.ts[s] = ts
        self.seq[s] = seq
        self._nb_len[s] = 0
        self.ids.append(eid)
        self.slot[eid] = s
        self._slot_of_seq[seq] = s
        self.n = m + 1
        self._max_sq = max(self._max_sq, sq)
        # the points whose list the new one enters (closer than their last entry)
        if m:
            near = np.flatnonzero(row < self._thr_tol32[:m] + np.float32(self._tol * sq - sq))
            if near.size:
                d = self._exact_sq(near, v)
                ok = d < self._thr[near]
                if ok.any():
                    self._enter_lists(near[ok], d[ok], seq)
        self._build_list(s, row)

    def _enter_lists(self, slots: IntArray, d: FloatArray, seq: int) -> None:
        """Insert (d, seq) into the sorted lists of `slots` (each d < its last entry)."""
        if slots.size <= 8:  # the usual case: a loop is cheaper than the vectorised form
            for p, dp in zip(slots.tolist(), d.tolist(), strict=True):
                self._enter_list(p, dp, seq)
            return
        k = self.k
        u = slots.size
        all_sq = np.empty((u, k + 1))
        all_sq[:, :k] = self._nb_sq[slots]
        all_sq[:, k] = d
        all_seq = np.empty((u, k + 1), dtype=np.int64)
        all_seq[:, :k] = self._nb_seq[slots]
        all_seq[:, k] = seq
        # stable: the newcomer goes after equal distances; the padding (inf) stays last
        order = np.argsort(all_sq, axis=1, kind="stable")[:, :k]
        rows = np.arange(u)[:, None]
        new_sq = all_sq[rows, order]
        new_seq = all_seq[rows, order]
        new_len = np.minimum(self._nb_len[slots] + 1, k)
        self._nb_sq[slots] = new_sq
        self._nb_seq[slots] = new_seq
        self._nb_len[slots] = new_len
        self.nn_sq[slots] = new_sq[:, 0]
        for p, val in zip(slots[new_seq[:, 0] == seq].tolist(),
                          new_sq[new_seq[:, 0] == seq, 0].tolist(), strict=True):
            heapq.heappush(self._heap, (val, int(self.seq[p])))
        thr = new_sq[np.arange(slots.size), new_len - 1]
        self._thr[slots] = thr
        self._thr_tol32[slots] = thr + self._tol * self._sq32[slots]

    def _enter_list(self, p: int, d: float, seq: int) -> None:
        ln = int(self._nb_len[p])
        sq_row = self._nb_sq[p]
        seq_row = self._nb_seq[p]
        pos = bisect.bisect_right(sq_row[:ln].tolist(), d)  # after equal distances
        end = min(ln, self.k - 1)
        if pos < end:
            sq_row[pos + 1 : end + 1] = sq_row[pos:end].copy()
            seq_row[pos + 1 : end + 1] = seq_row[pos:end].copy()
        sq_row[pos] = d
        seq_row[pos] = seq
        new_len = min(ln + 1, self.k)
        self._nb_len[p] = new_len
        thr = float(sq_row[new_len - 1])
        self._thr[p] = thr
        self._thr_tol32[p] = thr + self._tol * float(self._sq32[p])
        if pos == 0:
            self.nn_sq[p] = d
            heapq.heappush(self._heap, (d, int(self.seq[p])))

    def _build_list(self, p: int, row: F32Array) -> None:
        """Exact neighbour list of slot p from `row`, its float32 distances to slots
        [0, len(row)) less |x_p|^2 (`_scan`; p itself and tombstones +inf).

        The list is the k nearest of the points within a radius rho of p, and any
        rho >= p's nearest distance keeps the invariant (a point outside rho is farther than
        everything listed). rho is chosen to hold about k points: p's nearest distance scaled
        by the spread of its nearest point j's own list (k-th / first), capped by the
        triangle-inequality ball d(p, j) + radius of j's list."""
        k = self.k
        v = self.vectors[p]
        sq_p = float(v @ v)
        tol = self._tol * (self._max_sq + sq_p)
        if row.size == 0:
            self._set_list(p, np.zeros(0), np.zeros(0, dtype=np.int64))
            return
        j = int(row.argmin())
        if not math.isfinite(float(row[j])):
            self._set_list(p, np.zeros(0), np.zeros(0, dtype=np.int64))
            return
        rho_sq = math.inf
        thr_j = float(self._thr[j])
        if math.isfinite(thr_j):
            diff = self.vectors[j] - v
            d_j = float(diff @ diff)
            ball = math.sqrt(d_j) + math.sqrt(thr_j)
            rho_sq = ball * ball
            nn_j = float(self.nn_sq[j])
            if nn_j > 0.0:
                rho_sq = min(rho_sq, d_j * (thr_j / nn_j))
            rho_sq *= 1.0 + 1e-9  # rounding of the products above: never below d(p, j)
        cand: IntArray | None = None
        if math.isfinite(rho_sq):
            cand = np.flatnonzero(row <= rho_sq + tol - sq_p)  # finite entries only
        if cand is None or cand.size > _CAND_CAP:
            # too many (distances concentrate in many dimensions): the float32 k nearest of
            # them, widened by twice the rounding bound, hold the exact k nearest
            base = row if cand is None else row[cand]
            kk = min(k, base.size)
            part = np.argpartition(base, kk - 1)[:kk]
            near = base <= float(base[part].max()) + 2.0 * tol
            cand = np.flatnonzero(near) if cand is None else cand[near]
            cand = cand[np.isfinite(row[cand])]
        d = self._exact_sq(cand, v)
        if math.isfinite(rho_sq):
            inside = d <= rho_sq
            cand, d = cand[inside], d[inside]
        if d.size > k:
            part = np.argpartition(d, k - 1)[:k]
            cand, d = cand[part], d[part]
        order = np.lexsort((self.seq[cand], d))
        self._set_list(p, d[order], self.seq[cand[order]])

    def _set_list(self, p: int, d: FloatArray, seqs: IntArray) -> None:
        n = d.size
        self._nb_sq[p, :n] = d
        self._nb_sq[p, n:] = np.inf
        self._nb_seq[p, :n] = seqs
        self._nb_seq[p, n:] = -1
        self._nb_len[p] = n
        self.nn_sq[p] = d[0] if n else np.inf
        if n:
            heapq.heappush(self._heap, (float(d[0]), int(self.seq[p])))
        self._thr[p] = d[n - 1] if n else np.inf
        self._thr_tol32[p] = self._thr[p] + self._tol * float(self._sq32[p])

    def _refresh(self, p: int) -> None:
        """Drop the dead heads of p's list; rescan if none of it is alive."""
        ln = int(self._nb_len[p])
        seqs = self._nb_seq[p, :ln].tolist()
        first = next((i for i, s in enumerate(seqs) if s in self._slot_of_seq), ln)
        if first == 0:
            return
        if first < ln:
            keep = ln - first
            self._nb_sq[p, :keep] = self._nb_sq[p, first:ln]
            self._nb_seq[p, :keep] = self._nb_seq[p, first:ln]
            self._nb_sq[p, keep:] = np.inf
            self._nb_seq[p, keep:] = -1
            self._nb_len[p] = keep
            self.nn_sq[p] = self._nb_sq[p, 0]
            heapq.heappush(self._heap, (float(self.nn_sq[p]), int(self.seq[p])))
            return  # the tail, hence the threshold, is unchanged
        row = self._scan(self._aug[: self.dim, p] * np.float32(-0.5))
        row[p] = np.inf
        self._build_list(p, row)

    def _evict_to(self, capacity: int, evicted: list[str]) -> None:
        while len(self) > capacity:
            victim = self._most_redundant_slot(keep_entry=False)
            assert victim is not None
            evicted.append(self.ids[victim])
            self._tombstone(victim)

    def _tombstone(self, s: int) -> None:
        eid = self.ids[s]
        del self.slot[eid]
        del self._slot_of_seq[int(self.seq[s])]
        self._sq32[s] = np.inf
        self._aug[self.dim, s] = np.inf
        self.nn_sq[s] = np.inf
        self._thr[s] = -np.inf
        self._thr_tol32[s] = -np.inf
        self._dead.append(s)

    def _flush(self) -> None:
        """Physically remove tombstones: live points from the tail move into the holes
        (lists refer to points by insertion number, so nothing else has to change)."""
        if not self._dead:
            return
        n = self.n
        keep_n = n - len(self._dead)
        dead = np.array(self._dead, dtype=np.int64)
        holes = np.sort(dead[dead < keep_n])
        tail_dead = dead[dead >= keep_n]
        tail = np.setdiff1d(np.arange(keep_n, n), tail_dead)  # the live points of the tail
        if holes.size:
            for name in _PER_SLOT:
                a = getattr(self, name)
                a[holes] = a[tail]
            self._aug[:, holes] = self._aug[:, tail]
            ids = self.ids
            for h, t in zip(holes.tolist(), tail.tolist(), strict=True):
                moved = ids[t]
                ids[h] = moved
                self.slot[moved] = h
                self._slot_of_seq[int(self.seq[h])] = h
        del self.ids[keep_n:]
        self.n = keep_n
        self._dead.clear()

    def remove(self, episode_id: str) -> None:
        """Delete one point (lists naming it are refreshed lazily)."""
        self._tombstone(self.slot[episode_id])
        self._flush()

    # ------------------------------------------------------------------ persistence

    def arrays(self) -> dict[str, NDArray[np.generic]]:
        n = self.n
        return {
            "format": np.array(_FORMAT),
            "vectors": self.vectors[:n].copy(),
            "ts": self.ts[:n].copy(),
            "seq": self.seq[:n].copy(),
            "nb_sq": self._nb_sq[:n].copy(),
            "nb_seq": self._nb_seq[:n].copy(),
            "nb_len": self._nb_len[:n].copy(),
            "next_seq": np.array(self._next_seq),
        }

    @classmethod
    def from_arrays(
        cls, dim: int, ids: list[str], arrays: dict[str, NDArray[np.generic]],
        neighbours: int = DEFAULT_NEIGHBOURS,
    ) -> RedundancyIndex:
        n = len(ids)
        idx = cls(dim, initial_capacity=max(1024, n), neighbours=neighbours)
        vectors = np.asarray(arrays["vectors"], dtype=np.float64).reshape(n, dim)
        ts = np.asarray(arrays["ts"], dtype=np.float64).reshape(n)
        fmt = int(arrays["format"]) if "format" in arrays else 1
        if fmt != _FORMAT or int(np.asarray(arrays["nb_sq"]).shape[1]) != neighbours:
            # an older layout (or another list length): rebuild, in slot order
            idx.add_many(ids, vectors, ts)
            return idx
        idx.n = n
        idx.vectors[:n] = vectors
        idx._aug[: dim, :n] = vectors.T.astype(np.float32) * np.float32(-2.0)
        sq = np.einsum("ij,ij->i", vectors, vectors)
        idx._sq32[:n] = sq.astype(np.float32)
        idx._aug[dim, :n] = idx._sq32[:n]
        idx._max_sq = float(sq.max()) if n else 0.0
        idx.ts[:n] = ts
        idx.seq[:n] = arrays["seq"]
        idx._nb_sq[:n] = arrays["nb_sq"]
        idx._nb_seq[:n] = arrays["nb_seq"]
        idx._nb_len[:n] = arrays["nb_len"]
        idx._next_seq = int(arrays["next_seq"])
        lens = idx._nb_len[:n]
        rows = np.arange(n)
        idx.nn_sq[:n] = np.where(lens > 0, idx._nb_sq[:n, 0], np.inf)
        idx._thr[:n] = np.where(lens > 0, idx._nb_sq[rows, np.maximum(lens - 1, 0)], np.inf)
        idx._thr_tol32[:n] = idx._thr[:n] + idx._tol * idx._sq32[:n]
        idx.ids = list(ids)
        idx.slot = {eid: i for i, eid in enumerate(ids)}
        idx._slot_of_seq = {int(s): i for i, s in enumerate(idx.seq[:n].tolist())}
        idx._rebuild_heap()
        return idx


def _resized(a: Any, cap: int, fill: float) -> Any:
    out = np.full((cap, *a.shape[1:]), fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out

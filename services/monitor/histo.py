"""Histogram helpers on the fixed layout of `schemas.histogram` (no I/O).

The monitor merges many replicas' histograms every tick. It keeps window counts as dense
numpy arrays of `N_BUCKETS` int64 (`*_dense` functions) and offers the same operations on
sparse `dict[int, int]` counts for callers that have those.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping

import numpy as np

from schemas.histogram import (
    BUCKET_UPPER_BOUNDS_MS,
    N_BUCKETS,
    OVERFLOW_BUCKET,
    bucket_bounds_ms,
    bucket_index,
    quantile_from_counts,
)
from schemas.messages import Percentiles

_BOUNDS = np.asarray(BUCKET_UPPER_BOUNDS_MS, dtype=np.float64)
_EXACT_FLOAT = 2**53
"""Integer sums below this are exact in float64 (numpy's bincount weights are float64)."""
_LOW, _HIGH = (list(b) for b in zip(*(bucket_bounds_ms(i) for i in range(N_BUCKETS)), strict=True))
_REP_MS: dict[int, float] = {}
_SUM_INDEX: np.ndarray | None = None


def bucket_rep_ms(index: int) -> float:
    """A representative value of a bucket: the geometric middle (half the bound for bucket 0)."""
    rep = _REP_MS.get(index)
    if rep is None:
        low, high = bucket_bounds_ms(index)
        rep = high / 2 if low <= 0 else math.sqrt(low * high)
        _REP_MS[index] = rep
    return rep


def bucket_indices(values_ms: np.ndarray, validate: bool = True) -> np.ndarray:
    """`bucket_index` of every value (int64), vectorised; values must be finite and >= 0
    (checked unless `validate` is False: the caller has checked them).

    `bucket_index(v)` is the first bucket whose upper bound is >= v (its log10 estimate is
    only a starting point that it corrects upwards), which is a binary search over the bounds.
    The one difference is above the last finite bound, where `bucket_index` decides from the
    logarithm alone: those rare values are looked up one by one.
    """
    v = np.asarray(values_ms, dtype=np.float64)
    if validate and v.size and not (np.isfinite(v).all() and (v >= 0).all()):
        bad = v[~(np.isfinite(v) & (v >= 0))][0]
        raise ValueError(f"latency value_ms={float(bad)!r} must be finite and >= 0")
    idx = np.searchsorted(_BOUNDS, v, side="left").astype(np.int64, copy=False)
    if v.size and v.max() > _BOUNDS[-1]:
        for k in np.flatnonzero(idx == OVERFLOW_BUCKET).tolist():
            idx[k] = bucket_index(float(v[k]))
    return idx


def sum_index_table() -> np.ndarray:
    """`bucket_index(rep(i) + rep(j))` for every pair of buckets (N_BUCKETS x N_BUCKETS)."""
    global _SUM_INDEX
    if _SUM_INDEX is None:
        reps = [bucket_rep_ms(i) for i in range(N_BUCKETS)]
        table = np.empty((N_BUCKETS, N_BUCKETS), dtype=np.intp)
        for i, ra in enumerate(reps):
            # Float addition commutes, so the table is symmetric: fill one triangle.
            row = [bucket_index(ra + rb) for rb in reps[i:]]
            table[i, i:] = row
            table[i:, i] = row
        _SUM_INDEX = table
    return _SUM_INDEX


def dense(counts: Mapping[int, int]) -> np.ndarray:
    """Sparse counts as a dense int64 array over the layout."""
    out = np.zeros(N_BUCKETS, dtype=np.int64)
    if counts:
        out[list(counts.keys())] = list(counts.values())
    return out


def sparse(counts: np.ndarray) -> dict[int, int]:
    """Dense counts as a sparse dict (non-zero buckets only)."""
    nz = np.flatnonzero(counts)
    return dict(zip(nz.tolist(), counts[nz].tolist(), strict=True))


def add_counts(into: dict[int, int], counts: Mapping[int, int]) -> None:
    """Add sparse counts into `into`, index by index."""
    for idx, n in counts.items():
        into[idx] = into.get(idx, 0) + n


def percentiles(counts: Mapping[int, int]) -> Percentiles | None:
    """P50/P95/P99 of sparse counts, or None when there is no sample (never an invented 0)."""
    p50 = quantile_from_counts(counts, 0.50)
    p95 = quantile_from_counts(counts, 0.95)
    p99 = quantile_from_counts(counts, 0.99)
    if p50 is None or p95 is None or p99 is None:
        return None
    return _ordered(p50, p95, p99)


def _ordered(p50: float, p95: float, p99: float) -> Percentiles:
    # Quantiles of one distribution are ordered; max() only guards float rounding.
    p95 = max(p95, p50)
    p99 = max(p99, p95)
    return Percentiles(p50_ms=p50, p95_ms=p95, p99_ms=p99)


def quantile_dense(counts: np.ndarray, cum: np.ndarray, q: float) -> float | None:
    """`quantile_from_counts` on dense counts with their cumulative sum (same arithmetic)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile q={q!r} must be in (0, 1]")
    total = int(cum[-1])
    if total <= 0:
        return None
    rank = q * total
    # The first bucket whose cumulative count reaches the rank; it is never an empty one.
    return _quantile_at(counts, cum, rank, int(np.searchsorted(cum, rank, side="left")))


def _quantile_at(counts: np.ndarray, cum: np.ndarray, rank: float, idx: int) -> float:
    if idx >= N_BUCKETS:
        return _HIGH[int(np.flatnonzero(counts)[-1])]
    n = int(counts[idx])
    seen = int(cum[idx]) - n
    frac = (rank - seen) / n
    if idx == 0:
        return _HIGH[0] * frac
    low = _LOW[idx]
    return float(low * (_HIGH[idx] / low) ** frac)


def percentiles_dense(counts: np.ndarray) -> Percentiles | None:
    """`percentiles` of dense counts (identical results)."""
    cum = counts.cumsum()
    total = int(cum[-1])
    if total <= 0:
        return None
    if total < _EXACT_FLOAT:
        return percentiles_cum(cum.tolist())
    # Beyond float64's exact integers: numpy's comparisons, as always done here.
    ranks = [0.50 * total, 0.95 * total, 0.99 * total]
    where = np.searchsorted(cum, ranks, side="left").tolist()
    p50, p95, p99 = (
        _quantile_at(counts, cum, rank, idx) for rank, idx in zip(ranks, where, strict=True)
    )
    return _ordered(p50, p95, p99)


def percentiles_cum(cum: list[int] | list[float]) -> Percentiles | None:
    """`percentiles_dense` from the cumulative counts as a list (total below 2**53).

    Three binary searches over Python numbers instead of numpy calls. int and float compare
    exactly in Python, as numpy compares them below 2**53, so the buckets, and the results,
    are those of `percentiles_dense` (and of `quantile_from_counts`).
    """
    total = cum[-1]
    if total <= 0:
        return None
    return _ordered(
        _quantile_cum(cum, 0.50 * total),
        _quantile_cum(cum, 0.95 * total),
        _quantile_cum(cum, 0.99 * total),
    )


def _quantile_cum(cum: list[int] | list[float], rank: float) -> float:
    """`_quantile_at` on cumulative counts: the bucket where the cumulative count reaches
    `rank` (never an empty one), interpolated geometrically (the same arithmetic)."""
    idx = bisect_left(cum, rank)
    if idx >= N_BUCKETS:
        return _HIGH[bisect_left(cum, cum[-1])]  # the last non-empty bucket
    seen = cum[idx - 1] if idx else 0
    frac = (rank - seen) / (cum[idx] - seen)
    if idx == 0:
        return _HIGH[0] * frac
    low = _LOW[idx]
    return float(low * (_HIGH[idx] / low) ** frac)


def sojourn_percentiles(
    wait: np.ndarray, cum_wait: list[int], service: np.ndarray, cum_service: list[int]
) -> Percentiles | None:
    """`percentiles_dense(convolve_dense(wait, service))` (identical results) for counts
    >= 0 with their cumulative counts as lists (as `percentiles_cum` takes them).

    Pairs over the span from each side's first to last non-empty bucket, found in the
    cumulative counts (empty buckets in between add zero), so no index arrays are built; the
    sums stay float64, exact integers as in `convolve_dense`, and go to `percentiles_cum`.
    """
    total_w, total_s = cum_wait[-1], cum_service[-1]
    if total_w <= 0 or total_s <= 0:
        return None
    if total_w * total_s >= _EXACT_FLOAT:
        return percentiles_dense(convolve_dense(wait, service))
    w0, w1 = bisect_right(cum_wait, 0), bisect_left(cum_wait, total_w) + 1
    s0, s1 = bisect_right(cum_service, 0), bisect_left(cum_service, total_s) + 1
    prod = np.multiply.outer(wait[w0:w1], service[s0:s1])
    idx = sum_index_table()[w0:w1, s0:s1]
    sums = np.bincount(idx.ravel(), weights=prod.ravel(), minlength=N_BUCKETS)
    cum: list[float] = sums.cumsum().tolist()
    return percentiles_cum(cum)


def convolve_dense(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense counts of X + Y for independent X ~ a and Y ~ b (see `convolve`).

    The result must fit int64 (it does for any window of real traffic)."""
    ia = np.flatnonzero(a > 0)
    jb = np.flatnonzero(b > 0)
    out = np.zeros(N_BUCKETS, dtype=np.int64)
    if not ia.size or not jb.size:
        return out
    na, nb = a[ia], b[jb]
    total = int(na.sum()) * int(nb.sum())
    if total >= _EXACT_FLOAT:
        # Counts this large do not fit float64 (or int64) exactly: Python integers.
        return dense(_convolve_py(sparse(a), sparse(b)))
    prod = np.multiply.outer(na, nb)
    idx = sum_index_table()[np.ix_(ia, jb)]
    sums = np.bincount(idx.ravel(), weights=prod.ravel(), minlength=N_BUCKETS)
    out[:] = sums
    return out


def convolve(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    """Counts of X + Y for independent X ~ a and Y ~ b (each bucket at its representative).

    Used for sojourn = queue wait + service: replicas report the two separately, and the sum
    of two histograms is their convolution, not their merge. One table lookup per pair of
    buckets (`sum_index_table`) and one bincount, instead of a log10 per pair.
    """
    if not a or not b:
        return {}
    total_a = sum(n for n in a.values() if n > 0)
    total_b = sum(n for n in b.values() if n > 0)
    if total_a * total_b >= _EXACT_FLOAT:
        return _convolve_py(a, b)
    return sparse(convolve_dense(dense(a), dense(b)))


def _convolve_py(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    """The reference implementation, pair by pair with Python integers."""
    out: dict[int, int] = {}
    items_b = [(bucket_rep_ms(j), nb) for j, nb in b.items() if nb > 0]
    for i, na in a.items():
        if na <= 0:
            continue
        ra = bucket_rep_ms(i)
        for rb, nb in items_b:
            idx = bucket_index(ra + rb)
            out[idx] = out.get(idx, 0) + na * nb
    return out

"""Sparse histogram helpers on the fixed layout of `schemas.histogram` (plain dicts, no I/O).

The monitor merges many replicas' histograms every tick, so it works on bare
`dict[int, int]` counts rather than `LatencyHistogram` models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from schemas.histogram import bucket_bounds_ms, bucket_index, quantile_from_counts
from schemas.messages import Percentiles

_REP_MS: dict[int, float] = {}


def bucket_rep_ms(index: int) -> float:
    """A representative value of a bucket: the geometric middle (half the bound for bucket 0)."""
    rep = _REP_MS.get(index)
    if rep is None:
        low, high = bucket_bounds_ms(index)
        rep = high / 2 if low <= 0 else math.sqrt(low * high)
        _REP_MS[index] = rep
    return rep


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
    # Quantiles of one distribution are ordered; max() only guards float rounding.
    p95 = max(p95, p50)
    p99 = max(p99, p95)
    return Percentiles(p50_ms=p50, p95_ms=p95, p99_ms=p99)


def convolve(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    """Counts of X + Y for independent X ~ a and Y ~ b (each bucket at its representative).

    Used for sojourn = queue wait + service: replicas report the two separately, and the sum
    of two histograms is their convolution, not their merge.
    """
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

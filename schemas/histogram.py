"""Latency histograms with one fixed log-bucket layout, mergeable by addition.

Layout (version 1, shared by every producer and consumer):
- `N_BUCKETS` = 162 buckets;
- bucket 0 holds values in [0, 0.01] ms;
- bucket i (1 <= i <= 160) holds values in (b(i-1), b(i)] with b(i) = 0.01 * 10**(i/20) ms,
  i.e. 20 buckets per decade from 10 microseconds to 1,000 s, each 12.2% wider than the last;
- bucket 161 is the overflow bucket, values above 1,000,000 ms.

A histogram is sent sparse: `counts` maps a bucket index to its count (zero buckets are
omitted). Two histograms merge by adding counts index by index, so the monitor can merge
replicas' histograms without losing anything. Quantiles interpolate geometrically inside the
bucket, so a reported quantile is within half a bucket (about +/-6%) of the true value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated

from pydantic import Field

from .common import Count, NonNegFloat, SairModel

HISTOGRAM_LAYOUT_VERSION = 1
BUCKETS_PER_DECADE = 20
MIN_BOUND_MS = 0.01
N_FINITE_BOUNDS = 161  # b(0) .. b(160)
N_BUCKETS = N_FINITE_BOUNDS + 1
BucketIndex = Annotated[int, Field(ge=0, le=N_BUCKETS - 1)]
"""A bucket index of the fixed layout (checked in pydantic-core: reports are parsed hot)."""
OVERFLOW_BUCKET = N_BUCKETS - 1
BUCKET_GROWTH = 10 ** (1 / BUCKETS_PER_DECADE)

BUCKET_UPPER_BOUNDS_MS: tuple[float, ...] = tuple(
    MIN_BOUND_MS * 10 ** (i / BUCKETS_PER_DECADE) for i in range(N_FINITE_BOUNDS)
)


def bucket_index(value_ms: float) -> int:
    """The bucket that holds `value_ms` (negative values are an error)."""
    if not math.isfinite(value_ms) or value_ms < 0:
        raise ValueError(f"latency value_ms={value_ms!r} must be finite and >= 0")
    if value_ms <= MIN_BOUND_MS:
        return 0
    idx = math.ceil(math.log10(value_ms / MIN_BOUND_MS) * BUCKETS_PER_DECADE - 1e-9)
    if idx > N_FINITE_BOUNDS - 1:
        return OVERFLOW_BUCKET
    # Guard against rounding at a boundary: the value must not exceed the bucket's bound.
    while idx < N_FINITE_BOUNDS - 1 and value_ms > BUCKET_UPPER_BOUNDS_MS[idx]:
        idx += 1
    return idx


def bucket_bounds_ms(index: int) -> tuple[float, float]:
    """(lower, upper] bounds of a bucket; the overflow bucket reports upper = 10 x lower."""
    if index == 0:
        return 0.0, MIN_BOUND_MS
    if index == OVERFLOW_BUCKET:
        low = BUCKET_UPPER_BOUNDS_MS[-1]
        return low, low * 10
    return BUCKET_UPPER_BOUNDS_MS[index - 1], BUCKET_UPPER_BOUNDS_MS[index]


class LatencyHistogram(SairModel):
    """Sparse counts per bucket of the fixed layout, plus the exact sum for the mean."""

    counts: dict[BucketIndex, Count] = Field(default_factory=dict)
    sum_ms: NonNegFloat = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def mean_ms(self) -> float | None:
        n = self.total
        return self.sum_ms / n if n else None

    @classmethod
    def from_values(cls, values_ms: Iterable[float]) -> LatencyHistogram:
        counts: dict[int, int] = {}
        total = 0.0
        for v in values_ms:
            i = bucket_index(v)
            counts[i] = counts.get(i, 0) + 1
            total += v
        return cls(counts=counts, sum_ms=total)

    def quantile_ms(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1), or None for an empty histogram (never an invented 0)."""
        return quantile_from_counts(self.counts, q)


def merge_counts(histograms: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """Add sparse bucket counts index by index."""
    merged: dict[int, int] = {}
    for counts in histograms:
        for idx, n in counts.items():
            merged[idx] = merged.get(idx, 0) + n
    return merged


def merge(histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
    hs = list(histograms)
    return LatencyHistogram(
        counts=merge_counts(h.counts for h in hs), sum_ms=sum(h.sum_ms for h in hs)
    )


def quantile_from_counts(counts: Mapping[int, int], q: float) -> float | None:
    """Quantile of sparse counts, interpolated geometrically within the bucket it falls in."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile q={q!r} must be in (0, 1]")
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for idx in sorted(counts):
        n = counts[idx]
        if n <= 0:
            continue
        if seen + n >= rank:
            low, high = bucket_bounds_ms(idx)
            frac = (rank - seen) / n
            if idx == 0:
                return high * frac
            return low * (high / low) ** frac
        seen += n
    low, high = bucket_bounds_ms(max(counts))
    return high

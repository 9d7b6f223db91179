"""The fixed log-bucket latency histogram: layout, merge by addition, quantiles."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.histogram import (
    BUCKET_GROWTH,
    BUCKET_UPPER_BOUNDS_MS,
    N_BUCKETS,
    OVERFLOW_BUCKET,
    LatencyHistogram,
    bucket_bounds_ms,
    bucket_index,
    merge,
)


@pytest.mark.parametrize(
    ("value_ms", "index"),
    [
        (0.0, 0),
        (0.01, 0),  # upper bound of bucket 0 is inclusive
        (0.0100001, 1),
        (0.1, 20),  # one decade = 20 buckets
        (1.0, 40),
        (1.0000001, 41),
        (1000.0, 100),
        (1_000_000.0, 160),
        (1_000_001.0, OVERFLOW_BUCKET),
    ],
)
def test_bucket_index(value_ms: float, index: int) -> None:
    assert bucket_index(value_ms) == index


def test_layout_constants() -> None:
    assert N_BUCKETS == 162
    assert pytest.approx(1.122, abs=1e-3) == BUCKET_GROWTH
    assert BUCKET_UPPER_BOUNDS_MS[40] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bucket_index_rejects_bad_values(bad: float) -> None:
    with pytest.raises(ValueError, match="value_ms"):
        bucket_index(bad)


@given(st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
def test_value_lies_in_its_bucket(value: float) -> None:
    low, high = bucket_bounds_ms(bucket_index(value))
    assert (low < value <= high) or (value == 0.0 and low == 0.0)


def test_merge_is_addition_and_quantiles_match_exact_within_a_bucket() -> None:
    rng = random.Random(7)
    parts = [[rng.lognormvariate(3, 0.8) for _ in range(n)] for n in (10, 400, 3000)]
    merged = merge(LatencyHistogram.from_values(p) for p in parts)
    everything = sorted(v for p in parts for v in p)
    assert merged.total == len(everything)
    assert merged.sum_ms == pytest.approx(sum(everything))
    assert merged == LatencyHistogram.from_values(everything).model_copy(
        update={"sum_ms": merged.sum_ms}
    )
    for q in (0.5, 0.95, 0.99):
        exact = everything[math.ceil(q * len(everything)) - 1]
        got = merged.quantile_ms(q)
        assert got is not None
        assert abs(got / exact - 1) <= BUCKET_GROWTH - 1


def test_empty_histogram_has_no_quantile_not_zero() -> None:
    assert LatencyHistogram().quantile_ms(0.99) is None
    assert LatencyHistogram().mean_ms is None

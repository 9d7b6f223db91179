"""The monitor's fast histogram paths give exactly what the plain ones give (pure)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from schemas.histogram import BUCKET_UPPER_BOUNDS_MS, N_BUCKETS, bucket_index
from schemas.messages import Completion
from schemas.pipeline import PipelineSpec, StageSpec
from services.monitor import histo
from services.monitor.aggregate import WindowAggregator


def random_counts(rng: random.Random, big: bool = False) -> dict[int, int]:
    top = 10**12 if big else 10 ** rng.randint(0, 6)
    return {rng.randrange(N_BUCKETS): rng.randint(1, top) for _ in range(rng.randint(0, 60))}


def test_convolve_matches_the_pairwise_reference() -> None:
    rng = random.Random(7)
    for _ in range(200):
        a, b = random_counts(rng), random_counts(rng)
        assert histo.convolve(a, b) == histo._convolve_py(a, b)
    # Counts whose products leave float64's exact range take the exact (slow) path.
    a, b = random_counts(rng, big=True), random_counts(rng, big=True)
    assert histo.convolve(a, b) == histo._convolve_py(a, b)
    # The pair table is bucket_index of the two representatives, for every pair.
    table = histo.sum_index_table()
    for _ in range(500):
        i, j = rng.randrange(N_BUCKETS), rng.randrange(N_BUCKETS)
        assert table[i, j] == bucket_index(histo.bucket_rep_ms(i) + histo.bucket_rep_ms(j))


def test_dense_percentiles_match_the_sparse_ones() -> None:
    rng = random.Random(11)
    for _ in range(300):
        counts = random_counts(rng)
        assert histo.percentiles_dense(histo.dense(counts)) == histo.percentiles(counts)
    assert histo.percentiles_dense(np.zeros(N_BUCKETS, dtype=np.int64)) is None


def test_sojourn_percentiles_are_those_of_the_convolution() -> None:
    """The fused path (spans from the cumulative counts, float sums) gives exactly
    `percentiles_dense(convolve_dense(...))`, also where the product of the totals leaves
    float64's exact range (it then takes that path itself)."""
    rng = random.Random(13)
    for k in range(400):
        if k % 40 == 0:  # totals 1e9 x 1e8: beyond 2**53, within int64
            wait, service = (
                histo.dense(
                    {
                        rng.randrange(N_BUCKETS): rng.randint(1, 10) * scale
                        for _ in range(rng.randint(20, 40))
                    }
                )
                for scale in (10**7, 10**6)
            )
        else:
            wait, service = (
                histo.dense(
                    {
                        rng.randrange(N_BUCKETS): rng.randint(1, 10 ** rng.randint(0, 4))
                        for _ in range(rng.randint(0, 40))
                    }
                )
                for _ in range(2)
            )
        expected = (
            histo.percentiles_dense(histo.convolve_dense(wait, service))
            if wait.any() and service.any()
            else None
        )
        got = histo.sojourn_percentiles(
            wait, wait.cumsum().tolist(), service, service.cumsum().tolist()
        )
        assert got == expected
        if k % 40 == 0 and expected is not None:
            assert int(wait.sum()) * int(service.sum()) >= 2**53


def test_vectorised_bucket_index_matches_the_scalar_one() -> None:
    rng = random.Random(3)
    edges = list(BUCKET_UPPER_BOUNDS_MS)
    values = (
        [rng.lognormvariate(2.0, 4.0) for _ in range(20_000)]
        + edges
        + [float(np.nextafter(e, np.inf)) for e in edges]
        + [float(np.nextafter(e, 0.0)) for e in edges]
        + [0.0, 1e-9, 5e6, 1e12]
    )
    got = histo.bucket_indices(np.asarray(values)).tolist()
    assert got == [bucket_index(v) for v in values]
    with pytest.raises(ValueError, match="must be finite"):
        histo.bucket_indices(np.asarray([1.0, float("nan")]))


SPEC = PipelineSpec(name="p", slo_p99_ms=50.0, stages=[StageSpec(name="a", kind="cpu")])


def test_batch_completions_equal_one_by_one() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    done = np.sort(rng.uniform(100.0, 140.0, n))
    e2e = rng.lognormal(3.0, 0.8, n)
    ok = rng.random(n) > 0.05
    one, batch = WindowAggregator(SPEC, window_s=30), WindowAggregator(SPEC, window_s=30)
    for d, e, k in zip(done.tolist(), e2e.tolist(), ok.tolist(), strict=True):
        one.add_completion(
            Completion(request_id="r", pipeline="p", created_ts_s=0.0, done_ts_s=d, e2e_ms=e, ok=k),
            d,
        )
    # In chunks, like the simulator's per-tick batches.
    for lo in range(0, n, 700):
        batch.add_completions(e2e[lo : lo + 700], done[lo : lo + 700], ok[lo : lo + 700])
    for now in (120.0, 141.0, 160.0):
        a, b = one.snapshot(now), batch.snapshot(now)
        assert a.model_dump() == b.model_dump()
        assert a.e2e_p99_ms is not None or now == 160.0
    assert one.completions_total == batch.completions_total == n
    with pytest.raises(ValueError, match=r"e2e_ms=-1\.0"):
        batch.add_completions(np.asarray([5.0, -1.0]), 150.0)

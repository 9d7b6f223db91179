"""Surprisal scores, leave-one-out regression and greedy diverse selection (pure numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.retriever.scoring import (
    MIN_BANDWIDTH,
    gaussian_kernel,
    greedy_select,
    loo_estimates,
    median_bandwidth,
    neighbourhood_bandwidth,
    score_candidates,
    select,
    sq_distances,
)


def test_loo_estimate_on_three_points_by_hand() -> None:
    # points 0, 1, 2 on a line, h = 1: k(1) = e^-0.5, k(2) = e^-2
    x = np.array([[0.0], [1.0], [2.0]])
    r = np.array([1.0, 2.0, 4.0])
    k = gaussian_kernel(sq_distances(x, x), 1.0)
    a, b = math.exp(-0.5), math.exp(-2.0)
    # E_0 = (a*2 + b*4) / (a + b); E_1 = (a*1 + a*4) / (2a) = 2.5; E_2 = (b*1 + a*2) / (a + b)
    expected = [(2 * a + 4 * b) / (a + b), 2.5, (b + 2 * a) / (a + b)]
    assert loo_estimates(k, r) == pytest.approx(expected)


def test_loo_identity_matches_explicit_loop() -> None:
    rng = np.random.default_rng(7)
    x = rng.random((12, 4))
    r = rng.normal(size=12)
    k = gaussian_kernel(sq_distances(x, x), 0.3)
    explicit = []
    for i in range(12):
        others = [j for j in range(12) if j != i]
        explicit.append(float(k[i, others] @ r[others] / k[i, others].sum()))
    assert loo_estimates(k, r) == pytest.approx(explicit)


def test_isolated_episode_is_predicted_by_the_mean_of_the_others() -> None:
    # the kernel underflows to 0 between far points: no weight, fall back to the mean
    x = np.array([[0.0], [100.0], [200.0]])
    r = np.array([1.0, 2.0, 6.0])
    k = gaussian_kernel(sq_distances(x, x), 0.1)
    assert loo_estimates(k, r) == pytest.approx([4.0, 3.5, 1.5])


def test_single_episode_is_all_surprise() -> None:
    s = score_candidates(np.zeros(2), np.array([[0.0, 0.0]]), np.array([0.7]))
    assert s.surprisal == pytest.approx([0.7])
    assert s.similarity == pytest.approx([1.0])


def test_median_bandwidth_and_floor() -> None:
    assert median_bandwidth(np.array([0.04, 0.09, 0.16])) == pytest.approx(0.3)
    assert median_bandwidth(np.zeros(5)) == MIN_BANDWIDTH


def test_neighbourhood_bandwidth_ignores_the_pool_beyond_the_m_nearest() -> None:
    near = np.array([0.16, 0.01, 0.04, 0.09])  # distances 0.4, 0.1, 0.2, 0.3
    assert neighbourhood_bandwidth(near, m=2) == pytest.approx(0.2)
    assert neighbourhood_bandwidth(near, m=15) == pytest.approx(0.4)  # fewer than m: farthest
    # a bigger candidate pool (farther episodes) leaves the kernel as it was
    pool = np.concatenate([near, np.full(500, 2.0)])
    assert neighbourhood_bandwidth(pool, m=3) == neighbourhood_bandwidth(near, m=3)
    assert median_bandwidth(pool) > 1.0  # the old rule: the pool size set the kernel
    assert neighbourhood_bandwidth(np.zeros(5), m=3) == MIN_BANDWIDTH
    assert neighbourhood_bandwidth(np.zeros(0)) == MIN_BANDWIDTH


def test_default_bandwidth_is_the_m_th_nearest_distance() -> None:
    q = np.zeros(1)
    x = np.array([[0.1], [0.2], [0.3], [0.9], [1.0]])
    s = score_candidates(q, x, np.ones(5), m=3)
    assert s.bandwidth == pytest.approx(0.3)
    assert select(q, x, np.ones(5), m=2).bandwidth == pytest.approx(0.2)


def test_score_is_similarity_times_surprisal() -> None:
    q = np.array([0.5, 0.5])
    x = np.array([[0.5, 0.5], [0.6, 0.5], [0.9, 0.1]])
    r = np.array([1.0, 1.0, 3.0])
    s = score_candidates(q, x, r, bandwidth=0.2)
    assert s.similarity[0] == pytest.approx(1.0)
    assert s.similarity[1] == pytest.approx(math.exp(-0.01 / 0.08))
    assert s.score == pytest.approx(s.similarity * s.surprisal)


def test_greedy_never_picks_a_duplicate_while_distinct_ones_remain() -> None:
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    k = gaussian_kernel(sq_distances(x, x), 0.3)
    assert greedy_select(np.array([1.0, 1.0, 0.5]), k, 2) == [0, 2]
    # without the penalty the two duplicates win
    assert greedy_select(np.array([1.0, 1.0, 0.5]), k, 2, diversity=0.0) == [0, 1]


def test_all_zero_scores_fall_back_to_similarity_order() -> None:
    x = np.array([[0.0], [2.0], [1.0]])
    k = gaussian_kernel(sq_distances(x, x), 0.1)
    assert greedy_select(np.zeros(3), k, 3, tie_break=np.array([0.9, 0.1, 0.5])) == [0, 2, 1]


def test_select_returns_at_most_m_and_handles_empty() -> None:
    empty = select(np.zeros(3), np.zeros((0, 3)), np.zeros(0), m=15)
    assert empty.indices == []
    rng = np.random.default_rng(0)
    sel = select(rng.random(3), rng.random((40, 3)), rng.random(40), m=15)
    assert len(sel.indices) == 15 == len(set(sel.indices))


def test_bad_shapes_raise_naming_them() -> None:
    with pytest.raises(ValueError, match="dimension"):
        score_candidates(np.zeros(2), np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="bandwidth"):
        gaussian_kernel(np.zeros(2), 0.0)
    with pytest.raises(ValueError, match="diversity"):
        greedy_select(np.zeros(2), np.eye(2), 1, diversity=1.5)


coords = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)
rewards = st.floats(min_value=0.01, max_value=5.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    points=st.lists(st.tuples(coords, coords), min_size=2, max_size=12),
    others=st.lists(rewards, min_size=12, max_size=12),
    target=st.tuples(coords, coords),
    query=st.tuples(coords, coords),
    delta=st.floats(min_value=0.05, max_value=3.0),
)
def test_predicted_episode_scores_lower_than_an_identical_surprising_one(
    points: list[tuple[float, float]],
    others: list[float],
    target: tuple[float, float],
    query: tuple[float, float],
    delta: float,
) -> None:
    x = np.array([*points, target])
    n = len(points)
    q = np.array(query)
    base = np.array([*others[:n], 0.0])
    # the reward the neighbours predict for the target (independent of its own reward)
    h = neighbourhood_bandwidth(sq_distances(q[None, :], x)[0])
    predicted = loo_estimates(gaussian_kernel(sq_distances(x, x), h), base)[-1]
    r_predicted = base.copy()
    r_predicted[-1] = predicted
    r_surprising = base.copy()
    r_surprising[-1] = predicted + delta
    boring = score_candidates(q, x, r_predicted).score[-1]
    surprising = score_candidates(q, x, r_surprising).score[-1]
    assert boring == pytest.approx(0.0, abs=1e-9)
    assert surprising > boring


@settings(max_examples=60, deadline=None)
@given(
    dup=st.tuples(coords, coords),
    distinct=st.tuples(coords, coords),
    others=st.lists(st.tuples(coords, coords), max_size=6),
    score_dup=st.floats(min_value=0.1, max_value=1.0),
    ratio=st.floats(min_value=0.5, max_value=1.0),
    m=st.integers(min_value=2, max_value=4),
)
def test_duplicates_are_not_both_selected_while_a_distinct_candidate_exists(
    dup: tuple[float, float],
    distinct: tuple[float, float],
    others: list[tuple[float, float]],
    score_dup: float,
    ratio: float,
    m: int,
) -> None:
    # the 'distinct' candidate, and the low scorers, must not be copies of the others
    far: list[tuple[float, float]] = []
    for o in others:
        if min(math.dist(o, p) for p in [dup, distinct, *far]) > 1e-3:
            far.append(o)
    if math.dist(dup, distinct) < 0.05:
        return
    x = np.array([dup, dup, distinct, *far])
    # the two duplicates score highest; the distinct one is similar (>= half); the rest low
    score = np.array([score_dup, score_dup, score_dup * ratio] + [0.01] * len(far))
    k = gaussian_kernel(sq_distances(x, x), 0.1)
    # m below the number of distinct positions: a distinct candidate is always left
    chosen = greedy_select(score, k, min(m, len(x) - 1))
    assert not (0 in chosen and 1 in chosen)
    assert 2 in chosen

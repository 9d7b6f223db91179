"""Reward and Pareto term: hand-computed cases and the >= 0.2 separation margin."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.policy import pareto
from services.policy.reward import Outcome, max_cost_per_h, normalise, shaped_reward
from tests.policy import factories as f

# spec(): CPU replica = 1 core x 0.034 + 1 GB x 0.0045 = 0.0385 $/h; GPU replica at rho 1 adds
# 0.79. max cost = 8 x 0.0385 (pre) + 8 x 0.8285 (infer) + 8 x 0.0385 (post) = 7.244 $/h.
MAX_COST = 7.244


def test_max_cost_is_every_stage_at_max_replicas_and_full_rho() -> None:
    assert max_cost_per_h(f.spec()) == pytest.approx(MAX_COST)


@pytest.mark.parametrize(
    ("front", "point", "expected"),
    [
        # empty front: 1 + HV((0.8, 0.1)) = 1 + (3 - 0.8)(1 - 0.1)/3 = 1 + 0.66
        ([], (0.8, 0.1), 1.66),
        # dominated by (1, 0.5) at distance hypot(1, 0.1) and by nothing closer:
        # (2, 0.6) vs (1, 0.5) -> 1.005; vs (2, 0.2) -> 0.4 => 0.8 / 1.4
        ([(1.0, 0.5), (2.0, 0.2)], (2.0, 0.6), 0.8 / 1.4),
        # non-dominated, between the two: HV gain = staircase with (1.5, 0.3) minus without.
        # without: (1,.5): 1 x .5 + (2,.2): 1 x .8 = 1.3; with: .5 x .5 + .5 x .7 + 1 x .8 = 1.4
        # gain = 0.1 / 3
        ([(1.0, 0.5), (2.0, 0.2)], (1.5, 0.3), 1 + 0.1 / 3),
        # equal to a front point: not dominated, contributes nothing
        ([(1.0, 0.5)], (1.0, 0.5), 1.0),
    ],
    ids=["empty-front", "dominated", "fills-a-gap", "duplicate"],
)
def test_pareto_term(front: list[pareto.Point], point: pareto.Point, expected: float) -> None:
    assert pareto.pareto_term(point, front) == pytest.approx(expected)


def test_hypervolume_of_two_points() -> None:
    # staircase (1, .5) to x = 2, then (2, .2) to x = 3: 1 x 0.5 + 1 x 0.8 = 1.3, / box 3
    assert pareto.hypervolume([(1.0, 0.5), (2.0, 0.2)]) == pytest.approx(1.3 / 3)


def test_update_front_drops_dominated_points_and_ignores_dominated_newcomers() -> None:
    front = pareto.update_front([], (1.0, 0.5))
    front = pareto.update_front(front, (2.0, 0.2))
    assert front == ((1.0, 0.5), (2.0, 0.2))
    assert pareto.update_front(front, (2.5, 0.6)) == front  # dominated: no change
    assert pareto.update_front(front, (0.9, 0.2)) == ((0.9, 0.2),)  # dominates both


@pytest.mark.parametrize(
    ("before", "after", "added", "expected"),
    [
        # gain (600-400)/500 = 0.4; cost 0.7244/7.244 = 0.1 -> -0.05; slo 0; pareto 1.66
        # total = 0.4 - 0.05 + 1.66 = 2.01
        (Outcome(600, 1.0), Outcome(400, 0.7244), False, 2.01),
        # breach: after 750 -> excess 0.5, penalty 2 x 0.25 = 0.5; gain (600-750)/500 = -0.3;
        # point (1.5, 0.1): pareto 1 + 1.5 x 0.9 / 3 = 1.45; total -0.3 - 0.05 - 0.5 + 1.45
        (Outcome(600, 1.0), Outcome(750, 0.7244), False, 0.6),
        # proactive: before 420 >= 0.8 x 500, after 380 <= SLO, capacity added: +0.2 x 1
        # latency floor 0.8 x 500 = 400: gain (420 - 400) / 500 = 0.04; the point's P99 axis
        # is max(0.76, 0.8) = 0.8: pareto 1 + 2.2 x 0.9 / 3 = 1.66; 0.04 - 0.05 + 0.2 + 1.66
        (Outcome(420, 1.0), Outcome(380, 0.7244), True, 1.85),
        # no proactive bonus when the SLO was not at risk (before 300 < 400)
        # both under the floor: gain 0; pareto 1.66; total -0.05 + 1.66
        (Outcome(300, 1.0), Outcome(380, 0.7244), True, 1.61),
    ],
    ids=["improve", "breach-quadratic", "proactive", "no-risk-no-bonus"],
)
def test_shaped_reward(before: Outcome, after: Outcome, added: bool, expected: float) -> None:
    r = shaped_reward(f.spec(), before, after, [], added_capacity=added)
    assert r.total == pytest.approx(expected, abs=1e-9)


def test_latency_under_the_floor_earns_nothing_so_the_cheaper_wins() -> None:
    """Below 0.8 x SLO a lower P99 is not worth money: of two outcomes under the floor the
    cheaper scores higher; above it, latency still counts."""
    sp = f.spec()
    before = Outcome(350.0, 1.0)
    fast_dear = shaped_reward(sp, before, Outcome(100.0, 1.5), [])
    slow_cheap = shaped_reward(sp, before, Outcome(390.0, 0.75), [])
    assert fast_dear.gain == slow_cheap.gain == 0.0
    assert fast_dear.point[0] == slow_cheap.point[0] == pytest.approx(0.8)
    assert slow_cheap.total > fast_dear.total
    # above the floor the gain is measured as before: (480 - 420) / 500
    assert shaped_reward(sp, Outcome(480, 1), Outcome(420, 1), []).gain == pytest.approx(0.12)


def test_unknown_p99_is_the_worst_not_zero() -> None:
    sp = f.spec()
    r = shaped_reward(sp, Outcome(400, 1.0), Outcome(None, 0.7244), [(0.5, 0.05)])
    assert r.point == (pareto.REF[0], pytest.approx(0.1))
    assert r.gain == 0.0
    assert r.slo == pytest.approx(4.0)  # capped excess 2, squared
    assert r.pareto < 0.8


def test_slo_penalty_grows_quadratically() -> None:
    sp = f.spec()
    pen = [
        shaped_reward(sp, Outcome(500, 1), Outcome(p, 1), []).slo for p in (550.0, 600.0, 700.0)
    ]
    # excess 0.1, 0.2, 0.4 -> 0.01, 0.04, 0.16
    assert pen == pytest.approx([0.01, 0.04, 0.16])


points = st.tuples(
    st.floats(0.0, 4.0, allow_nan=False, allow_infinity=False),
    st.floats(0.0, 1.2, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None)
@given(front_pts=st.lists(points, min_size=0, max_size=12), a=points, b=points)
def test_non_dominated_beats_dominated_by_at_least_0_2(
    front_pts: list[pareto.Point], a: pareto.Point, b: pareto.Point
) -> None:
    front: tuple[pareto.Point, ...] = ()
    for p in front_pts:
        front = pareto.update_front(front, p)
    ta, tb = pareto.pareto_term(a, front), pareto.pareto_term(b, front)
    a_dom, b_dom = pareto.is_dominated(a, front), pareto.is_dominated(b, front)
    assert (ta >= 1.0) != a_dom and (tb >= 1.0) != b_dom
    if not a_dom and b_dom:
        assert ta - tb >= 0.2 - 1e-12
    assert math.isfinite(ta) and math.isfinite(tb)


@settings(max_examples=200, deadline=None)
@given(front_pts=st.lists(points, min_size=1, max_size=8), p99=st.floats(0, 3000), c=st.floats(0, 8))
def test_full_reward_keeps_the_margin_when_the_other_parts_are_equal(
    front_pts: list[pareto.Point], p99: float, c: float
) -> None:
    """Two outcomes with the same gain, cost and SLO terms differ only by the Pareto term."""
    sp = f.spec()
    front: tuple[pareto.Point, ...] = ()
    for p in front_pts:
        front = pareto.update_front(front, p)
    base = shaped_reward(sp, Outcome(500, 1), Outcome(p99, c), ())
    point = normalise(sp, p99, c)
    dominated = pareto.is_dominated(point, front)
    r = shaped_reward(sp, Outcome(500, 1), Outcome(p99, c), front)
    rest = r.total - r.pareto
    assert rest == pytest.approx(base.total - base.pareto)
    assert (r.pareto <= 0.8) == dominated

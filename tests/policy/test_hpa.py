"""Kubernetes HPA reimplementation: the ratio formula, tolerance band, missing/unready pods,
stabilisation and rate policies (hand-computed, as in replica_calculator_test.go)."""

from __future__ import annotations

import pytest

from services.policy.baselines.hpa import (
    Behavior,
    HPAConfig,
    HPAPolicy,
    HPAStageState,
    replicas_for_average_value,
    replicas_for_utilisation,
    scale_down_limit,
    scale_up_limit,
    stabilise,
)
from tests.policy import factories as f

TARGET = 0.5


@pytest.mark.parametrize(
    ("current", "ready", "unready", "missing", "util", "expected"),
    [
        # ratio 0.75 / 0.5 = 1.5 -> ceil(1.5 x 4) = 6
        (4, 4, 0, 0, 0.75, 6),
        # just inside the band: 0.549 / 0.5 = 1.098 <= 1.1 -> keep 4
        (4, 4, 0, 0, 0.549, 4),
        # just outside: 0.551 / 0.5 = 1.102 -> ceil(4.408) = 5
        (4, 4, 0, 0, 0.551, 5),
        # scale-down just inside: 0.451 / 0.5 = 0.902 >= 0.9 -> keep 10
        (10, 10, 0, 0, 0.451, 10),
        # just outside: 0.449 / 0.5 = 0.898 -> ceil(8.98) = 9
        (10, 10, 0, 0, 0.449, 9),
        # 1 of 4 ready pods has no sample; scale-down counts it at 100%:
        # (0.1 x 3 + 1.0) / 4 = 0.325 -> ratio 0.65 -> ceil(0.65 x 4) = 3
        # (ignoring it we'd get ceil(0.2 x 3) = 1)
        (4, 3, 0, 1, 0.1, 3),
        # 2 starting pods count 0% on a scale-up: (0.9 x 2) / 4 = 0.45 -> 0.9, back across 1
        # -> keep 4 (if they were as busy as the ready ones we'd go to ceil(1.8 x 4) = 8)
        (4, 2, 2, 0, 0.9, 4),
        # missing pod on a scale-up counts 0%: (1.0 x 3 + 0) / 4 = 0.75 -> 1.5 -> ceil(6) = 6
        (4, 3, 0, 1, 1.0, 6),
        # no ready pod with a sample: hold
        (3, 0, 3, 0, 0.0, 3),
    ],
    ids=[
        "ratio-up",
        "tolerance-inside-up",
        "tolerance-outside-up",
        "tolerance-inside-down",
        "tolerance-outside-down",
        "missing-counts-100pct-on-down",
        "unready-counts-0pct-on-up",
        "missing-counts-0pct-on-up",
        "no-metrics",
    ],
)
def test_replicas_for_utilisation(
    current: int, ready: int, unready: int, missing: int, util: float, expected: int
) -> None:
    n, why = replicas_for_utilisation(current, ready, unready, missing, util, TARGET)
    assert n == expected, why


@pytest.mark.parametrize(
    ("current", "total", "expected"),
    [
        (2, 55.0, 6),  # 55 / (10 x 2) = 2.75 -> ceil(55 / 10) = 6
        (5, 52.0, 5),  # 52 / 50 = 1.04 within 0.1 -> keep
        (5, 4.0, 1),  # 4 / 50 = 0.08 -> ceil(0.4) = 1
    ],
    ids=["lag-up", "lag-within-tolerance", "lag-down"],
)
def test_average_value(current: int, total: float, expected: int) -> None:
    assert replicas_for_average_value(current, total, 10.0)[0] == expected


def test_scale_down_stabilisation_window() -> None:
    b = Behavior()
    s = HPAStageState()
    out, s, _ = stabilise(s, 0.0, 10, 10, b)  # t=0 raw 10
    assert out == 10
    for t in range(15, 301, 15):  # every sync after that recommends 5
        out, s, _ = stabilise(s, float(t), 10, 5, b)
        assert out == 10, t  # the 10 from t=0 is still inside the 300 s window (age <= 300)
    out, s, why = stabilise(s, 315.0, 10, 5, b)  # t=0 has left the window
    assert out == 5 and why is None


def test_scale_up_is_not_stabilised_by_default() -> None:
    s = HPAStageState(recommendations=((0.0, 2),))
    assert stabilise(s, 15.0, 2, 9, Behavior())[0] == 9


@pytest.mark.parametrize(
    ("current", "events", "now", "expected"),
    [
        # no recent events: max(ceil(2 x 2) = 4, 2 + 4 = 6) = 6
        (2, (), 100.0, 6),
        # 10 pods: max(20, 14) = 20
        (10, (), 100.0, 20),
        # 4 added 10 s ago: period start 6 - 4 = 2 -> max(4, 6) = 6: no more room
        (6, ((90.0, 4),), 100.0, 6),
        # that event is 15 s old: out of the 15 s period -> start 6 -> max(12, 10) = 12
        (6, ((85.0, 4),), 100.0, 12),
    ],
    ids=["percent-vs-pods-small", "percent-wins-large", "period-used-up", "period-expired"],
)
def test_scale_up_limit(
    current: int, events: tuple[tuple[float, int], ...], now: float, expected: int
) -> None:
    assert scale_up_limit(current, events, now, Behavior()) == expected


def test_scale_down_limit_100_percent() -> None:
    # floor(8 x (1 - 1.0)) = 0: no rate limit on the way down by default
    assert scale_down_limit(8, (), 0.0, Behavior()) == 0


def test_policy_end_to_end_cpu_stage_and_gpu_signal() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp)
    t = f.with_stage(t, "pre", utilisation=0.9)  # 0.9 / 0.5 = 1.8 -> ceil(3.6) = 4
    t = f.with_stage(t, "infer", utilisation=0.9)  # gpu utilisation: same formula -> 4
    pol = HPAPolicy()
    d, s = pol.decide(sp, t, pol.initial_state(sp), 0.0)
    assert d.target("pre").target_replicas == 4
    assert d.target("infer").target_replicas == 4
    assert d.source == "baseline" and not d.hold
    # 5 s later: the 15 s sync period has not passed
    d2, s2 = pol.decide(sp, t, s, 5.0)
    assert d2.hold and s2 == s


def test_gpu_stage_is_scaled_on_gpu_utilisation_by_default() -> None:
    """A saturated GPU stage must make HPA scale it. With the old host-CPU factor 0.5 the
    signal (1.0 x 0.5) never left the tolerance band of the 0.5 target: no scaling ever."""
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "infer", utilisation=1.0)
    d, _ = HPAPolicy().decide(sp, t, HPAPolicy().initial_state(sp), 0.0)
    assert d.target("infer").target_replicas == 4  # 1.0 / 0.5 x 2
    cpu_view = HPAPolicy(HPAConfig(gpu_cpu_factor=0.5))
    d, _ = cpu_view.decide(sp, t, cpu_view.initial_state(sp), 0.0)
    assert d.target("infer").target_replicas == 2  # 0.5 / 0.5: within tolerance, held

"""Queueing-model planner: formulas against closed forms, estimation and the search."""

from __future__ import annotations

import math

import pytest

from services.policy import planner
from services.policy.interface import current_targets
from tests.policy import factories as f


@pytest.mark.parametrize(
    ("c", "a", "expected"),
    [
        (1, 0.5, 0.5),  # M/M/1: P(wait) = rho
        (2, 1.0, 1 / 3),  # (a^2/2! x 2/(2-1)) / (1 + a + that) = 1 / 3
        (3, 0.0, 0.0),  # idle
        (2, 2.0, 1.0),  # saturated
    ],
    ids=["mm1", "mm2-a1", "idle", "saturated"],
)
def test_erlang_c(c: int, a: float, expected: float) -> None:
    assert planner.erlang_c(c, a) == pytest.approx(expected)


def test_mm1_p99_is_exponential_tail() -> None:
    # M/M/1 sojourn ~ Exp(mu - lambda): p99 = ln(100) / (10 - 5) s = 921.03 ms
    assert planner.mmc_sojourn_quantile_ms(5.0, 10.0, 1) == pytest.approx(
        1000 * math.log(100) / 5, rel=1e-4
    )
    # mean = 1 / (mu - lambda) = 200 ms
    assert planner.mmc_mean_sojourn_ms(5.0, 10.0, 1) == pytest.approx(200.0)


def test_unstable_queue_is_infinite_and_more_servers_help() -> None:
    assert planner.mmc_sojourn_quantile_ms(20.0, 10.0, 2) == math.inf
    p2 = planner.mmc_sojourn_quantile_ms(15.0, 10.0, 2)
    p3 = planner.mmc_sojourn_quantile_ms(15.0, 10.0, 3)
    # with 3 servers at low load the tail approaches the service tail ln(100)/mu = 460.5 ms
    assert p3 < p2 and p3 >= 1000 * math.log(100) / 10 - 1e-6


def test_combine_is_sum_of_means_plus_rss_of_excess() -> None:
    # 4 x Exp(1) s: mean 1, p99 4.605 -> 4 + sqrt(4 x 3.605^2) = 4 + 7.21 = 11.21
    assert planner.combine_ms([(4.60517, 1.0)] * 4) == pytest.approx(11.2103, rel=1e-4)
    # one stage alone: its own p99
    assert planner.combine_ms([(4.6, 1.0)]) == pytest.approx(4.6)


@pytest.mark.parametrize(
    ("stage", "update", "expected"),
    [
        # cpu: 20 rps / (0.5 util x 2 replicas) = 20 rps per replica
        ("pre", {}, 20.0),
        # gpu: 20 / (0.5 util-of-quota x 2 x rho 0.5) = 40 rps per replica at rho 1
        ("infer", {}, 40.0),
        # too idle to measure: falls back to 1000 / p50 ms = 1000 / 40 = 25 rps
        ("pre", {"utilisation": 0.01}, 25.0),
    ],
    ids=["cpu", "gpu-per-unit-rho", "idle-falls-back-to-service-p50"],
)
def test_estimate_rates(stage: str, update: dict[str, float], expected: float) -> None:
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), stage, **update)
    est = planner.estimate_rates(sp, t, {})
    assert est[stage].mu1_rps == pytest.approx(expected)


def test_estimate_is_smoothed_with_the_previous_one() -> None:
    sp = f.spec()
    est = planner.estimate_rates(sp, f.telemetry(sp=sp), {"pre": 30.0})
    # EWMA alpha 0.5: 0.5 x 30 + 0.5 x 20 = 25
    assert est["pre"].mu1_rps == pytest.approx(25.0)


def test_plan_picks_fewest_replicas_that_meet_the_slo() -> None:
    sp = f.spec()
    # pre overloaded: 60 rps on 20 rps replicas needs >= 4 replicas to be stable at all
    t = f.with_stage(f.telemetry(sp=sp, e2e_p99_ms=None), "pre", arrival_rate_rps=60.0)
    est = planner.estimate_rates(sp, t, {})
    p = planner.plan(sp, t, est, current_targets(sp, t))
    by = {a.stage: a for a in p.targets}
    assert p.feasible
    assert by["pre"].target_replicas >= 4
    assert p.prediction.p99_ms <= 0.8 * sp.slo_p99_ms
    # one replica less on pre would break the budget (fewest replicas)
    fewer = [
        a.model_copy(update={"target_replicas": a.target_replicas - 1}) if a.stage == "pre" else a
        for a in p.targets
    ]
    assert planner.predict(sp, est, fewer).p99_ms > 0.8 * sp.slo_p99_ms


def test_plan_lowers_rho_when_the_gpu_has_room() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp, e2e_p99_ms=None)
    t = f.with_stage(t, "infer", utilisation=0.1)  # mu1 = 20 / (0.1 x 2 x 0.5) = 200 rps
    for name in ("pre", "post"):
        t = f.with_stage(t, name, utilisation=0.1)  # 100 rps per replica: fast cpu stages
    est = planner.estimate_rates(sp, t, {})
    p = planner.plan(sp, t, est, current_targets(sp, t))
    infer = {a.stage: a for a in p.targets}["infer"]
    # 1 x 200 x 0.25 = 50 rps for 20 rps: M/M/1 p99 = ln(100) / 30 s = 154 ms, within budget
    assert (infer.target_replicas, infer.rho) == (1, 0.25)


def test_plan_reports_infeasible_when_max_cannot_keep_up() -> None:
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "pre", arrival_rate_rps=500.0)  # 8 x 20 = 160 max
    est = planner.estimate_rates(sp, t, {})
    p = planner.plan(sp, t, est, current_targets(sp, t))
    assert not p.feasible
    assert {a.stage: a for a in p.targets}["pre"].target_replicas == 8
    assert any("unstable even at max_replicas" in r for r in p.reasons)


def test_backlog_must_drain_within_the_interval() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp, e2e_p99_ms=None)
    base = planner.plan(sp, t, planner.estimate_rates(sp, t, {}), current_targets(sp, t))
    # 1200 queued / 30 s = +40 rps on top of 20 rps
    tq = f.with_stage(t, "pre", queue_depth=1200)
    with_q = planner.plan(sp, tq, planner.estimate_rates(sp, tq, {}), current_targets(sp, tq))
    n = {a.stage: a.target_replicas for a in with_q.targets}["pre"]
    assert n > {a.stage: a.target_replicas for a in base.targets}["pre"] and n >= 4

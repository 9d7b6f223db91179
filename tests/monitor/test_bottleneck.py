"""Bottleneck detection on constructed tandem-queue cases (pure)."""

from __future__ import annotations

import math

import pytest

from services.monitor.bottleneck import (
    StageLoad,
    detect_bottleneck,
    erlang_c,
    max_utilisation_bottleneck,
    mmc_wait_s,
)


def stage(name: str, lam: float, util: float, servers: int, **kw: float) -> StageLoad:
    """A stage fed at `lam` with `servers` servers at utilisation `util`."""
    service_s = util * servers / lam
    return StageLoad(
        name=name,
        servers=servers,
        service_s=service_s,
        arrival_rps=lam,
        throughput_rps=min(lam, servers / service_s),
        queue_depth=kw.get("queue", 0.0),
        queue_growth_per_s=kw.get("growth", 0.0),
        utilisation=util,
    )


def test_erlang_c_known_values() -> None:
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.5) == 1.0
    assert mmc_wait_s(9.0, 10.0, 1) == pytest.approx(0.9 / (10 - 9))
    assert math.isinf(mmc_wait_s(10.0, 5.0, 2))
    assert mmc_wait_s(0.0, 5.0, 2) == 0.0


def test_highest_utilisation_wins_when_replicas_are_equal() -> None:
    b = detect_bottleneck([stage("pre", 20, 0.5, 2), stage("infer", 20, 0.9, 2),
                           stage("post", 20, 0.6, 2)])
    assert b.stage == "infer" and b.confidence > 0.5


def test_one_server_at_80_percent_beats_eight_at_85_percent() -> None:
    # Pooling: eight servers at 0.85 queue little, and a ninth helps less than a second
    # server for the lone one at 0.8.
    loads = [stage("pre", 20, 0.85, 8), stage("infer", 20, 0.8, 1), stage("post", 20, 0.3, 2)]
    assert detect_bottleneck(loads).stage == "infer"
    assert max_utilisation_bottleneck(loads).stage == "pre"  # the naive rule gets it wrong


def test_overloaded_stage_wins_and_growth_is_used() -> None:
    loads = [stage("pre", 30, 0.95, 3), stage("infer", 30, 1.2, 2, queue=200, growth=5.0),
             stage("post", 30, 0.5, 2)]
    b = detect_bottleneck(loads)
    assert b.stage == "infer" and b.confidence > 0.5
    assert b.gains_ms["infer"] > b.gains_ms["pre"]


def test_upstream_overload_hides_downstream_until_relieved() -> None:
    # pre can do 20/s of 30/s offered; infer can do 25/s. Adding to pre only moves the queue
    # to infer, so pre's gain is real but smaller than the tighter model of the two says.
    pre = StageLoad("pre", servers=2, service_s=0.1, arrival_rps=30.0, throughput_rps=20.0,
                    queue_depth=300, queue_growth_per_s=10.0)
    infer = StageLoad("infer", servers=1, service_s=0.04, arrival_rps=20.0, throughput_rps=20.0,
                      queue_depth=2, queue_growth_per_s=0.0)
    b = detect_bottleneck([pre, infer])
    assert b.stage == "pre"
    assert b.gains_ms["infer"] < b.gains_ms["pre"]


def test_near_tie_has_low_confidence() -> None:
    b = detect_bottleneck([stage("a", 20, 0.80, 2), stage("b", 20, 0.805, 2)])
    assert b.stage in {"a", "b"} and b.confidence < 0.2


def test_unknown_service_time_uses_throughput_when_the_queue_grows() -> None:
    unknown = StageLoad("infer", servers=2, service_s=None, arrival_rps=30.0,
                        throughput_rps=20.0, queue_depth=100, queue_growth_per_s=10.0)
    b = detect_bottleneck([stage("pre", 30, 0.6, 2), unknown])
    assert b.stage == "infer"
    # Unknown and not visibly saturated: cannot be judged, confidence reduced.
    quiet = StageLoad("infer", servers=2, service_s=None, arrival_rps=30.0)
    b2 = detect_bottleneck([stage("pre", 30, 0.6, 2), quiet])
    assert b2.stage == "pre" and b2.confidence <= 0.5


def test_no_demand_no_bottleneck() -> None:
    assert detect_bottleneck([]).stage is None
    blind = StageLoad("pre", servers=1, service_s=0.1)
    assert detect_bottleneck([blind]).stage is None
    assert max_utilisation_bottleneck([blind]).stage is None

"""Fresh demand estimation (services/policy/demand.py), hand-computed."""

from __future__ import annotations

import pytest

from services.policy.demand import (
    BURST_MARGIN,
    DemandState,
    capacity_rps,
    observe,
    sustained_trend,
)
from services.policy.interface import current_targets
from tests.policy import factories as f

MU1 = {"pre": 40.0, "infer": 40.0, "post": 40.0}


def test_gpu_capacity_is_the_bucket_and_full_speed_bound() -> None:
    st = f.spec().stage("infer")
    # 1 ready, 3 replicas (2 starting) at rho 0.5, mu1 40: bucket 3 x 0.5 x 40 = 60, but
    # the one ready replica runs at most at full speed: 40
    assert capacity_rps(st, 40.0, 1, 3, 0.5) == pytest.approx(40.0)
    assert capacity_rps(st, 40.0, 3, 3, 0.25) == pytest.approx(30.0)
    assert capacity_rps(st, None, 3, 3, 0.25) is None


def test_saturated_stage_uses_the_capacity_that_served_the_tick() -> None:
    """Replicas that became ready at the tick's end did not drain its queue: the arrival is
    the previous tick's capacity plus the growth (seen: textgen, 98.6 rps for 39.7)."""
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "infer", queue_depth=40, replicas_ready=4)
    before = DemandState(queues=(("infer", 0.0, 20),), capacities=(("infer", 40.0),))
    d, s = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    # busy all tick (20 and 40 queued): 40 served (not 4 x 0.5 x 40 = 80) + 10/s growth
    assert d.stages["infer"].arrival_rps == pytest.approx(50.0)
    assert dict(s.capacities)["infer"] == pytest.approx(80.0)  # for the next tick


def test_surging_stage_with_an_arrival_counter_uses_what_arrived() -> None:
    """On a host whose CPUs are saturated the replicas serve far less than ready x mu_1, so
    capacity + growth overstates the load (seen live: 54 rps for 24 offered). With the
    queue's arrival counter the arrival is what entered the queue this tick."""
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "pre", queue_depth=40, replicas_ready=4,
                     arrived_total=1048)  # fmt: skip
    before = DemandState(queues=(("pre", 0.0, 20),), capacities=(("pre", 160.0),),
                         arrived=(("pre", 0.0, 1000),))  # fmt: skip
    d, s = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    # 48 arrived in 2 s: 24 rps, not the model's 160 served + 10/s growth = 170
    assert d.stages["pre"].arrival_rps == pytest.approx(24.0)
    assert d.demand_rps == pytest.approx(24.0)
    assert ("pre", 2.0, 1048) in s.arrived
    # Without the previous counter (first tick, or a monitor that does not give it) the
    # capacity model it is.
    d, _ = observe(sp, t, DemandState(queues=(("pre", 0.0, 20),), capacities=(("pre", 160.0),)),
                   2.0, MU1, current_targets(sp, t), 30.0)  # fmt: skip
    assert d.stages["pre"].arrival_rps == pytest.approx(170.0)
    # A stage that is not surging keeps the monitor's windowed arrival: a counter's tick-to-
    # tick noise must not ratchet up the planned peak at a steady load.
    calm = f.with_stage(f.telemetry(sp=sp), "pre", queue_depth=1, arrived_total=1060)
    d, _ = observe(sp, calm, DemandState(queues=(("pre", 0.0, 1),), arrived=(("pre", 0.0, 1000),)),
                   2.0, MU1, current_targets(sp, calm), 30.0)  # fmt: skip
    assert d.stages["pre"].arrival_rps == pytest.approx(20.0)
    assert d.demand_rps == pytest.approx(20.0)


def test_flow_conservation_upstream_drain_is_not_new_demand() -> None:
    """A stage downstream of one draining its backlog sees more than the pipeline gets."""
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "pre", queue_depth=10)
    t = f.with_stage(t, "infer", queue_depth=60)
    before = DemandState(
        queues=(("pre", 0.0, 50), ("infer", 0.0, 30)),
        capacities=(("pre", 80.0), ("infer", 40.0)),
    )
    d, _ = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    # infer: 40 + 15 = 55 arriving, but pre shrank by 20/s: the pipeline gets 55 - 20 = 35;
    # pre itself (busy, 80 + (-20)) says 60: the demand is the largest, 60
    assert d.stages["infer"].arrival_rps == pytest.approx(55.0)
    assert d.demand_rps == pytest.approx(60.0)


def test_stabilisation_window_keeps_the_peak() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp)  # windowed arrival 20
    s = DemandState(history=((75.0, 45.0), (95.0, 30.0)))
    d, s2 = observe(sp, t, s, 100.0, MU1, current_targets(sp, t), 30.0)
    assert d.demand_rps == 20.0 and d.peak_rps == 45.0  # 25 s ago: inside 30 s
    d, _ = observe(sp, t, s2, 106.0, MU1, current_targets(sp, t), 30.0)
    assert d.peak_rps == 30.0  # the 45 at t = 75 is now 31 s old


def test_burst_memory_records_only_bursts_renews_and_expires() -> None:
    sp = f.spec()
    cur = current_targets(sp, f.telemetry(sp=sp))
    burst = f.with_stage(f.telemetry(sp=sp), "infer", queue_depth=60)
    before = DemandState(queues=(("infer", 0.0, 0),), capacities=(("infer", 40.0),))
    d, s = observe(sp, burst, before, 2.0, MU1, cur, 30.0, burst_memory_s=300.0)
    # 40 + 30 = 70 rps against a windowed 20: 3.5x, a burst
    assert d.burst_floor_rps == pytest.approx(70.0)
    assert d.plan_rps(0.0) == pytest.approx(BURST_MARGIN * 70.0)
    quiet = f.telemetry(sp=sp)
    d, s2 = observe(sp, quiet, s, 200.0, MU1, cur, 30.0, burst_memory_s=300.0)
    assert d.burst_floor_rps == pytest.approx(70.0)  # remembered
    back = quiet.model_copy(update={"arrival_rate_rps": 45.0})  # >= 0.6 x 70: it recurs
    d, s3 = observe(sp, back, s2, 290.0, MU1, cur, 30.0, burst_memory_s=300.0)
    d, _ = observe(sp, quiet, s3, 500.0, MU1, cur, 30.0, burst_memory_s=300.0)
    assert d.burst_floor_rps == pytest.approx(70.0)  # renewed at 290
    d, _ = observe(sp, quiet, s2, 400.0, MU1, cur, 30.0, burst_memory_s=300.0)
    assert d.burst_floor_rps == 0.0  # 398 s without it: forgotten


def test_a_stage_short_of_capacity_at_a_steady_load_is_not_a_burst() -> None:
    sp = f.spec()
    cur = current_targets(sp, f.telemetry(sp=sp))
    t = f.with_stage(f.telemetry(sp=sp), "infer", queue_depth=24)
    before = DemandState(queues=(("infer", 0.0, 0),), capacities=(("infer", 22.0),))
    d, _ = observe(sp, t, before, 2.0, MU1, cur, 30.0)
    # 22 + 12 = 34 rps: a surge (12 >= 0.25 x 22) but under 2 x the windowed 20
    assert d.stages["infer"].saturated and d.burst_floor_rps == 0.0


def test_trend_needs_two_rising_windows() -> None:
    ramp = [(float(t), 10.0 + 0.2 * t) for t in range(0, 62, 2)]
    assert sustained_trend(ramp, 60.0) == pytest.approx(0.2)
    # a burst's echo: flat for 30 s, then rising: no trend
    echo = [(float(t), 10.0 if t <= 30 else 10.0 + 1.5 * (t - 30)) for t in range(0, 62, 2)]
    assert sustained_trend(echo, 60.0) == 0.0
    # a fresh start: 20 s of a rising window count; 10 s do not
    assert sustained_trend(ramp[:11], 20.0) == pytest.approx(0.2)
    assert sustained_trend(ramp[:6], 10.0) == 0.0

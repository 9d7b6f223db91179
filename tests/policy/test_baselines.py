"""Static, VPA, Threshold, KEDA, KPA and Ray Serve baselines, hand-computed, and the registry."""

from __future__ import annotations

import pytest

from services.policy.baselines.keda import KEDAPolicy
from services.policy.baselines.kpa import KPAConfig, KPAStageState, kpa_step
from services.policy.baselines.ray_serve import (
    RayServeConfig,
    RayStageState,
    apply_delay,
    ray_desired,
)
from services.policy.baselines.static import StaticConfig, StaticPolicy
from services.policy.baselines.threshold import ThresholdConfig, ThresholdStageState, threshold_step
from services.policy.baselines.vpa import VPAPolicy, grid_at_least
from services.policy.interface import POLICY_NAMES, get_policy, to_scaling_action
from tests.policy import factories as f


def test_static_sizes_once_from_mean_rate_and_service_rate() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp)
    pol = StaticPolicy(StaticConfig(rate_rps=50.0))
    d, s = pol.decide(sp, t, pol.initial_state(sp), 0.0)
    # pre: mu = 20 / (0.5 x 2) = 20 rps; ceil(50 / (20 x 0.7)) = ceil(3.57) = 4
    # infer: mu1 = 20 / (0.5 x 2 x 0.5) = 40 rps at rho 1; ceil(50 / 28) = 2, rho -> 1.0
    assert [(a.target_replicas, a.rho) for a in d.targets] == [(4, None), (2, 1.0), (4, None)]
    # frozen: a later, different telemetry changes nothing
    d2, _ = pol.decide(sp, f.with_stage(t, "pre", utilisation=0.99), s, 30.0)
    assert d2.targets == d.targets


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # U = 0.8, k_up = 2: two evaluations above -> +1
        ([0.9, 0.9], [2, 3]),
        # an evaluation at 0.7 resets the counter
        ([0.9, 0.7, 0.9], [2, 2, 2]),
        # L = 0.3, k_down = 4: four below -> -1 (no earlier scaling, no cooldown)
        ([0.1, 0.1, 0.1, 0.1], [2, 2, 2, 1]),
        # just at U is not above U
        ([0.8, 0.8], [2, 2]),
    ],
    ids=["up-after-2", "reset", "down-after-4", "at-threshold"],
)
def test_threshold(values: list[float], expected: list[int]) -> None:
    cfg = ThresholdConfig()
    s = ThresholdStageState()
    current = 2
    got = []
    for i, v in enumerate(values):
        current, s, _ = threshold_step(cfg, s, v, current, 1, 8, 30.0 * i)
        got.append(current)
    assert got == expected


def test_threshold_up_cooldown() -> None:
    cfg = ThresholdConfig()
    s = ThresholdStageState(above=1, last_up_s=0.0, last_scale_s=0.0)
    # at t = 30 the second evaluation above U, but the last scale-up was 30 s < 60 s ago
    n, s, why = threshold_step(cfg, s, 0.95, 3, 1, 8, 30.0)
    assert n == 3 and "cooldown" in why
    n, _, _ = threshold_step(cfg, s, 0.95, 3, 1, 8, 60.0)
    assert n == 4


def test_keda_lag_threshold_through_hpa() -> None:
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "pre", queue_depth=55)
    pol = KEDAPolicy()
    d, _ = pol.decide(sp, t, pol.initial_state(sp), 0.0)
    # 55 / (10 x 2) = 2.75 outside tolerance -> ceil(55 / 10) = 6; HPA up limit max(4, 6) = 6
    assert d.target("pre").target_replicas == 6


def test_keda_unknown_lag_holds_unless_quirk() -> None:
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "pre", queue_depth=None)
    d, _ = KEDAPolicy().decide(sp, t, KEDAPolicy().initial_state(sp), 0.0)
    assert d.target("pre").target_replicas == 2
    from services.policy.baselines.keda import KEDAConfig

    quirky = KEDAPolicy(KEDAConfig(missing_consumer_scales_to_max=True))
    d, _ = quirky.decide(sp, t, quirky.initial_state(sp), 0.0)
    assert d.target("pre").target_replicas == 8


def test_vpa_right_sizes_gpu_rho_only() -> None:
    sp = f.spec()
    # infer uses 0.2 of its 0.5 quota = 0.1 of a GPU; target p90 x 1.15: bucket upper bound
    # of 0.1 (0.01 x 1.05^48 = 0.104) x 1.15 = 0.120 -> rounded up to the grid: 0.25
    t = f.with_stage(f.telemetry(sp=sp), "infer", utilisation=0.2)
    pol = VPAPolicy()
    d, s = pol.decide(sp, t, pol.initial_state(sp), 0.0)
    assert d.target("infer").rho == 0.25
    assert [a.target_replicas for a in d.targets] == [2, 2, 2]  # never the replica count
    # applied: same 0.1 of a GPU is now 0.4 of the 0.25 quota; inside [lower, upper]: hold
    t2 = f.with_stage(t, "infer", utilisation=0.4, rho=0.25)
    for k in range(1, 4):
        d, s = pol.decide(sp, t2, s, 60.0 * k)
        assert d.hold, d.rationale


def test_vpa_grid_rounds_up() -> None:
    st = f.spec().stage("infer")
    assert [grid_at_least(st, x) for x in (0.1, 0.25, 0.26, 1.3)] == [0.25, 0.25, 0.5, 1.0]


def test_kpa_stable_and_panic() -> None:
    cfg = KPAConfig()
    s = KPAStageState()
    # target 0.5 per pod (exact in binary). 1.0 concurrent / 0.5 -> 2 pods, ready 2: stable
    n, s, why = kpa_step(cfg, s, 0.5, 1.0, 2, 0.0)
    assert n == 2 and why.startswith("stable")
    # burst at t = 10: the 6 s panic window holds only this sample: ceil(5 / 0.5) = 10;
    # 10 / 2 ready >= 2.0 -> panic, desired = 10 (stable would say ceil(3 / 0.5) = 6)
    n, s, why = kpa_step(cfg, s, 0.5, 5.0, 2, 10.0)
    assert n == 10 and why.startswith("panic")
    # load gone: in panic the count never decreases
    n, s, _ = kpa_step(cfg, s, 0.5, 0.0, 10, 12.0)
    assert n == 10
    # a full stable window (60 s) after the last panic condition: back to stable
    n, s, why = kpa_step(cfg, s, 0.5, 0.0, 10, 71.0)
    assert why.startswith("stable") and n == 5  # ready 10 / max-scale-down-rate 2


@pytest.mark.parametrize(
    ("running", "ongoing", "expected"),
    [
        (2, 8.0, 4),  # error ratio 8 / (2 x 2) = 2 -> ceil(2 x (1 + 1)) = 4
        (4, 4.0, 2),  # 4 / 8 = 0.5 -> ceil(4 x 0.5) = 2
        (0, 3.0, 1),  # cold start
    ],
    ids=["up", "down", "cold-start"],
)
def test_ray_desired(running: int, ongoing: float, expected: int) -> None:
    assert ray_desired(RayServeConfig(), running, ongoing) == expected


def test_ray_delays_count_time_and_reset_on_opposite_decision() -> None:
    cfg = RayServeConfig()
    s = RayStageState()
    n, s, _ = apply_delay(cfg, s, 2, 4, 0.0)
    assert n == 2  # proposed up at t=0
    n, s, _ = apply_delay(cfg, s, 2, 4, 29.0)
    assert n == 2  # 29 s < 30 s
    n, s2, _ = apply_delay(cfg, s, 2, 1, 29.5)  # opposite decision resets the clock
    n, s2, _ = apply_delay(cfg, s2, 2, 4, 30.0)
    assert n == 2
    n, _, _ = apply_delay(cfg, s, 2, 4, 30.0)  # without the reset: 30 s reached
    assert n == 4


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_registry_builds_every_policy_and_its_actions_validate(name: str) -> None:
    sp = f.spec()
    t = f.with_stage(f.telemetry(sp=sp), "pre", utilisation=0.95, queue_depth=40)
    pol = get_policy(name, **({"from_env": False} if name == "llm" else {}))
    s = pol.initial_state(sp)
    d, s = pol.decide(sp, t, s, 0.0)
    msg = to_scaling_action(d, sp.name, f"{name}-1", 0.0)
    assert msg.policy == name and len(msg.stages) == 3
    for a in d.targets:
        st = sp.stage(a.stage)
        assert st.min_replicas <= a.target_replicas <= st.max_replicas


def test_registry_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown"):
        get_policy("nope")

"""Embedded in-context policy, exploration and reflex."""

from __future__ import annotations

from dataclasses import replace

import pytest

from schemas.context import encode_context
from services.policy.demand import DemandState, observe
from services.policy.embedded import (
    SairConfig,
    SairPolicy,
    SairState,
    kernel_scores,
    learn,
    prepare,
    strategic_decide,
)
from services.policy.explore import ExploreState, decay, maybe_explore
from services.policy.interface import current_targets, get_policy, to_scaling_action
from services.policy.reflex import ReflexState, reflex_check
from services.policy.reward import Outcome
from services.policy.validator import ValidatorState, action_cost_per_h
from tests.policy import factories as f

NO_EXPLORE = SairConfig(explore=False)


def overloaded_infer():  # type: ignore[no-untyped-def]
    sp = f.spec()
    t = f.telemetry(sp=sp, e2e_p99_ms=900.0, arrival_rate_rps=38.0)
    # infer: 38 rps arriving, mu1 = 20 / (1.0 x 2 x 0.5) = 20 rps -> 2 x 20 x 0.5 = 20 rps cap
    t = f.with_stage(t, "infer", arrival_rate_rps=38.0, utilisation=1.0, queue_depth=200)
    for name in ("pre", "post"):
        t = f.with_stage(t, name, arrival_rate_rps=38.0, throughput_rps=38.0, utilisation=0.3)
    return sp, t.model_copy(update={"bottleneck": "infer", "bottleneck_confidence": 0.9})


def test_without_episodes_the_planner_prior_adds_capacity_to_the_bottleneck() -> None:
    sp, t = overloaded_infer()
    d, s = strategic_decide(sp, t, SairState(), 0.0, (), NO_EXPLORE)
    infer = d.target("infer")
    cur = {a.stage: a for a in current_targets(sp, t)}["infer"]
    assert infer.target_replicas * (infer.rho or 0) > cur.target_replicas * (cur.rho or 0)
    assert d.source == "embedded" and d.bottleneck == "infer" and not d.hold
    assert d.predicted_p99_ms is not None and d.predicted_reward is not None
    assert any(r.startswith("chose ") for r in d.rationale)
    assert s.next_decision_s == 30.0 and dict(s.mu1)["infer"] == pytest.approx(20.0)


def test_kernel_regression_arithmetic() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp)
    ctx = encode_context(t, sp)
    act = current_targets(sp, t)
    ep = f.episode(sp, ctx, {a.stage: (a.target_replicas, a.rho) for a in act}, reward=2.0)
    # same context, same action: weight 1; (1 x 2.0 + 0.5 x 1.0) / (1 + 0.5) = 1.6667
    scores, evidence = kernel_scores(sp, ctx, [act], [1.0], [ep], SairConfig())
    assert scores[0] == pytest.approx(2.5 / 1.5)
    assert evidence[0] == pytest.approx(1.0)


def test_good_episodes_override_the_prior() -> None:
    sp, t = overloaded_infer()
    ctx = encode_context(t, sp)
    base = prepare(sp, t, SairState(), (), NO_EXPLORE)
    # pick a candidate the prior does not rank first, and tell the policy it paid off
    loser = next(i for i in range(len(base.candidates)) if i != base.best)
    target = base.candidates[loser].targets
    eps = [
        f.episode(sp, ctx, {a.stage: (a.target_replicas, a.rho) for a in target}, 10.0, i)
        for i in range(5)
    ]
    d, _ = strategic_decide(sp, t, SairState(), 0.0, eps, NO_EXPLORE)
    assert d.targets == target


def test_degraded_telemetry_never_scales_down() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp, degraded=True)
    for name in ("pre", "infer", "post"):
        t = f.with_stage(t, name, utilisation=0.05)  # idle: the planner would cut
    d, _ = strategic_decide(sp, t, SairState(), 0.0, (), NO_EXPLORE)
    cur = {a.stage: a for a in current_targets(sp, t)}
    for a in d.targets:
        assert a.target_replicas >= cur[a.stage].target_replicas
    assert any("degraded" in r for r in d.rationale)


def test_exploration_is_seeded_and_decays() -> None:
    s = ExploreState(epsilon=1.0, seed=7)
    a = maybe_explore(s, [0, 1, 2, 3], 0)
    b = maybe_explore(s, [0, 1, 2, 3], 0)
    assert a == b and a[1] and a[0] != 0  # epsilon 1: always another candidate
    assert a[2].epsilon == 0.95 and a[2].counter == 1
    assert maybe_explore(s, [0, 1], 0, allowed=False)[:2] == (0, False)
    assert decay(0.05) == 0.05 and decay(0.052) == 0.05  # floor


def test_no_exploration_while_the_slo_breaks() -> None:
    sp, t = overloaded_infer()  # e2e 900 > 500
    cfg = SairConfig(epsilon_start=1.0)
    pol = SairPolicy(cfg)
    d, s = pol.decide(sp, t, pol.initial_state(sp, seed=1), 0.0)
    assert d.source == "embedded"
    assert s.explore.epsilon == pytest.approx(0.95)


def test_gating_strategic_then_reflex_then_strategic() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp)
    pol = SairPolicy(NO_EXPLORE)
    s = pol.initial_state(sp)
    assert pol.wants_retrieval(sp, s, 0.0)
    d, s = pol.decide(sp, t, s, 0.0)
    assert d.source == "embedded"
    assert not pol.wants_retrieval(sp, s, 2.0)
    d, s = pol.decide(sp, t, s, 2.0)
    assert d.source == "reflex" and d.hold
    assert pol.wants_retrieval(sp, s, 30.0)


def onset(sp, q_now: int = 20, q_before: int = 0, **infer):  # type: ignore[no-untyped-def]
    """A burst reaching infer: its queue went q_before -> q_now in one 2 s tick, while the
    monitor's 30 s window still shows the old 20 rps."""
    t = f.telemetry(sp=sp, e2e_p99_ms=300.0)
    t = f.with_stage(t, "infer", queue_depth=q_now, **infer)
    before = DemandState(queues=(("infer", 0.0, q_before),), capacities=(("infer", 40.0),))
    return t, before


MU1 = {"pre": 40.0, "infer": 40.0}


def test_reflex_raises_rho_first_when_that_is_enough() -> None:
    sp = f.spec()
    t, before = onset(sp, q_now=20)
    # infer: 2 ready x 0.5 x 40 = 40 rps served; +20 in 2 s: g = 10 >= 0.25 x 40: a burst.
    # arrival = 40 + 10 = 50 rps; needed = 50 / 0.8 + 20 / 2 s = 72.5 rps.
    # 2 ready x 40 at full speed = 80 >= 72.5: no replica; 2 x rho x 40 >= 72.5 -> rho 1.0
    demand, _ = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    assert demand.demand_rps == pytest.approx(50.0)
    d, _ = reflex_check(sp, t, ReflexState(), 2.0, 30.0, MU1, demand=demand)
    assert d is not None and d.source == "reflex"
    assert (d.target("infer").target_replicas, d.target("infer").rho) == (2, 1.0)
    # the whole pipeline is sized for the burst: post (20 rps per replica, measured)
    # needs 72.5 rps -> ceil(72.5 / 20) = 4 replicas; pre (2 x 40 = 80 >= 62.5) is fine
    assert d.target("post").target_replicas == 4 and d.target("pre").target_replicas == 2
    assert any("pipeline demand 50.0 rps" in r for r in d.rationale)


def test_reflex_adds_replicas_when_rho_is_not_enough() -> None:
    sp = f.spec()
    t, before = onset(sp, q_now=60)
    # g = 30: arrival 70, needed 70 / 0.8 + 60 / 2 = 117.5 > 2 x 40 at full speed
    # -> ceil(117.5 / 40) = 3 replicas, and 3 x rho x 40 >= 117.5 -> rho 1.0
    demand, _ = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    d, s = reflex_check(sp, t, ReflexState(), 2.0, 30.0, MU1, demand=demand)
    assert d is not None
    assert (d.target("infer").target_replicas, d.target("infer").rho) == (3, 1.0)
    assert s.fired_at("infer") == 2.0


def test_reflex_sizes_from_the_queue_not_the_lagging_window() -> None:
    """Defect 2: the monitor's window said 16.3 rps while 59 rps arrived. The reflex must
    size from the freshest signal: a saturated stage serves its capacity, so arrival =
    capacity + queue growth."""
    sp = f.spec()
    t, before = onset(sp, q_now=60, arrival_rate_rps=16.3)
    t = t.model_copy(update={"arrival_rate_rps": 16.3})
    demand, _ = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    assert demand.demand_rps == pytest.approx(70.0)  # 40 served + 30/s piling up
    assert demand.stages["infer"].saturated


def test_reflex_never_lowers_rho_below_the_last_target() -> None:
    """Defect 1: strategic set infer to rho 1.0; the telemetry's rho is a window average
    (0.42 two seconds later). The reflex treats the last target as current and never
    removes capacity: no 'rho 0.416667 -> 0.5'."""
    sp = f.spec()
    t, before = onset(sp, q_now=20, rho=0.42)
    applied = current_targets(sp, t, {"infer": 1.0})
    assert {a.stage: a.rho for a in applied}["infer"] == 1.0
    demand, _ = observe(sp, t, before, 2.0, MU1, applied, 30.0)
    d, _ = reflex_check(sp, t, ReflexState(), 2.0, 30.0, MU1, demand=demand, current=applied)
    assert d is None or d.target("infer").rho == 1.0
    # through the policy (validator included): the applied rho lives in the state
    pol = get_policy("sair", config=NO_EXPLORE)
    st = pol.initial_state(sp)
    st = replace(st, inner=replace(st.inner, next_decision_s=30.0, demand=before,
                                   applied=(("infer", 2, 1.0),)),
                 validator=ValidatorState(applied_rho=(("infer", 1.0),)))  # fmt: skip
    d, _ = pol.decide(sp, t, st, 2.0)
    assert d.target("infer").rho == 1.0


def test_reflex_raises_rho_while_its_replicas_start() -> None:
    """The replica cooldown (startup + a tick) must not block a rho increase: rho acts now."""
    sp = f.spec()
    t, before = onset(sp, q_now=60, replicas_starting=1)
    fired = ReflexState((("infer", 1.0),))  # added a replica 1 s ago (startup 10 s)
    demand, _ = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    d, _ = reflex_check(sp, t, fired, 2.0, 30.0, MU1, demand=demand)
    assert d is not None
    infer = d.target("infer")
    # 2 ready + 1 starting = 3 replicas, none added; rho 0.5 -> 1.0 at once
    assert (infer.target_replicas, infer.rho) == (3, 1.0)


def test_reflex_counts_starting_replicas() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp, e2e_p99_ms=450.0)
    t = f.with_stage(t, "pre", replicas_starting=2, queue_depth=30)
    before = DemandState(queues=(("pre", 0.0, 0),), capacities=(("pre", 40.0),))
    # pre: 2 ready x 20 = 40 served, +30 in 2 s: arrival 55; needed 55 / 0.8 + 30 / 2
    # = 83.75 -> 5 replicas: 2 ready + 2 starting are 4 already, so one more (not 5 more)
    mu1 = {"pre": 20.0, "infer": 40.0}
    demand, _ = observe(sp, t, before, 2.0, mu1, current_targets(sp, t), 30.0)
    d, _ = reflex_check(sp, t, ReflexState(), 2.0, 30.0, mu1, demand=demand)
    assert d is not None and d.target("pre").target_replicas == 5


def test_reflex_quiet_without_growth() -> None:
    sp = f.spec()
    d, s = reflex_check(sp, f.telemetry(sp=sp), ReflexState(), 2.0, 30.0, {})
    assert d is None and s == ReflexState()


def test_reflex_ignores_ordinary_queueing() -> None:
    """A few requests waiting at a busy stage, the queue up by 2 in a tick: not a burst."""
    sp = f.spec()
    t, before = onset(sp, q_now=6, q_before=2)
    demand, _ = observe(sp, t, before, 2.0, MU1, current_targets(sp, t), 30.0)
    assert not demand.stages["infer"].saturated and demand.demand_rps == pytest.approx(20.0)
    d, _ = reflex_check(sp, t, ReflexState(), 2.0, 30.0, MU1, demand=demand)
    assert d is None


def test_learn_updates_the_front_and_scores_the_outcome() -> None:
    sp = f.spec()
    r, s = learn(sp, SairState(), Outcome(600, 1.0), Outcome(400, 0.7244), added_capacity=True)
    assert r.total == pytest.approx(2.01)  # see test_reward "improve"
    assert s.front == (r.point,)


def test_scaling_action_from_a_decision() -> None:
    sp, t = overloaded_infer()
    d, _ = strategic_decide(sp, t, SairState(), 0.0, (), NO_EXPLORE)
    msg = to_scaling_action(d, sp.name, "a-1", 12.0, based_on_tick=t.tick)
    assert msg.source == "embedded" and msg.policy == "sair" and msg.action_id == "a-1"
    assert msg.bottleneck == "infer" and "chose" in msg.rationale
    assert [s.stage for s in msg.stages] == ["pre", "infer", "post"]


def settled(**update: object) -> SairState:
    """A policy that has watched the pipeline for a while (window full, no recent change)."""
    return replace(SairState(first_seen_s=-1000.0), **update)  # type: ignore[arg-type]


def idle_pipeline():  # type: ignore[no-untyped-def]
    sp = f.spec()
    t = f.telemetry(sp=sp, e2e_p99_ms=80.0)
    for name in ("pre", "infer", "post"):
        t = f.with_stage(t, name, utilisation=0.1)  # mu1 200 (cpu 100): far too much
    return sp, t


def test_steady_low_load_scales_down_to_a_small_gpu_share() -> None:
    """Defect 5: at a steady low load the strategic step cuts to the cheapest configuration
    that meets the SLO with headroom, with rho < 1 where the GPU has room."""
    sp, t = idle_pipeline()
    d, _ = strategic_decide(sp, t, settled(), 100.0, (), NO_EXPLORE)
    infer = d.target("infer")
    assert infer.target_replicas * (infer.rho or 0.0) < 2 * 0.5
    assert (infer.rho or 1.0) < 1.0
    assert d.target("pre").target_replicas == 1 and not d.hold


def test_strategic_never_cuts_a_stage_whose_queue_grows() -> None:
    """Defect 4: at a burst's onset the window says the load is low (10 rps against 44); a
    stage whose queue is long or growing keeps its capacity."""
    sp, t = idle_pipeline()
    t = f.with_stage(t, "infer", queue_depth=20, queue_growth_per_s=2.0)
    d, _ = strategic_decide(sp, t, settled(), 100.0, (), NO_EXPLORE)
    cur = {a.stage: a for a in current_targets(sp, t)}["infer"]
    infer = d.target("infer")
    assert infer.target_replicas >= cur.target_replicas and (infer.rho or 0) >= (cur.rho or 0)
    assert any("queue growing or long at infer" in r for r in d.rationale)
    assert d.target("pre").target_replicas < 2  # the idle stages still shrink


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    """A demand of 60 rps seen 20 s ago is planned for; 40 s ago it no longer is."""
    sp, t = idle_pipeline()
    recent = settled(demand=DemandState(history=((80.0, 60.0),)))
    held, _ = strategic_decide(sp, t, recent, 100.0, (), NO_EXPLORE)
    assert any("window peak 60.0" in r for r in held.rationale)
    old = settled(demand=DemandState(history=((60.0, 60.0),)))
    cut, _ = strategic_decide(sp, t, old, 100.0, (), NO_EXPLORE)
    assert any("window peak 20.0" in r for r in cut.rationale)
    assert action_cost_per_h(sp, held.targets) > action_cost_per_h(sp, cut.targets)


def test_no_cut_before_the_monitor_window_has_filled() -> None:
    sp, t = idle_pipeline()
    d, _ = strategic_decide(sp, t, SairState(first_seen_s=95.0), 100.0, (), NO_EXPLORE)
    assert d.hold and any("window not yet full" in r for r in d.rationale)


def test_cut_needs_a_clear_margin_hysteresis() -> None:
    """A cut must be predicted under 0.7 x SLO (the planner adds capacity above 0.8)."""
    sp, t = idle_pipeline()
    prep = prepare(sp, t, settled(), (), NO_EXPLORE, now=100.0)
    cur = {a.stage: a for a in prep.current}
    for c in prep.candidates:
        cuts = any(
            a.target_replicas < cur[a.stage].target_replicas
            or (a.rho or 0) < (cur[a.stage].rho or 0)
            for a in c.targets
        )
        if cuts:
            assert c.prediction.p99_ms <= 0.7 * sp.slo_p99_ms


def test_strategic_tick_in_a_burst_is_sized_at_least_like_the_reflex() -> None:
    """A strategic decision due at a burst's onset (video, t = 182) must not size it more
    loosely than the reflex: the reflex runs on top of it and may only add."""
    sp = f.spec()
    t, before = onset(sp, q_now=60)
    pol = SairPolicy(NO_EXPLORE)
    st = replace(pol.initial_state(sp), first_seen_s=-1000.0, demand=before, mu1=tuple(MU1.items()))
    d, _ = pol.decide(sp, t, st, 2.0)
    assert d.source == "embedded"
    infer = d.target("infer")
    assert infer.target_replicas * (infer.rho or 0) * 40.0 >= 117.5 - 1e-9

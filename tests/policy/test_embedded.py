"""Embedded in-context policy, exploration and reflex."""

from __future__ import annotations

import pytest

from schemas.context import encode_context
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
from services.policy.interface import current_targets, to_scaling_action
from services.policy.reflex import ReflexState, reflex_check
from services.policy.reward import Outcome
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


def burst(sp, **infer):  # type: ignore[no-untyped-def]
    t = f.telemetry(sp=sp, e2e_p99_ms=300.0)
    update = {"queue_depth": 300, "queue_growth_per_s": 20.0, "arrival_rate_rps": 40.0}
    update.update(infer)
    return f.with_stage(t, "infer", **update)


def test_reflex_raises_rho_first_when_that_is_enough() -> None:
    sp = f.spec()
    t = burst(sp)
    # extra wait = 1000 x 20/s x (28 s to next + 10 s startup) / 20 rps = 38 s > SLO: fire.
    # needed = 40 + 300 / 30 = 50 rps; 2 x 40 x 0.75 = 60 >= 50: rho 0.5 -> 0.75, no replica
    d, s = reflex_check(sp, t, ReflexState(), 2.0, 30.0, {"infer": 40.0})
    assert d is not None and d.source == "reflex" and d.bottleneck == "infer"
    assert (d.target("infer").target_replicas, d.target("infer").rho) == (2, 0.75)
    # within the cooldown (startup 10 + 2 ticks x 2 = 14 s) it does not fire again
    assert reflex_check(sp, t, s, 10.0, 30.0, {"infer": 40.0})[0] is None
    assert reflex_check(sp, t, s, 16.1, 30.0, {"infer": 40.0})[0] is not None


def test_reflex_adds_replicas_when_rho_is_not_enough() -> None:
    sp = f.spec()
    t = burst(sp, arrival_rate_rps=100.0, queue_depth=0)
    # needed 100 rps; rho 1: 2 x 40 = 80 < 100 -> ceil(100 / 40) = 3 replicas at rho 1
    d, _ = reflex_check(sp, t, ReflexState(), 2.0, 30.0, {"infer": 40.0})
    assert d is not None
    assert (d.target("infer").target_replicas, d.target("infer").rho) == (3, 1.0)


def test_reflex_counts_starting_replicas() -> None:
    sp = f.spec()
    t = f.telemetry(sp=sp, e2e_p99_ms=450.0)
    t = f.with_stage(
        t, "pre", replicas_starting=2, queue_growth_per_s=10.0, queue_depth=30,
        arrival_rate_rps=50.0,
    )
    # needed 50 + 1 = 51 rps; 4 replicas (2 ready + 2 starting) x 20 = 80: nothing to add
    d, _ = reflex_check(sp, t, ReflexState(), 2.0, 30.0, {"pre": 20.0})
    assert d is None


def test_reflex_quiet_without_growth() -> None:
    sp = f.spec()
    d, s = reflex_check(sp, f.telemetry(sp=sp), ReflexState(), 2.0, 30.0, {})
    assert d is None and s == ReflexState()


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

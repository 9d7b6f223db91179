"""Validator: every rule, hand-computed, with the reasons it gives."""

from __future__ import annotations

import pytest

from schemas.messages import StageAction
from services.policy.validator import ValidatorConfig, ValidatorState, clamp, snap_rho, validate
from tests.policy import factories as f

# current scale of factories.telemetry(): pre 2, infer 2 @ 0.5, post 2
CURRENT = (
    StageAction(stage="pre", target_replicas=2),
    StageAction(stage="infer", target_replicas=2, rho=0.5),
    StageAction(stage="post", target_replicas=2),
)


def act(pre: int = 2, infer: int = 2, rho: float | None = 0.5, post: int = 2) -> list[StageAction]:
    return [
        StageAction(stage="pre", target_replicas=pre),
        StageAction(stage="infer", target_replicas=infer, rho=rho),
        StageAction(stage="post", target_replicas=post),
    ]


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        (0.6, 0.5),  # |0.6-0.5| = 0.1 < |0.75-0.6| = 0.15
        (0.63, 0.75),  # 0.13 vs 0.12
        (0.625, 0.75),  # tie: the larger share (safer for latency)
        (0.1, 0.25),  # below the grid
        (1.0, 1.0),
    ],
    ids=["down", "up", "tie-goes-up", "below-grid", "on-grid"],
)
def test_snap_rho(rho: float, expected: float) -> None:
    assert snap_rho(f.spec().stage("infer"), rho) == expected


@pytest.mark.parametrize(
    ("proposed", "expected_pre", "reason_part"),
    [
        # step: 2 -> 7 exceeds max_step 2: 2 + 2 = 4
        (act(pre=7), 4, "limited to 2->4"),
        # step allows 0 (2 - 2) but the bound min_replicas = 1 wins
        (act(pre=0), 1, "clamped to 1"),
        (act(pre=3), 3, None),
    ],
    ids=["step-up", "bounds-win-over-step", "within-everything"],
)
def test_step_and_bounds(
    proposed: list[StageAction], expected_pre: int, reason_part: str | None
) -> None:
    targets, reasons = clamp(f.spec(), proposed, CURRENT)
    assert targets[0].target_replicas == expected_pre
    if reason_part is None:
        assert reasons == []
    else:
        assert any(reason_part in r for r in reasons), reasons


def test_bounds_apply_from_a_current_count_above_max() -> None:
    cur = (CURRENT[0].model_copy(update={"target_replicas": 12}), *CURRENT[1:])
    # step from 12 allows [10, 14]; max_replicas 8 wins
    targets, reasons = clamp(f.spec(), act(pre=14), cur)
    assert targets[0].target_replicas == 8
    assert any("clamped to 8" in r for r in reasons)


def test_missing_stage_is_held_and_cpu_rho_dropped() -> None:
    proposed = [StageAction(stage="pre", target_replicas=3, rho=0.5)]
    targets, reasons = clamp(f.spec(), proposed, CURRENT)
    assert targets[0] == StageAction(stage="pre", target_replicas=3)
    assert targets[1] == CURRENT[1] and targets[2] == CURRENT[2]
    assert any("rho=0.5 ignored on a cpu stage" in r for r in reasons)
    assert any("infer: missing from the action" in r for r in reasons)


def test_gpu_rho_none_keeps_the_current_share() -> None:
    targets, _ = clamp(f.spec(), act(infer=3, rho=None), CURRENT)
    assert targets[1].rho == 0.5


def test_cost_budget_undoes_the_most_expensive_increases_first() -> None:
    # current: 4 cpu x 0.0385 + 2 gpu x (0.0385 + 0.5 x 0.79) = 0.154 + 0.867 = 1.021 $/h
    # proposed pre 3, infer 4: + 0.0385 + 2 x 0.4335 = 1.9265 > 1.1
    # undo infer 4 -> 3 (saves 0.4335): 1.493; infer 3 -> 2: 1.0595 <= 1.1, stop
    sp = f.spec(cost_budget_per_h=1.1)
    targets, reasons = clamp(sp, act(pre=3, infer=4), CURRENT)
    assert [a.target_replicas for a in targets] == [3, 2, 2]
    assert any("over budget" in r for r in reasons)


def test_cost_budget_does_not_force_cuts_below_current() -> None:
    sp = f.spec(cost_budget_per_h=0.5)  # current 1.021 is already over
    targets, reasons = clamp(sp, act(pre=3), CURRENT)
    assert [a.target_replicas for a in targets] == [2, 2, 2]
    assert any("no forced cut" in r for r in reasons)


@pytest.mark.parametrize(
    ("now", "breaking", "expected_pre"),
    [
        (30.0, False, 2),  # 30 s after scaling up, a scale-down is a reversal: held
        (61.0, False, 1),  # past the 60 s cooldown (2 x 30 s control interval): allowed
        # SLO breaking does not let capacity go: after a burst the windowed P99 stays high
        # while the load is already gone, and that is exactly when a policy flaps
        (30.0, True, 2),
    ],
    ids=["reversal-held", "after-cooldown", "slo-breaking-still-holds-a-cut"],
)
def test_anti_flapping(now: float, breaking: bool, expected_pre: int) -> None:
    sp = f.spec()
    # at t = 0 pre went 1 -> 3 (up)
    was = (CURRENT[0].model_copy(update={"target_replicas": 1}), *CURRENT[1:])
    _, _, state = validate(sp, act(pre=3), was, ValidatorState(), 0.0, slo_breaking=False)
    last = state.last("pre")
    assert last is not None and last.replica_dir == 1
    targets, reasons, _ = validate(sp, act(pre=1), CURRENT, state, now, slo_breaking=breaking)
    assert targets[0].target_replicas == expected_pre
    assert any("reversal" in r for r in reasons) == (expected_pre == 2)


def test_an_increase_that_reverses_a_cut_always_passes() -> None:
    """Holding a scale-up because it reverses a recent cut keeps a mistake in place (seen on
    a ramp: rho cut at t = 78, the raise at t = 108 held, the queue built up)."""
    sp = f.spec()
    was = (CURRENT[0].model_copy(update={"target_replicas": 3}), *CURRENT[1:])
    _, _, state = validate(sp, act(pre=2), was, ValidatorState(), 0.0, slo_breaking=False)
    up, reasons, _ = validate(sp, act(pre=4), CURRENT, state, 10.0, slo_breaking=False)
    assert up[0].target_replicas == 4 and not any("reversal" in r for r in reasons)


def test_replica_step_does_not_reset_a_rho_reversal_clock() -> None:
    sp = f.spec()
    # t = 0: rho 0.5 -> 0.75 (up); t = 50: replicas 2 -> 3 (rho unchanged)
    _, _, s = validate(sp, act(rho=0.75), CURRENT, ValidatorState(), 0.0, slo_breaking=False)
    cur = (CURRENT[0], CURRENT[1].model_copy(update={"rho": 0.75}), CURRENT[2])
    _, _, s = validate(sp, act(infer=3, rho=0.75), cur, s, 50.0, slo_breaking=False)
    last = s.last("infer")
    assert last is not None and last.rho_dir == 1 and last.rho_ts_s == 0.0
    cur = (CURRENT[0], CURRENT[1].model_copy(update={"target_replicas": 3, "rho": 0.75}),
           CURRENT[2])  # fmt: skip
    # t = 61: rho down is 61 s after the rho went up: allowed on its own
    out, reasons, _ = validate(sp, act(infer=3, rho=0.5), cur, s, 61.0, slo_breaking=False)
    assert (out[1].target_replicas, out[1].rho) == (3, 0.5) and reasons == []
    # with the replicas cut too (11 s after they went up): the stage is held as a whole
    out, reasons, _ = validate(sp, act(infer=2, rho=0.5), cur, s, 61.0, slo_breaking=False)
    assert (out[1].target_replicas, out[1].rho) == (3, 0.75)
    assert any("infer: reversal 3->2 held" in r for r in reasons)
    assert any("infer: held as a whole" in r for r in reasons)


def test_wrapped_policy_holds_the_last_target_not_the_window_average() -> None:
    """Defect 3: the telemetry's rho is a window average (0.6 between 0.5 and 0.75 after a
    change); a policy that only changes replicas must keep the rho last applied, on the grid."""
    from services.policy.interface import Decision
    from services.policy.validator import Validated, ValidatedPolicy

    sp = f.spec()

    class OnlyReplicas:
        name = "only-replicas"
        is_baseline = False

        def decide(self, spec, telemetry, state, now, retrieved=()):  # type: ignore[no-untyped-def]
            targets = act(pre=3, rho=None)
            return Decision(targets=tuple(targets), source="embedded", policy=self.name), state

    pol: ValidatedPolicy[None] = ValidatedPolicy(OnlyReplicas())  # type: ignore[arg-type]
    t = f.with_stage(f.telemetry(sp=sp), "infer", rho=0.6)  # mid-way average
    state = Validated(None, ValidatorState(applied_rho=(("infer", 0.75),)))
    d, s = pol.decide(sp, t, state, 100.0)
    assert d.target("infer").rho == 0.75 and d.target("pre").target_replicas == 3
    assert not any("snapped" in r for r in d.validator_reasons)
    # no applied value yet: the average is snapped to the grid, never emitted as is
    d, s = pol.decide(sp, t, Validated(None, ValidatorState()), 100.0)
    assert d.target("infer").rho == 0.5
    assert s.validator.applied() == {"infer": 0.5}


def test_bounds_only_guardrails_skip_step_and_budget() -> None:
    sp = f.spec(cost_budget_per_h=0.5)
    targets, _, _ = validate(
        sp, act(pre=7), CURRENT, ValidatorState(), 0.0, slo_breaking=False,
        config=ValidatorConfig(guardrails="bounds"),
    )
    assert targets[0].target_replicas == 7

"""guard: every rule, one scenario per row, just inside and just outside each limit."""

from __future__ import annotations

import pytest

from services.actuator.guard import CurrentStage, guard, snap_rho
from tests.actuator.factories import make_action, make_spec, sa

SPEC = make_spec("guarded")
# pre: 1..8, step 2; infer: gpu 1..4, step 1, grid .25/.5/.75/1, initial_rho .5; post: 0..6, step 2

CASES = [
    # id, requested, current, expected (stage, replicas, rho), reason fragments
    ("within-limits", sa("pre", 3), {"pre": CurrentStage(2)}, ("pre", 3, None), []),
    ("step-just-inside", sa("pre", 4), {"pre": CurrentStage(2)}, ("pre", 4, None), []),
    # 2 -> 5 is a step of 3 > max_step 2: limited to 2 + 2 = 4
    ("step-just-outside", sa("pre", 5), {"pre": CurrentStage(2)}, ("pre", 4, None), ["max_step=2"]),
    ("step-down", sa("pre", 1), {"pre": CurrentStage(6)}, ("pre", 4, None), ["6 -> 1"]),
    # 9 > max 8: clamped to 8, then 8 is 2 away from 6: allowed
    (
        "above-max",
        sa("pre", 9),
        {"pre": CurrentStage(6)},
        ("pre", 8, None),
        ["above max_replicas=8"],
    ),
    ("at-max", sa("pre", 8), {"pre": CurrentStage(6)}, ("pre", 8, None), []),
    (
        "below-min",
        sa("pre", 0),
        {"pre": CurrentStage(1)},
        ("pre", 1, None),
        ["below min_replicas=1"],
    ),
    ("scale-to-zero-allowed", sa("post", 0), {"post": CurrentStage(1)}, ("post", 0, None), []),
    # nothing known: the step is measured from initial_replicas=1, so 1 + 2 = 3
    ("no-current-uses-initial", sa("pre", 7), {}, ("pre", 3, None), ["1 -> 7"]),
    # current 12 is out of bounds (spec changed): step gives 10, bounds win with 8
    (
        "bounds-win-over-step",
        sa("pre", 12),
        {"pre": CurrentStage(12)},
        ("pre", 8, None),
        ["above max_replicas=8"],
    ),
    ("rho-on-grid", sa("infer", 2, 0.75), {"infer": CurrentStage(1, 0.5)}, ("infer", 2, 0.75), []),
    (
        "rho-float-noise",
        sa("infer", 1, 0.7500000000001),
        {"infer": CurrentStage(1, 0.5)},
        ("infer", 1, 0.75),
        [],
    ),
    (
        "rho-snapped",
        sa("infer", 1, 0.6),
        {"infer": CurrentStage(1, 0.5)},
        ("infer", 1, 0.5),
        ["rho=0.6 is not on rho_grid"],
    ),
    # 0.625 is halfway between 0.5 and 0.75: ties go to the lower share
    (
        "rho-tie-goes-lower",
        sa("infer", 1, 0.625),
        {"infer": CurrentStage(1, 0.5)},
        ("infer", 1, 0.5),
        ["snapped to 0.5"],
    ),
    ("rho-zero-snaps-up", sa("infer", 1, 0.0), {}, ("infer", 1, 0.25), ["snapped to 0.25"]),
    (
        "rho-kept-from-current",
        sa("infer", 2),
        {"infer": CurrentStage(1, 0.75)},
        ("infer", 2, 0.75),
        [],
    ),
    ("rho-from-initial", sa("infer", 2), {}, ("infer", 2, 0.5), []),
    (
        "rho-on-cpu-ignored",
        sa("pre", 2, 0.5),
        {"pre": CurrentStage(2)},
        ("pre", 2, None),
        ["cpu stage has no GPU share"],
    ),
]


@pytest.mark.parametrize(
    ("requested", "current", "expected", "fragments"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_guard_rules(requested, current, expected, fragments) -> None:  # type: ignore[no-untyped-def]
    result = guard(SPEC, make_action(SPEC, requested), current)
    assert not result.rejected
    (stage,) = result.stages
    assert (stage.stage, stage.target_replicas, stage.rho) == expected
    joined = " | ".join(result.reasons)
    for fragment in fragments:
        assert fragment in joined
    assert result.clamped == bool(fragments)
    if not fragments:
        assert result.reasons == ()


def test_unknown_stage_is_dropped_with_a_reason_and_the_rest_applies() -> None:
    result = guard(SPEC, make_action(SPEC, sa("pre", 2), sa("decode", 3)), {})
    assert [s.stage for s in result.stages] == ["pre"]
    assert any("'decode': not in pipeline 'guarded'" in r for r in result.reasons)
    assert result.clamped


def test_only_unknown_stages_is_rejected() -> None:
    result = guard(SPEC, make_action(SPEC, sa("decode", 3)), {})
    assert result.rejected and result.stages == ()
    assert "no stage of the action can be applied" in result.reasons


def test_action_for_another_pipeline_is_rejected() -> None:
    other = make_spec("other")
    result = guard(SPEC, make_action(other, sa("pre", 2)), {})
    assert result.rejected
    assert "'other'" in result.reasons[0]


def test_snap_rho_nearest_point() -> None:
    stage = SPEC.stage("infer")
    assert snap_rho(stage, 0.9)[0] == 1.0
    assert snap_rho(stage, 0.3)[0] == 0.25
    assert snap_rho(stage, 1.0) == (1.0, None)

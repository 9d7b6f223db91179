"""Re-check an action against the pipeline spec before it touches anything (pure, no I/O).

The actuator never trusts its input, whatever validated it before: the policy's validator may
be another team's, an old version, or a person on the command line. Each rule that changes the
action says so in a reason; the reasons end up in `ActionResult.reasons`.

Rules, in the order they apply to each stage of the action:
1. the stage must exist in the spec (else it is dropped);
2. bounds: `min_replicas <= target <= max_replicas`;
3. step: `|target - current| <= max_step`, measured from the stage's current replicas (the
   backend's desired state; `initial_replicas` when nothing is known yet);
4. bounds again, because they are hard limits and win over the step rule when the current count
   is itself out of bounds (the spec changed since);
5. rho: only GPU stages have one; it is snapped to the nearest point of `rho_grid` (ties go to
   the lower share); when the action leaves it out, the current rho is kept and written out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.messages import ScalingAction, StageAction
from schemas.pipeline import PipelineSpec, StageSpec

RHO_TOLERANCE = 1e-9
"""A rho this close to a grid point is on the grid (floats from JSON are not exact)."""


@dataclass(frozen=True)
class CurrentStage:
    """What the backend holds for a stage now; None where it does not know."""

    replicas: int | None = None
    rho: float | None = None


@dataclass(frozen=True)
class GuardResult:
    stages: tuple[StageAction, ...]
    """What may be applied: every surviving stage, clamped, with its effective rho."""
    reasons: tuple[str, ...]
    """One line per rule that changed or dropped something."""
    rejected: bool
    """Nothing can be applied (wrong pipeline, no known stage)."""

    @property
    def clamped(self) -> bool:
        return bool(self.reasons) and not self.rejected


def clamp_to_bounds(stage: StageSpec, target: int) -> tuple[int, str | None]:
    """Target within [min_replicas, max_replicas], and why it moved."""
    if target < stage.min_replicas:
        return stage.min_replicas, (
            f"stage {stage.name!r}: target_replicas={target} below min_replicas="
            f"{stage.min_replicas}, clamped to {stage.min_replicas}"
        )
    if target > stage.max_replicas:
        return stage.max_replicas, (
            f"stage {stage.name!r}: target_replicas={target} above max_replicas="
            f"{stage.max_replicas}, clamped to {stage.max_replicas}"
        )
    return target, None


def limit_step(stage: StageSpec, current: int, target: int) -> tuple[int, str | None]:
    """Target at most max_step away from current, and why it moved."""
    step = target - current
    if abs(step) <= stage.max_step:
        return target, None
    limited = current + stage.max_step if step > 0 else current - stage.max_step
    return limited, (
        f"stage {stage.name!r}: change {current} -> {target} exceeds max_step="
        f"{stage.max_step}, limited to {limited}"
    )


def snap_rho(stage: StageSpec, rho: float) -> tuple[float, str | None]:
    """Nearest point of the stage's rho grid (ties to the lower share), and why it moved."""
    grid = stage.rho_grid
    nearest = min(grid, key=lambda g: (abs(g - rho), g))
    if abs(nearest - rho) <= RHO_TOLERANCE:
        return nearest, None
    return nearest, (
        f"stage {stage.name!r}: rho={rho} is not on rho_grid {grid}, snapped to {nearest}"
    )


def baseline_replicas(stage: StageSpec, current: CurrentStage | None) -> int:
    """The count the step limit is measured from: the current one, else initial_replicas
    (what a supervisor starts when no desired state exists)."""
    if current is not None and current.replicas is not None:
        return current.replicas
    return stage.initial_replicas


def guard_stage(
    stage: StageSpec, requested: StageAction, current: CurrentStage | None
) -> tuple[StageAction, list[str]]:
    """One stage through rules 2-5."""
    reasons: list[str] = []
    base = baseline_replicas(stage, current)
    target, why = clamp_to_bounds(stage, requested.target_replicas)
    if why:
        reasons.append(why)
    target, why = limit_step(stage, base, target)
    if why:
        reasons.append(why)
    bounded, why = clamp_to_bounds(stage, target)
    if why and bounded != target:
        # Only possible when the current count is out of bounds: bounds win over the step.
        reasons.append(why.replace("target_replicas", "step-limited target"))
    target = bounded

    rho: float | None = None
    if stage.kind == "gpu":
        wanted = requested.rho
        if wanted is None:
            wanted = current.rho if current is not None and current.rho is not None else None
        if wanted is None:
            # A gpu stage's grid is never empty (the spec checks it), so this is its start rho.
            wanted = stage.start_rho if stage.start_rho is not None else stage.rho_grid[-1]
        rho, why = snap_rho(stage, wanted)
        if why:
            reasons.append(why)
    elif requested.rho is not None:
        reasons.append(
            f"stage {stage.name!r}: cpu stage has no GPU share, rho={requested.rho} ignored"
        )
    return StageAction(stage=stage.name, target_replicas=target, rho=rho), reasons


def guard(
    spec: PipelineSpec, action: ScalingAction, current: Mapping[str, CurrentStage]
) -> GuardResult:
    """Clamp `action` to what `spec` allows, given the `current` state per stage name."""
    if action.pipeline != spec.name:
        return GuardResult(
            (),
            (f"action is for pipeline {action.pipeline!r}, this spec is {spec.name!r}",),
            rejected=True,
        )
    known = set(spec.stage_names)
    stages: list[StageAction] = []
    reasons: list[str] = []
    for requested in action.stages:
        if requested.stage not in known:
            reasons.append(
                f"stage {requested.stage!r}: not in pipeline {spec.name!r} "
                f"(stages: {', '.join(spec.stage_names)}), dropped"
            )
            continue
        clamped, why = guard_stage(
            spec.stage(requested.stage), requested, current.get(requested.stage)
        )
        stages.append(clamped)
        reasons.extend(why)
    if not stages:
        reasons.append("no stage of the action can be applied")
        return GuardResult((), tuple(reasons), rejected=True)
    return GuardResult(tuple(stages), tuple(reasons), rejected=False)

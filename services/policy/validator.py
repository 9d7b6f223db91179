"""The validator: every action, whatever its source, is clamped here, and every clamp says why.

Rules, per stage, in this order (each one that changes something adds a reason):
1. missing  - a stage the action leaves out keeps its current target;
2. rho      - CPU stages carry no rho; a GPU stage's rho snaps to the nearest grid value
              (None means "keep the current share");
3. step     - |target - current| <= stage.max_step;
4. bounds   - min_replicas <= target <= max_replicas (wins over the step limit);
5. flapping - a cut (fewer replicas, lower rho) less than `flap_cooldown_s` after an
              increase of the same dimension is held back, with the stage's other dimension
              (a stage's replicas and rho are one configuration). Whether the SLO is
              breaking does not matter: after a burst the telemetry's P99 stays high for a
              window while the load is gone, exactly when a policy flaps. An increase that
              reverses a recent cut always passes: it corrects a mistake;
6. budget   - if the action's effective cost exceeds `cost_budget_per_h`, the increases are
              undone one unit at a time (most expensive replica first, then rho grid steps)
              until it fits; a configuration already over budget is not forced down (that
              could break the SLO), only kept from growing, and that is reported.

Baselines are wrapped with `guardrails="bounds"`: rules 1, 2 and 4 only, what a real
deployment's min/max and the GPU grid impose; SAIR's own step limit, damping and budget would
distort them. Pure: the state (last change per stage, and the rho last applied per GPU
stage) is passed in and returned. "Current" is the last target, not the telemetry's rho: that
is a window average, off the grid after a change, and emitting it would move the share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageAction
from schemas.pipeline import PipelineSpec, StageSpec

from .interface import Decision, Policy, current_targets, same_targets

S = TypeVar("S")
Guardrails = Literal["full", "bounds"]


@dataclass(frozen=True)
class LastChange:
    stage: str
    ts_s: float
    replica_dir: int
    """+1 up, -1 down, 0 never changed."""
    rho_dir: int
    replica_ts_s: float | None = None
    """When the replicas last moved (in `replica_dir`); None: never."""
    rho_ts_s: float | None = None


@dataclass(frozen=True)
class ValidatorState:
    last_changes: tuple[LastChange, ...] = ()
    applied_rho: tuple[tuple[str, float], ...] = ()
    """The rho of every GPU stage in the last action that went out."""

    def last(self, stage: str) -> LastChange | None:
        for c in self.last_changes:
            if c.stage == stage:
                return c
        return None

    def applied(self) -> dict[str, float | None]:
        return dict(self.applied_rho)


@dataclass(frozen=True)
class ValidatorConfig:
    guardrails: Guardrails = "full"
    flap_cooldown_s: float | None = None
    """None: twice the pipeline's control interval."""


def snap_rho(stage: StageSpec, rho: float) -> float:
    """Nearest grid value (ties go to the larger share: the safer side for latency)."""
    return min(stage.rho_grid, key=lambda g: (abs(g - rho), -g))


def _sign(x: float) -> int:
    return (x > 1e-12) - (x < -1e-12)


def action_cost_per_h(spec: PipelineSpec, targets: Sequence[StageAction]) -> float:
    by = {a.stage: a for a in targets}
    return sum(
        by[st.name].target_replicas * spec.replica_cost_per_h(st, by[st.name].rho)
        for st in spec.stages
    )


def clamp(
    spec: PipelineSpec,
    proposed: Sequence[StageAction],
    current: Sequence[StageAction],
    *,
    guardrails: Guardrails = "full",
) -> tuple[tuple[StageAction, ...], list[str]]:
    """Rules 1-4 and 6 (no history needed): missing, rho, step, bounds, budget."""
    reasons: list[str] = []
    prop = {a.stage: a for a in proposed}
    cur = {a.stage: a for a in current}
    for name in prop:
        if name not in cur:
            reasons.append(f"{name}: not a stage of {spec.name!r}, ignored")
    out: list[StageAction] = []
    for st in spec.stages:
        c = cur[st.name]
        a = prop.get(st.name)
        if a is None:
            reasons.append(f"{st.name}: missing from the action, held at {c.target_replicas}")
            out.append(c)
            continue
        n = a.target_replicas
        rho = a.rho
        if st.kind == "cpu":
            if rho is not None:
                reasons.append(f"{st.name}: rho={rho} ignored on a cpu stage")
            rho = None
        else:
            if rho is None:
                rho = c.rho if c.rho is not None else st.start_rho
            assert rho is not None  # a GPU stage always has a grid (spec validation)
            snapped = snap_rho(st, rho)
            if snapped != rho:
                reasons.append(f"{st.name}: rho {rho:g} snapped to grid value {snapped:g}")
            rho = snapped
        if guardrails == "full":
            lo, hi = c.target_replicas - st.max_step, c.target_replicas + st.max_step
            if n > hi or n < lo:
                step_n = min(max(n, lo), hi)
                reasons.append(
                    f"{st.name}: step {c.target_replicas}->{n} limited to "
                    f"{c.target_replicas}->{step_n} (max_step {st.max_step})"
                )
                n = step_n
        if n < st.min_replicas or n > st.max_replicas:
            bounded = min(max(n, st.min_replicas), st.max_replicas)
            reasons.append(
                f"{st.name}: {n} replicas clamped to {bounded} "
                f"(bounds [{st.min_replicas}, {st.max_replicas}])"
            )
            n = bounded
        out.append(StageAction(stage=st.name, target_replicas=n, rho=rho))
    targets = tuple(out)
    if guardrails == "full" and spec.cost_budget_per_h is not None:
        targets, budget_reasons = _fit_budget(spec, targets, current)
        reasons.extend(budget_reasons)
    return targets, reasons


def _fit_budget(
    spec: PipelineSpec, targets: tuple[StageAction, ...], current: Sequence[StageAction]
) -> tuple[tuple[StageAction, ...], list[str]]:
    budget = spec.cost_budget_per_h
    assert budget is not None
    cost = action_cost_per_h(spec, targets)
    if cost <= budget + 1e-12:
        return targets, []
    reasons = [f"cost ${cost:.3f}/h over budget ${budget:.3f}/h"]
    cur = {a.stage: a for a in current}
    work = {a.stage: a for a in targets}
    while action_cost_per_h(spec, tuple(work.values())) > budget + 1e-12:
        # Undo one unit of increase: the most expensive added replica first, then rho steps.
        best: tuple[float, str, StageAction] | None = None
        for st in spec.stages:
            a, c = work[st.name], cur[st.name]
            if a.target_replicas > c.target_replicas:
                saving = spec.replica_cost_per_h(st, a.rho)
                cand = replace_action(a, target_replicas=a.target_replicas - 1)
                if best is None or saving > best[0]:
                    best = (saving, st.name, cand)
        if best is None:
            for st in spec.stages:
                a, c = work[st.name], cur[st.name]
                if st.kind == "gpu" and a.rho is not None and c.rho is not None and a.rho > c.rho:
                    lower = [g for g in st.rho_grid if g < a.rho]
                    cand = replace_action(a, rho=lower[-1] if lower else c.rho)
                    saving = a.target_replicas * (a.rho - (cand.rho or 0.0)) * spec.prices.gpu_per_h
                    if best is None or saving > best[0]:
                        best = (saving, st.name, cand)
        if best is None:
            reasons.append("over budget even without increases: none left, no forced cut")
            break
        work[best[1]] = best[2]
    out = tuple(work[st.name] for st in spec.stages)
    for a, b in zip(targets, out, strict=True):
        if a != b:
            reasons.append(
                f"{a.stage}: budget cut {a.target_replicas}@{a.rho} -> {b.target_replicas}@{b.rho}"
            )
    return out, reasons


def replace_action(a: StageAction, **changes: Any) -> StageAction:
    data = a.model_dump()
    data.update(changes)
    return StageAction.model_validate(data)


def validate(
    spec: PipelineSpec,
    proposed: Sequence[StageAction],
    current: Sequence[StageAction],
    state: ValidatorState,
    now: float,
    *,
    slo_breaking: bool = False,
    config: ValidatorConfig = ValidatorConfig(),
) -> tuple[tuple[StageAction, ...], list[str], ValidatorState]:
    """All six rules; returns the clamped targets, every reason, and the new state.

    `slo_breaking` no longer changes any rule (rule 5 holds cuts whatever the SLO does, and
    never holds increases); it is kept for callers and tells the reasons."""
    targets, reasons = clamp(spec, proposed, current, guardrails=config.guardrails)
    cur = {a.stage: a for a in current}
    if config.guardrails == "full":
        cooldown = (
            2.0 * spec.control_interval_s
            if config.flap_cooldown_s is None
            else config.flap_cooldown_s
        )
        damped: list[StageAction] = []
        for a in targets:
            c = cur[a.stage]
            last = state.last(a.stage)
            rdir = _sign(a.target_replicas - c.target_replicas)
            pdir = _sign((a.rho or 0.0) - (c.rho or 0.0))
            if last is not None:
                # Only a cut that reverses a recent increase is held: that is the half of
                # a flap that hurts (after a burst the load has gone, the telemetry's P99 is
                # still high). An increase that reverses a recent cut corrects a mistake and
                # always passes.
                r_age = now - (last.replica_ts_s if last.replica_ts_s is not None else last.ts_s)
                p_age = now - (last.rho_ts_s if last.rho_ts_s is not None else last.ts_s)
                held_r = rdir < 0 and last.replica_dir > 0 and r_age < cooldown
                held_p = pdir < 0 and last.rho_dir > 0 and p_age < cooldown
                if held_r:
                    reasons.append(
                        f"{a.stage}: reversal {c.target_replicas}->{a.target_replicas} held "
                        f"({r_age:.0f} s after the last change < cooldown {cooldown:.0f} s)"
                    )
                if held_p:
                    reasons.append(
                        f"{a.stage}: rho reversal {c.rho}->{a.rho} held "
                        f"({p_age:.0f} s < cooldown {cooldown:.0f} s)"
                    )
                if (held_r or held_p) and slo_breaking:
                    reasons.append(f"{a.stage}: held although the SLO is breaking")
                if held_r or held_p:
                    # A stage's (replicas, rho) is one configuration: holding half of a
                    # trade (fewer replicas at a higher rho) would apply one nobody chose.
                    if (held_r and pdir != 0) or (held_p and rdir != 0):
                        reasons.append(f"{a.stage}: held as a whole")
                    a = replace_action(a, target_replicas=c.target_replicas, rho=c.rho)
            damped.append(a)
        targets = tuple(damped)
    changes = {c.stage: c for c in state.last_changes}
    for a in targets:
        c = cur[a.stage]
        rdir = _sign(a.target_replicas - c.target_replicas)
        pdir = _sign((a.rho or 0.0) - (c.rho or 0.0))
        if rdir or pdir:
            last = changes.get(a.stage)
            # Each dimension keeps its own direction and time: a replica step does not
            # restart (or clear) the clock of a rho reversal, and vice versa.
            changes[a.stage] = LastChange(
                a.stage,
                now,
                rdir if rdir else (last.replica_dir if last is not None else 0),
                pdir if pdir else (last.rho_dir if last is not None else 0),
                now if rdir else (last.replica_ts_s if last is not None else None),
                now if pdir else (last.rho_ts_s if last is not None else None),
            )
    applied = dict(state.applied_rho)
    for a in targets:
        if a.rho is not None:
            applied[a.stage] = a.rho
    new_state = ValidatorState(
        tuple(changes[k] for k in sorted(changes)), tuple(sorted(applied.items()))
    )
    return targets, reasons, new_state


def slo_breaking(spec: PipelineSpec, telemetry: PipelineTelemetry) -> bool:
    return telemetry.e2e_p99_ms is not None and telemetry.e2e_p99_ms > spec.slo_p99_ms


# --------------------------------------------------------------------------- wrapper


@dataclass(frozen=True)
class Validated(Generic[S]):
    inner: S
    validator: ValidatorState = field(default_factory=ValidatorState)


class ValidatedPolicy(Generic[S]):
    """A policy whose every decision goes through `validate`."""

    def __init__(self, inner: Policy[S], config: ValidatorConfig | None = None) -> None:
        self.inner = inner
        if config is None:
            is_baseline = getattr(inner, "is_baseline", False)
            config = ValidatorConfig(guardrails="bounds" if is_baseline else "full")
        self.config = config
        self.name = inner.name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> Validated[S]:
        return Validated(self.inner.initial_state(spec, seed))

    def period_s(self, spec: PipelineSpec) -> float:
        return self.inner.period_s(spec)

    def wants_retrieval(self, spec: PipelineSpec, state: Validated[S], now: float) -> bool:
        return self.inner.wants_retrieval(spec, state.inner, now)

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: Validated[S],
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, Validated[S]]:
        decision, inner = self.inner.decide(spec, telemetry, state.inner, now, retrieved)
        return self.check(spec, telemetry, decision, Validated(inner, state.validator), now)

    def check(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        decision: Decision,
        state: Validated[S],
        now: float,
    ) -> tuple[Decision, Validated[S]]:
        current = current_targets(spec, telemetry, state.validator.applied())
        if decision.hold:
            # Nothing to apply: the targets are the present scale as this validator knows it.
            return replace(decision, targets=current), state
        breaking = slo_breaking(spec, telemetry) or decision.source == "reflex"
        targets, reasons, vstate = validate(
            spec, decision.targets, current, state.validator, now,
            slo_breaking=breaking, config=self.config,
        )
        hold = same_targets(targets, current)
        out = replace(
            decision,
            targets=targets,
            validator_reasons=decision.validator_reasons + tuple(reasons),
            hold=hold,
        )
        inner = state.inner
        note = getattr(self.inner, "note_applied", None)
        if note is not None:
            # Tell the policy what actually went out (the validator may have clamped or
            # held what it proposed).
            inner = note(inner, targets, now, current)
        return out, Validated(inner, vstate)

"""The policy interface: one pure `decide` for SAIR, the LLM policy and every baseline.

    decide(spec, telemetry, state, now, retrieved=()) -> (Decision, new_state)

- Pure: no I/O (except the LLM policy's one call, injected as a client), no clock (`now` is a
  parameter), no state kept on the object; `state` is a frozen dataclass passed in and returned.
- Called every monitor tick. Each policy gates itself by its own period (HPA 15 s, KEDA 30 s,
  SAIR's strategic decision every `control_interval_s`, its reflex every tick) and returns a
  `Decision` with `hold=True` when it has nothing to do.
- `wants_retrieval(spec, state, now)` tells the caller whether the next `decide` is a strategic
  one, so that the retriever is asked only then.
- `get_policy(name)` builds a policy by name; by default it is wrapped in the validator
  (`services/policy/validator.py`), so every action, whatever its source, is clamped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from schemas.common import MAX_TEXT_CHARS
from schemas.messages import (
    ActionSource,
    PipelineTelemetry,
    RetrievedEpisode,
    ScalingAction,
    StageAction,
    StageMetrics,
)
from schemas.pipeline import PipelineSpec, StageSpec

S = TypeVar("S")

POLICY_NAMES = ("static", "hpa", "vpa", "threshold", "keda", "kpa", "ray", "sair", "llm")


@dataclass(frozen=True)
class LLMCall:
    """What one LLM call cost and returned (recorded per call, whether used or not)."""

    model: str
    latency_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_chars: int = 0
    ok: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Decision:
    """A policy's decision: full per-stage targets (current values where nothing changes)."""

    targets: tuple[StageAction, ...]
    source: ActionSource
    policy: str
    rationale: tuple[str, ...] = ()
    """The rules that fired, in order (tolerance, clamp, delay pending, cooldown, ...)."""
    hold: bool = False
    """True when the targets equal the current state: nothing to apply."""
    bottleneck: str | None = None
    predicted_p99_ms: float | None = None
    predicted_reward: float | None = None
    fallback_reason: str | None = None
    validator_reasons: tuple[str, ...] = ()
    llm: LLMCall | None = None

    def target(self, stage: str) -> StageAction:
        for a in self.targets:
            if a.stage == stage:
                return a
        raise KeyError(f"stage {stage!r} not in decision")


class Policy(Protocol[S]):
    """A scaling policy (SAIR, LLM or a baseline) behind one pure interface."""

    name: str

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> S: ...

    def period_s(self, spec: PipelineSpec) -> float:
        """How often the policy itself evaluates (the caller may call decide more often)."""
        ...

    def wants_retrieval(self, spec: PipelineSpec, state: S, now: float) -> bool: ...

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: S,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, S]: ...


# --------------------------------------------------------------------------- helpers


def stage_metrics(telemetry: PipelineTelemetry, stage: str) -> StageMetrics | None:
    for m in telemetry.stages:
        if m.stage == stage:
            return m
    return None


def current_replicas(m: StageMetrics | None, stage: StageSpec) -> int:
    """The replica count the stage is scaled to now: desired if known, else ready + starting."""
    if m is None:
        return stage.initial_replicas
    if m.replicas_desired is not None:
        return m.replicas_desired
    return m.replicas_ready + m.replicas_starting


def current_rho(
    m: StageMetrics | None, stage: StageSpec, applied: float | None = None
) -> float | None:
    """The GPU share the stage is set to: the last target applied when known (a grid value),
    else the telemetry's rho snapped to the grid. Telemetry's rho is a window average (after
    a change it lies between the old and the new value): a measurement, never a target."""
    if stage.kind != "gpu":
        return None
    if applied is not None:
        return applied
    rho = m.rho if m is not None and m.rho is not None else stage.start_rho
    if rho is None or not stage.rho_grid:
        return rho
    return min(stage.rho_grid, key=lambda g: (abs(g - rho), -g))


def measured_rho(m: StageMetrics | None, stage: StageSpec) -> float | None:
    """The rho the telemetry's rates were measured at (its window average): the one to pair
    with its utilisation (which is normalised by it). Not a target: see `current_rho`."""
    if stage.kind != "gpu":
        return None
    if m is not None and m.rho is not None:
        return m.rho
    return stage.start_rho


def current_targets(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    applied: Mapping[str, float | None] | None = None,
) -> tuple[StageAction, ...]:
    """The pipeline's present scale as a full set of targets, in spec order.

    `applied`: the rho last applied per GPU stage (policy state); replicas always come from
    telemetry (desired if the supervisor says, else ready + starting)."""
    out: list[StageAction] = []
    applied = applied or {}
    for st in spec.stages:
        m = stage_metrics(telemetry, st.name)
        out.append(
            StageAction(
                stage=st.name,
                target_replicas=current_replicas(m, st),
                rho=current_rho(m, st, applied.get(st.name)),
            )
        )
    return tuple(out)


def targets_from(
    spec: PipelineSpec,
    base: Sequence[StageAction],
    changes: Mapping[str, tuple[int, float | None]],
) -> tuple[StageAction, ...]:
    """`base` with the given stages replaced by (replicas, rho), in spec order."""
    by_name = {a.stage: a for a in base}
    out: list[StageAction] = []
    for st in spec.stages:
        if st.name in changes:
            n, rho = changes[st.name]
            out.append(StageAction(stage=st.name, target_replicas=n, rho=rho))
        else:
            out.append(by_name[st.name])
    return tuple(out)


def same_targets(a: Sequence[StageAction], b: Sequence[StageAction]) -> bool:
    ka = {(x.stage, x.target_replicas, x.rho) for x in a}
    kb = {(x.stage, x.target_replicas, x.rho) for x in b}
    return ka == kb


def hold_decision(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    policy: str,
    source: ActionSource,
    reason: str,
    **extra: Any,
) -> Decision:
    return Decision(
        targets=current_targets(spec, telemetry),
        source=source,
        policy=policy,
        rationale=(reason,),
        hold=True,
        **extra,
    )


def finish(decision: Decision, spec: PipelineSpec, telemetry: PipelineTelemetry) -> Decision:
    """Set `hold` from a comparison with the present scale."""
    return replace(decision, hold=same_targets(decision.targets, current_targets(spec, telemetry)))


def to_scaling_action(
    decision: Decision,
    pipeline: str,
    action_id: str,
    now: float,
    *,
    based_on_tick: int | None = None,
    advisory: bool = False,
) -> ScalingAction:
    """The `ScalingAction` message for a decision (the I/O shell publishes it)."""
    text = "; ".join(decision.rationale)
    if len(text) > MAX_TEXT_CHARS:
        text = text[: MAX_TEXT_CHARS - 3] + "..."
    fallback = decision.fallback_reason
    if fallback is not None and len(fallback) > MAX_TEXT_CHARS:
        fallback = fallback[: MAX_TEXT_CHARS - 3] + "..."
    return ScalingAction(
        pipeline=pipeline,
        action_id=action_id,
        ts_s=now,
        stages=list(decision.targets),
        source=decision.source,
        policy=decision.policy,
        rationale=text,
        bottleneck=decision.bottleneck,
        predicted_p99_ms=decision.predicted_p99_ms,
        predicted_reward=decision.predicted_reward,
        based_on_tick=based_on_tick,
        advisory=advisory,
        fallback_reason=fallback,
        validator_reasons=[r[:MAX_TEXT_CHARS] for r in decision.validator_reasons[:64]],
    )


@dataclass(frozen=True)
class Periodic:
    """When a periodic evaluation last ran (shared by the baselines' gating)."""

    last_eval_s: float | None = None

    def due(self, now: float, period_s: float) -> bool:
        return self.last_eval_s is None or now - self.last_eval_s >= period_s - 1e-9


def get_policy(name: str, *, validate: bool = True, **options: Any) -> Policy[Any]:
    """Build a policy by name (see `POLICY_NAMES`); `options` go to its config.

    With `validate=True` (the default) the policy is wrapped in the validator.
    """
    # Imported here: the baselines import this module's helpers.
    from .baselines.hpa import HPAPolicy
    from .baselines.keda import KEDAPolicy
    from .baselines.kpa import KPAPolicy
    from .baselines.ray_serve import RayServePolicy
    from .baselines.static import StaticPolicy
    from .baselines.threshold import ThresholdPolicy
    from .baselines.vpa import VPAPolicy
    from .embedded import SairPolicy
    from .llm import LLMPolicy
    from .validator import ValidatedPolicy

    builders: dict[str, Any] = {
        "static": StaticPolicy,
        "hpa": HPAPolicy,
        "vpa": VPAPolicy,
        "threshold": ThresholdPolicy,
        "keda": KEDAPolicy,
        "kpa": KPAPolicy,
        "ray": RayServePolicy,
        "sair": SairPolicy,
        "llm": LLMPolicy,
    }
    if name not in builders:
        raise ValueError(f"policy {name!r} is unknown; known: {', '.join(POLICY_NAMES)}")
    policy: Policy[Any] = builders[name](**options)
    return ValidatedPolicy(policy) if validate else policy


__all__ = [
    "POLICY_NAMES",
    "Decision",
    "LLMCall",
    "Periodic",
    "Policy",
    "current_replicas",
    "current_rho",
    "current_targets",
    "finish",
    "get_policy",
    "hold_decision",
    "measured_rho",
    "same_targets",
    "stage_metrics",
    "targets_from",
    "to_scaling_action",
]

"""One control cycle of the policy service, pure: the app and the simulator both call `step`.

Per telemetry tick:
1. **learn**: if an earlier strategic action has settled (`spec.settle_s` since it was
   decided), its shaped reward is computed from the telemetry now; the episode (context at
   decision time, action, reward, outcome) is emitted only when the reward is positive, as in
   the paper. Degraded telemetry (stale stages, missing replicas) measures nothing: the
   pending action is dropped without an episode rather than labelled with a wrong reward.
2. **decide**: the policy (any of `POLICY_NAMES`, already wrapped in the validator) decides;
   the caller passes the retrieved episodes when `needs_retrieval` said so.
3. **act**: a decision that changes anything becomes a `ScalingAction`; a strategic decision
   (held or not) becomes the new pending action, so holding is learned from too.

Only SAIR's own policies (`sair`, `llm`) learn; baselines just decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from schemas.context import ENCODING_VERSION, encode_context
from schemas.messages import (
    ActionSource,
    Episode,
    EpisodeOutcome,
    PipelineTelemetry,
    RetrievedEpisode,
    ScalingAction,
    StageAction,
)
from schemas.pipeline import PipelineSpec

from .embedded import SairPolicy, SairState, learn
from .interface import Decision, Policy, current_targets, to_scaling_action
from .reward import Outcome, RewardBreakdown
from .validator import Validated, ValidatedPolicy

STRATEGIC_SOURCES: frozenset[str] = frozenset({"embedded", "explore", "llm"})


@dataclass(frozen=True)
class PendingAction:
    """A strategic decision waiting for its settle time before its reward is measured."""

    action_id: str | None
    """Id of the published action; None for a hold (nothing was published)."""
    targets: tuple[StageAction, ...]
    source: ActionSource
    context: tuple[float, ...]
    before: Outcome
    decided_s: float
    added_capacity: bool


@dataclass(frozen=True)
class LoopState:
    policy: Any
    """The policy's own state (opaque here)."""
    pending: PendingAction | None = None
    episodes: int = 0
    dropped_measurements: int = 0


@dataclass(frozen=True)
class Step:
    decision: Decision
    action: ScalingAction | None = None
    episode: Episode | None = None
    reward: RewardBreakdown | None = None
    note: str | None = None
    """Why a settled action produced no episode (negative reward, degraded telemetry)."""


def initial_state(policy: Policy[Any], spec: PipelineSpec, seed: int = 0) -> LoopState:
    return LoopState(policy=policy.initial_state(spec, seed))


def learns(policy: Policy[Any]) -> bool:
    inner = policy.inner if isinstance(policy, ValidatedPolicy) else policy
    return isinstance(inner, SairPolicy)


def needs_retrieval(policy: Policy[Any], spec: PipelineSpec, state: LoopState, now: float) -> bool:
    """Whether the next `step` is a strategic decision that wants retrieved episodes."""
    return learns(policy) and policy.wants_retrieval(spec, state.policy, now)


def _sair_state(policy: Policy[Any], state: Any) -> SairState:
    inner = state.inner if isinstance(policy, ValidatedPolicy) else state
    assert isinstance(inner, SairState)
    return inner


def _with_sair_state(policy: Policy[Any], state: Any, sair: SairState) -> Any:
    if isinstance(policy, ValidatedPolicy):
        assert isinstance(state, Validated)
        return Validated(sair, state.validator)
    return sair


def _outcome(t: PipelineTelemetry) -> Outcome:
    return Outcome(p99_ms=t.e2e_p99_ms, cost_per_h=t.cost_per_h)


def _adds_capacity(targets: Sequence[StageAction], current: Sequence[StageAction]) -> bool:
    now = {a.stage: a for a in current}
    for a in targets:
        c = now.get(a.stage)
        if c is None:
            continue
        if a.target_replicas > c.target_replicas:
            return True
        if a.rho is not None and c.rho is not None and a.rho > c.rho:
            return True
    return False


def _settle(
    policy: Policy[Any],
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: LoopState,
    now: float,
) -> tuple[LoopState, Episode | None, RewardBreakdown | None, str | None]:
    pending = state.pending
    if pending is None or now - pending.decided_s < spec.settle_s - 1e-9:
        return state, None, None, None
    if telemetry.degraded:
        return (
            replace(state, pending=None, dropped_measurements=state.dropped_measurements + 1),
            None,
            None,
            "telemetry degraded at settle time: reward not measured",
        )
    sair = _sair_state(policy, state.policy)
    after = _outcome(telemetry)
    reward, sair = learn(
        spec, sair, pending.before, after, added_capacity=pending.added_capacity
    )
    new_state = replace(state, policy=_with_sair_state(policy, state.policy, sair), pending=None)
    if reward.total <= 0:
        return new_state, None, reward, f"reward {reward.total:.3f} <= 0: not stored"
    episode = Episode(
        pipeline=spec.name,
        episode_id=f"ep-{pending.action_id or f'hold-{pending.decided_s:.3f}'}",
        ts_s=now,
        encoding_version=ENCODING_VERSION,
        context=list(pending.context),
        action=list(pending.targets),
        reward=reward.total,
        outcome=EpisodeOutcome(
            p99_ms=after.p99_ms,
            cost_per_h=after.cost_per_h,
            slo_attainment=telemetry.slo_attainment,
            throughput_rps=telemetry.completed_rps,
        ),
        source=pending.source,
        action_id=pending.action_id,
    )
    return replace(new_state, episodes=state.episodes + 1), episode, reward, None


def step(
    policy: Policy[Any],
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: LoopState,
    now: float,
    action_id: str,
    retrieved: Sequence[RetrievedEpisode] = (),
    advisory: bool = False,
) -> tuple[Step, LoopState]:
    """Learn from a settled action, decide, and say what to publish."""
    learning = learns(policy)
    episode: Episode | None = None
    reward: RewardBreakdown | None = None
    note: str | None = None
    if learning:
        state, episode, reward, note = _settle(policy, spec, telemetry, state, now)
    decision, policy_state = policy.decide(spec, telemetry, state.policy, now, retrieved)
    state = replace(state, policy=policy_state)
    action = None
    if not decision.hold:
        action = to_scaling_action(
            decision, spec.name, action_id, now, based_on_tick=telemetry.tick, advisory=advisory
        )
    if learning and decision.source in STRATEGIC_SOURCES:
        current = current_targets(spec, telemetry)
        state = replace(
            state,
            pending=PendingAction(
                action_id=action.action_id if action else None,
                targets=tuple(decision.targets),
                source=decision.source,
                context=tuple(encode_context(telemetry, spec)),
                before=_outcome(telemetry),
                decided_s=now,
                added_capacity=_adds_capacity(decision.targets, current),
            ),
        )
    return Step(decision=decision, action=action, episode=episode, reward=reward, note=note), state

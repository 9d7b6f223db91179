"""SAIR's embedded in-context policy (the default; no LLM), plus its reflex and learning step.

Strategic decision, every `control_interval_s`:
1. Estimate service rates (planner, EWMA in the state) and find the bottleneck (telemetry's,
   else the stage with the highest load).
2. Candidates: hold; the planner's plan at each headroom (0.8 and 0.6 of the SLO); +-1
   replica on the bottleneck and, for a GPU bottleneck, +-1 rho grid step; the actions of the
   best retrieved episodes (reward x similarity, top 3). Each candidate is clamped by the
   validator's stateless rules (step, bounds, grid, budget) and duplicates merge.
3. Each candidate gets a prior: the shaped reward (`reward.shaped_reward`) of the planner's
   predicted outcome, against the Pareto front kept in the state.
4. Kernel regression over the retrieved episodes, in the joint (context, action) space:
       w_e(a) = exp(-mean((x_e - x)^2) / 2 h_x^2) * exp(-mean((a_e - a)^2) / 2 h_a^2)
       score(a) = (sum_e w_e(a) r_e + kappa * prior(a)) / (sum_e w_e(a) + kappa)
   with h_x = 0.15, h_a = 0.1 (features in [0, 1]) and kappa = 0.5: with no evidence the
   planner's prior ranks; with close, consistent episodes their rewards dominate. Actions
   are encoded per stage as (replicas / max_replicas, rho), CPU rho = 1.
5. The best score wins; epsilon-greedy exploration (explore.py) may pick another candidate.
Between strategic decisions the reflex (reflex.py) runs every tick.
Telemetry flagged degraded: candidates that remove capacity are dropped (never scale down
on bad data) and nothing is explored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from schemas.context import encode_context
from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageAction
from schemas.pipeline import PipelineSpec

from . import pareto, planner
from .explore import EPSILON_START, ExploreState, maybe_explore
from .interface import Decision, current_targets, same_targets, targets_from
from .reflex import ReflexState, reflex_check
from .reward import Outcome, RewardBreakdown, shaped_reward
from .validator import clamp, slo_breaking

CONTEXT_BANDWIDTH = 0.15
ACTION_BANDWIDTH = 0.1
PRIOR_WEIGHT = 0.5
TOP_EPISODES = 3
HEADROOMS = (0.8, 0.6)


@dataclass(frozen=True)
class SairConfig:
    headrooms: tuple[float, ...] = HEADROOMS
    context_bandwidth: float = CONTEXT_BANDWIDTH
    action_bandwidth: float = ACTION_BANDWIDTH
    prior_weight: float = PRIOR_WEIGHT
    top_episodes: int = TOP_EPISODES
    reflex: bool = True
    explore: bool = True
    epsilon_start: float = EPSILON_START


@dataclass(frozen=True)
class SairState:
    mu1: tuple[tuple[str, float], ...] = ()
    """Planner's service-rate estimates per stage (requests/s of one replica at rho = 1)."""
    explore: ExploreState = field(default_factory=ExploreState)
    reflex: ReflexState = field(default_factory=ReflexState)
    front: tuple[pareto.Point, ...] = ()
    """Pareto front of observed outcomes (normalised p99, cost)."""
    next_decision_s: float | None = None
    """When the next strategic decision is due; None: at the next call."""
    decisions: int = 0


@dataclass(frozen=True)
class Candidate:
    name: str
    targets: tuple[StageAction, ...]
    prediction: planner.Prediction
    prior: float
    score: float = 0.0
    evidence: float = 0.0
    """Sum of the kernel weights of the episodes that informed the score."""


@dataclass(frozen=True)
class Prepared:
    """Everything a strategic decision needs, shared by the embedded and the LLM policy."""

    candidates: tuple[Candidate, ...]
    best: int
    bottleneck: str | None
    reasons: tuple[str, ...]
    mu1: tuple[tuple[str, float], ...]
    current: tuple[StageAction, ...]
    breaking: bool
    degraded: bool
    estimates: Mapping[str, planner.StageEstimate]
    correction: float


# --------------------------------------------------------------------------- candidates


def _key(targets: Sequence[StageAction]) -> tuple[tuple[str, int, float | None], ...]:
    return tuple((a.stage, a.target_replicas, a.rho) for a in targets)


def _bottleneck(
    spec: PipelineSpec, telemetry: PipelineTelemetry, model_bottleneck: str | None
) -> tuple[str | None, str]:
    if telemetry.bottleneck is not None:
        return telemetry.bottleneck, (
            f"bottleneck {telemetry.bottleneck} (monitor, confidence "
            f"{telemetry.bottleneck_confidence:.2f})"
        )
    if model_bottleneck is not None:
        return model_bottleneck, f"bottleneck {model_bottleneck} (highest modelled load)"
    return None, "bottleneck unknown"


def _neighbour_moves(
    spec: PipelineSpec, current: Sequence[StageAction], stage: str
) -> list[tuple[str, tuple[StageAction, ...]]]:
    st = spec.stage(stage)
    c = {a.stage: a for a in current}[stage]
    out: list[tuple[str, tuple[StageAction, ...]]] = []
    for d in (1, -1):
        n = c.target_replicas + d
        if st.min_replicas <= n <= st.max_replicas:
            out.append(
                (f"{stage}{d:+d}", targets_from(spec, current, {stage: (n, c.rho)}))
            )
    if st.kind == "gpu" and c.rho is not None:
        grid = list(st.rho_grid)
        i = min(range(len(grid)), key=lambda k: abs(grid[k] - (c.rho or 0.0)))
        for d in (1, -1):
            if 0 <= i + d < len(grid):
                out.append(
                    (
                        f"{stage} rho{d:+d}",
                        targets_from(spec, current, {stage: (c.target_replicas, grid[i + d])}),
                    )
                )
    return out


def _episode_moves(
    spec: PipelineSpec,
    current: Sequence[StageAction],
    retrieved: Sequence[RetrievedEpisode],
    top: int,
) -> list[tuple[str, tuple[StageAction, ...]]]:
    ranked = sorted(
        retrieved, key=lambda e: e.episode.reward * max(e.similarity, 1e-3), reverse=True
    )
    out: list[tuple[str, tuple[StageAction, ...]]] = []
    names = set(spec.stage_names)
    for r in ranked[:top]:
        changes = {
            a.stage: (a.target_replicas, a.rho) for a in r.episode.action if a.stage in names
        }
        out.append(
            (f"episode {r.episode.episode_id}", targets_from(spec, current, changes))
        )
    return out


def encode_action(spec: PipelineSpec, targets: Sequence[StageAction]) -> list[float]:
    by = {a.stage: a for a in targets}
    vec: list[float] = []
    for st in spec.stages:
        a = by.get(st.name)
        n = a.target_replicas if a is not None else st.initial_replicas
        rho = 1.0 if st.kind == "cpu" or a is None or a.rho is None else a.rho
        vec.extend([n / st.max_replicas, rho])
    return vec


def kernel_scores(
    spec: PipelineSpec,
    context: Sequence[float],
    actions: Sequence[Sequence[StageAction]],
    priors: Sequence[float],
    retrieved: Sequence[RetrievedEpisode],
    config: SairConfig,
) -> tuple[list[float], list[float]]:
    """(score, evidence) per candidate: kernel regression shrunk towards the prior."""
    kappa = config.prior_weight
    if not retrieved:
        return list(priors), [0.0] * len(priors)
    x = np.asarray(context, dtype=float)
    ctx_w = np.empty(len(retrieved))
    for i, r in enumerate(retrieved):
        xe = r.episode.context
        if len(xe) == len(x):
            d2 = float(np.mean((np.asarray(xe, dtype=float) - x) ** 2))
            ctx_w[i] = math.exp(-d2 / (2 * config.context_bandwidth**2))
        else:  # another encoding: trust the retriever's own similarity
            ctx_w[i] = r.similarity
    ep_a = np.asarray([encode_action(spec, r.episode.action) for r in retrieved], dtype=float)
    cand_a = np.asarray([encode_action(spec, a) for a in actions], dtype=float)
    rewards = np.asarray([r.episode.reward for r in retrieved], dtype=float)
    d2a = np.mean((cand_a[:, None, :] - ep_a[None, :, :]) ** 2, axis=2)
    w = np.exp(-d2a / (2 * config.action_bandwidth**2)) * ctx_w[None, :]
    evidence = w.sum(axis=1)
    prior = np.asarray(priors, dtype=float)
    scores = (w @ rewards + kappa * prior) / (evidence + kappa)
    return [float(s) for s in scores], [float(e) for e in evidence]


def prepare(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: SairState,
    retrieved: Sequence[RetrievedEpisode],
    config: SairConfig = SairConfig(),
) -> Prepared:
    """Candidates, their predictions, priors and kernel scores (no choice made yet)."""
    current = current_targets(spec, telemetry)
    estimates = planner.estimate_rates(spec, telemetry, dict(state.mu1))
    mu1 = tuple(sorted((k, e.mu1_rps) for k, e in estimates.items() if e.mu1_rps is not None))
    corr = planner.correction_factor(spec, telemetry, estimates, current)
    now_pred = planner.predict(spec, estimates, current, correction=corr)
    bottleneck, why_bn = _bottleneck(spec, telemetry, now_pred.bottleneck)
    reasons: list[str] = [why_bn]
    raw: list[tuple[str, tuple[StageAction, ...]]] = [("hold", current)]
    plans = planner.plans(spec, telemetry, estimates, current, headrooms=config.headrooms)
    for headroom, p in zip(config.headrooms, plans, strict=True):
        raw.append((f"planner@{headroom:.2f}", p.targets))
        reasons.append(p.reasons[-1])
    if plans:
        reasons.extend(r for r in plans[0].reasons[:-1])
    if bottleneck is not None:
        raw.extend(_neighbour_moves(spec, current, bottleneck))
    raw.extend(_episode_moves(spec, current, retrieved, config.top_episodes))
    degraded = telemetry.degraded or bool(telemetry.stale_stages)
    breaking = slo_breaking(spec, telemetry)
    cur_by = {a.stage: a for a in current}
    merged: dict[tuple[tuple[str, int, float | None], ...], tuple[str, tuple[StageAction, ...]]]
    merged = {}
    for name, targets in raw:
        clamped, _ = clamp(spec, targets, current)
        if degraded and any(
            a.target_replicas < cur_by[a.stage].target_replicas
            or (a.rho or 0.0) < (cur_by[a.stage].rho or 0.0)
            for a in clamped
        ):
            continue
        k = _key(clamped)
        if k in merged:
            merged[k] = (f"{merged[k][0]}={name}", clamped)
        else:
            merged[k] = (name, clamped)
    if degraded:
        reasons.append("telemetry degraded: no candidate that removes capacity")
    before = Outcome(telemetry.e2e_p99_ms, telemetry.cost_per_h)
    cands: list[Candidate] = []
    for name, targets in merged.values():
        pred = planner.predict(spec, estimates, targets, correction=corr)
        p99 = pred.p99_ms if math.isfinite(pred.p99_ms) else None
        added = any(
            a.target_replicas > cur_by[a.stage].target_replicas
            or (a.rho or 0.0) > (cur_by[a.stage].rho or 0.0)
            for a in targets
        )
        prior = shaped_reward(
            spec, before, Outcome(p99, pred.cost_per_h), state.front, added_capacity=added
        ).total
        cands.append(Candidate(name=name, targets=targets, prediction=pred, prior=prior))
    context = encode_context(telemetry, spec)
    scores, evidence = kernel_scores(
        spec, context, [c.targets for c in cands], [c.prior for c in cands], retrieved, config
    )
    cands = [
        replace(c, score=s, evidence=e) for c, s, e in zip(cands, scores, evidence, strict=True)
    ]
    best = max(range(len(cands)), key=lambda i: (cands[i].score, -i))
    return Prepared(
        candidates=tuple(cands),
        best=best,
        bottleneck=bottleneck,
        reasons=tuple(reasons),
        mu1=mu1,
        current=current,
        breaking=breaking,
        degraded=degraded,
        estimates=estimates,
        correction=corr,
    )


def describe(c: Candidate) -> str:
    p99 = f"{c.prediction.p99_ms:.0f} ms" if math.isfinite(c.prediction.p99_ms) else "unstable"
    return (
        f"{c.name}: predicted p99 {p99}, ${c.prediction.cost_per_h:.3f}/h, "
        f"score {c.score:.3f} (prior {c.prior:.3f}, evidence {c.evidence:.2f})"
    )


def decision_for(
    prep: Prepared, index: int, policy: str, *, source: str = "embedded", why: Sequence[str] = ()
) -> Decision:
    c = prep.candidates[index]
    p99 = c.prediction.p99_ms if math.isfinite(c.prediction.p99_ms) else None
    return Decision(
        targets=c.targets,
        source=source,  # type: ignore[arg-type]
        policy=policy,
        rationale=(*prep.reasons, *why, f"chose {describe(c)}"),
        hold=same_targets(c.targets, prep.current),
        bottleneck=prep.bottleneck,
        predicted_p99_ms=p99,
        predicted_reward=c.score,
    )


def strategic_decide(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: SairState,
    now: float,
    retrieved: Sequence[RetrievedEpisode] = (),
    config: SairConfig = SairConfig(),
    policy: str = "sair",
) -> tuple[Decision, SairState]:
    """One strategic decision of the embedded policy (see the module doc)."""
    prep = prepare(spec, telemetry, state, retrieved, config)
    chosen, explored, ex_state = maybe_explore(
        state.explore,
        prep.candidates,
        prep.best,
        allowed=config.explore and not prep.breaking and not prep.degraded,
    )
    why: list[str] = []
    if explored:
        why.append(
            f"exploring (epsilon {state.explore.epsilon:.3f}) instead of "
            f"{prep.candidates[prep.best].name}"
        )
    decision = decision_for(
        prep, chosen, policy, source="explore" if explored else "embedded", why=why
    )
    new_state = replace(
        state,
        mu1=prep.mu1,
        explore=ex_state,
        next_decision_s=now + spec.control_interval_s,
        decisions=state.decisions + 1,
    )
    return decision, new_state


def learn(
    spec: PipelineSpec,
    state: SairState,
    before: Outcome,
    after: Outcome,
    *,
    added_capacity: bool,
    breach_predicted: bool = False,
) -> tuple[RewardBreakdown, SairState]:
    """After the settle time: the action's shaped reward, and the front updated with it.
    The caller stores the episode only when the reward is positive (as in the paper)."""
    r = shaped_reward(
        spec,
        before,
        after,
        state.front,
        added_capacity=added_capacity,
        breach_predicted=breach_predicted,
    )
    return r, replace(state, front=pareto.update_front(state.front, r.point))


def mu1_map(state: SairState) -> Mapping[str, float]:
    return dict(state.mu1)


class SairPolicy:
    """The embedded policy behind the common interface: strategic when due, reflex otherwise."""

    is_baseline = False

    def __init__(self, config: SairConfig | None = None, name: str = "sair") -> None:
        self.config = config or SairConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> SairState:
        return SairState(explore=ExploreState(epsilon=self.config.epsilon_start, seed=seed))

    def period_s(self, spec: PipelineSpec) -> float:
        return spec.tick_s

    def wants_retrieval(self, spec: PipelineSpec, state: SairState, now: float) -> bool:
        return state.next_decision_s is None or now >= state.next_decision_s - 1e-9

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, SairState]:
        if self.wants_retrieval(spec, state, now):
            return self.strategic(spec, telemetry, state, now, retrieved)
        return self.reflex(spec, telemetry, state, now)

    def strategic(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, SairState]:
        return strategic_decide(spec, telemetry, state, now, retrieved, self.config, self.name)

    def reflex(
        self, spec: PipelineSpec, telemetry: PipelineTelemetry, state: SairState, now: float
    ) -> tuple[Decision, SairState]:
        nxt = state.next_decision_s if state.next_decision_s is not None else now
        if self.config.reflex:
            d, rstate = reflex_check(
                spec, telemetry, state.reflex, now, nxt, mu1_map(state), self.name
            )
            if d is not None:
                return d, replace(state, reflex=rstate)
        return (
            Decision(
                targets=current_targets(spec, telemetry),
                source="reflex",
                policy=self.name,
                rationale=(f"no breach predicted before the next decision at {nxt:.0f} s",),
                hold=True,
            ),
            state,
        )


__all__ = [
    "Candidate",
    "Prepared",
    "SairConfig",
    "SairPolicy",
    "SairState",
    "decision_for",
    "kernel_scores",
    "learn",
    "prepare",
    "strategic_decide",
]

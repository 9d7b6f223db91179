"""SAIR's embedded in-context policy (the default; no LLM), plus its reflex and learning step.

Every tick, first: the fresh demand estimate (`demand.py`: queue growth of this tick, the
arrival a saturated stage implies; its peak over the stabilisation window).

Strategic decision, every `control_interval_s`:
1. Estimate service rates (planner, EWMA in the state; not re-measured across a rescale)
   and the model's correction factor (smoothed; measured only over windows with no
   rescale). Plan for the load `Demand.plan_rps`: never below the peak demand of the
   stabilisation window (scale-down stabilisation), a rising trend extrapolated over half a
   window plus one interval (ramps). Find the bottleneck (telemetry's, else the stage with
   the highest load).
2. Candidates: hold; the planner's plan at each headroom (0.8 and 0.6 of the SLO); +-1
   replica on the bottleneck and, for a GPU bottleneck, +-1 rho grid step; the actions of the
   best retrieved episodes (reward x similarity, top 3). Each candidate is clamped by the
   validator's stateless rules (step, bounds, grid, budget), then guarded:
   - a stage whose queue is non-trivial or growing keeps its capacity (never scale down
     into a burst), and so does every stage while the load is rising (a sustained trend)
     or until the monitor's window has filled once;
   - hysteresis: a candidate that removes capacity must be predicted under
     DOWN_HEADROOM x SLO (the planner scales up above 0.8 x SLO) and leave no stage
     loaded above the planner's MAX_PLAN_LOAD;
   duplicates merge; and when some candidate keeps every stage under the planner's
   MAX_PLAN_LOAD at the planned load, those that do not are dropped (hold included).
3. Each candidate gets a prior: the shaped reward (`reward.shaped_reward`) of the planner's
   predicted outcome, against the Pareto front kept in the state.
4. Kernel regression over the retrieved episodes, in the joint (context, action) space:
       w_e(a) = exp(-mean((x_e - x)^2) / 2 h_x^2) * exp(-mean((a_e - a)^2) / 2 h_a^2)
       score(a) = (sum_e w_e(a) r_e + kappa * prior(a)) / (sum_e w_e(a) + kappa)
   with h_x = 0.15, h_a = 0.1 (features in [0, 1]) and kappa = 0.5: with no evidence the
   planner's prior ranks; with close, consistent episodes their rewards dominate. Actions
   are encoded per stage as (replicas / max_replicas, rho), CPU rho = 1.
5. The best score wins; epsilon-greedy exploration (explore.py) may pick another candidate,
   among those predicted within the top headroom (exploration never gambles on the SLO).
Between strategic decisions the reflex (reflex.py) runs every tick: scale-up only.
"Current" is the last target set (kept in the state; the telemetry's rho is a window
average). Telemetry flagged degraded: candidates that remove capacity are dropped (never
scale down on bad data) and nothing is explored.
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
from .demand import BURST_MEMORY_S, Demand, DemandState, observe
from .explore import EPSILON_START, ExploreState, maybe_explore
from .interface import Decision, current_targets, same_targets, stage_metrics, targets_from
from .reflex import ReflexState, rates, reflex_check
from .reward import Outcome, RewardBreakdown, shaped_reward
from .validator import clamp, slo_breaking

CONTEXT_BANDWIDTH = 0.15
ACTION_BANDWIDTH = 0.1
PRIOR_WEIGHT = 0.5
TOP_EPISODES = 3
HEADROOMS = (0.8, 0.6)
DOWN_HEADROOM = 0.7
"""A candidate that removes capacity must be predicted under this share of the SLO (the
planner adds capacity above 0.8: the band between is the hysteresis)."""
CORRECTION_ALPHA = 0.5
"""EWMA weight (in log space) of a new measurement of the model's correction factor."""
GROWING_PER_S = 0.5
"""A queue growing faster than this (requests/s) is growing."""


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
    down_headroom: float = DOWN_HEADROOM
    stabilisation_s: float | None = None
    """Scale-down plans for the peak demand of this long; None: the control interval
    (on top of the monitor's 30 s window)."""
    burst_memory_s: float = BURST_MEMORY_S
    """How long the capacity for a burst is kept after it was last seen (demand.py)."""


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
    applied: tuple[tuple[str, int, float | None], ...] = ()
    """The targets last set (stage, replicas, rho): "current" for rho (module doc)."""
    replicas_changed: tuple[tuple[str, float], ...] = ()
    """When each stage's replica target last changed (its rates are not re-measured over a
    window that straddles it)."""
    changed_s: float | None = None
    """When any target last changed (the correction factor is measured only after a quiet
    window)."""
    correction: float | None = None
    """The planner's smoothed correction factor (None: not measured yet)."""
    first_seen_s: float | None = None
    """When the policy saw its first telemetry."""
    demand: DemandState = field(default_factory=DemandState)

    def applied_rho(self) -> dict[str, float | None]:
        return {name: rho for name, _, rho in self.applied if rho is not None}


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
    safe: tuple[int, ...] = ()
    """Candidates exploration may pick: predicted within the top headroom."""
    busy: tuple[str, ...] = ()
    """Stages whose queue grows or is long (see `busy_stages`)."""
    correction_state: float | None = None
    """The smoothed correction factor to keep in the state."""


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


def _removes(a: StageAction, c: StageAction) -> bool:
    return a.target_replicas < c.target_replicas or (a.rho or 0.0) < (c.rho or 0.0) - 1e-12


def _adds(a: StageAction, c: StageAction) -> bool:
    return a.target_replicas > c.target_replicas or (a.rho or 0.0) > (c.rho or 0.0) + 1e-12


def busy_stages(spec: PipelineSpec, telemetry: PipelineTelemetry, demand: Demand) -> list[str]:
    """Stages whose capacity must not go: a queue that is growing (this tick or over the
    monitor's 10 s), or longer than two requests per server."""
    out: list[str] = []
    for st in spec.stages:
        m = stage_metrics(telemetry, st.name)
        s = demand.stages.get(st.name)
        if m is None:
            continue
        q = s.queue_depth if s is not None else (m.queue_depth or 0)
        g_tick = s.growth_rps if s is not None and s.growth_rps is not None else 0.0
        g_slope = m.queue_growth_per_s or 0.0
        servers = max(1, m.replicas_ready) * st.concurrency
        if q > 2 * servers or g_tick > GROWING_PER_S or g_slope > GROWING_PER_S:
            out.append(st.name)
    return out


def _protect(
    targets: Sequence[StageAction], current: Mapping[str, StageAction], busy: Sequence[str]
) -> tuple[StageAction, ...]:
    """`targets` with every busy stage's capacity cut undone (its increases kept)."""
    out: list[StageAction] = []
    for a in targets:
        c = current[a.stage]
        if a.stage in busy and _removes(a, c):
            a = StageAction(
                stage=a.stage,
                target_replicas=max(a.target_replicas, c.target_replicas),
                rho=None if a.rho is None else max(a.rho, c.rho or 0.0),
            )
        out.append(a)
    return tuple(out)


def measured_correction(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: SairState,
    estimates: Mapping[str, planner.StageEstimate],
    current: Sequence[StageAction],
    now: float,
) -> tuple[float, float | None]:
    """(correction to use, new smoothed value to keep). A window in which the scale changed
    measures another configuration than the present one, and one with a surge measures a
    backlog the model does not hold: the previous value is kept."""
    prev = state.correction
    settle = telemetry.window_s + spec.tick_s
    quiet = state.changed_s is None or now - state.changed_s >= settle - 1e-9
    surge = state.demand.last_surge_s
    quiet = quiet and (surge is None or now - surge >= settle - 1e-9)
    if not quiet or telemetry.e2e_p99_ms is None or telemetry.degraded:
        return (prev if prev is not None else 1.0), prev
    raw = planner.correction_factor(spec, telemetry, estimates, current)
    if prev is None:
        return raw, raw
    new = math.exp((1 - CORRECTION_ALPHA) * math.log(prev) + CORRECTION_ALPHA * math.log(raw))
    return new, new


def prepare(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: SairState,
    retrieved: Sequence[RetrievedEpisode],
    config: SairConfig = SairConfig(),
    *,
    demand: Demand | None = None,
    now: float | None = None,
) -> Prepared:
    """Candidates, their predictions, priors and kernel scores (no choice made yet).

    `demand`: this tick's estimate (computed here from the state when not given)."""
    now = telemetry.ts_s if now is None else now
    current = current_targets(spec, telemetry, state.applied_rho())
    window_s = telemetry.window_s
    skip = [name for name, ts in state.replicas_changed if now - ts < window_s - 1e-9]
    measured = planner.estimate_rates(spec, telemetry, dict(state.mu1), skip=skip)
    mu1 = tuple(sorted((k, e.mu1_rps) for k, e in measured.items() if e.mu1_rps is not None))
    if demand is None:
        demand, _ = observe(
            spec, telemetry, state.demand, now, dict(mu1), current,
            config.stabilisation_s or spec.control_interval_s, config.burst_memory_s,
        )
    plan_rps = demand.plan_rps(window_s / 2 + spec.control_interval_s)
    estimates = {
        name: replace(e, arrival_rps=max(e.arrival_rps, plan_rps)) for name, e in measured.items()
    }
    corr, corr_state = measured_correction(spec, telemetry, state, measured, current, now)
    now_pred = planner.predict(spec, estimates, current, correction=corr)
    bottleneck, why_bn = _bottleneck(spec, telemetry, now_pred.bottleneck)
    reasons: list[str] = [
        why_bn,
        f"planning for {plan_rps:.1f} rps (demand now {demand.demand_rps:.1f}, window peak "
        f"{demand.peak_rps:.1f}, trend {demand.trend_rps_per_s:+.2f}/s); model x{corr:.2f}; "
        "mu1 " + ", ".join(f"{k} {v:.1f}" for k, v in mu1) + " rps",
    ]
    raw: list[tuple[str, tuple[StageAction, ...]]] = [("hold", current)]
    plans = planner.plans(
        spec, telemetry, estimates, current, headrooms=config.headrooms, correction=corr
    )
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
    busy = busy_stages(spec, telemetry, demand)
    first = state.first_seen_s if state.first_seen_s is not None else now
    if now - first < window_s - 1e-9:
        # The monitor's window is not full yet: its averages are noisy; cut nothing.
        busy = [st.name for st in spec.stages]
        reasons.append("telemetry window not yet full: no capacity taken")
    elif demand.trend_rps_per_s > 0:
        busy = [st.name for st in spec.stages]
        reasons.append("load rising: no capacity taken")
    elif busy:
        reasons.append(f"queue growing or long at {', '.join(busy)}: no capacity taken there")
    merged: dict[tuple[tuple[str, int, float | None], ...], tuple[str, tuple[StageAction, ...]]]
    merged = {}
    for name, targets in raw:
        clamped, _ = clamp(spec, targets, current)
        clamped = _protect(clamped, cur_by, busy)
        if degraded and any(_removes(a, cur_by[a.stage]) for a in clamped):
            continue
        k = _key(clamped)
        if k in merged:
            merged[k] = (f"{merged[k][0]}={name}", clamped)
        else:
            merged[k] = (name, clamped)
    if degraded:
        reasons.append("telemetry degraded: no candidate that removes capacity")
    before = Outcome(telemetry.e2e_p99_ms, telemetry.cost_per_h)
    down_ms = config.down_headroom * spec.slo_p99_ms
    cands: list[Candidate] = []
    for name, targets in merged.values():
        pred = planner.predict(spec, estimates, targets, correction=corr)
        removes = any(_removes(a, cur_by[a.stage]) for a in targets)
        if removes and not (pred.p99_ms <= down_ms and pred.max_load <= planner.MAX_PLAN_LOAD):
            continue  # hysteresis: only cut what leaves a clear margin
        p99 = pred.p99_ms if math.isfinite(pred.p99_ms) else None
        added = any(_adds(a, cur_by[a.stage]) for a in targets)
        prior = shaped_reward(
            spec, before, Outcome(p99, pred.cost_per_h), state.front, added_capacity=added
        ).total
        cands.append(Candidate(name=name, targets=targets, prediction=pred, prior=prior))
    within = [c for c in cands if c.prediction.max_load <= planner.MAX_PLAN_LOAD + 1e-9]
    if within and len(within) < len(cands):
        # No stage planned above MAX_PLAN_LOAD, whatever the P99 model says (planner doc):
        # a hold that would run a stage hotter is not a candidate when a fix exists.
        dropped = [c.name for c in cands if c not in within]
        reasons.append(
            f"over {planner.MAX_PLAN_LOAD:.0%} load at {plan_rps:.1f} rps: "
            + ", ".join(dropped[:4])
        )
        cands = within
    if not cands:  # hold is always a candidate unless degraded data removed it: keep it
        pred = planner.predict(spec, estimates, current, correction=corr)
        cands.append(Candidate(name="hold", targets=current, prediction=pred, prior=0.0))
    context = encode_context(telemetry, spec)
    scores, evidence = kernel_scores(
        spec, context, [c.targets for c in cands], [c.prior for c in cands], retrieved, config
    )
    cands = [
        replace(c, score=s, evidence=e) for c, s, e in zip(cands, scores, evidence, strict=True)
    ]
    best = max(range(len(cands)), key=lambda i: (cands[i].score, -i))
    top_ms = max(config.headrooms) * spec.slo_p99_ms
    safe = tuple(
        i
        for i, c in enumerate(cands)
        if c.prediction.p99_ms <= top_ms and c.prediction.max_load <= planner.MAX_PLAN_LOAD
    )
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
        safe=safe,
        busy=tuple(busy),
        correction_state=corr_state,
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
    *,
    demand: Demand | None = None,
) -> tuple[Decision, SairState]:
    """One strategic decision of the embedded policy (see the module doc)."""
    prep = prepare(spec, telemetry, state, retrieved, config, demand=demand, now=now)
    chosen, explored, ex_state = maybe_explore(
        state.explore,
        prep.candidates,
        prep.best,
        allowed=config.explore and not prep.breaking and not prep.degraded and not prep.busy,
        eligible=prep.safe,
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
    return decision, after_strategic(spec, telemetry, state, prep, ex_state, now)


def after_strategic(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    state: SairState,
    prep: Prepared,
    explore: ExploreState,
    now: float,
) -> SairState:
    """The state after a strategic decision: estimates, correction, the clock."""
    return replace(
        state,
        mu1=prep.mu1,
        correction=prep.correction_state,
        explore=explore,
        next_decision_s=now + spec.control_interval_s,
        decisions=state.decisions + 1,
    )


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

    def stabilisation_s(self, spec: PipelineSpec) -> float:
        return self.config.stabilisation_s or spec.control_interval_s

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, SairState]:
        current = current_targets(spec, telemetry, state.applied_rho())
        demand, dstate = observe(
            spec, telemetry, state.demand, now, rates(spec, telemetry, mu1_map(state)),
            current, self.stabilisation_s(spec), self.config.burst_memory_s,
        )
        state = replace(state, demand=dstate)
        if state.first_seen_s is None:
            state = replace(state, first_seen_s=now)
        if self.wants_retrieval(spec, state, now):
            d, state = self.strategic(spec, telemetry, state, now, retrieved, demand=demand)
            d, state = self._reflex_on_top(spec, telemetry, state, now, d, demand, current)
        else:
            d, state = self.reflex(spec, telemetry, state, now, demand=demand, current=current)
        if not d.hold:
            state = self.note_applied(state, d.targets, now, current)
        return d, state

    def _reflex_on_top(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        d: Decision,
        demand: Demand,
        current: Sequence[StageAction],
    ) -> tuple[Decision, SairState]:
        """A strategic decision due in the middle of a burst must not size it more loosely
        than the reflex would (the planner drains a backlog over a whole interval): the
        reflex runs on the chosen targets and may only add to them."""
        if not self.config.reflex:
            return d, state
        r, rstate = reflex_check(
            spec, telemetry, state.reflex, now, now + spec.control_interval_s,
            mu1_map(state), self.name, demand=demand, current=d.targets,
        )
        if r is None:
            return d, state
        merged = replace(
            d,
            targets=r.targets,
            rationale=(*d.rationale, *r.rationale),
            hold=same_targets(r.targets, current),
        )
        return merged, replace(state, reflex=rstate)

    def note_applied(
        self,
        state: SairState,
        targets: Sequence[StageAction],
        now: float,
        current: Sequence[StageAction] | None = None,
    ) -> SairState:
        """Record the targets that went out (the validator calls this with what it let
        through): they are "current" from now on; rescaled stages are not re-measured over
        a window that straddles the change."""
        before = {a.stage: (a.target_replicas, a.rho) for a in current} if current else {
            name: (n, rho) for name, n, rho in state.applied
        }
        changed = dict(state.replicas_changed)
        any_change = False
        for a in targets:
            b = before.get(a.stage)
            if b is None:
                continue
            if b[0] != a.target_replicas:
                changed[a.stage] = now
            if b != (a.target_replicas, a.rho):
                any_change = True
        return replace(
            state,
            applied=tuple((a.stage, a.target_replicas, a.rho) for a in targets),
            replicas_changed=tuple(sorted(changed.items())),
            changed_s=now if any_change else state.changed_s,
        )

    def strategic(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
        *,
        demand: Demand | None = None,
    ) -> tuple[Decision, SairState]:
        return strategic_decide(
            spec, telemetry, state, now, retrieved, self.config, self.name, demand=demand
        )

    def reflex(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        *,
        demand: Demand | None = None,
        current: Sequence[StageAction] | None = None,
    ) -> tuple[Decision, SairState]:
        nxt = state.next_decision_s if state.next_decision_s is not None else now
        current = (
            tuple(current) if current is not None
            else current_targets(spec, telemetry, state.applied_rho())
        )
        if self.config.reflex:
            d, rstate = reflex_check(
                spec, telemetry, state.reflex, now, nxt, mu1_map(state), self.name,
                demand=demand, current=current,
            )
            if d is not None:
                return d, replace(state, reflex=rstate)
        return (
            Decision(
                targets=current,
                source="reflex",
                policy=self.name,
                rationale=(f"no burst in the queues before the next decision at {nxt:.0f} s",),
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

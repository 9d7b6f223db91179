"""The LLM policy's prompt, its JSON-schema response format and the parser (pure).

Prompt = a fixed system message (the rules and the answer format) + one compact user
message: the pipeline spec, the current telemetry, the M retrieved episodes with their
rewards, and the candidates with the planner's predictions and the embedded policy's
scores. Numbers are rounded and laid out as short lines, not JSON, to save tokens.

Token budget: `PROMPT_TOKEN_BUDGET` = 2500 tokens for 15 episodes and 4 stages, counted
approximately as ceil(characters / 4) (`approx_tokens`; English text and numbers run about
4 characters per token with GPT-style BPE tokenisers). If the prompt is over budget, the
least informative lines go first: episodes beyond the budget are dropped, lowest score
first, and the fact is stated in the prompt.

The answer must match `response_schema(spec)`: the chosen candidate id (or null), the full
per-stage action, the named bottleneck and a one-paragraph rationale. `parse_answer` turns
the text into targets or raises `AnswerError` with the reason (malformed / out of range).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageAction
from schemas.pipeline import PipelineSpec

from .embedded import Candidate, Prepared
from .interface import targets_from

PROMPT_TOKEN_BUDGET = 2500
CHARS_PER_TOKEN = 4
MAX_RATIONALE_CHARS = 1200

SYSTEM = (
    "You are SAIR, the autoscaler of a multi-stage ML inference pipeline. Every control "
    "interval you choose, for every stage, the number of replicas and, for GPU stages, rho "
    "(the share of one GPU a replica may use). Goal: end-to-end P99 under the SLO at the "
    "lowest effective cost (GPU billed by rho). Past episodes show (context, action, reward); "
    "higher reward is better; rewards above 1 mean the outcome was Pareto-optimal on "
    "(P99, cost). Prefer a listed candidate; you may propose another action within the "
    "bounds, the step limit and the rho grid. Name the bottleneck stage. Answer with JSON "
    "only, matching the schema; the rationale is one short paragraph."
)


class AnswerError(ValueError):
    """The LLM's answer cannot be used; `kind` is 'malformed' or 'out_of_range'."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Answer:
    targets: tuple[StageAction, ...]
    candidate: str | None
    bottleneck: str | None
    rationale: str


def approx_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def messages_tokens(messages: Sequence[dict[str, str]]) -> int:
    return sum(approx_tokens(m["content"]) + 4 for m in messages)


def _f(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "?"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.{digits}f}"


def _action(spec: PipelineSpec, targets: Sequence[StageAction]) -> str:
    by = {a.stage: a for a in targets}
    parts = []
    for st in spec.stages:
        a = by.get(st.name)
        if a is None:
            continue
        parts.append(
            f"{st.name} {a.target_replicas}" + (f"@{a.rho:g}" if a.rho is not None else "")
        )
    return ", ".join(parts)


def candidate_id(i: int) -> str:
    return f"c{i}"


def _spec_lines(spec: PipelineSpec) -> list[str]:
    lines = [
        f"pipeline {spec.name}: SLO p99 {spec.slo_p99_ms:g} ms, interval "
        f"{spec.control_interval_s:g} s"
        + (f", budget ${spec.cost_budget_per_h:g}/h" if spec.cost_budget_per_h else ""),
        "stages (name kind replicas min..max step [rho grid] $/h per replica at rho 1):",
    ]
    for st in spec.stages:
        grid = f" rho {st.rho_grid}" if st.kind == "gpu" else ""
        lines.append(
            f"- {st.name} {st.kind} {st.min_replicas}..{st.max_replicas} step {st.max_step}"
            f"{grid} ${spec.replica_cost_per_h(st, 1.0):.3f}"
        )
    return lines


def _telemetry_lines(spec: PipelineSpec, t: PipelineTelemetry) -> list[str]:
    lines = [
        f"now: e2e p99 {_f(t.e2e_p99_ms)} ms, arrival {_f(t.arrival_rate_rps, 1)} rps, "
        f"cost ${t.cost_per_h:.3f}/h, attainment {_f(t.slo_attainment, 3)}"
        + (" DEGRADED" if t.degraded else ""),
        "stage: ready+starting, arrival rps, thr rps, queue, dq/s, util, p99 ms, rho",
    ]
    for m in t.stages:
        p99 = m.sojourn_ms.p99_ms if m.sojourn_ms else None
        lines.append(
            f"- {m.stage}: {m.replicas_ready}+{m.replicas_starting}, "
            f"{_f(m.arrival_rate_rps, 1)}, {_f(m.throughput_rps, 1)}, "
            f"{m.queue_depth if m.queue_depth is not None else '?'}, "
            f"{_f(m.queue_growth_per_s, 1)}, {_f(m.utilisation, 2)}, {_f(p99)}, "
            f"{_f(m.rho, 2) if m.rho is not None else '-'}"
        )
    return lines


def _episode_line(spec: PipelineSpec, i: int, r: RetrievedEpisode) -> str:
    e = r.episode
    ctx = e.context
    # Context summary: load, e2e p99/SLO, then each stage's utilisation (feature 2 of 6).
    utils = [ctx[2 + 6 * k + 1] for k in range(len(spec.stages)) if 2 + 6 * k + 1 < len(ctx)]
    util_txt = "/".join(f"{u * 2:.2f}" for u in utils)
    return (
        f"e{i} sim {r.similarity:.2f} reward {e.reward:.2f}: load {ctx[0]:.2f} "
        f"p99/SLO {ctx[1] * 3:.2f} util {util_txt} | {_action(spec, e.action)} -> "
        f"p99 {_f(e.outcome.p99_ms)} ms ${e.outcome.cost_per_h:.3f}/h"
    )


def _candidate_line(spec: PipelineSpec, i: int, c: Candidate) -> str:
    return (
        f"{candidate_id(i)} ({c.name}): {_action(spec, c.targets)} | predicted p99 "
        f"{_f(c.prediction.p99_ms)} ms ${c.prediction.cost_per_h:.3f}/h score {c.score:.2f}"
    )


def build_messages(
    spec: PipelineSpec,
    telemetry: PipelineTelemetry,
    prep: Prepared,
    retrieved: Sequence[RetrievedEpisode],
    budget_tokens: int = PROMPT_TOKEN_BUDGET,
) -> list[dict[str, str]]:
    """System + user messages, kept under `budget_tokens` (approximate count)."""
    head = [*_spec_lines(spec), *_telemetry_lines(spec, telemetry)]
    if prep.bottleneck:
        head.append(f"suspected bottleneck: {prep.bottleneck}")
    cands = [
        "candidates (id (origin): action | planner prediction, embedded score):",
        *(_candidate_line(spec, i, c) for i, c in enumerate(prep.candidates)),
    ]
    ranked = sorted(retrieved, key=lambda r: r.score, reverse=True)
    ep_lines = [_episode_line(spec, i, r) for i, r in enumerate(ranked)]
    tail = ["Answer with the JSON object."]

    def render(n_eps: int) -> list[dict[str, str]]:
        eps = [f"episodes ({n_eps} of {len(ranked)} retrieved; context util per stage):"]
        eps += ep_lines[:n_eps]
        user = "\n".join([*head, *eps, *cands, *tail])
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    n = len(ep_lines)
    msgs = render(n)
    while n > 0 and messages_tokens(msgs) > budget_tokens:
        n -= 1
        msgs = render(n)
    return msgs


def response_schema(spec: PipelineSpec) -> dict[str, Any]:
    names = list(spec.stage_names)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["candidate", "stages", "bottleneck", "rationale"],
        "properties": {
            "candidate": {"type": ["string", "null"]},
            "stages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["stage", "replicas", "rho"],
                    "properties": {
                        "stage": {"type": "string", "enum": names},
                        "replicas": {"type": "integer"},
                        "rho": {"type": ["number", "null"]},
                    },
                },
            },
            "bottleneck": {"type": ["string", "null"], "enum": [*names, None]},
            "rationale": {"type": "string"},
        },
    }


def response_format(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "scaling_decision",
            "strict": True,
            "schema": response_schema(spec),
        },
    }


def parse_answer(
    spec: PipelineSpec, text: str | None, prep: Prepared
) -> Answer:
    """The answer's targets (full, spec order); raises AnswerError naming what is wrong."""
    if not text:
        raise AnswerError("malformed", "empty answer")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnswerError("malformed", f"not JSON ({exc.msg} at {exc.pos})") from exc
    if not isinstance(data, dict):
        raise AnswerError("malformed", f"expected an object, got {type(data).__name__}")
    extra = set(data) - {"candidate", "stages", "bottleneck", "rationale"}
    if extra:
        raise AnswerError("malformed", f"unknown fields {sorted(extra)}")
    rationale = data.get("rationale")
    if not isinstance(rationale, str) or not rationale.strip():
        raise AnswerError("malformed", "rationale missing")
    bottleneck = data.get("bottleneck")
    if bottleneck is not None and bottleneck not in spec.stage_names:
        raise AnswerError("out_of_range", f"bottleneck={bottleneck!r} is not a stage")
    cand = data.get("candidate")
    ids = {candidate_id(i): c for i, c in enumerate(prep.candidates)}
    stages = data.get("stages")
    if cand is not None and cand not in ids:
        raise AnswerError("out_of_range", f"candidate={cand!r} is not one of {sorted(ids)}")
    if not isinstance(stages, list):
        raise AnswerError("malformed", "stages must be a list")
    if not stages:
        if cand is None:
            raise AnswerError("malformed", "neither a candidate nor stages")
        targets = ids[cand].targets
    else:
        changes: dict[str, tuple[int, float | None]] = {}
        for i, item in enumerate(stages):
            if not isinstance(item, dict) or set(item) != {"stage", "replicas", "rho"}:
                raise AnswerError("malformed", f"stages[{i}] must have stage, replicas, rho")
            name, n, rho = item["stage"], item["replicas"], item["rho"]
            if name not in spec.stage_names:
                raise AnswerError("out_of_range", f"stages[{i}].stage={name!r} is not a stage")
            if isinstance(n, bool) or not isinstance(n, int):
                raise AnswerError("malformed", f"stages[{i}].replicas={n!r} is not an integer")
            st = spec.stage(name)
            if not st.min_replicas <= n <= st.max_replicas:
                raise AnswerError(
                    "out_of_range",
                    f"{name}.replicas={n} outside [{st.min_replicas}, {st.max_replicas}]",
                )
            if st.kind == "cpu":
                if rho is not None:
                    raise AnswerError("out_of_range", f"{name}.rho={rho!r} on a cpu stage")
            elif rho is not None:
                if isinstance(rho, bool) or not isinstance(rho, int | float):
                    raise AnswerError("malformed", f"{name}.rho={rho!r} is not a number")
                if not any(abs(float(rho) - g) < 1e-6 for g in st.rho_grid):
                    raise AnswerError(
                        "out_of_range", f"{name}.rho={rho!r} not on the grid {st.rho_grid}"
                    )
                rho = next(g for g in st.rho_grid if abs(float(rho) - g) < 1e-6)
            else:
                rho = {a.stage: a for a in prep.current}[name].rho
            changes[name] = (n, rho)
        targets = targets_from(spec, prep.current, changes)
    return Answer(
        targets=targets,
        candidate=cand,
        bottleneck=bottleneck,
        rationale=" ".join(rationale.split())[:MAX_RATIONALE_CHARS],
    )

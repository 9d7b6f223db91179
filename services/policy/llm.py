"""The LLM policy: the embedded policy's candidates, chosen by an LLM over an
OpenAI-compatible endpoint (official `openai` client, JSON-schema response format).

One strategic decision = `embedded.prepare` (candidates, predictions, kernel scores; pure)
-> exploration draw (an exploratory step needs no LLM call) -> `prompt.build_messages` ->
one chat-completions call with `response_format=prompt.response_format(spec)`, timeout
`LLMConfig.timeout_s` and no retries -> `prompt.parse_answer`. A timeout, an API error, a
malformed or an out-of-range answer falls back to the embedded policy's best candidate,
with the reason in `Decision.fallback_reason` (-> ScalingAction.fallback_reason). Every call
is recorded in `Decision.llm` (model, latency, prompt/completion tokens, error).

The client is injected (built from OPENAI_BASE_URL / OPENAI_API_KEY by `client_from_env`);
the call's latency is measured with `time.perf_counter`, the only clock read in the policy
code. Between strategic decisions the embedded reflex runs, exactly as for `sair`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import openai

from schemas.messages import PipelineTelemetry, RetrievedEpisode
from schemas.pipeline import PipelineSpec

from . import planner, prompt
from .demand import Demand
from .embedded import (
    Prepared,
    SairConfig,
    SairPolicy,
    SairState,
    after_strategic,
    decision_for,
    prepare,
)
from .explore import maybe_explore
from .interface import Decision, LLMCall, same_targets


@dataclass(frozen=True)
class LLMConfig:
    model: str = "gpt-4o-mini"
    timeout_s: float = 10.0
    max_tokens: int = 400
    temperature: float = 0.0
    prompt_budget_tokens: int = prompt.PROMPT_TOKEN_BUDGET


def client_from_env(timeout_s: float = 10.0) -> openai.OpenAI | None:
    """A client for OPENAI_BASE_URL (None when no endpoint is configured)."""
    from sair.settings import Settings

    s = Settings.from_env()
    if not s.openai_base_url:
        return None
    return openai.OpenAI(
        base_url=s.openai_base_url,
        api_key=s.openai_api_key or "unused",
        timeout=timeout_s,
        max_retries=0,
    )


def _request(spec: PipelineSpec, cfg: LLMConfig, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "messages": messages,
        "response_format": prompt.response_format(spec),
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }


def _describe_exc(exc: Exception, cfg: LLMConfig) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return f"timeout after {cfg.timeout_s:g} s"
    if isinstance(exc, openai.APIStatusError):
        return f"api error: HTTP {exc.status_code}"
    if isinstance(exc, openai.APIConnectionError):
        return f"api error: connection ({exc.__class__.__name__})"
    return f"api error: {exc.__class__.__name__}: {exc}"[:300]


def _text_and_usage(resp: Any) -> tuple[str | None, int | None, int | None]:
    text = resp.choices[0].message.content if resp.choices else None
    usage = getattr(resp, "usage", None)
    pt = getattr(usage, "prompt_tokens", None) if usage is not None else None
    ct = getattr(usage, "completion_tokens", None) if usage is not None else None
    return text, pt, ct


def conclude(
    spec: PipelineSpec,
    prep: Prepared,
    text: str | None,
    call: LLMCall,
    policy: str,
) -> Decision:
    """Pure: the decision from the LLM's text, or the embedded fallback with the reason."""
    reason: str | None = call.error
    if reason is None:
        try:
            answer = prompt.parse_answer(spec, text, prep)
        except prompt.AnswerError as exc:
            reason = str(exc)
        else:
            pred = planner.predict(spec, prep.estimates, answer.targets, correction=prep.correction)
            chosen = answer.candidate or "own action"
            return Decision(
                targets=answer.targets,
                source="llm",
                policy=policy,
                rationale=(
                    *prep.reasons,
                    f"llm chose {chosen}: {answer.rationale}",
                ),
                hold=same_targets(answer.targets, prep.current),
                bottleneck=answer.bottleneck or prep.bottleneck,
                predicted_p99_ms=pred.p99_ms if math.isfinite(pred.p99_ms) else None,
                predicted_reward=None,
                llm=replace(call, ok=True),
            )
    fallback = decision_for(prep, prep.best, policy, why=(f"llm fallback: {reason}",))
    return replace(fallback, fallback_reason=f"llm {reason}", llm=replace(call, error=reason))


class LLMPolicy(SairPolicy):
    """`sair` with the strategic choice made by an LLM (see the module doc)."""

    def __init__(
        self,
        client: openai.OpenAI | None = None,
        config: LLMConfig | None = None,
        sair: SairConfig | None = None,
        name: str = "llm",
        async_client: openai.AsyncOpenAI | None = None,
        from_env: bool = True,
    ) -> None:
        super().__init__(sair, name)
        if config is None:
            config = LLMConfig(model=os.environ.get("SAIR_LLM_MODEL") or LLMConfig.model)
        self.llm_config = config
        # No client given: the endpoint from the environment, if any (else every strategic
        # decision falls back to the embedded policy, saying so).
        self.client = (
            client if client is not None or not from_env else client_from_env(config.timeout_s)
        )
        self.async_client = async_client

    def _begin(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        retrieved: Sequence[RetrievedEpisode],
        demand: Demand | None = None,
    ) -> tuple[Prepared, Decision | None, SairState, list[dict[str, str]]]:
        prep = prepare(spec, telemetry, state, retrieved, self.config, demand=demand, now=now)
        chosen, explored, ex_state = maybe_explore(
            state.explore,
            prep.candidates,
            prep.best,
            allowed=(
                self.config.explore and not prep.breaking and not prep.degraded and not prep.busy
            ),
            eligible=prep.safe,
        )
        new_state = after_strategic(spec, telemetry, state, prep, ex_state, now)
        if explored:
            d = decision_for(
                prep,
                chosen,
                self.name,
                source="explore",
                why=(f"exploring (epsilon {state.explore.epsilon:.3f}); no llm call",),
            )
            return prep, d, new_state, []
        msgs = prompt.build_messages(
            spec, telemetry, prep, retrieved, self.llm_config.prompt_budget_tokens
        )
        return prep, None, new_state, msgs

    def _answered(
        self,
        spec: PipelineSpec,
        prep: Prepared,
        chars: int,
        t0: float,
        resp: Any,
        exc: Exception | None,
    ) -> Decision:
        """The decision from one call's answer (or failure), with its cost recorded."""
        cfg = self.llm_config
        ms = (time.perf_counter() - t0) * 1000.0
        if exc is not None:
            call = LLMCall(cfg.model, ms, prompt_chars=chars, error=_describe_exc(exc, cfg))
            return conclude(spec, prep, None, call, self.name)
        text, pt, ct = _text_and_usage(resp)
        return conclude(
            spec, prep, text, LLMCall(cfg.model, ms, pt, ct, prompt_chars=chars), self.name
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
        prep, early, new_state, msgs = self._begin(
            spec, telemetry, state, now, retrieved, demand
        )
        if early is not None:
            return early, new_state
        cfg = self.llm_config
        chars = sum(len(m["content"]) for m in msgs)
        if self.client is None:
            call = LLMCall(cfg.model, 0.0, prompt_chars=chars, error="no llm endpoint configured")
            return conclude(spec, prep, None, call, self.name), new_state
        t0 = time.perf_counter()
        try:
            resp = self.client.with_options(
                timeout=cfg.timeout_s, max_retries=0
            ).chat.completions.create(**_request(spec, cfg, msgs))
        except Exception as exc:  # any client failure is a fallback, never a crash
            return self._answered(spec, prep, chars, t0, None, exc), new_state
        return self._answered(spec, prep, chars, t0, resp, None), new_state

    async def strategic_async(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: SairState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
        *,
        demand: Demand | None = None,
    ) -> tuple[Decision, SairState]:
        """As `strategic`, with the async client (for the service's event loop)."""
        prep, early, new_state, msgs = self._begin(
            spec, telemetry, state, now, retrieved, demand
        )
        if early is not None:
            return early, new_state
        cfg = self.llm_config
        chars = sum(len(m["content"]) for m in msgs)
        if self.async_client is None:
            call = LLMCall(cfg.model, 0.0, prompt_chars=chars, error="no llm endpoint configured")
            return conclude(spec, prep, None, call, self.name), new_state
        t0 = time.perf_counter()
        try:
            resp = await self.async_client.with_options(
                timeout=cfg.timeout_s, max_retries=0
            ).chat.completions.create(**_request(spec, cfg, msgs))
        except Exception as exc:  # any client failure is a fallback, never a crash
            return self._answered(spec, prep, chars, t0, None, exc), new_state
        return self._answered(spec, prep, chars, t0, resp, None), new_state

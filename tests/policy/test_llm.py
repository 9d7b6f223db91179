"""LLM policy through the real `openai` client against a local OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from schemas.context import encode_context
from services.policy import prompt
from services.policy.embedded import SairConfig, SairState, prepare
from services.policy.interface import to_scaling_action
from services.policy.llm import LLMConfig, LLMPolicy
from tests.policy import factories as f


class FakeLLM(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions with `self.content` after `self.delay_s`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.content = ""
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeLLM

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        time.sleep(self.server.delay_s)
        out = json.dumps(
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.server.content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 812, "completion_tokens": 64, "total_tokens": 876},
            }
        ).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    srv = FakeLLM()
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def policy(srv: FakeLLM, timeout_s: float = 5.0) -> LLMPolicy:
    client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
    return LLMPolicy(
        client=client,
        config=LLMConfig(model="test-model", timeout_s=timeout_s),
        sair=SairConfig(explore=False),
    )


def answer(**over: Any) -> str:
    data: dict[str, Any] = {
        "candidate": None,
        "stages": [
            {"stage": "pre", "replicas": 3, "rho": None},
            {"stage": "infer", "replicas": 3, "rho": 0.75},
            {"stage": "post", "replicas": 2, "rho": None},
        ],
        "bottleneck": "infer",
        "rationale": "Infer queue grows; one more replica at 0.75 covers the load.",
    }
    data.update(over)
    return json.dumps(data)


def decide(srv: FakeLLM, timeout_s: float = 5.0):  # type: ignore[no-untyped-def]
    sp = f.spec()
    t = f.telemetry(sp=sp)
    pol = policy(srv, timeout_s)
    d, _ = pol.decide(sp, t, pol.initial_state(sp), 0.0)
    return sp, d


def test_good_answer_is_used(fake_llm: FakeLLM) -> None:
    fake_llm.content, fake_llm.delay_s = answer(), 0.0
    _, d = decide(fake_llm)
    assert d.source == "llm" and d.fallback_reason is None
    assert [(a.target_replicas, a.rho) for a in d.targets] == [(3, None), (3, 0.75), (2, None)]
    assert d.bottleneck == "infer" and any("one more replica" in r for r in d.rationale)
    assert d.llm is not None and d.llm.ok
    assert (d.llm.prompt_tokens, d.llm.completion_tokens) == (812, 64) and d.llm.latency_ms > 0
    req = fake_llm.requests[-1]
    assert req["model"] == "test-model"
    assert req["response_format"]["type"] == "json_schema"
    assert req["response_format"]["json_schema"]["strict"] is True


def test_candidate_id_answer_uses_that_candidate(fake_llm: FakeLLM) -> None:
    fake_llm.content, fake_llm.delay_s = answer(candidate="c0", stages=[]), 0.0
    _, d = decide(fake_llm)
    assert d.source == "llm" and d.hold  # c0 is always "hold"


@pytest.mark.parametrize(
    ("content", "delay_s", "timeout_s", "reason"),
    [
        ("{not json", 0.0, 5.0, "malformed"),
        (answer(rationale=""), 0.0, 5.0, "malformed"),
        (
            answer(stages=[{"stage": "infer", "replicas": 50, "rho": 0.75}]),
            0.0, 5.0, "out_of_range: infer.replicas=50 outside [1, 8]",
        ),
        (
            answer(stages=[{"stage": "infer", "replicas": 3, "rho": 0.6}]),
            0.0, 5.0, "out_of_range: infer.rho=0.6 not on the grid",
        ),
        (answer(), 2.0, 0.5, "timeout after 0.5 s"),
    ],
    ids=["not-json", "no-rationale", "replicas-out-of-bounds", "rho-off-grid", "slow"],
)
def test_bad_answers_fall_back_to_the_embedded_policy(
    fake_llm: FakeLLM, content: str, delay_s: float, timeout_s: float, reason: str
) -> None:
    fake_llm.content, fake_llm.delay_s = content, delay_s
    sp, d = decide(fake_llm, timeout_s)
    assert d.source == "embedded"
    assert d.fallback_reason is not None and reason in d.fallback_reason
    assert d.llm is not None and not d.llm.ok and d.llm.error is not None
    msg = to_scaling_action(d, sp.name, "a-1", 0.0)
    assert msg.fallback_reason == d.fallback_reason
    assert any(r.startswith("chose ") for r in d.rationale)  # the embedded choice


def test_no_endpoint_falls_back() -> None:
    sp = f.spec()
    pol = LLMPolicy(client=None, from_env=False, sair=SairConfig(explore=False))
    d, _ = pol.decide(sp, f.telemetry(sp=sp), pol.initial_state(sp), 0.0)
    assert d.source == "embedded" and d.fallback_reason == "llm no llm endpoint configured"


async def test_async_client(fake_llm: FakeLLM) -> None:
    fake_llm.content, fake_llm.delay_s = answer(), 0.0
    sp = f.spec()
    pol = LLMPolicy(
        async_client=openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="t", max_retries=0),
        from_env=False,
        sair=SairConfig(explore=False),
    )
    d, _ = await pol.strategic_async(sp, f.telemetry(sp=sp), pol.initial_state(sp), 0.0)
    assert d.source == "llm" and d.target("infer").rho == 0.75


def test_prompt_stays_under_budget_with_15_episodes_and_4_stages() -> None:
    sp = f.spec4()
    t = f.telemetry(sp=sp)
    ctx = encode_context(t, sp)
    action = {"pre": (2, None), "infer": (3, 0.5), "agg": (1, None), "post": (2, None)}
    eps = [f.episode(sp, ctx, action, 1.0 + i / 10, i) for i in range(15)]
    prep = prepare(sp, t, SairState(), eps)
    msgs = prompt.build_messages(sp, t, prep, eps)
    tokens = prompt.messages_tokens(msgs)
    assert tokens <= prompt.PROMPT_TOKEN_BUDGET
    assert "episodes (15 of 15" in msgs[1]["content"]
    # a smaller budget drops episodes (lowest score first) and says so
    small = prompt.build_messages(sp, t, prep, eps, budget_tokens=tokens - 100)
    assert prompt.messages_tokens(small) <= tokens - 100
    assert "of 15 retrieved" in small[1]["content"] and "(15 of 15" not in small[1]["content"]

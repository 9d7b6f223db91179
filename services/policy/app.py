"""The policy service: telemetry in, actions (and episodes) out.

    python -m services.policy --pipeline-spec PATH [--policy sair] [--advisory]

Subscribes to `sair.telemetry.<pipeline>`; for each tick (the newest one, when decisions are
slower than ticks) it asks the retriever on `sair.retrieve.<pipeline>` when a strategic
decision is due, runs `loop.step` (in a thread: the LLM client blocks), and publishes the
`ScalingAction` on `sair.actions.<pipeline>` and the positive-reward `Episode` on
`sair.episodes.<pipeline>`. A retriever that does not answer in time costs the decision its
episodes, not the decision itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from sair.runtime import ServiceRuntime, configure_logging
from sair.settings import Settings
from schemas import subjects
from schemas.context import ENCODING_VERSION, encode_context
from schemas.messages import PipelineTelemetry, RetrievedEpisode, RetrieveReply, RetrieveRequest
from schemas.pipeline import PipelineSpec, load_pipeline_spec

from . import loop
from .interface import POLICY_NAMES, Policy, get_policy

SERVICE = "policy"
log = logging.getLogger("sair.policy")


@dataclass
class PolicyStats:
    ticks: int = 0
    decisions: int = 0
    actions: int = 0
    episodes: int = 0
    retrievals: int = 0
    retrieval_failures: int = 0
    last_retrieved: int = 0
    last_action_source: str | None = None
    last_note: str | None = None
    llm_fallbacks: int = 0


@dataclass
class PolicyApp:
    rt: ServiceRuntime
    spec: PipelineSpec
    policy: Policy[Any]
    advisory: bool
    retrieval_timeout_s: float
    clock: Callable[[], float]
    state: loop.LoopState
    stats: PolicyStats = field(default_factory=PolicyStats)
    _latest: PipelineTelemetry | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False

    async def on_telemetry(self, telemetry: PipelineTelemetry) -> None:
        # Keep only the newest tick: a slow decision must not work through a backlog.
        self._latest = telemetry
        self._wake.set()

    async def decide_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            telemetry, self._latest = self._latest, None
            if telemetry is None:
                continue
            try:
                await self.handle_tick(telemetry)
            except Exception:  # one bad tick must not end the service
                log.exception("tick %d failed", telemetry.tick)

    async def handle_tick(self, telemetry: PipelineTelemetry) -> None:
        now = self.clock()
        self.stats.ticks += 1
        retrieved: Sequence[RetrievedEpisode] = ()
        if loop.needs_retrieval(self.policy, self.spec, self.state, now):
            retrieved = await self.retrieve(telemetry)
        action_id = f"{self.spec.name}-{uuid.uuid4().hex[:16]}"
        result, self.state = await asyncio.to_thread(
            loop.step,
            self.policy,
            self.spec,
            telemetry,
            self.state,
            now,
            action_id,
            retrieved,
            self.advisory,
        )
        if result.note:
            self.stats.last_note = result.note
            log.info("%s", result.note)
        if result.decision.fallback_reason:
            self.stats.llm_fallbacks += 1
        if result.episode is not None:
            await self.rt.js_publish(
                subjects.episodes(self.spec.name), result.episode, msg_id=result.episode.episode_id
            )
            self.stats.episodes += 1
        if result.action is not None:
            await self.rt.js_publish(
                subjects.actions(self.spec.name), result.action, msg_id=result.action.action_id
            )
            self.stats.actions += 1
            self.stats.last_action_source = result.action.source
            log.info(
                "action %s (%s): %s — %s",
                result.action.action_id,
                result.action.source,
                ", ".join(
                    f"{a.stage}={a.target_replicas}" + (f"@{a.rho}" if a.rho is not None else "")
                    for a in result.action.stages
                ),
                result.action.rationale[:200],
            )
        self.stats.decisions += 1  # last: a reader seeing the count sees everything published

    async def retrieve(self, telemetry: PipelineTelemetry) -> Sequence[RetrievedEpisode]:
        req = RetrieveRequest(
            pipeline=self.spec.name,
            encoding_version=ENCODING_VERSION,
            context=encode_context(telemetry, self.spec),
        )
        self.stats.retrievals += 1
        try:
            reply = await self.rt.request(
                subjects.retrieve(self.spec.name), req, RetrieveReply, self.retrieval_timeout_s
            )
        except Exception as exc:
            self.stats.retrieval_failures += 1
            log.warning("retrieval failed (%s): deciding without episodes", exc)
            return ()
        if reply.error:
            self.stats.retrieval_failures += 1
            log.warning("retriever answered with an error: %s", reply.error)
            return ()
        self.stats.last_retrieved = len(reply.episodes)
        return reply.episodes

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.rt.stop()
        await self.rt.close()


async def start_policy(
    settings: Settings,
    spec: PipelineSpec,
    policy: str = "sair",
    *,
    advisory: bool = False,
    seed: int = 0,
    retrieval_timeout_s: float = 2.0,
    clock: Callable[[], float] = time.time,
    policy_options: dict[str, Any] | None = None,
) -> PolicyApp:
    chosen = get_policy(policy, **(policy_options or {}))
    rt = ServiceRuntime(SERVICE, settings)
    await rt.start()
    app = PolicyApp(
        rt=rt,
        spec=spec,
        policy=chosen,
        advisory=advisory,
        retrieval_timeout_s=retrieval_timeout_s,
        clock=clock,
        state=loop.initial_state(chosen, spec, seed),
    )
    _metrics(app)
    await rt.subscribe(
        subjects.telemetry(spec.name),
        PipelineTelemetry,
        app.on_telemetry,
        context={"spec": spec},
    )
    rt.spawn(app.decide_forever(), name="policy-decide")
    log.info("policy %s on %s (advisory=%s)", policy, spec.name, advisory)
    return app


def _metrics(app: PolicyApp) -> None:
    reg = app.rt.metrics.registry
    labels = {"pipeline": app.spec.name, "policy": app.policy.name}
    for name, doc in (
        ("decisions", "Decisions taken"),
        ("actions", "Actions published"),
        ("episodes", "Episodes published"),
        ("retrieval_failures", "Retrievals that failed or timed out"),
        ("llm_fallbacks", "LLM answers replaced by the embedded policy"),
    ):
        g = Gauge(f"sair_policy_{name}", doc, list(labels), registry=reg)
        g.labels(**labels).set_function(_stat_reader(app.stats, name))
    Counter("sair_policy_starts", "Service starts", list(labels), registry=reg).labels(
        **labels
    ).inc()


def _stat_reader(stats: PolicyStats, name: str) -> Callable[[], float]:
    def read() -> float:
        return float(getattr(stats, name))

    return read


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.policy", description=__doc__)
    p.add_argument("--pipeline-spec", required=True, help="pipeline spec TOML file")
    p.add_argument("--policy", default="sair", choices=POLICY_NAMES)
    p.add_argument("--advisory", action="store_true", help="publish actions marked not-to-apply")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def _amain(args: argparse.Namespace) -> None:
    spec = load_pipeline_spec(args.pipeline_spec)
    app = await start_policy(
        Settings.from_env(), spec, args.policy, advisory=args.advisory, seed=args.seed
    )
    try:
        await app.rt.run()
    finally:
        await app.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_amain(args))

"""The actuator service: carries out `ScalingAction`s (thin I/O shell, see docs/actuator.md).

Per pipeline: a JetStream durable pull consumer on exactly `sair.actions.<pipeline>` (stream
SAIR_ACTIONS, which also holds the `.result` subjects). For each action, in order:
1. idempotency: an id already handled is not applied again (record in KV `sair_state`);
2. advisory actions are recorded, not applied;
3. `guard` re-checks the action against the spec (bounds, step, rho grid);
4. the backend applies it; GPU stages get their token rate in Redis;
5. the record is updated, the `ActionResult` published on `sair.actions.<pipeline>.result`;
6. only then the message is acked.
An unreachable backend, Redis or KV is retried with backoff (the message is kept in progress,
never dropped); a definitive failure gives a "failed" result and the message is acked.
On start each pipeline first re-asserts its last applied settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from sair.runtime import ServiceRuntime, configure_logging
from sair.settings import Settings
from schemas import subjects
from schemas.common import describe_error
from schemas.messages import ActionResult, ResultStatus, ScalingAction, StageAction
from schemas.pipeline import PipelineSpec, load_pipeline_spec

from .backends import BACKEND_NAMES, ActionRef, ApplyOutcome, Backend, BackendUnavailable
from .backends.dryrun import DryRunBackend
from .backends.kubernetes import KubeConfig, KubernetesBackend
from .backends.local import LocalBackend
from .guard import CurrentStage, guard
from .state import ActuatorRecord, reassert_groups, record_key, with_published, with_result
from .tokens import (
    BURST_WINDOW_S,
    GpuTokens,
    TokenScriptError,
    TokenStoreUnavailable,
    gpu_burst,
    gpu_rate_per_s,
)

log = logging.getLogger("sair.actuator")

T = TypeVar("T")

SERVICE = "actuator"
KV_TIMEOUT_S = 5.0
FAILPOINTS = ("after_apply", "after_record", "before_ack")
"""Test hooks: the app stops dead at that point, as if killed, without acking."""

_NATS_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)


class StateUnavailable(RuntimeError):
    """The KV bucket or the bus cannot be reached right now."""


class _Stopped(Exception):
    """The app is closing: leave the message unacked for the next instance."""


class _Crash(Exception):
    """A failpoint fired: behave as if the process died here."""


RETRYABLE = (BackendUnavailable, TokenStoreUnavailable, StateUnavailable)


def durable_name(pipeline: str) -> str:
    return f"actuator-{subjects.check_name(pipeline, 'pipeline')}"


class ActuatorApp:
    """A running actuator. `close()` stops it; `health` says per pipeline what it is doing."""

    def __init__(
        self,
        rt: ServiceRuntime,
        specs: Sequence[PipelineSpec],
        backend: Backend,
        tokens: GpuTokens | None,
        ack_wait_s: float,
        retry_initial_s: float,
        retry_max_s: float,
        burst_window_s: float,
        failpoint: str | None,
    ) -> None:
        if failpoint is not None and failpoint not in FAILPOINTS:
            raise ValueError(f"failpoint={failpoint!r}: must be one of {', '.join(FAILPOINTS)}")
        self.rt = rt
        self.specs = {s.name: s for s in specs}
        self.backend = backend
        self.tokens = tokens
        self.ack_wait_s = ack_wait_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.burst_window_s = burst_window_s
        self.failpoint = failpoint
        self.crashed = asyncio.Event()
        """Set when a failpoint fired (tests wait on it)."""
        self.health: dict[str, str] = {name: "starting" for name in self.specs}
        self._closing = asyncio.Event()
        self._state_kv: KeyValue | None = None
        self._psubs: list[nats.js.JetStreamContext.PullSubscription] = []
        reg = rt.metrics.registry
        self.m_results = Counter(
            "sair_actuator_results",
            "Action results by status",
            ["pipeline", "status"],
            registry=reg,
        )
        self.m_retries = Counter(
            "sair_actuator_retries",
            "Retries after an unreachable dependency",
            ["pipeline"],
            registry=reg,
        )
        self.m_retrying = Gauge(
            "sair_actuator_retrying",
            "1 while an action or reconcile waits on a dependency",
            ["pipeline"],
            registry=reg,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # Consumers first, so an action published once start() returned is never skipped by
        # the consumer's start position; reconciling may then wait on Redis in the background.
        for spec in self.specs.values():
            psub = await self._subscribe(spec)
            self._psubs.append(psub)
            self.rt.spawn(self._pipeline_loop(spec, psub), name=f"actuator-{spec.name}")

    async def close(self) -> None:
        self._closing.set()
        if self.crashed.is_set():
            # Simulated death: drop the connection as a killed process would, no draining.
            with contextlib.suppress(Exception):
                await self.rt.nc.close()
        for psub in self._psubs:
            # Before draining: a pull request left open by a cancelled fetch would otherwise
            # park a status message in the subscription's queue and stall the drain.
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        await self.rt.close()
        await self.backend.close()
        if self.tokens is not None:
            with contextlib.suppress(Exception):
                await self.tokens.close()

    async def run(self) -> None:
        """Until SIGTERM/SIGINT."""
        try:
            await self.rt.run()
        finally:
            await self.close()

    # ------------------------------------------------------------------ per pipeline

    async def _pipeline_loop(
        self, spec: PipelineSpec, psub: nats.js.JetStreamContext.PullSubscription
    ) -> None:
        try:
            await self._reconcile(spec)
            self.health[spec.name] = "ok"
            while not self._closing.is_set():
                try:
                    msgs = await psub.fetch(1, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except Exception as exc:  # bus down or reconnecting: wait, the consumer stays
                    if self._closing.is_set():
                        return
                    log.warning("fetch of %s actions failed: %s", spec.name, exc)
                    await self._sleep(0.5)
                    continue
                for msg in msgs:
                    try:
                        await self._handle(spec, msg)
                    except (_Stopped, _Crash, asyncio.CancelledError):
                        raise
                    except Exception:  # a bug must not stop the pipeline's actuation
                        log.exception("action on %s failed unexpectedly; redelivering", msg.subject)
                        with contextlib.suppress(Exception):
                            await msg.nak(delay=self.retry_max_s)
        except _Stopped:
            return
        except _Crash:
            log.error("failpoint %s fired: actuator for %s stops here", self.failpoint, spec.name)
            self.crashed.set()

    async def _subscribe(self, spec: PipelineSpec) -> nats.js.JetStreamContext.PullSubscription:
        durable = durable_name(spec.name)
        cfg = js_api.ConsumerConfig(
            durable_name=durable,
            filter_subject=subjects.actions(spec.name),  # not the `.result` subject beside it
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=1,  # strictly one action at a time, in order, across instances
            # A new consumer starts from the latest action: the audit log's history is not
            # replayed onto a fresh deployment, but an action sent just before is not lost.
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
        )

        async def create() -> nats.js.JetStreamContext.PullSubscription:
            try:
                await self.rt.js.add_consumer(subjects.ACTIONS_STREAM, cfg)
            except nats.js.errors.BadRequestError as exc:
                log.info("consumer %s exists with other settings, using it: %s", durable, exc)
            except _NATS_TRANSIENT as exc:
                raise StateUnavailable(f"creating consumer {durable}: {exc!r}") from exc
            return await self.rt.js.pull_subscribe_bind(durable, subjects.ACTIONS_STREAM)

        return await self._retry(spec.name, "subscribe", create)

    async def _handle(self, spec: PipelineSpec, msg: Msg) -> None:
        self.rt.metrics.received.labels(SERVICE, msg.subject).inc()
        try:
            action = ScalingAction.model_validate_json(msg.data)
        except ValidationError as exc:
            await self.rt.dead_letter(
                msg.subject, msg.data, f"ScalingAction: {describe_error(exc)}"
            )
            await msg.term()
            return
        result = await self._process(spec, action, msg)
        self.m_results.labels(spec.name, result.status).inc()
        self._failpoint("before_ack")
        await msg.ack()

    # ------------------------------------------------------------------ one action

    async def _process(
        self, spec: PipelineSpec, action: ScalingAction, msg: Msg | None
    ) -> ActionResult:
        p = spec.name
        record, _rev = await self._retry(p, "read state", lambda: self._load_record(p), msg)
        if record.seen(action.action_id):
            return await self._duplicate(spec, action, record, msg)

        if action.advisory:
            current = {s.stage: CurrentStage(s.target_replicas, s.rho) for s in record.desired}
            g = guard(spec, action, current)
            reasons = ["advisory action: recorded, not applied"]
            reasons += [f"would be: {r}" for r in g.reasons]
            result = self._result(spec, action, "recorded", [], reasons)
            return await self._finish(spec, action, result, applied_to_backend=False, msg=msg)

        current = await self._retry(p, "read backend", lambda: self._current(spec, record), msg)
        g = guard(spec, action, current)
        if g.rejected:
            result = self._result(spec, action, "failed", [], list(g.reasons))
            return await self._finish(spec, action, result, applied_to_backend=False, msg=msg)

        ref = ActionRef(action.action_id, action.ts_s)
        outcome: ApplyOutcome = await self._retry(
            p,
            f"apply via {self.backend.name}",
            lambda: self.backend.apply(spec, ref, g.stages),
            msg,
        )
        self._failpoint("after_apply")
        token_failures, token_notes = await self._set_token_rates(spec, outcome.applied, msg)

        reasons = [*g.reasons, *outcome.failures, *token_failures, *outcome.notes, *token_notes]
        status: ResultStatus
        if not self.backend.applies:
            status = "recorded"
        elif outcome.failures or token_failures:
            status = "failed"
        elif g.reasons:
            status = "clamped"
        else:
            status = "applied"
        result = self._result(spec, action, status, list(outcome.applied), reasons)
        return await self._finish(
            spec, action, result, applied_to_backend=self.backend.applies, msg=msg
        )

    async def _duplicate(
        self, spec: PipelineSpec, action: ScalingAction, record: ActuatorRecord, msg: Msg | None
    ) -> ActionResult:
        original = record.result_of(action.action_id)
        if original is not None and action.action_id in record.unpublished:
            # The first run died between recording and publishing: publish its result now.
            await self._publish_and_mark(spec.name, original, msg)
        was = original.status if original is not None else "result no longer kept"
        result = self._result(
            spec,
            action,
            "duplicate",
            [],
            [f"action {action.action_id} was already handled ({was}); not applied again"],
        )
        await self._retry(
            spec.name, "publish result", lambda: self._publish(result, dedupe=False), msg
        )
        log.info("duplicate action %s for %s ignored", action.action_id, spec.name)
        return result

    async def _finish(
        self,
        spec: PipelineSpec,
        action: ScalingAction,
        result: ActionResult,
        applied_to_backend: bool,
        msg: Msg | None,
    ) -> ActionResult:
        p = spec.name
        await self._retry(
            p,
            "write state",
            lambda: self._update_record(
                p, lambda r: with_result(r, result, action.ts_s, applied_to_backend)
            ),
            msg,
        )
        self._failpoint("after_record")
        await self._publish_and_mark(p, result, msg)
        log.info(
            "action %s for %s: %s %s", action.action_id, p, result.status, "; ".join(result.reasons)
        )
        return result

    async def _publish_and_mark(self, p: str, result: ActionResult, msg: Msg | None) -> None:
        await self._retry(p, "publish result", lambda: self._publish(result), msg)
        await self._retry(
            p,
            "write state",
            lambda: self._update_record(p, lambda r: with_published(r, result.action_id)),
            msg,
        )

    def _result(
        self,
        spec: PipelineSpec,
        action: ScalingAction,
        status: ResultStatus,
        applied: list[StageAction],
        reasons: list[str],
    ) -> ActionResult:
        return ActionResult(
            pipeline=spec.name,  # the subject it came on, even when the payload names another
            action_id=action.action_id,
            ts_s=time.time(),
            status=status,
            backend=self.backend.name,
            applied=applied,
            reasons=[r[:4000] for r in reasons[:64]],
        )

    async def _current(self, spec: PipelineSpec, record: ActuatorRecord) -> dict[str, CurrentStage]:
        """Backend's view, with rho from our record where the backend keeps none (Kubernetes)."""
        current = await self.backend.current(spec)
        for s in record.desired:
            held = current.get(s.stage)
            if held is None:
                current[s.stage] = CurrentStage(s.target_replicas, s.rho)
            elif held.rho is None and s.rho is not None:
                current[s.stage] = CurrentStage(held.replicas, s.rho)
        return current

    async def _set_token_rates(
        self, spec: PipelineSpec, applied: Sequence[StageAction], msg: Msg | None
    ) -> tuple[list[str], list[str]]:
        """Set each applied GPU stage's bucket rate; (failures, notes)."""
        failures: list[str] = []
        notes: list[str] = []
        if self.tokens is None or not self.backend.applies:
            return failures, notes
        tokens = self.tokens
        for action in applied:
            stage = spec.stage(action.stage)
            if stage.kind != "gpu":
                continue
            rho = action.rho if action.rho is not None else (stage.start_rho or 1.0)
            rate = gpu_rate_per_s(stage, action.target_replicas, rho)
            if rate is None:
                notes.append(
                    f"stage {stage.name!r}: no full_speed_launch_rate in the spec, "
                    f"GPU token rate not set"
                )
                continue
            burst = gpu_burst(rate, self.burst_window_s)
            try:
                await self._retry(
                    spec.name,
                    "set GPU token rate",
                    functools.partial(tokens.set_rate, spec.name, stage.name, rate, burst, rho),
                    msg,
                )
            except TokenScriptError as exc:
                failures.append(f"stage {stage.name!r}: GPU token rate not set: {exc}")
        return failures, notes

    # ------------------------------------------------------------------ reconcile

    async def _reconcile(self, spec: PipelineSpec) -> None:
        """Re-assert the last applied settings (the KV or the cluster may have lost them, Redis
        certainly has if it restarted), and give every GPU bucket a rate."""
        p = spec.name
        self.health[p] = "reconciling"
        record, _rev = await self._retry(p, "read state", lambda: self._load_record(p))
        if self.backend.applies:
            for action_id, ts_s, stages in reassert_groups(record):
                ref = ActionRef(action_id, ts_s)
                outcome = await self._retry(
                    p, "re-assert", functools.partial(self.backend.apply, spec, ref, stages)
                )
                for why in outcome.failures:
                    log.warning("re-asserting %s for %s: %s", action_id, p, why)
        current = await self._retry(p, "read backend", lambda: self._current(spec, record))
        gpu_settings: list[StageAction] = []
        for stage in spec.stages:
            if stage.kind != "gpu":
                continue
            held = current.get(stage.name)
            replicas = (
                held.replicas if held and held.replicas is not None else stage.initial_replicas
            )
            rho = held.rho if held and held.rho is not None else stage.start_rho
            gpu_settings.append(StageAction(stage=stage.name, target_replicas=replicas, rho=rho))
        _failures, _notes = await self._set_token_rates(spec, gpu_settings, None)
        for why in _failures:
            log.warning("reconcile %s: %s", p, why)
        log.info("reconciled %s: %d stage settings re-asserted", p, len(record.desired))

    # ------------------------------------------------------------------ state in KV

    async def _state_bucket(self) -> KeyValue:
        if self._state_kv is None:
            try:
                self._state_kv = await asyncio.wait_for(
                    self.rt.js.key_value(subjects.STATE_BUCKET), KV_TIMEOUT_S
                )
            except _NATS_TRANSIENT as exc:
                raise StateUnavailable(f"KV bucket {subjects.STATE_BUCKET}: {exc!r}") from exc
        return self._state_kv

    async def _load_record(self, pipeline: str) -> tuple[ActuatorRecord, int | None]:
        kv = await self._state_bucket()
        key = record_key(pipeline)
        try:
            entry = await asyncio.wait_for(kv.get(key), KV_TIMEOUT_S)
        except nats.js.errors.KeyNotFoundError:
            return ActuatorRecord(pipeline=pipeline), None
        except _NATS_TRANSIENT as exc:
            raise StateUnavailable(f"KV get {key}: {exc!r}") from exc
        if not entry.value:
            return ActuatorRecord(pipeline=pipeline), entry.revision
        try:
            return ActuatorRecord.model_validate_json(entry.value), entry.revision
        except ValidationError as exc:
            # Never block actuation on a broken record: start a new one, say so.
            log.error("state %s unreadable (%s); starting a fresh record", key, describe_error(exc))
            return ActuatorRecord(pipeline=pipeline), entry.revision

    async def _update_record(
        self, pipeline: str, change: Callable[[ActuatorRecord], ActuatorRecord]
    ) -> ActuatorRecord:
        """Compare-and-set: read, change, write at the read revision; again on a conflict."""
        kv = await self._state_bucket()
        key = record_key(pipeline)
        while True:
            record, revision = await self._load_record(pipeline)
            new = change(record)
            data = new.model_dump_json().encode()
            try:
                if revision is None:
                    await asyncio.wait_for(kv.create(key, data), KV_TIMEOUT_S)
                else:
                    await asyncio.wait_for(kv.update(key, data, last=revision), KV_TIMEOUT_S)
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except _NATS_TRANSIENT as exc:
                raise StateUnavailable(f"KV write {key}: {exc!r}") from exc

    async def _publish(self, result: ActionResult, dedupe: bool = True) -> None:
        try:
            await self.rt.js_publish(
                subjects.action_results(result.pipeline),
                result,
                # Not the action's own id: the policy may use that for the action message.
                msg_id=f"result:{result.action_id}" if dedupe else None,
            )
        except _NATS_TRANSIENT as exc:
            raise StateUnavailable(f"publish result of {result.action_id}: {exc!r}") from exc

    # ------------------------------------------------------------------ helpers

    def _failpoint(self, name: str) -> None:
        if self.failpoint == name:
            raise _Crash(name)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _retry(
        self, pipeline: str, what: str, op: Callable[[], Awaitable[T]], msg: Msg | None = None
    ) -> T:
        """Run `op` until it succeeds, backing off while a dependency is unreachable; keeps the
        message in progress so JetStream does not hand it to another instance meanwhile."""
        delay_s = self.retry_initial_s
        attempt = 0
        while True:
            if self._closing.is_set():
                raise _Stopped()
            try:
                value = await op()
            except RETRYABLE as exc:
                attempt += 1
                self.health[pipeline] = f"retrying {what} (attempt {attempt}): {exc}"
                self.m_retries.labels(pipeline).inc()
                self.m_retrying.labels(pipeline).set(1)
                log.warning(
                    "%s for %s failed (attempt %d), retrying in %.1f s: %s",
                    what,
                    pipeline,
                    attempt,
                    delay_s,
                    exc,
                )
                if msg is not None:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await self._sleep(delay_s)
                delay_s = min(self.retry_max_s, delay_s * 2)
                continue
            if attempt:
                log.info("%s for %s succeeded after %d retries", what, pipeline, attempt)
                self.health[pipeline] = "ok"
                self.m_retrying.labels(pipeline).set(0)
            return value


def make_backend(name: str, rt: ServiceRuntime, kube: KubeConfig | None = None) -> Backend:
    if name == "local":
        return LocalBackend(rt.js)
    if name == "kubernetes":
        return KubernetesBackend(kube or KubeConfig.from_env())
    if name == "dry-run":
        return DryRunBackend()
    raise ValueError(f"backend={name!r}: must be one of {', '.join(BACKEND_NAMES)}")


async def start_actuator(
    settings: Settings,
    specs: list[PipelineSpec],
    backend: str = "local",
    *,
    kube_config: KubeConfig | None = None,
    ack_wait_s: float = 30.0,
    retry_initial_s: float = 0.2,
    retry_max_s: float = 5.0,
    burst_window_s: float = BURST_WINDOW_S,
    failpoint: str | None = None,
) -> ActuatorApp:
    """Connect, create the pipelines' consumers and start actuating; returns the running app."""
    if not specs:
        raise ValueError("specs: at least one pipeline spec is needed")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r}: must be one of {', '.join(BACKEND_NAMES)}")
    rt = ServiceRuntime(SERVICE, settings)
    await rt.start()
    try:
        chosen = make_backend(backend, rt, kube_config)
        # Redis is connected lazily: an unreachable one is retried per action, not at start.
        tokens = GpuTokens.from_url(settings.redis_url) if chosen.applies else None
        app = ActuatorApp(
            rt,
            specs,
            chosen,
            tokens,
            ack_wait_s=ack_wait_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
            burst_window_s=burst_window_s,
            failpoint=failpoint,
        )
    except Exception:
        await rt.close()
        raise
    await app.start()
    log.info("actuator started: backend %s, pipelines %s", backend, ", ".join(app.specs))
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.actuator", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--pipeline-spec",
        action="append",
        required=True,
        type=Path,
        help="pipeline spec TOML (repeat for several pipelines)",
    )
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="local")
    parser.add_argument("--ack-wait-s", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    specs = [load_pipeline_spec(p) for p in args.pipeline_spec]

    async def run() -> None:
        app = await start_actuator(
            Settings.from_env(), specs, args.backend, ack_wait_s=args.ack_wait_s
        )
        await app.run()

    asyncio.run(run())

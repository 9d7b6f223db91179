"""The service runtime: the thin I/O shell every SAIR service is built from.

- connects to NATS with reconnect and logs every state change;
- creates the JetStream streams and KV buckets of the design, idempotently;
- typed subscriptions: each payload is parsed into a `schemas/` model before the handler
  runs; a malformed one is rejected, counted, logged and published with the reason on the
  service's dead-letter subject `sair.dlq.<service>`, and the subscription carries on;
- request/reply with typed requests and replies;
- JetStream pull consumers acked only after the handler succeeded;
- a Prometheus `/metrics` endpoint per service;
- graceful shutdown on SIGTERM/SIGINT: drain subscriptions, flush, close.

Handlers are plain async functions taking a model; the logic they call has no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from pydantic import ValidationError

from schemas import subjects
from schemas.common import SairModel, describe_error
from schemas.messages import DeadLetter
from schemas.pipeline import PipelineSpec

from .settings import Settings

log = logging.getLogger("sair.runtime")

M = TypeVar("M", bound=SairModel)
R = TypeVar("R", bound=SairModel)

MAX_DLQ_PAYLOAD = 65536
CLOSE_STEP_TIMEOUT_S = 5.0
DAY_S = 86400.0
SUBSCRIBE_FLUSH_TIMEOUT_S = 5


class BusError(RuntimeError):
    """NATS or JetStream failed in a way the caller must handle."""


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry
    received: Counter
    rejected: Counter
    handler_errors: Counter
    handler_seconds: Histogram

    @classmethod
    def create(cls, service: str) -> ServiceMetrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            received=Counter(
                "sair_messages_received", "Messages received", ["service", "subject"], registry=reg
            ),
            rejected=Counter(
                "sair_messages_rejected",
                "Messages rejected and sent to the dead-letter subject",
                ["service", "subject"],
                registry=reg,
            ),
            handler_errors=Counter(
                "sair_handler_errors", "Handler exceptions", ["service", "subject"], registry=reg
            ),
            handler_seconds=Histogram(
                "sair_handler_seconds",
                "Handler time",
                ["service"],
                registry=reg,
                buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            ),
        )


async def ensure_core_streams(js: JetStreamContext) -> None:
    """Streams and buckets every deployment has (idempotent)."""
    await _ensure_stream(
        js,
        js_api.StreamConfig(
            name=subjects.ACTIONS_STREAM,
            subjects=[f"{subjects.PREFIX}.actions.>"],
            retention=js_api.RetentionPolicy.LIMITS,
            max_age=30 * DAY_S,
            storage=js_api.StorageType.FILE,
        ),
    )
    await _ensure_stream(
        js,
        js_api.StreamConfig(
            name=subjects.EPISODES_STREAM,
            subjects=[f"{subjects.PREFIX}.episodes.>"],
            retention=js_api.RetentionPolicy.LIMITS,
            max_age=30 * DAY_S,
            storage=js_api.StorageType.FILE,
        ),
    )
    await _ensure_stream(
        js,
        js_api.StreamConfig(
            name=subjects.DLQ_STREAM,
            subjects=[f"{subjects.PREFIX}.dlq.>"],
            retention=js_api.RetentionPolicy.LIMITS,
            max_msgs=1_000_000,
            max_age=7 * DAY_S,
            storage=js_api.StorageType.FILE,
        ),
    )
    for bucket in (subjects.DESIRED_BUCKET, subjects.STATE_BUCKET):
        await _ensure_bucket(js, bucket)


async def ensure_pipeline_streams(js: JetStreamContext, spec: PipelineSpec) -> None:
    """The pipeline's work-queue stream and one durable pull consumer per stage."""
    stream = subjects.pipe_stream(spec.name)
    await _ensure_stream(
        js,
        js_api.StreamConfig(
            name=stream,
            subjects=[subjects.pipe_stage(spec.name, s) for s in spec.stage_names],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=js_api.StorageType.FILE,
            max_age=DAY_S,
        ),
    )
    await ensure_done_stream(js, spec.name)
    for stage in spec.stage_names:
        cfg = js_api.ConsumerConfig(
            durable_name=subjects.stage_consumer(stage),
            filter_subject=subjects.pipe_stage(spec.name, stage),
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=10.0,  # workers send in_progress on long requests
            max_ack_pending=10_000,
            max_deliver=-1,
        )
        # Create only when absent: add_consumer on an existing durable would reset a tuned
        # configuration (e.g. a shorter ack_wait) to these defaults.
        try:
            await js.consumer_info(stream, subjects.stage_consumer(stage))
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await js.add_consumer(stream, cfg)


DONE_MAX_AGE_S = 3600.0
DONE_MAX_BYTES = 256 * 1024 * 1024


async def ensure_done_stream(js: JetStreamContext, pipeline: str) -> None:
    """Keep the pipeline's completions (core-NATS publishes on `pipe_done`) for an hour.

    Completions stay on core NATS for latency; this stream only lets a subscriber that was
    disconnected read back what it missed (the load generator does, after a reconnect).
    """
    await _ensure_stream(
        js,
        js_api.StreamConfig(
            name=subjects.done_stream(pipeline),
            subjects=[subjects.pipe_done(pipeline)],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            max_age=DONE_MAX_AGE_S,
            max_bytes=DONE_MAX_BYTES,
            discard=js_api.DiscardPolicy.OLD,
        ),
    )


async def _ensure_stream(js: JetStreamContext, cfg: js_api.StreamConfig) -> None:
    assert cfg.name is not None
    try:
        info = await js.stream_info(cfg.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(cfg)
        return
    if sorted(info.config.subjects or []) != sorted(cfg.subjects or []):
        await js.update_stream(cfg)


async def _ensure_bucket(js: JetStreamContext, bucket: str) -> None:
    try:
        await js.key_value(bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.create_key_value(js_api.KeyValueConfig(bucket=bucket, history=5))


Handler = Callable[[M], Awaitable[None]]


@dataclass
class ServiceRuntime:
    """One service's connection to the bus. Create, `await start()`, wire handlers, `run()`."""

    service: str
    settings: Settings = field(default_factory=Settings.from_env)
    metrics: ServiceMetrics = field(init=False)
    nc: NatsClient = field(init=False)
    js: JetStreamContext = field(init=False)
    metrics_port: int | None = field(default=None, init=False)
    _subs: list[Subscription] = field(default_factory=list, init=False)
    _pull_subs: list[JetStreamContext.PullSubscription] = field(default_factory=list, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _metrics_server: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        subjects.check_name(self.service, "service")
        self.metrics = ServiceMetrics.create(self.service)
        self.log = logging.getLogger(f"sair.{self.service}")

    # ------------------------------------------------------------------ lifecycle

    async def start(self, connect_timeout_s: float = 10.0) -> None:
        async def on_disconnect() -> None:
            self.log.warning("disconnected from NATS")

        async def on_reconnect() -> None:
            url = self.nc.connected_url
            where = f"{url.hostname}:{url.port}" if url else "?"  # never the credentials
            self.log.warning("reconnected to NATS at %s", where)

        async def on_error(exc: Exception) -> None:
            self.log.warning("NATS error: %s", exc)

        async def on_closed() -> None:
            self.log.info("NATS connection closed")

        try:
            self.nc = await asyncio.wait_for(
                nats.connect(
                    self.settings.nats_url,
                    name=f"sair-{self.service}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    error_cb=on_error,
                    closed_cb=on_closed,
                ),
                timeout=connect_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
            shown = self.settings.redacted()["nats_url"]
            raise BusError(f"cannot connect to NATS at {shown}: {exc}") from exc
        self.js = self.nc.jetstream()
        await ensure_core_streams(self.js)
        if self.settings.metrics_port >= 0:
            self._start_metrics_server()
        self.log.info(
            "service %s connected to %s (metrics on port %s)",
            self.service,
            self.settings.redacted()["nats_url"],
            self.metrics_port,
        )

    def _start_metrics_server(self) -> None:
        server, _thread = start_http_server(
            self.settings.metrics_port,
            addr=self.settings.metrics_host,
            registry=self.metrics.registry,
        )
        self._metrics_server = server
        self.metrics_port = int(server.server_port)

    def stop(self) -> None:
        """Ask `run()` to return (safe from a signal handler)."""
        self._stopping.set()

    async def run(self) -> None:
        """Wait until SIGTERM/SIGINT (or `stop()`), then close gracefully."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
        try:
            await self._stopping.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.close()

    async def close(self) -> None:
        """Stop background tasks, drain subscriptions (in-flight handlers finish), close."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that swallows its cancellation must not hold the shutdown.
            await asyncio.wait(self._tasks, timeout=CLOSE_STEP_TIMEOUT_S)
        self._tasks.clear()
        # A pull subscription whose fetch was cancelled can hold drain() for its whole
        # timeout; unsubscribing first avoids that stall.
        for psub in self._pull_subs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(psub.unsubscribe(), CLOSE_STEP_TIMEOUT_S)
        self._pull_subs.clear()
        if hasattr(self, "nc") and not self.nc.is_closed:
            # asyncio.wait, not wait_for: wait_for also waits for the cancelled drain to
            # finish, and nats-py's drain can outlive its cancellation.
            drain = asyncio.ensure_future(self.nc.drain())
            done, _ = await asyncio.wait({drain}, timeout=CLOSE_STEP_TIMEOUT_S)
            if not done:
                self.log.warning("drain did not finish in %.0f s; closing", CLOSE_STEP_TIMEOUT_S)
                drain.cancel()
            elif drain.exception() is not None:
                self.log.warning("drain failed: %s", drain.exception())
            if not self.nc.is_closed:
                closing = asyncio.ensure_future(self.nc.close())
                done, _ = await asyncio.wait({closing}, timeout=CLOSE_STEP_TIMEOUT_S)
                if not done:  # same reason as drain: never wait on a cancelled close
                    self.log.warning("close did not finish in %.0f s", CLOSE_STEP_TIMEOUT_S)
                    closing.cancel()
                elif closing.exception() is not None:
                    self.log.warning("close failed: %s", closing.exception())
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Run a background loop owned by the service; exceptions are logged, not lost."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("background task %s failed", name)

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.append(task)
        return task

    # ------------------------------------------------------------------ publishing

    async def publish(self, subject: str, message: SairModel) -> None:
        await self.nc.publish(subject, message.model_dump_json().encode())

    async def js_publish(self, subject: str, message: SairModel, msg_id: str | None = None) -> None:
        """Publish into a stream and wait for its ack (at-least-once)."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.js.publish(subject, message.model_dump_json().encode(), headers=headers)

    async def request(
        self, subject: str, message: SairModel, reply_model: type[R], timeout_s: float | None = None
    ) -> R:
        msg = await self.nc.request(
            subject,
            message.model_dump_json().encode(),
            timeout=timeout_s or self.settings.request_timeout_s,
        )
        return reply_model.model_validate_json(msg.data)

    async def dead_letter(self, subject: str, payload: bytes, reason: str) -> None:
        """Record a rejected message: counted, logged, kept on `sair.dlq.<service>`."""
        self.metrics.rejected.labels(self.service, subject).inc()
        self.log.warning("rejected message on %s: %s", subject, reason)
        letter = DeadLetter(
            service=self.service,
            subject=subject[:256],
            reason=reason[:4000],
            ts_s=time.time(),
            payload=payload[:MAX_DLQ_PAYLOAD].decode("utf-8", errors="replace")[:MAX_DLQ_PAYLOAD],
        )
        try:
            await self.js.publish(subjects.dlq(self.service), letter.model_dump_json().encode())
        except Exception as exc:  # the bus may be down; the log line above still has it
            self.log.error("could not publish dead letter for %s: %s", subject, exc)

    # ------------------------------------------------------------------ receiving

    def parse(self, model: type[M], data: bytes, context: dict[str, Any] | None = None) -> M:
        return model.model_validate_json(data, context=context)

    async def subscribe(
        self,
        subject: str,
        model: type[M],
        handler: Handler[M],
        queue: str = "",
        context: dict[str, Any] | None = None,
    ) -> Subscription:
        """Core NATS subscription; each message is parsed, then handled one at a time."""

        # Labelled metric children are looked up once per subject: a hot subscription (worker
        # reports into the monitor) pays a dict lookup per message, not prometheus' label lock.
        received: dict[str, Any] = {}
        handler_seconds = self.metrics.handler_seconds.labels(self.service)

        async def on_msg(msg: Msg) -> None:
            counter = received.get(msg.subject)
            if counter is None:
                counter = received[msg.subject] = self.metrics.received.labels(
                    self.service, msg.subject
                )
            counter.inc()
            try:
                parsed = model.model_validate_json(msg.data, context=context)
            except ValidationError as exc:
                await self.dead_letter(
                    msg.subject, msg.data, f"{model.__name__}: {describe_error(exc)}"
                )
                return
            started = time.perf_counter()
            try:
                await handler(parsed)
            except Exception as exc:
                self.metrics.handler_errors.labels(self.service, msg.subject).inc()
                self.log.exception("handler for %s failed", msg.subject)
                await self.dead_letter(msg.subject, msg.data, f"handler error: {exc!r}")
            finally:
                handler_seconds.observe(time.perf_counter() - started)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_msg)
        self._subs.append(sub)
        # Registered at the server when we return: a message sent next is not missed.
        await self._flush_registration(subject)
        return sub

    async def _flush_registration(self, subject: str) -> None:
        """Wait for the server to have a new subscription. If the bus went down meanwhile,
        the client re-sends it on reconnect: log that and go on, do not fail start-up."""
        try:
            await self.nc.flush(timeout=SUBSCRIBE_FLUSH_TIMEOUT_S)
        except nats.errors.FlushTimeoutError:
            self.log.warning(
                "NATS did not confirm the subscription to %s in %d s; it is registered "
                "again on reconnect",
                subject,
                SUBSCRIBE_FLUSH_TIMEOUT_S,
            )

    async def serve(
        self,
        subject: str,
        model: type[M],
        handler: Callable[[M], Awaitable[SairModel]],
        error_reply: Callable[[str], SairModel] | None = None,
        queue: str = "",
        context: dict[str, Any] | None = None,
    ) -> Subscription:
        """Request/reply: a malformed request is dead-lettered and, when `error_reply` is
        given, answered with the error so the requester does not wait for a timeout."""

        async def on_msg(msg: Msg) -> None:
            self.metrics.received.labels(self.service, msg.subject).inc()
            try:
                parsed = model.model_validate_json(msg.data, context=context)
            except ValidationError as exc:
                reason = f"{model.__name__}: {describe_error(exc)}"
                await self.dead_letter(msg.subject, msg.data, reason)
                if error_reply is not None and msg.reply:
                    await msg.respond(error_reply(reason).model_dump_json().encode())
                return
            try:
                reply = await handler(parsed)
            except Exception as exc:
                self.metrics.handler_errors.labels(self.service, msg.subject).inc()
                self.log.exception("handler for %s failed", msg.subject)
                reason = f"handler error: {exc!r}"
                await self.dead_letter(msg.subject, msg.data, reason)
                if error_reply is not None and msg.reply:
                    await msg.respond(error_reply(reason).model_dump_json().encode())
                return
            if msg.reply:
                await msg.respond(reply.model_dump_json().encode())

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_msg)
        self._subs.append(sub)
        # Registered at the server when we return: a message sent next is not missed.
        await self._flush_registration(subject)
        return sub

    async def consume(
        self,
        stream: str,
        durable: str,
        subject: str,
        model: type[M],
        handler: Handler[M],
        batch: int = 64,
        context: dict[str, Any] | None = None,
        nak_delay_s: float = 1.0,
        config: js_api.ConsumerConfig | None = None,
    ) -> asyncio.Task[None]:
        """Durable JetStream pull consumer: ack after the handler returns; a handler error
        naks with a delay (redelivery); a malformed message is dead-lettered and terminated."""
        psub = await self.js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        self._pull_subs.append(psub)

        async def loop() -> None:
            while not self._stopping.is_set():
                try:
                    msgs = await psub.fetch(batch, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
                    await asyncio.sleep(0.5)
                    continue
                except Exception as exc:
                    self.log.warning("fetch on %s failed: %s", subject, exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self._handle_js(msg, model, handler, context, nak_delay_s)

        return self.spawn(loop(), name=f"consume-{durable}")

    async def _handle_js(
        self,
        msg: Msg,
        model: type[M],
        handler: Handler[M],
        context: dict[str, Any] | None,
        nak_delay_s: float,
    ) -> None:
        self.metrics.received.labels(self.service, msg.subject).inc()
        try:
            parsed = model.model_validate_json(msg.data, context=context)
        except ValidationError as exc:
            await self.dead_letter(
                msg.subject, msg.data, f"{model.__name__}: {describe_error(exc)}"
            )
            await msg.term()
            return
        try:
            await handler(parsed)
        except Exception:
            self.metrics.handler_errors.labels(self.service, msg.subject).inc()
            self.log.exception("handler for %s failed; redelivering", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=nak_delay_s)
            return
        await msg.ack()


async def run_service(
    service: str,
    wire: Callable[[ServiceRuntime], Awaitable[None]],
    settings: Settings | None = None,
    pipelines: Sequence[PipelineSpec] = (),
) -> None:
    """Start a runtime, create the pipelines' streams, let `wire` subscribe, run until signalled."""
    rt = ServiceRuntime(service, settings or Settings.from_env())
    await rt.start()
    for spec in pipelines:
        await ensure_pipeline_streams(rt.js, spec)
    await wire(rt)
    await rt.run()


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

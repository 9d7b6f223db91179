"""The stage worker process: pull requests of one stage, run its handler, forward, report.

Flow of one request: fetch from the stage's durable pull consumer (shared by all replicas)
-> parse `StageRequest` (malformed: dead letter on `sair.dlq.worker`, term) -> run the
handler in a thread (or inline when marked cheap) -> JetStream-publish the result to the next
stage with `Nats-Msg-Id = <request id>:<next stage>` (a redelivered request is stored once),
or publish a `Completion` on `sair.pipe.<p>.done` from the last stage -> ack.
A handler exception naks with exponential backoff; the `max_failures`-th failed delivery
publishes a `DeadLetter` on `sair.dlq.pipe.<p>.<stage>` (stream SAIR_DLQ) and terms it.

Fetching: `prefetch_slots` = concurrency + prefetch tasks each hold their own pull
subscription and fetch one message at a time, so a fetch round trip overlaps the previous
request's handler, yet at most `prefetch` requests wait inside a replica (a slow replica
cannot hoard the queue). Handlers run under a semaphore of `StageSpec.concurrency`.

SIGTERM drains: stop fetching, nak (no delay) anything fetched but not started, finish and
ack in-flight requests, send a `draining` report, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from sair import gpu_emulation
from sair.runtime import ServiceRuntime, ensure_pipeline_streams
from sair.settings import Settings
from schemas import subjects
from schemas.common import describe_error
from schemas.messages import DeadLetter, StageRequest, WorkerState
from schemas.pipeline import PipelineSpec, StageSpec

from . import logic

log = logging.getLogger("sair.worker")

SERVICE = "worker"


async def ensure_pipeline_exists(js: JetStreamContext, spec: PipelineSpec) -> None:
    """Create the pipeline's stream and consumers only if something is missing.

    `ensure_pipeline_streams` re-applies the default consumer config; calling it only when
    needed keeps an operator's tuned consumers (e.g. a shorter ack_wait) as they are.
    """
    stream = subjects.pipe_stream(spec.name)
    try:
        await js.stream_info(stream)
        await js.stream_info(subjects.done_stream(spec.name))
        for stage in spec.stage_names:
            await js.consumer_info(stream, subjects.stage_consumer(stage))
    except nats.js.errors.NotFoundError:
        await ensure_pipeline_streams(js, spec)


@dataclass
class WorkerConfig:
    spec: PipelineSpec
    stage: str
    worker_id: str
    max_failures: int = logic.DEFAULT_MAX_FAILURES
    report_interval_s: float = 1.0
    prefetch: int = 1
    startup_s: float | None = None
    """Override of StageSpec.startup_s (None = use the spec)."""
    fetch_timeout_s: float = 0.5
    gpu_take_batch: int = gpu_emulation.DEFAULT_TAKE_BATCH
    install_signals: bool = True
    """False when the worker runs inside another program's event loop (tests, benchmarks)."""

    def __post_init__(self) -> None:
        self.stage_spec: StageSpec = self.spec.stage(self.stage)
        if self.stage_spec.handler is None:
            raise ValueError(f"stage {self.stage!r} of {self.spec.name!r} has no handler")
        if self.max_failures < 1:
            raise ValueError(f"max_failures={self.max_failures!r} must be >= 1")
        if self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch!r} must be >= 0")
        if not self.report_interval_s > 0:
            raise ValueError(f"report_interval_s={self.report_interval_s!r} must be > 0")


class StageWorker:
    """One replica of one stage."""

    def __init__(self, cfg: WorkerConfig, settings: Settings) -> None:
        self.cfg = cfg
        self.settings = settings
        self.spec = cfg.spec
        self.stage = cfg.stage_spec
        self.handler = logic.load_handler(self.stage.handler or "")
        self.inline = logic.runs_inline(self.handler)
        self.options: dict[str, Any] = dict(self.stage.options)
        nxt = self.spec.next_stage(self.stage.name)
        self.next_subject = subjects.pipe_stage(self.spec.name, nxt.name) if nxt else None
        self.next_name = nxt.name if nxt else None
        self.done_subject = subjects.pipe_done(self.spec.name)
        self.subject = subjects.pipe_stage(self.spec.name, self.stage.name)
        self.dlq_subject = subjects.pipe_dlq(self.spec.name, self.stage.name)
        self.state: WorkerState = "starting"
        self.window = logic.ReportWindow(
            self.spec.name, self.stage.name, cfg.worker_id, started_s=time.time()
        )
        self.rt = ServiceRuntime(SERVICE, settings)
        self._draining = asyncio.Event()
        self._sem = asyncio.Semaphore(self.stage.concurrency)
        self._executor = ThreadPoolExecutor(
            max_workers=self.stage.concurrency, thread_name_prefix="handler"
        )
        self._in_flight: dict[int, Msg] = {}
        self._in_flight_started: dict[int, float] = {}
        self._gpu: gpu_emulation.EmulatedGpu | None = None
        self._ack_wait_s = 30.0
        self.processed_total = 0
        self.dead_lettered_total = 0

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Begin draining (safe from a signal handler)."""
        if not self._draining.is_set():
            log.info("worker %s draining", self.cfg.worker_id)
        self._draining.set()

    async def run(self) -> None:
        """Connect, start up, serve until stopped, drain, close."""
        if self.cfg.install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.stop)
        await self.rt.start()
        reporter = asyncio.create_task(self._report_loop(), name="reports")
        announcer = asyncio.create_task(self._announce_drain(), name="announce-drain")
        try:
            await ensure_pipeline_exists(self.rt.js, self.spec)
            await self._publish_report()
            await self._startup()
            if not self._draining.is_set():
                await self._serve()
            self.state = "draining"
            await self._publish_report()
        finally:
            for task in (reporter, announcer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._executor.shutdown(wait=True)
            if self._gpu is not None:
                self._gpu.close()
            await self.rt.close()

    async def _startup(self) -> None:
        """Model load: the state stays `starting` for startup_s (interruptible by SIGTERM)."""
        if self.stage.kind == "gpu" and self.stage.full_speed_launch_rate:
            self._gpu = gpu_emulation.configure(
                self.spec.name, self.stage.name, self.stage.full_speed_launch_rate,
                self.settings.redis_url, take_batch=self.cfg.gpu_take_batch,
            )  # fmt: skip
        startup_s = self.stage.startup_s if self.cfg.startup_s is None else self.cfg.startup_s
        warm = getattr(self.handler, "sair_warmup", None)
        if callable(warm):  # a real model load (torch backend) is part of start-up
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(self._executor, warm, self.options)
            startup_s = max(0.0, startup_s - (time.monotonic() - t0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._draining.wait(), timeout=startup_s)
        if not self._draining.is_set():
            self.state = "ready"
            await self._publish_report()
            log.info("worker %s ready", self.cfg.worker_id)

    async def _serve(self) -> None:
        stream = subjects.pipe_stream(self.spec.name)
        durable = subjects.stage_consumer(self.stage.name)
        n_slots = self.stage.concurrency + self.cfg.prefetch
        psubs = [
            await self.rt.js.pull_subscribe(self.subject, durable=durable, stream=stream)
            for _ in range(n_slots)
        ]
        with contextlib.suppress(Exception):
            info = await psubs[0].consumer_info()
            if info.config.ack_wait:
                self._ack_wait_s = float(info.config.ack_wait)
        heart = asyncio.create_task(self._progress_loop(), name="in-progress")
        slots = [asyncio.create_task(self._slot(p), name=f"slot-{i}") for i, p in enumerate(psubs)]
        await asyncio.gather(*slots)
        heart.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heart
        # Messages the server delivered for a pull request that was still open when the slot
        # stopped: hand them straight back.
        for psub in psubs:
            queue = psub._sub._pending_queue  # no public API for a pull sub's buffered messages
            while not queue.empty():
                msg = queue.get_nowait()
                if msg.reply and msg.reply.startswith("$JS.ACK."):  # a request, not a status
                    with contextlib.suppress(Exception):
                        await msg.nak()
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _slot(self, psub: Any) -> None:
        while not self._draining.is_set():
            try:
                msgs = await psub.fetch(1, timeout=self.cfg.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:
                log.warning("fetch on %s failed: %s", self.subject, exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                if self._draining.is_set():
                    with contextlib.suppress(Exception):
                        await msg.nak()  # not started: another replica takes it now
                    continue
                await self._process(msg)

    # ------------------------------------------------------------------ one request

    async def _process(self, msg: Msg) -> None:
        try:
            req = StageRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            await self.rt.dead_letter(msg.subject, msg.data, f"StageRequest: {describe_error(exc)}")
            with contextlib.suppress(Exception):
                await msg.term()
            return
        key = id(msg)
        self._in_flight[key] = msg
        self._in_flight_started[key] = time.monotonic()
        try:
            async with self._sem:
                started_s = time.time()
                t0 = time.perf_counter()
                error: Exception | None = None
                output: dict[str, Any] | None = None
                try:
                    if self.inline:
                        output = self.handler(dict(req.payload), self.options)
                    else:
                        loop = asyncio.get_running_loop()
                        output = await loop.run_in_executor(
                            self._executor, self.handler, dict(req.payload), self.options
                        )
                except Exception as exc:
                    error = exc
                service_ms = (time.perf_counter() - t0) * 1000.0
            queue_wait_ms = max(0.0, (started_s - req.enqueued_ts_s) * 1000.0)
            if error is None:
                error = await self._forward(req, output, service_ms)
            if error is not None:
                self.window.record_failure(service_ms)
                await self._failed(msg, req, error)
                return
            await msg.ack()
            self.window.record(service_ms, queue_wait_ms)
            self.processed_total += 1
        finally:
            self._in_flight.pop(key, None)
            self._in_flight_started.pop(key, None)

    async def _forward(
        self, req: StageRequest, output: dict[str, Any] | None, service_ms: float
    ) -> Exception | None:
        """Publish the result downstream; an invalid output is the handler's error."""
        if not isinstance(output, dict):
            return TypeError(f"handler returned {type(output).__name__}, expected dict")
        now_s = time.time()
        try:
            if self.next_subject is None:
                done = logic.completion(req, self.stage.name, service_ms, now_s)
                await self.rt.nc.publish(self.done_subject, done.model_dump_json().encode())
                return None
            fwd = logic.forward_request(req, self.stage.name, service_ms, output, now_s)
        except ValidationError as exc:
            return ValueError(f"handler output rejected: {describe_error(exc)}")
        assert self.next_name is not None
        msg_id = logic.dedupe_id(req.request_id, self.next_name)
        while True:
            try:
                await self.rt.js.publish(
                    self.next_subject, fwd.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": msg_id}, timeout=5.0,
                )  # fmt: skip
                return None
            except (nats.errors.TimeoutError, nats.errors.ConnectionReconnectingError,
                    nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
                # The bus is briefly away: retry (the msg id dedupes a publish that did land).
                log.warning("forward of %s failed (%s); retrying", req.request_id, exc)
                await asyncio.sleep(0.2)

    async def _failed(self, msg: Msg, req: StageRequest, error: Exception) -> None:
        try:
            delivered = int(msg.metadata.num_delivered)
        except Exception:
            delivered = 1
        reason = f"{type(error).__name__}: {error}"
        if logic.should_dead_letter(delivered, self.cfg.max_failures):
            log.warning("request %s failed %d times, dead-lettered: %s",
                        req.request_id, delivered, reason)  # fmt: skip
            letter = DeadLetter(
                service=SERVICE,
                subject=msg.subject[:256],
                reason=f"stage {self.stage.name} failed {delivered} times: {reason}"[:4000],
                ts_s=time.time(),
                payload=msg.data[:65536].decode("utf-8", errors="replace"),
            )
            try:
                await self.rt.js.publish(
                    self.dlq_subject, letter.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": logic.dedupe_id(req.request_id, "dlq-" + self.stage.name)},  # noqa: E501
                )  # fmt: skip
            except Exception as exc:
                log.error("dead letter for %s not stored (%s); redelivering", req.request_id, exc)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=logic.backoff_s(delivered))
                return
            self.dead_lettered_total += 1
            with contextlib.suppress(Exception):
                await msg.term()
            return
        log.info("request %s failed (attempt %d): %s", req.request_id, delivered, reason)
        with contextlib.suppress(Exception):
            await msg.nak(delay=logic.backoff_s(delivered))

    # ------------------------------------------------------------------ background

    async def _progress_loop(self) -> None:
        """Tell JetStream that long-running requests are still being worked on."""
        period = max(0.5, self._ack_wait_s / 3)
        while True:
            await asyncio.sleep(period / 2)
            now = time.monotonic()
            for key, msg in list(self._in_flight.items()):
                if now - self._in_flight_started.get(key, now) >= period:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _announce_drain(self) -> None:
        """Report `draining` at once, so the supervisor and monitor stop counting us as ready."""
        await self._draining.wait()
        self.state = "draining"
        with contextlib.suppress(Exception):
            await self._publish_report()

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.report_interval_s)
            try:
                await self._publish_report()
            except Exception as exc:
                log.warning("report not sent: %s", exc)

    async def _publish_report(self) -> None:
        rho: float | None = None
        tokens, wait_s = 0, 0.0
        if self._gpu is not None:
            gpu = self._gpu
            snap = gpu.snapshot()
            tokens, wait_s = snap.tokens_used, snap.token_wait_s
            if snap.rate_tokens_per_s is not None:
                # The bucket's rate is replicas x rho x full speed, so rho is read as set, not
                # derived from the rate; one HGET a second, off the event loop.
                rho = await asyncio.get_running_loop().run_in_executor(None, gpu.rho)
        rep = self.window.report(
            self.state, time.time(), len(self._in_flight), rho, tokens, wait_s
        )
        await self.rt.publish(subjects.reports(self.spec.name, self.stage.name), rep)

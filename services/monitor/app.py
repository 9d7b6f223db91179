"""The monitor service: the I/O shell around `aggregate.WindowAggregator`.

Subscribes to `sair.reports.<p>.*` (WorkerReport), `sair.pipe.<p>.done` (Completion) and
`sair.replicas.<p>` (ReplicaStatus); every tick reads each stage's queue from JetStream
(num_pending + num_ack_pending of the stage's durable consumer; arrivals from
delivered.consumer_seq + num_pending), takes a snapshot and publishes `PipelineTelemetry` on
`sair.telemetry.<p>`; the same figures go to `/metrics`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import ValidationError

from sair.runtime import ServiceRuntime, configure_logging, ensure_pipeline_streams
from sair.settings import Settings
from schemas import subjects
from schemas.common import SairModel, describe_error
from schemas.messages import Completion, PipelineTelemetry, ReplicaStatus, WorkerReport
from schemas.pipeline import PipelineSpec, load_pipeline_spec

from .aggregate import DEFAULT_WINDOW_S, QueueObservation, WindowAggregator
from .gauges import MonitorGauges

log = logging.getLogger("sair.monitor")

SERVICE = "monitor"
QUEUE_READ_TIMEOUT_S = 1.0
YIELD_EVERY = 256
"""Handlers that never suspend would starve the tick loop under a flood: yield now and then."""

M = TypeVar("M", bound=SairModel)


class MonitorApp:
    """A running monitor for one pipeline. `latest` is the last telemetry published."""

    def __init__(
        self, rt: ServiceRuntime, spec: PipelineSpec, aggregator: WindowAggregator, tick_s: float
    ) -> None:
        self.rt = rt
        self.spec = spec
        self.aggregator = aggregator
        self.tick_s = tick_s
        self.gauges = MonitorGauges(rt.metrics.registry)
        self.latest: PipelineTelemetry | None = None
        self.last_lateness_s = 0.0
        self.max_lateness_s = 0.0
        self.ticks = 0
        self._context: dict[str, Any] = {"spec": spec}
        self._handled = 0
        # Per-subject message counts, added to the runtime's counter once per tick: a
        # Prometheus increment per message is a lock and a lookup we need not pay.
        self._received: dict[str, int] = {}
        self._ctl: NatsClient | None = None

    async def open_control_connection(self) -> None:
        """A second connection for the JetStream queue reads: on the runtime's connection
        their replies would queue behind a flood of reports and make ticks late."""
        self._ctl = await nats.connect(
            self.rt.settings.nats_url, name="sair-monitor-ctl", max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )

    # ------------------------------------------------------------------ wiring

    async def wire(self) -> None:
        p = self.spec.name
        await self.rt.nc.subscribe(
            subjects.reports_all(p), cb=self._typed(WorkerReport, self.aggregator.add_report)
        )
        await self.rt.nc.subscribe(
            subjects.pipe_done(p), cb=self._typed(Completion, self.aggregator.add_completion)
        )
        await self.rt.subscribe(
            subjects.replicas(p), ReplicaStatus, self._on_replicas, context=self._context
        )
        await self.rt.nc.flush()
        self.rt.spawn(self._tick_loop(), name=f"monitor-tick-{p}")

    def _typed(
        self, model: type[M], handle: Callable[[M, float], object]
    ) -> Callable[[Msg], Awaitable[None]]:
        """A lean callback for high-rate subjects: parse, fold in, dead-letter what is bad.

        `rt.subscribe` would also time every handler; at thousands of reports per second the
        per-message overhead matters, so these two subjects are wired by hand.
        """

        received = self._received
        # The model's own validator, called directly: `model_validate_json` is a Python
        # wrapper around exactly this call (same checks, same errors), ~3% of a report's cost.
        validate = model.__pydantic_validator__.validate_json
        clock = time.time

        async def on_msg(msg: Msg) -> None:
            subject = msg.subject
            received[subject] = received.get(subject, 0) + 1
            try:
                # No spec context here: the aggregator rejects foreign pipelines and stages
                # itself (ValueError below), and the context validators cost ~15% per message.
                parsed = validate(msg.data)
                handle(parsed, clock())
            except ValidationError as exc:
                await self.rt.dead_letter(
                    msg.subject, msg.data, f"{model.__name__}: {describe_error(exc)}"
                )
            except ValueError as exc:
                await self.rt.dead_letter(msg.subject, msg.data, f"{model.__name__}: {exc}")
            self._handled += 1
            if self._handled % YIELD_EVERY == 0:
                await asyncio.sleep(0)

        return on_msg

    async def _on_replicas(self, status: ReplicaStatus) -> None:
        self.aggregator.add_replica_status(status, time.time())

    # ------------------------------------------------------------------ ticking

    async def read_queues(self) -> dict[str, QueueObservation | None]:
        """Each stage's durable consumer, read concurrently; None where it cannot be read."""
        stream = subjects.pipe_stream(self.spec.name)
        js = self._ctl.jetstream() if self._ctl is not None else self.rt.js

        async def one(stage: str) -> QueueObservation | None:
            try:
                info = await asyncio.wait_for(
                    js.consumer_info(stream, subjects.stage_consumer(stage)),
                    QUEUE_READ_TIMEOUT_S,
                )
            except Exception as exc:  # missing consumer, bus down, timeout: unknown, not 0
                log.debug("queue of %s unreadable: %s", stage, exc)
                return None
            pending = info.num_pending or 0
            delivered = info.delivered.consumer_seq if info.delivered else None
            arrived = None if delivered is None else delivered + pending
            depth = pending + (info.num_ack_pending or 0)
            return QueueObservation(depth=depth, arrived_total=arrived)

        names = self.spec.stage_names
        results = await asyncio.gather(*(one(s) for s in names))
        return dict(zip(names, results, strict=True))

    async def tick(self, lateness_s: float = 0.0) -> PipelineTelemetry:
        """One telemetry tick: read queues, snapshot, publish, export."""
        queues = await self.read_queues()
        telemetry = self.aggregator.snapshot(time.time(), queues)
        await self.rt.publish(subjects.telemetry(self.spec.name), telemetry)
        self.latest = telemetry
        self.ticks += 1
        for subject, n in self._received.items():
            self.rt.metrics.received.labels(SERVICE, subject).inc(n)
        self._received.clear()
        agg = self.aggregator
        self.gauges.update(
            telemetry, lateness_s, agg.reports_total, agg.restarts_total, agg.lost_reports_total
        )
        return telemetry

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.tick_s
            await asyncio.sleep(max(0.0, due - loop.time()))
            lateness = max(0.0, loop.time() - due)
            self.last_lateness_s = lateness
            self.max_lateness_s = max(self.max_lateness_s, lateness)
            if lateness > self.tick_s:
                log.warning("telemetry tick %.2f s late; skipping missed ticks", lateness)
                due = loop.time()
            try:
                await self.tick(lateness)
            except Exception:
                log.exception("telemetry tick failed")

    async def close(self) -> None:
        await self.rt.close()
        if self._ctl is not None and not self._ctl.is_closed:
            with contextlib.suppress(Exception):
                await self._ctl.close()


async def start_monitor(
    settings: Settings,
    spec: PipelineSpec,
    window_s: float = DEFAULT_WINDOW_S,
    tick_s: float | None = None,
    stale_after_s: float = 3.0,
) -> MonitorApp:
    """Connect, make sure the pipeline's streams exist, subscribe and start ticking."""
    tick = tick_s if tick_s is not None else spec.tick_s
    if not tick > 0:
        raise ValueError(f"tick_s={tick!r} must be > 0")
    rt = ServiceRuntime(SERVICE, settings)
    await rt.start()
    try:
        await ensure_pipeline_streams(rt.js, spec)
        agg = WindowAggregator(spec, window_s=window_s, stale_after_s=stale_after_s)
        app = MonitorApp(rt, spec, agg, tick)
        await app.open_control_connection()
        await app.wire()
    except BaseException:
        await rt.close()
        raise
    log.info(
        "monitor for %s: window %.0f s, tick %.1f s, metrics port %s",
        spec.name, window_s, tick, rt.metrics_port,
    )
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m services.monitor", description=__doc__)
    ap.add_argument("--pipeline-spec", required=True, help="pipeline spec TOML")
    ap.add_argument("--window-s", type=float, default=DEFAULT_WINDOW_S)
    ap.add_argument("--tick-s", type=float, default=None, help="default: the spec's tick_s")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    configure_logging(args.log_level)
    spec = load_pipeline_spec(args.pipeline_spec)
    settings = Settings.from_env()

    async def run() -> None:
        app = await start_monitor(settings, spec, window_s=args.window_s, tick_s=args.tick_s)
        await app.rt.run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())

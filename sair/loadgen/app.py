"""Open-loop load generator: publish `StageRequest`s at seeded arrival times, time completions.

Arrivals never wait for completions: each publish is its own task, started at its arrival
time. Each request is published into the first stage's queue with
`Nats-Msg-Id = <request id>:<first stage>` (a retried publish is stored once). End-to-end
latency comes from the `Completion`s on `sair.pipe.<p>.done` (the last stage's clock minus
`created_ts_s`); a request completed twice is counted as a duplicate, never twice.

Completions travel on core NATS, which keeps nothing for a subscriber that is disconnected
(e.g. over a NATS restart). The pipeline's done stream (`subjects.done_stream`) keeps them,
so while requests are outstanding the generator reads back, every couple of seconds, the
completions stored since its last read and folds in the ones it missed; one seen both ways
is recognised by (request id, done time) and counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api
from pydantic import ValidationError

from schemas import subjects
from schemas.messages import Completion, StageRequest
from schemas.pipeline import PipelineSpec

log = logging.getLogger("sair.loadgen")

READ_BACK_S = 2.0
"""While requests are outstanding after the last send, read the done stream back this often."""

PayloadFn = Callable[[np.random.Generator, int], dict[str, Any]]


@dataclass
class RequestRecord:
    request_id: str
    sent_s: float
    done_s: float | None = None
    e2e_ms: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    completions: int = 0


@dataclass
class LoadResult:
    pipeline: str
    stage_names: tuple[str, ...]
    records: dict[str, RequestRecord]
    started_s: float
    send_end_s: float
    end_s: float
    publish_failures: int = 0
    read_back: int = 0
    """Completions missed on core NATS and read back from the done stream."""

    @property
    def sent(self) -> int:
        return len(self.records)

    @property
    def completed(self) -> int:
        return sum(1 for r in self.records.values() if r.completions > 0)

    @property
    def duplicates(self) -> int:
        return sum(max(0, r.completions - 1) for r in self.records.values())

    def latencies_ms(self) -> np.ndarray:
        return np.array([r.e2e_ms for r in self.records.values() if r.e2e_ms is not None])

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms()
        q = (lambda p: round(float(np.percentile(lat, p)), 3)) if lat.size else (lambda p: None)
        send_span = max(1e-9, self.send_end_s - self.started_s)
        stage: dict[str, Any] = {}
        for name in self.stage_names:
            vals = np.array([r.stage_ms[name] for r in self.records.values() if name in r.stage_ms])
            if vals.size:
                stage[name] = {
                    "mean_ms": round(float(vals.mean()), 3),
                    "p50_ms": round(float(np.percentile(vals, 50)), 3),
                    "p99_ms": round(float(np.percentile(vals, 99)), 3),
                }
        return {
            "pipeline": self.pipeline,
            "sent": self.sent,
            "completed": self.completed,
            "lost": self.sent - self.completed,
            "duplicates": self.duplicates,
            "publish_failures": self.publish_failures,
            "read_back": self.read_back,
            "offered_rps": round(self.sent / send_span, 3),
            "e2e_p50_ms": q(50),
            "e2e_p95_ms": q(95),
            "e2e_p99_ms": q(99),
            "stage_service_ms": stage,
        }

    def write_csv(self, path: str | Path) -> None:
        """One row per request: id, send and done times, e2e and per-stage service ms."""
        with Path(path).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["request_id", "sent_ts_s", "done_ts_s", "e2e_ms", "ok", "completions",
                        *[f"{s}_ms" for s in self.stage_names]])  # fmt: skip
            for r in self.records.values():
                w.writerow([
                    r.request_id, f"{r.sent_s:.6f}",
                    "" if r.done_s is None else f"{r.done_s:.6f}",
                    "" if r.e2e_ms is None else f"{r.e2e_ms:.3f}",
                    int(r.ok), r.completions,
                    *[("" if s not in r.stage_ms else f"{r.stage_ms[s]:.3f}")
                      for s in self.stage_names],
                ])  # fmt: skip


class LoadGenerator:
    """Sends one run of arrivals into a pipeline and collects its completions."""

    def __init__(self, nc: NatsClient, spec: PipelineSpec, run_id: str,
                 payload_fn: PayloadFn | None = None, seed: int = 0) -> None:  # fmt: skip
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,100}", run_id):
            raise ValueError(f"run_id={run_id!r}: letters, digits, _ . : - only (<= 101 chars)")
        self.nc = nc
        self.js = nc.jetstream()
        self.spec = spec
        self.run_id = run_id
        self.first = spec.stages[0].name
        self.subject = subjects.pipe_stage(spec.name, self.first)
        self.payload_fn = payload_fn or (lambda rng, i: {"seq": i})
        self.rng = np.random.default_rng(seed + 1)
        self.records: dict[str, RequestRecord] = {}
        self.publish_failures = 0
        self._all_done = asyncio.Event()
        self._expected = 0
        self._sub: Any = None
        self._seen: set[tuple[str, float]] = set()
        self._next_done_seq: int | None = None  # first done-stream sequence not read back yet
        self.read_back = 0
        """Completions missed on core NATS and read back from the done stream."""

    async def _on_done(self, msg: Msg) -> None:
        self._fold(msg.data)

    def _fold(self, data: bytes) -> bool:
        """Count one completion; False if it is not ours, malformed or already counted."""
        try:
            c = Completion.model_validate_json(data)
        except ValidationError:
            return False
        rec = self.records.get(c.request_id)
        if rec is None:
            return False
        key = (c.request_id, c.done_ts_s)
        if key in self._seen:
            return False
        self._seen.add(key)
        rec.completions += 1
        if rec.completions == 1:
            rec.done_s, rec.e2e_ms, rec.ok = c.done_ts_s, c.e2e_ms, c.ok
            rec.stage_ms = dict(c.stage_ms)
            if self._expected and self._count_done() >= self._expected:
                self._all_done.set()
        return True

    async def _done_stream_last_seq(self) -> int | None:
        """The done stream's last sequence, or None where there is no done stream."""
        try:
            info = await self.js.stream_info(subjects.done_stream(self.spec.name))
        except Exception:  # no stream (an older deployment) or the bus is down right now
            return None
        return int(info.state.last_seq)

    async def _read_back(self) -> int:
        """Fold in the completions stored since the last read that core NATS did not bring."""
        if self._next_done_seq is None:
            return 0
        last = await self._done_stream_last_seq()
        if last is None or last < self._next_done_seq:
            return 0
        folded = 0
        cfg = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next_done_seq,
            ack_policy=js_api.AckPolicy.NONE,
            inactive_threshold=30.0,
        )
        try:
            sub = await self.js.pull_subscribe(
                subjects.pipe_done(self.spec.name),
                stream=subjects.done_stream(self.spec.name),
                config=cfg,
            )
            try:
                while self._next_done_seq <= last:
                    msgs = await sub.fetch(256, timeout=2.0)
                    for m in msgs:
                        self._next_done_seq = max(
                            self._next_done_seq, m.metadata.sequence.stream + 1
                        )
                        folded += self._fold(m.data)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        except Exception as exc:  # the bus went away mid-read: the next read resumes here
            log.info("reading back completions stopped at seq %s: %s", self._next_done_seq, exc)
        if folded:
            log.warning("%d completions missed on core NATS were read back", folded)
        self.read_back += folded
        return folded

    def _count_done(self) -> int:
        return sum(1 for r in self.records.values() if r.completions > 0)

    async def _publish(self, req: StageRequest) -> None:
        data = req.model_dump_json().encode()
        headers = {"Nats-Msg-Id": f"{req.request_id}:{self.first}"}
        for attempt in range(5):
            try:
                await self.js.publish(self.subject, data, headers=headers, timeout=5.0)
                return
            except Exception as exc:
                log.warning("publish of %s failed (%s), attempt %d", req.request_id, exc, attempt)
                await asyncio.sleep(0.2 * (attempt + 1))
        self.publish_failures += 1

    async def run(self, offsets_s: Sequence[float], drain_timeout_s: float = 30.0,
                  on_sent: Callable[[int], None] | None = None) -> LoadResult:  # fmt: skip
        """Send at `offsets_s` (seconds from now); wait up to `drain_timeout_s` for the rest."""
        self._sub = await self.nc.subscribe(subjects.pipe_done(self.spec.name), cb=self._on_done)
        await self.nc.flush()
        last = await self._done_stream_last_seq()
        self._next_done_seq = None if last is None else last + 1
        self._expected = len(offsets_s)
        tasks: set[asyncio.Task[None]] = set()
        start = time.time()
        t0 = time.monotonic()
        for i, off in enumerate(offsets_s):
            delay = t0 + float(off) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            rid = f"{self.run_id}-{i:07d}"
            req = StageRequest(
                request_id=rid, pipeline=self.spec.name, created_ts_s=now, enqueued_ts_s=now,
                payload=self.payload_fn(self.rng, i),
            )  # fmt: skip
            self.records[rid] = RequestRecord(request_id=rid, sent_s=now)
            task = asyncio.create_task(self._publish(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if on_sent is not None:
                on_sent(i)
        if tasks:
            await asyncio.gather(*tasks)
        send_end = time.time()
        if self._count_done() >= self._expected:
            self._all_done.set()
        deadline = time.monotonic() + drain_timeout_s
        while not self._all_done.is_set() and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_done.wait(), timeout=min(READ_BACK_S, left))
            if not self._all_done.is_set():
                await self._read_back()
        await asyncio.sleep(0.2)  # late duplicates, if any, are counted too
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        return LoadResult(
            pipeline=self.spec.name, stage_names=self.spec.stage_names, records=self.records,
            started_s=start, send_end_s=send_end, end_s=time.time(),
            publish_failures=self.publish_failures, read_back=self.read_back,
        )  # fmt: skip

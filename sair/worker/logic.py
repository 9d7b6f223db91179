"""Pure parts of the stage worker: handler loading, report windows, retry policy, messages."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.histogram import LatencyHistogram, bucket_index
from schemas.messages import Completion, StageRequest, WorkerReport, WorkerState

Handler = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]

DEFAULT_MAX_FAILURES = 3
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0


class HandlerLoadError(ValueError):
    """A stage's `module:function` handler path cannot be imported or is not callable."""


def load_handler(path: str) -> Handler:
    """Import `package.module:function`."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"handler={path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerLoadError(f"handler={path!r}: cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HandlerLoadError(f"handler={path!r}: {module_name} has no callable {attr!r}")
    return fn


def runs_inline(handler: Handler) -> bool:
    """Handlers marked `sair_inline = True` are cheap enough to run on the event loop."""
    return bool(getattr(handler, "sair_inline", False))


def backoff_s(num_delivered: int) -> float:
    """Redelivery delay after the `num_delivered`-th failed attempt (exponential, capped)."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, num_delivered - 1)))


def should_dead_letter(num_delivered: int, max_failures: int) -> bool:
    """After `max_failures` failed deliveries the request goes to the dead-letter subject."""
    return num_delivered >= max_failures


def dedupe_id(request_id: str, target: str) -> str:
    """Nats-Msg-Id of a forward: the same request forwarded twice into `target` is stored once."""
    return f"{request_id}:{target}"


_ID_BAD = re.compile(r"[^A-Za-z0-9_.:-]")


def safe_identifier(raw: str) -> str:
    """Turn a host/pid string into a valid `Identifier` (worker ids)."""
    cleaned = _ID_BAD.sub("-", raw).lstrip("_.:-") or "worker"
    return cleaned[:128]


def forward_request(
    req: StageRequest, stage: str, service_ms: float, output: Mapping[str, Any], now_s: float
) -> StageRequest:
    """The request as it enters the next stage: new payload, this stage's time recorded."""
    return StageRequest(
        request_id=req.request_id,
        pipeline=req.pipeline,
        created_ts_s=req.created_ts_s,
        enqueued_ts_s=now_s,
        payload=dict(output),
        stage_ms={**req.stage_ms, stage: service_ms},
    )


def completion(
    req: StageRequest, stage: str, service_ms: float, now_s: float
) -> Completion:
    """What the last stage publishes on `sair.pipe.<p>.done`."""
    return Completion(
        request_id=req.request_id,
        pipeline=req.pipeline,
        created_ts_s=req.created_ts_s,
        done_ts_s=now_s,
        e2e_ms=max(0.0, (now_s - req.created_ts_s) * 1000.0),
        stage_ms={**req.stage_ms, stage: service_ms},
    )


def _add(counts: dict[int, int], value_ms: float) -> None:
    i = bucket_index(value_ms)
    counts[i] = counts.get(i, 0) + 1


@dataclass
class ReportWindow:
    """What a worker did since its last report; `report()` closes the window and starts anew."""

    pipeline: str
    stage: str
    worker_id: str
    started_s: float
    seq: int = 0
    processed: int = 0
    failed: int = 0
    busy_s: float = 0.0
    service_counts: dict[int, int] = field(default_factory=dict)
    service_sum_ms: float = 0.0
    wait_counts: dict[int, int] = field(default_factory=dict)
    wait_sum_ms: float = 0.0
    gpu_tokens_base: int = 0
    gpu_wait_base_s: float = 0.0

    def record(self, service_ms: float, queue_wait_ms: float) -> None:
        self.processed += 1
        self.busy_s += service_ms / 1000.0
        _add(self.service_counts, service_ms)
        self.service_sum_ms += service_ms
        wait = max(0.0, queue_wait_ms)
        _add(self.wait_counts, wait)
        self.wait_sum_ms += wait

    def record_failure(self, service_ms: float) -> None:
        """A failed attempt occupied the replica too: it counts as busy, not as processed."""
        self.failed += 1
        self.busy_s += service_ms / 1000.0

    def report(
        self,
        state: WorkerState,
        now_s: float,
        in_flight: int,
        rho: float | None = None,
        gpu_tokens_total: int = 0,
        gpu_wait_total_s: float = 0.0,
    ) -> WorkerReport:
        """Close the window at `now_s`. GPU totals are cumulative; the report carries deltas."""
        rep = WorkerReport(
            pipeline=self.pipeline,
            stage=self.stage,
            worker_id=self.worker_id,
            seq=self.seq,
            state=state,
            ts_s=now_s,
            interval_s=max(1e-6, now_s - self.started_s),
            processed=self.processed,
            failed=self.failed,
            in_flight=in_flight,
            busy_s=self.busy_s,
            service_ms=LatencyHistogram(counts=self.service_counts, sum_ms=self.service_sum_ms),
            queue_wait_ms=LatencyHistogram(counts=self.wait_counts, sum_ms=self.wait_sum_ms),
            rho=None if rho is None else min(1.0, max(0.0, rho)),
            gpu_tokens_used=max(0, gpu_tokens_total - self.gpu_tokens_base),
            gpu_token_wait_s=max(0.0, gpu_wait_total_s - self.gpu_wait_base_s),
        )
        self.seq += 1
        self.started_s = now_s
        self.processed = self.failed = 0
        self.busy_s = self.service_sum_ms = self.wait_sum_ms = 0.0
        self.service_counts = {}
        self.wait_counts = {}
        self.gpu_tokens_base = gpu_tokens_total
        self.gpu_wait_base_s = gpu_wait_total_s
        return rep

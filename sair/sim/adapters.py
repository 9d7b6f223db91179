"""Connect the simulator to the real telemetry and policy code.

- `MonitorTelemetry`: the monitor's pure `WindowAggregator` (services/monitor/aggregate.py)
  as the simulator's telemetry producer: completions, then worker reports, fed with their
  own timestamps as `now` (the order in which they reach the monitor live), then a snapshot
  with the queue depths JetStream would report.
- `load_policy(name, **options)`: a policy by name through `services.policy.interface`
  (wrapped in the validator unless `validate=False`).

Completions: the live last stage publishes one `Completion` per request, and building 200
pydantic messages per simulated second would cost more than the rest of the simulator. By
default (`exact_completions=False`) the batch is folded into the aggregator's per-second
completion slots directly, with exactly the arithmetic of `WindowAggregator.add_completion`
(tests/sim/test_adapters.py checks that both paths give identical telemetry). A public batch
method on the aggregator would remove the need for this (requested in the simulator report).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from schemas.histogram import N_BUCKETS
from schemas.messages import PipelineTelemetry, WorkerReport
from schemas.pipeline import PipelineSpec

from .engine import CompletionBatch, QueueState, bucket_indices


class MonitorTelemetry:
    """`TelemetryProducer` backed by the monitor's `WindowAggregator`."""

    def __init__(
        self, spec: PipelineSpec, *, exact_completions: bool = False, **aggregator_options: Any
    ) -> None:
        from services.monitor.aggregate import QueueObservation, WindowAggregator

        self.spec = spec
        self.aggregator = WindowAggregator(spec, **aggregator_options)
        self.exact_completions = exact_completions
        self._queue_obs = QueueObservation

    def observe(
        self,
        now: float,
        reports: Sequence[WorkerReport],
        completions: Sequence[CompletionBatch],
        queues: Mapping[str, QueueState],
    ) -> PipelineTelemetry:
        agg = self.aggregator
        for batch in completions:
            if not len(batch):
                continue
            if self.exact_completions:
                for c in batch.messages():
                    agg.add_completion(c, c.done_ts_s)
            else:
                self._fold(batch)
        for r in reports:
            agg.add_report(r, r.ts_s)
        obs = {name: self._queue_obs(q.depth, q.arrived_total) for name, q in queues.items()}
        return agg.snapshot(now, obs)

    def _fold(self, batch: CompletionBatch) -> None:
        """`add_completion` for a whole batch (all ok), vectorised over requests."""
        from services.monitor.aggregate import SLOT_S, _CompletionSlot

        agg = self.aggregator
        done = batch.done_s
        e2e = batch.e2e_ms
        agg._mark_start(float(done[0]))
        agg.completions_total += int(done.size)
        slots = np.floor_divide(done, SLOT_S).astype(np.int64)
        first = int(slots.min())
        rel = slots - first
        n_slots = int(rel.max()) + 1
        per_slot = np.bincount(rel, minlength=n_slots).tolist()
        within = np.bincount(rel[e2e <= self.spec.slo_p99_ms], minlength=n_slots).tolist()
        key = rel * N_BUCKETS + bucket_indices(e2e)
        counts = np.bincount(key, minlength=n_slots * N_BUCKETS)
        nz = np.flatnonzero(counts)
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for k, c in zip(nz.tolist(), counts[nz].tolist(), strict=True):
            by_slot.setdefault(k // N_BUCKETS, []).append((k % N_BUCKETS, c))
        for r, items in by_slot.items():
            idx = first + r
            slot = agg._completions.get(idx)
            if slot is None:
                slot = agg._completions[idx] = _CompletionSlot()
            slot.n += per_slot[r]
            slot.n_ok += per_slot[r]
            slot.n_within_slo += within[r]
            for i, c in items:
                slot.e2e[i] = slot.e2e.get(i, 0) + c


def load_policy(name: str, **options: Any) -> Any:
    """A policy by name (`services.policy.interface.get_policy`)."""
    from services.policy.interface import get_policy

    return get_policy(name, **options)

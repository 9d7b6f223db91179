"""Connect the simulator to the real telemetry and policy code.

- `MonitorTelemetry`: the monitor's pure `WindowAggregator` (services/monitor/aggregate.py)
  as the simulator's telemetry producer: completions, then worker reports, fed with their
  own timestamps as `now` (the order in which they reach the monitor live), then a snapshot
  with the queue depths JetStream would report.
- `load_policy(name, **options)`: a policy by name through `services.policy.interface`
  (wrapped in the validator unless `validate=False`).

Completions: the live last stage publishes one `Completion` per request, and building 200
pydantic messages per simulated second would cost more than the rest of the simulator. By
default (`exact_completions=False`) each batch goes through the aggregator's public batch
method `WindowAggregator.add_completions` (vectorised; the same result as `add_completion`
per message, which `exact_completions=True` uses - tests/sim/test_run.py checks that both
paths give identical telemetry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from schemas.messages import PipelineTelemetry, WorkerReport
from schemas.pipeline import PipelineSpec

from .engine import CompletionBatch, QueueState


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
                agg.add_completions(batch.e2e_ms, batch.done_s)
        for r in reports:
            agg.add_report(r, r.ts_s)
        obs = {name: self._queue_obs(q.depth, q.arrived_total) for name, q in queues.items()}
        return agg.snapshot(now, obs)


def load_policy(name: str, **options: Any) -> Any:
    """A policy by name (`services.policy.interface.get_policy`)."""
    from services.policy.interface import get_policy

    return get_policy(name, **options)

"""The aggregator's running window totals against a straightforward recomputation (pure).

`WindowAggregator` keeps each stage's window totals as it goes (added when a slot is folded
in, subtracted when the slot leaves the window) and recomputes percentiles only when a
histogram changed. `Recomputed` is the same aggregator with those three steps replaced by
the plain way: every tick, sum every slot of the window in a Python loop and take the
percentiles of the merged sparse counts (the sojourn's of their convolution). Both eat
the same long seeded sequences (replicas starting, draining, vanishing and restarting,
lost and duplicate reports, late reports, stages going stale, rho changes, idle gaps longer
than the window, single and batched completions, queues that cannot be read) and must
publish the same telemetry, floats within 1e-9 relative (and exact zeros).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytest

from schemas.histogram import N_BUCKETS, LatencyHistogram
from schemas.messages import Completion, Percentiles, ReplicaStatus, StageReplicas, WorkerReport
from schemas.pipeline import PipelineSpec, StageSpec
from services.monitor.aggregate import (
    QueueObservation,
    WindowAggregator,
    _StageState,
    _Window,
)
from services.monitor.histo import convolve, percentiles, sparse

SPEC = PipelineSpec(
    name="p",
    slo_p99_ms=120.0,
    stages=[
        StageSpec(name="pre", kind="cpu", concurrency=2),
        StageSpec(name="infer", kind="gpu", rho_grid=[0.25, 0.5, 1.0], initial_rho=0.5),
        StageSpec(name="post", kind="cpu"),
    ],
)


def merged(parts: list[np.ndarray | None]) -> dict[int, int]:
    """The slots' dense counts added up, as sparse counts."""
    total = np.zeros(N_BUCKETS, dtype=np.int64)
    for p in parts:
        if p is not None:
            total = total + p
    return sparse(total)


class Recomputed(WindowAggregator):
    """The aggregator with every window sum and percentile recomputed from the slots."""

    def _window(self, st: _StageState) -> _Window:
        reports = lost = processed = without_rho = 0
        busy = interval = token = rho_x = rho_int = service_sum = service_x_rho = 0.0
        for s in st.slots.values():
            reports += s.reports
            lost += s.lost_reports
            processed += s.processed
            without_rho += s.service_without_rho
            busy += s.busy_s
            interval += s.interval_s
            token += s.token_wait_s
            rho_x += s.rho_x_interval
            rho_int += s.rho_interval_s
            service_sum += s.service_sum_ms
            service_x_rho += s.service_x_rho_ms
        return _Window(reports, lost, processed, without_rho, busy, interval, token, rho_x,
                       rho_int, service_sum, service_x_rho)  # fmt: skip

    def _histogram_figures(
        self, st: _StageState
    ) -> tuple[Percentiles | None, int, Percentiles | None]:
        service = merged([s.service for s in st.slots.values()])
        wait = merged([s.queue_wait for s in st.slots.values()])
        service_pct = percentiles(service)
        sojourn = None
        if service_pct is not None and wait:
            sojourn = percentiles(convolve(wait, service))
        return service_pct, sum(service.values()), sojourn

    def _completion_window(self) -> tuple[int, int, Percentiles | None]:
        slots = self._completions.values()
        e2e = merged([c.e2e for c in slots])
        return sum(c.n for c in slots), sum(c.n_within_slo for c in slots), percentiles(e2e)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal structures; floats within 1e-9 relative (a zero must be exactly zero)."""
    if isinstance(a, float) and isinstance(b, float):
        same = math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))
        assert same, f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


@dataclass
class _Replica:
    stage: str
    wid: str
    seq: int
    state: Literal["starting", "ready", "draining"]
    rho: float | None


def random_run(seed: int, window_s: float, n_ticks: int) -> dict[str, int]:
    """Feed one seeded sequence to both aggregators, comparing every tick; returns how often
    each situation the sequence is meant to exercise occurred."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    fast = WindowAggregator(SPEC, window_s=window_s, stale_after_s=3.0)
    plain = Recomputed(SPEC, window_s=window_s, stale_after_s=3.0)
    both = (fast, plain)
    replicas: list[_Replica] = []
    silent: dict[str, float] = {}  # stage -> silent until
    rho_now = 0.5
    arrived = {s.name: 0 for s in SPEC.stages}
    seen: dict[str, int] = {"stale": 0, "sojourn": 0, "expired": 0, "status": 0, "no_service": 0}
    now = 100.0 + rng.random()
    for tick in range(n_ticks):
        gap = rng.choice([0.5, 1.0, 1.0, 2.0, 2.0, 2.5])
        if rng.random() < 0.01:
            gap = window_s + rng.uniform(1.0, 10.0)  # everything leaves the window
            seen["expired"] += 1
        now += gap
        # Replicas come and go; the GPU stage's quota moves now and then.
        if rng.random() < 0.1 or not replicas:
            stage = rng.choice(SPEC.stages).name
            rho = rho_now if stage == "infer" else None
            replicas.append(_Replica(stage, f"{stage}-{tick}", 0, "starting", rho))
        for r in replicas:
            if r.state == "starting" and rng.random() < 0.5:
                r.state = "ready"
        if replicas and rng.random() < 0.05:
            rng.choice(replicas).state = "draining"
        replicas = [r for r in replicas if not (r.state == "draining" and rng.random() < 0.3)]
        if replicas and rng.random() < 0.03:
            replicas.remove(rng.choice(replicas))  # vanishes without draining
        if rng.random() < 0.05:
            rho_now = rng.choice([0.25, 0.5, 1.0])
            for r in replicas:
                if r.stage == "infer":
                    r.rho = rho_now if rng.random() < 0.9 else None
        if rng.random() < 0.03:
            silent[rng.choice(SPEC.stages).name] = now + rng.uniform(3.0, 12.0)
        reports: list[tuple[WorkerReport, float]] = []
        for r in replicas:
            if silent.get(r.stage, 0.0) > now:
                continue
            r.seq += 1
            if rng.random() < 0.03:
                r.seq += rng.randint(1, 4)  # lost reports
            if rng.random() < 0.01:
                r.seq = 1  # the worker restarted under the same id
            n = rng.randint(0, 40)
            service = nrng.lognormal(math.log(rng.choice([2.0, 20.0, 200.0])), 0.5, n).tolist()
            wait = (nrng.exponential(rng.choice([0.5, 10.0]), n) * (rng.random() < 0.8)).tolist()
            interval = rng.uniform(0.5, 2.5)
            rep = WorkerReport(
                pipeline="p",
                stage=r.stage,
                worker_id=r.wid,
                seq=r.seq,
                state=r.state,
                ts_s=now - rng.uniform(0.0, 0.3),
                interval_s=interval,
                processed=n,
                failed=rng.randint(0, 1),
                busy_s=interval * rng.random(),
                service_ms=LatencyHistogram.from_values(service),
                queue_wait_ms=LatencyHistogram.from_values(w for w in wait if w > 0),
                rho=r.rho,
                gpu_token_wait_s=rng.random() * 0.2 if r.stage == "infer" else 0.0,
            )
            at = now - rng.uniform(0.0, 0.9)
            if rng.random() < 0.02:
                at = now - window_s - rng.uniform(0.0, 5.0)  # arrives long after its time
            reports.append((rep, at))
            if rng.random() < 0.02:
                reports.append((rep, at))  # delivered twice
        # Completions: one by one or as a batch, some failed, some beyond the SLO.
        k = rng.randint(0, 60)
        done = now - nrng.uniform(0.0, gap, k)
        e2e = nrng.lognormal(math.log(60.0), 0.7, k)
        ok = nrng.random(k) > 0.05
        queues: dict[str, QueueObservation | None] = {}
        for s in SPEC.stages:
            arrived[s.name] += rng.randint(0, 50)
            if rng.random() < 0.02:
                arrived[s.name] = 0  # the consumer was recreated
            queues[s.name] = (
                None
                if rng.random() < 0.05
                else QueueObservation(
                    rng.randint(0, 30) if rng.random() < 0.95 else None,
                    arrived[s.name] if rng.random() < 0.9 else None,
                )
            )
        status = None
        if rng.random() < 0.2:
            seen["status"] += 1
            status = ReplicaStatus(
                pipeline="p",
                supervisor_id="sup",
                ts_s=now,
                stages=[
                    StageReplicas(stage=s.name, desired=rng.randint(0, 4),
                                  ready=rng.randint(0, 3), starting=rng.randint(0, 1))
                    for s in SPEC.stages
                ],
            )  # fmt: skip
        one_by_one = rng.random() < 0.5
        for agg in both:
            for rep, at in reports:
                agg.add_report(rep, at)
            if one_by_one:
                for d, e, o in zip(done.tolist(), e2e.tolist(), ok.tolist(), strict=True):
                    c = Completion(
                        request_id="r", pipeline="p", created_ts_s=0.0, done_ts_s=d, e2e_ms=e,
                        ok=o, error=None if o else "x",
                    )  # fmt: skip
                    agg.add_completion(c, d)
            else:
                agg.add_completions(e2e, done, ok)
        a = fast.snapshot(now, queues, status)
        b = plain.snapshot(now, queues, status)
        assert_same(b.model_dump(), a.model_dump(), f"tick {tick}")
        assert_same(
            [vars(ld) for ld in plain.last_loads], [vars(ld) for ld in fast.last_loads], "loads"
        )
        assert plain.last_bottleneck is not None and fast.last_bottleneck is not None
        assert_same(vars(plain.last_bottleneck), vars(fast.last_bottleneck), "bottleneck")
        seen["stale"] += bool(a.stale_stages)
        seen["sojourn"] += any(m.sojourn_ms is not None for m in a.stages)
        seen["no_service"] += any(m.service_ms is None for m in a.stages)
    seen["lost"] = fast.lost_reports_total
    seen["restarts"] = fast.restarts_total
    seen["duplicates"] = fast.duplicates_total
    assert (fast.reports_total, fast.completions_total) == (
        plain.reports_total,
        plain.completions_total,
    )
    return seen


@pytest.mark.parametrize(("seed", "window_s"), [(1, 30.0), (2, 10.0), (3, 90.0)])
def test_running_totals_equal_a_recomputation(seed: int, window_s: float) -> None:
    seen = random_run(seed, window_s, n_ticks=500)
    # The sequence did exercise what it is meant to (else the comparison proves little).
    for what in ("stale", "sojourn", "expired", "status", "no_service", "lost", "restarts",
                 "duplicates"):  # fmt: skip
        assert seen[what] > 0, (what, seen)

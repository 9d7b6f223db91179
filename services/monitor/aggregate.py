"""Sliding-window aggregation of worker reports and completions into `PipelineTelemetry`.

Pure: the clock is passed in as `now` (seconds; wall time in the service, simulated time in
the simulator), nothing here reads a clock or does I/O.

    agg = WindowAggregator(spec, window_s=30)
    agg.add_report(report, now)          # every WorkerReport
    agg.add_completion(completion, now)  # every Completion on sair.pipe.<p>.done
    agg.add_replica_status(status, now)  # the supervisor's ReplicaStatus, when there is one
    telemetry = agg.snapshot(now, queues={"infer": QueueObservation(depth, arrived_total)})

Reports are folded into one-second slots per stage as they arrive (sparse histogram counts
added, sums kept). Each stage also keeps the window's totals: counts and histograms are added
when a slot's contents are folded in and subtracted when the slot leaves the window (integers:
exact), float sums are one numpy reduction over per-slot rows kept in slot order (the same
additions, in the same order, as a loop over the slots). Percentiles are recomputed only when
a stage's histograms changed. A snapshot costs O(stages + slots that changed), whatever the
report rate and the window length.
Data-quality rules (docs/monitor.md): None means unknown, never an invented 0; a stage whose
last report is older than `stale_after_s` is stale and its report-derived figures are None;
figures built from fewer replicas than expected, or inferred rather than measured, are named
in `estimated_fields`; figures that cannot be given are named in `missing_fields`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from schemas.histogram import N_BUCKETS, bucket_index
from schemas.messages import (
    Completion,
    Percentiles,
    PipelineTelemetry,
    ReplicaStatus,
    StageMetrics,
    WorkerReport,
)
from schemas.pipeline import PipelineSpec, StageSpec

from .bottleneck import Bottleneck, StageLoad, detect_bottleneck
from .histo import bucket_indices, percentiles_cum, sojourn_percentiles

SLOT_S = 1.0
DEFAULT_WINDOW_S = 30.0
DEFAULT_STALE_AFTER_S = 3.0
DEFAULT_GROWTH_WINDOW_S = 10.0
"""Queue growth is the slope over the last 10 s: fresh enough for a reflex, smooth enough."""
MAX_LOST_REPORTS = 60
"""A seq jump larger than this is treated as a restart, not as lost reports."""


@dataclass(frozen=True)
class QueueObservation:
    """A stage queue read from JetStream at one instant (None = could not be read)."""

    depth: int | None
    """num_pending + num_ack_pending of the stage's durable consumer."""
    arrived_total: int | None = None
    """Messages that ever entered the stage queue: delivered.consumer_seq + num_pending."""


@dataclass
class _Slot:
    """Everything reported for one stage during one second."""

    reports: int = 0
    lost_reports: int = 0
    processed: int = 0
    failed: int = 0
    busy_s: float = 0.0
    interval_s: float = 0.0
    token_wait_s: float = 0.0
    rho_x_interval: float = 0.0
    rho_interval_s: float = 0.0
    service: np.ndarray | None = None
    """Dense counts (int64 per bucket) of what has been folded in; None = nothing yet."""
    service_sum_ms: float = 0.0
    service_x_rho_ms: float = 0.0
    """Sum over reports of service sum_ms x the rho they ran at (GPU time at full speed)."""
    service_without_rho: int = 0
    """Reports with service samples but no rho (their samples cannot be rho-normalised)."""
    queue_wait: np.ndarray | None = None
    # Histogram counts not yet folded in: bucket indices and counts, appended by C-level
    # list.extend per report and folded with one numpy bincount at the next snapshot (a
    # Python loop per bucket per report was the monitor's largest per-message cost). The
    # reports themselves are not kept: holding thousands of parsed models alive until the
    # tick made the garbage collector, and so the parse, twice as slow.
    pending_service: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    pending_wait: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    row: int = -1
    """The slot's row in its stage's `_FloatRows` (-1: none yet)."""

    def fold(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Fold the pending histogram counts into `service` and `queue_wait`; returns what was
        added to each (None: nothing), to be read, never changed (it may be the slot's own)."""
        service = pending_counts(self.pending_service)
        if service is not None:
            self.service = service if self.service is None else self.service + service
        wait = pending_counts(self.pending_wait)
        if wait is not None:
            self.queue_wait = wait if self.queue_wait is None else self.queue_wait + wait
        return service, wait

    def floats(self) -> tuple[float, float, float, float, float, float, float]:
        """The float sums, in `_FloatRows` column order."""
        return (
            self.busy_s,
            self.interval_s,
            self.token_wait_s,
            self.rho_x_interval,
            self.rho_interval_s,
            self.service_sum_ms,
            self.service_x_rho_ms,
        )


_N_FLOATS = 7
"""Columns of `_FloatRows`: busy, interval, token wait, rho x interval, rho interval, service
sum, service sum x rho."""


class _FloatRows:
    """A stage's per-slot float sums as the rows of one matrix, in slot creation order.

    The window's float totals are one numpy reduction down the rows, which adds them in row
    order, one after the other, exactly as a Python loop over the slots in creation order
    does: a slot that left the window leaves a zero row (and x + 0.0 == x), so the totals
    are those of a recomputation, bit for bit, with no drift or cancellation (as running
    add-and-subtract float totals would have) and no Python loop over the slots.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.m = np.zeros((capacity, _N_FLOATS))
        self.owners: list[_Slot | None] = [None] * capacity
        self.head = 0
        """Rows before it are free."""
        self.tail = 0
        """The next row to hand out."""

    def write(self, slot: _Slot) -> None:
        """Put the slot's current sums in its row (a new slot gets the next row)."""
        row = slot.row
        if row < 0:
            if self.tail == len(self.owners):
                self._compact()
            row = slot.row = self.tail
            self.owners[row] = slot
            self.tail += 1
        self.m[row] = slot.floats()

    def drop(self, slot: _Slot) -> None:
        """The slot left the window: zero its row."""
        row = slot.row
        if row < 0:
            return
        self.m[row] = 0.0
        self.owners[row] = None
        slot.row = -1
        owners = self.owners
        while self.head < self.tail and owners[self.head] is None:
            self.head += 1
        if self.head == self.tail:
            self.head = self.tail = 0

    def _compact(self) -> None:
        """Move the rows in use to the top, in order (twice the room when over half full)."""
        live = [s for s in self.owners[self.head : self.tail] if s is not None]
        capacity = len(self.owners)
        if 2 * len(live) > capacity:
            capacity *= 2
        m = np.zeros((capacity, _N_FLOATS))
        if live:
            m[: len(live)] = self.m[[s.row for s in live]]
        owners: list[_Slot | None] = [None] * capacity
        for row, s in enumerate(live):
            s.row = row
            owners[row] = s
        self.m, self.owners, self.head, self.tail = m, owners, 0, len(live)

    def sums(self) -> list[float]:
        if self.head == self.tail:
            return [0.0] * _N_FLOATS
        out: list[float] = self.m[self.head : self.tail].sum(axis=0).tolist()
        return out


@dataclass
class _Worker:
    stage: str
    worker_id: str
    seq: int
    ts_s: float
    state: str
    last_seen_s: float
    rho: float | None
    restarts: int = 0


@dataclass
class _CompletionSlot:
    n: int = 0
    n_ok: int = 0
    n_within_slo: int = 0
    e2e: np.ndarray | None = None
    """Dense bucket counts of successful completions folded in so far."""
    pending: list[int] = field(default_factory=list)
    """Bucket indices of single completions not yet folded into `e2e`."""

    def fold(self) -> np.ndarray | None:
        """Fold the pending completions into `e2e`; returns what was added (None: nothing),
        to be read, never changed (it may be the slot's own)."""
        if not self.pending:
            return None
        counts = np.bincount(np.asarray(self.pending, dtype=np.intp), minlength=N_BUCKETS)
        self.e2e = counts if self.e2e is None else self.e2e + counts
        self.pending.clear()
        return counts


def _zeros() -> np.ndarray:
    return np.zeros(N_BUCKETS, dtype=np.int64)


@dataclass
class _StageState:
    spec: StageSpec
    slots: dict[int, _Slot] = field(default_factory=dict)
    first_report_s: float | None = None
    last_report_s: float | None = None
    queue: deque[tuple[float, int | None, int | None]] = field(default_factory=deque)
    # The window's totals: the sum of every slot in `slots` (histograms: of what is folded).
    dirty: dict[int, _Slot] = field(default_factory=dict)
    """Slots with reports since the last snapshot (histograms to fold, float rows to write)."""
    reports: int = 0
    lost_reports: int = 0
    processed: int = 0
    service_without_rho: int = 0
    service: np.ndarray = field(default_factory=_zeros)
    queue_wait: np.ndarray = field(default_factory=_zeros)
    floats: _FloatRows = field(default_factory=_FloatRows)
    version: int = 0
    """Changes whenever `service` or `queue_wait` does (keys the percentile cache)."""
    cached: tuple[int, Percentiles | None, int, Percentiles | None] | None = None
    """(version, service percentiles, service samples, sojourn percentiles)."""


class _Window(NamedTuple):
    """A stage's sums over the window's slots."""

    reports: int
    lost_reports: int
    processed: int
    service_without_rho: int
    busy_s: float
    interval_s: float
    token_wait_s: float
    rho_x_interval: float
    rho_interval_s: float
    service_sum_ms: float
    service_x_rho_ms: float


class WindowAggregator:
    """Per-pipeline sliding-window state; see the module docstring."""

    def __init__(
        self,
        spec: PipelineSpec,
        window_s: float = DEFAULT_WINDOW_S,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        growth_window_s: float = DEFAULT_GROWTH_WINDOW_S,
        replica_status_max_age_s: float | None = None,
        horizon_s: float | None = None,
    ) -> None:
        if not window_s > 0 or not math.isfinite(window_s):
            raise ValueError(f"window_s={window_s!r} must be a finite number > 0")
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s={stale_after_s!r} must be > 0")
        self.spec = spec
        self.window_s = float(window_s)
        self.stale_after_s = float(stale_after_s)
        self.growth_window_s = min(float(growth_window_s), self.window_s)
        self.replica_status_max_age_s = (
            replica_status_max_age_s
            if replica_status_max_age_s is not None
            else max(10.0, 3 * spec.tick_s)
        )
        # The decision is judged over the next control interval plus the settle time.
        self.horizon_s = (
            horizon_s if horizon_s is not None else spec.control_interval_s + spec.settle_s
        )
        self._stages: dict[str, _StageState] = {s.name: _StageState(s) for s in spec.stages}
        self._workers: dict[tuple[str, str], _Worker] = {}
        self._completions: dict[int, _CompletionSlot] = {}
        # The completion window's totals (the sum of every slot in `_completions`).
        self._dirty_completions: dict[int, _CompletionSlot] = {}
        self._n = 0
        self._n_ok = 0
        self._n_within_slo = 0
        self._e2e = _zeros()
        self._e2e_version = 0
        self._e2e_cached: tuple[int, Percentiles | None] | None = None
        self._replicas: ReplicaStatus | None = None
        self._replicas_seen_s: float | None = None
        self._started_s: float | None = None
        self._tick = 0
        self.reports_total = 0
        self.duplicates_total = 0
        self.restarts_total = 0
        self.lost_reports_total = 0
        self.completions_total = 0
        self.last_loads: tuple[StageLoad, ...] = ()
        """What the bottleneck detector was fed at the last snapshot (for diagnostics)."""
        self.last_bottleneck: Bottleneck | None = None
        """The detector's full answer at the last snapshot, modelled gains per stage included
        (the telemetry carries only the stage and the confidence)."""

    # ------------------------------------------------------------------ ingest

    def _mark_start(self, now: float) -> None:
        if self._started_s is None:
            self._started_s = now

    def add_report(self, report: WorkerReport, now: float) -> bool:
        """Fold one worker report in; False when it was a duplicate and ignored."""
        st = self._stages.get(report.stage)
        if st is None or report.pipeline != self.spec.name:
            raise ValueError(
                f"report for {report.pipeline!r}/{report.stage!r} does not belong to "
                f"pipeline {self.spec.name!r} (stages {', '.join(self.spec.stage_names)})"
            )
        if self._started_s is None:
            self._started_s = now
        key = (report.stage, report.worker_id)
        worker = self._workers.get(key)
        lost = 0
        if worker is None:
            worker = _Worker(
                report.stage,
                report.worker_id,
                report.seq,
                report.ts_s,
                report.state,
                now,
                report.rho,
            )
            self._workers[key] = worker
        else:
            if report.seq == worker.seq and report.ts_s == worker.ts_s:
                self.duplicates_total += 1
                return False
            if report.seq <= worker.seq:
                # The counter went back: the worker process restarted under the same id.
                # Its reports are per-interval deltas, so nothing is double counted.
                worker.restarts += 1
                self.restarts_total += 1
            elif report.seq - worker.seq - 1 <= MAX_LOST_REPORTS:
                lost = report.seq - worker.seq - 1
            worker.seq = report.seq
            worker.ts_s = report.ts_s
            worker.state = report.state
            worker.last_seen_s = now
            worker.rho = report.rho
        self.reports_total += 1
        self.lost_reports_total += lost
        if st.first_report_s is None:
            st.first_report_s = now - report.interval_s
        if st.last_report_s is None or now > st.last_report_s:
            st.last_report_s = now
        idx = int(now // SLOT_S)
        slot = st.slots.get(idx)
        if slot is None:
            slot = st.slots[idx] = st.dirty[idx] = _Slot()
        elif idx not in st.dirty:
            st.dirty[idx] = slot
        slot.reports += 1
        st.reports += 1
        if lost:
            slot.lost_reports += lost
            st.lost_reports += lost
        slot.processed += report.processed
        st.processed += report.processed
        slot.failed += report.failed
        interval = report.interval_s
        slot.busy_s += report.busy_s
        slot.interval_s += interval
        slot.token_wait_s += report.gpu_token_wait_s
        rho = report.rho
        if rho is not None:
            slot.rho_x_interval += rho * interval
            slot.rho_interval_s += interval
        hist = report.service_ms
        counts = hist.counts
        if counts:
            keys, values = slot.pending_service
            keys.extend(counts.keys())
            values.extend(counts.values())
            slot.service_sum_ms += hist.sum_ms
            if rho is not None:
                slot.service_x_rho_ms += hist.sum_ms * rho
            else:
                slot.service_without_rho += 1
                st.service_without_rho += 1
        counts = report.queue_wait_ms.counts
        if counts:
            keys, values = slot.pending_wait
            keys.extend(counts.keys())
            values.extend(counts.values())
        return True

    def add_completion(self, completion: Completion, now: float) -> None:
        """Fold one end-to-end completion in (failed ones count against the SLO)."""
        if completion.pipeline != self.spec.name:
            raise ValueError(
                f"completion for pipeline {completion.pipeline!r} is not {self.spec.name!r}"
            )
        self._mark_start(now)
        self.completions_total += 1
        idx = int(now // SLOT_S)
        slot = self._completions.get(idx)
        if slot is None:
            slot = self._completions[idx] = _CompletionSlot()
        slot.n += 1
        self._n += 1
        if completion.ok:
            slot.n_ok += 1
            self._n_ok += 1
            if completion.e2e_ms <= self.spec.slo_p99_ms:
                slot.n_within_slo += 1
                self._n_within_slo += 1
            slot.pending.append(bucket_index(completion.e2e_ms))
            self._dirty_completions[idx] = slot

    def add_completions(
        self,
        e2e_ms: np.ndarray,
        now_s: np.ndarray | float,
        ok: np.ndarray | None = None,
    ) -> None:
        """`add_completion` for many completions of this pipeline at once (vectorised).

        `e2e_ms[i]` is a completion's end-to-end latency, `now_s[i]` when it was seen (one
        float: all at once), `ok[i]` whether it succeeded (default: all did). The result is
        exactly that of calling `add_completion` for each, in order.
        """
        e2e = np.asarray(e2e_ms, dtype=np.float64).ravel()
        n = int(e2e.size)
        if n == 0:
            return
        seen = np.asarray(now_s, dtype=np.float64)
        if seen.shape != e2e.shape:
            seen = np.broadcast_to(seen, e2e.shape)
        # min/max are NaN when any value is: one check each for finite (and >= 0).
        lo_s, hi_s = float(seen.min()), float(seen.max())
        if not (math.isfinite(lo_s) and math.isfinite(hi_s)):
            raise ValueError(f"now_s={float(seen[~np.isfinite(seen)][0])!r} must be finite")
        lo, hi = float(e2e.min()), float(e2e.max())
        if not (lo >= 0 and hi < math.inf):
            bad = ~(np.isfinite(e2e) & (e2e >= 0))
            raise ValueError(f"e2e_ms={float(e2e[bad][0])!r} must be finite and >= 0")
        if ok is None:
            good: np.ndarray | None = None
            e2e_ok = e2e
        else:
            good = np.broadcast_to(np.asarray(ok, dtype=bool), e2e.shape)
            e2e_ok = e2e[good]
        buckets = bucket_indices(e2e_ok, validate=False)
        self._mark_start(float(seen[0]))
        self.completions_total += n
        slo = self.spec.slo_p99_ms
        first = int(lo_s // SLOT_S)
        if first == int(hi_s // SLOT_S):
            # All in one slot (the usual batch): no per-slot split.
            n_ok = int(e2e_ok.size)
            within = int(np.count_nonzero(e2e_ok <= slo)) if n_ok else 0
            hist = np.bincount(buckets, minlength=N_BUCKETS) if n_ok else None
            self._add_completion_slot(first, n, n_ok, within, hist)
            return
        slots = np.floor_divide(seen, SLOT_S).astype(np.int64)
        first = int(slots.min())
        rel = slots - first
        n_slots = int(rel.max()) + 1
        per_slot = np.bincount(rel, minlength=n_slots)
        ok_rel = rel if good is None else rel[good]
        ok_slot = per_slot if good is None else np.bincount(ok_rel, minlength=n_slots)
        within_slot = np.bincount(ok_rel[e2e_ok <= slo], minlength=n_slots)
        hists = np.bincount(ok_rel * N_BUCKETS + buckets, minlength=n_slots * N_BUCKETS)
        hists = hists.reshape(n_slots, N_BUCKETS)
        per, oks, withins = per_slot.tolist(), ok_slot.tolist(), within_slot.tolist()
        for r in np.flatnonzero(per_slot).tolist():
            self._add_completion_slot(
                first + r, per[r], oks[r], withins[r], hists[r] if oks[r] else None
            )

    def _add_completion_slot(
        self, idx: int, n: int, n_ok: int, within: int, hist: np.ndarray | None
    ) -> None:
        slot = self._completions.get(idx)
        if slot is None:
            slot = self._completions[idx] = _CompletionSlot()
        slot.n += n
        slot.n_ok += n_ok
        slot.n_within_slo += within
        self._n += n
        self._n_ok += n_ok
        self._n_within_slo += within
        if hist is not None:
            slot.e2e = hist.copy() if slot.e2e is None else slot.e2e + hist
            self._e2e += hist
            self._e2e_version += 1

    def add_replica_status(self, status: ReplicaStatus, now: float) -> None:
        if status.pipeline != self.spec.name:
            raise ValueError(f"replica status for {status.pipeline!r} is not {self.spec.name!r}")
        self._replicas = status
        self._replicas_seen_s = now

    # ------------------------------------------------------------------ snapshot

    def snapshot(
        self,
        now: float,
        queues: Mapping[str, QueueObservation | None] | None = None,
        replica_status: ReplicaStatus | None = None,
    ) -> PipelineTelemetry:
        """The pipeline over the window ending at `now`; advances the tick counter."""
        self._mark_start(now)
        if replica_status is not None:
            self.add_replica_status(replica_status, now)
        self._prune(now)
        self._fold()
        queues = queues or {}
        status = self._fresh_replica_status(now)
        metrics: list[StageMetrics] = []
        loads: list[StageLoad] = []
        short: list[str] = []
        workers: dict[str, list[_Worker]] = {name: [] for name in self._stages}
        for w in self._workers.values():
            workers[w.stage].append(w)
        for name, st in self._stages.items():
            obs = queues.get(name)
            if obs is not None:
                st.queue.append((now, obs.depth, obs.arrived_total))
            m, load, short_of_replicas = self._stage_metrics(st, now, status, workers[name])
            metrics.append(m)
            loads.append(load)
            if short_of_replicas:
                short.append(name)
        bottleneck = detect_bottleneck(loads, horizon_s=self.horizon_s)
        self.last_loads = tuple(loads)
        self.last_bottleneck = bottleneck
        telemetry = self._pipeline(now, metrics, bottleneck, short)
        self._tick += 1
        return telemetry

    def _prune(self, now: float) -> None:
        """Drop the slots that left the window, and their contents from the totals."""
        # Keep every slot that overlaps (now - window, now].
        oldest = math.floor((now - self.window_s) / SLOT_S) - 1
        for st in self._stages.values():
            for idx in [i for i in st.slots if i <= oldest]:
                slot = st.slots.pop(idx)
                st.dirty.pop(idx, None)
                st.reports -= slot.reports
                st.lost_reports -= slot.lost_reports
                st.processed -= slot.processed
                st.service_without_rho -= slot.service_without_rho
                st.floats.drop(slot)
                if slot.service is not None:
                    st.service -= slot.service
                    st.version += 1
                if slot.queue_wait is not None:
                    st.queue_wait -= slot.queue_wait
                    st.version += 1
            while st.queue and st.queue[0][0] < now - self.window_s:
                st.queue.popleft()
        for idx in [i for i in self._completions if i <= oldest]:
            c = self._completions.pop(idx)
            self._dirty_completions.pop(idx, None)
            self._n -= c.n
            self._n_ok -= c.n_ok
            self._n_within_slo -= c.n_within_slo
            if c.e2e is not None:
                self._e2e -= c.e2e
                self._e2e_version += 1
        horizon = now - self.window_s
        for key in [k for k, w in self._workers.items() if w.last_seen_s < horizon]:
            del self._workers[key]

    def _fold(self) -> None:
        """Fold the reports and completions since the last snapshot into the totals."""
        for st in self._stages.values():
            if not st.dirty:
                continue
            for slot in st.dirty.values():
                service, wait = slot.fold()
                if service is not None:
                    st.service += service
                    st.version += 1
                if wait is not None:
                    st.queue_wait += wait
                    st.version += 1
                st.floats.write(slot)
            st.dirty.clear()
        if self._dirty_completions:
            for c in self._dirty_completions.values():
                e2e = c.fold()
                if e2e is not None:
                    self._e2e += e2e
                    self._e2e_version += 1
            self._dirty_completions.clear()

    def _window(self, st: _StageState) -> _Window:
        """The stage's sums over the window (from the running totals)."""
        return _Window(st.reports, st.lost_reports, st.processed, st.service_without_rho,
                       *st.floats.sums())  # fmt: skip

    def _histogram_figures(
        self, st: _StageState
    ) -> tuple[Percentiles | None, int, Percentiles | None]:
        """Service percentiles, service samples and sojourn percentiles over the window
        (None: no sample); recomputed only when the stage's histograms changed."""
        cached = st.cached
        if cached is not None and cached[0] == st.version:
            return cached[1], cached[2], cached[3]
        # Cumulative counts as lists: they give the percentiles, the totals and where each
        # histogram starts and ends (the convolution's span). Counts are >= 0.
        cum_service: list[int] = st.service.cumsum().tolist()
        n_service = cum_service[-1]
        service_pct = percentiles_cum(cum_service)
        sojourn_pct = None
        if service_pct is not None:
            cum_wait: list[int] = st.queue_wait.cumsum().tolist()
            if cum_wait[-1] > 0:
                sojourn_pct = sojourn_percentiles(st.queue_wait, cum_wait, st.service, cum_service)
        st.cached = (st.version, service_pct, n_service, sojourn_pct)
        return service_pct, n_service, sojourn_pct

    def _completion_window(self) -> tuple[int, int, Percentiles | None]:
        """Completions, those within the SLO, and end-to-end percentiles over the window."""
        cached = self._e2e_cached
        if cached is None or cached[0] != self._e2e_version:
            cum: list[int] = self._e2e.cumsum().tolist()
            cached = self._e2e_cached = (self._e2e_version, percentiles_cum(cum))
        return self._n, self._n_within_slo, cached[1]

    def _fresh_replica_status(self, now: float) -> ReplicaStatus | None:
        if self._replicas is None or self._replicas_seen_s is None:
            return None
        if now - self._replicas_seen_s > self.replica_status_max_age_s:
            return None
        return self._replicas

    def _effective_window_s(self, since_s: float | None, now: float) -> float | None:
        """Length of the window actually observed (shorter right after start)."""
        if since_s is None:
            return None
        span = min(self.window_s, now - since_s)
        return span if span > 0 else None

    def _stage_metrics(
        self, st: _StageState, now: float, status: ReplicaStatus | None, workers: list[_Worker]
    ) -> tuple[StageMetrics, StageLoad, bool]:
        """The stage's metrics, the detector's view of it, and whether replicas are missing."""
        spec = st.spec
        missing: list[str] = []
        estimated: list[str] = []
        stale = st.last_report_s is None or now - st.last_report_s > self.stale_after_s

        # --- replicas: the supervisor's view when fresh, else the workers' own reports.
        alive = [w for w in workers if now - w.last_seen_s <= self.stale_after_s]
        vanished = [
            w for w in workers if now - w.last_seen_s > self.stale_after_s and w.state != "draining"
        ]
        reporting = len(alive)
        by_state = {"ready": 0, "starting": 0, "draining": 0}
        for w in alive:
            by_state[w.state] += 1
        desired: int | None = None
        stage_status = None
        if status is not None:
            stage_status = next((s for s in status.stages if s.stage == spec.name), None)
        if stage_status is not None:
            ready, starting, draining = (
                stage_status.ready,
                stage_status.starting,
                stage_status.draining,
            )
            desired = stage_status.desired
            expected = ready + starting + draining
        else:
            ready = by_state["ready"]
            starting = by_state["starting"]
            draining = by_state["draining"]
            expected = reporting + len(vanished)
            if reporting == 0 and not vanished:
                missing.append("replicas_ready")
        short_of_replicas = reporting < expected

        # --- sums over the window's slots.
        win = self._window(st)
        n_reports, lost, processed = win.reports, win.lost_reports, win.processed
        busy_s, interval_s, token_wait_s = win.busy_s, win.interval_s, win.token_wait_s
        rho_int, rho_x_int = win.rho_interval_s, win.rho_x_interval

        # --- rho: what the replicas say they run at, else the spec's start value.
        rho: float | None = None
        rho_now: float | None = None
        if spec.kind == "gpu":
            if rho_int > 0:
                rho = rho_x_int / rho_int
            else:
                rho = spec.start_rho
                estimated.append("rho")
            latest = [w.rho for w in alive if w.rho is not None]
            rho_now = sum(latest) / len(latest) if latest else None

        throughput: float | None = None
        utilisation: float | None = None
        service_pct = None
        sojourn_pct = None
        token_wait: float | None = None
        service_mean_s: float | None = None
        span = self._effective_window_s(st.first_report_s, now)
        if stale or n_reports == 0 or span is None:
            missing += ["throughput_rps", "utilisation", "service_ms", "sojourn_ms"]
            if spec.kind == "gpu":
                missing.append("gpu_token_wait_s")
        else:
            throughput = processed * (n_reports + lost) / n_reports / span
            if lost:
                estimated.append("throughput_rps")
            if interval_s > 0:
                occupied = busy_s
                if spec.kind == "gpu":
                    # GPU time actually used = busy minus time blocked on launch tokens; the
                    # quota is rho of the GPU, so divide by rho (the paper's normalisation).
                    occupied = max(0.0, busy_s - token_wait_s)
                    if rho is not None and rho > 0:
                        utilisation = occupied / (interval_s * spec.concurrency * rho)
                else:
                    utilisation = occupied / (interval_s * spec.concurrency)
            if utilisation is None:
                missing.append("utilisation")
            if short_of_replicas:
                estimated += (
                    ["throughput_rps", "utilisation"]
                    if utilisation is not None
                    else ["throughput_rps"]
                )
            service_pct, n_service, sojourn_pct = self._histogram_figures(st)
            if service_pct is None:
                missing.append("service_ms")
            else:
                service_mean_s = win.service_sum_ms / n_service / 1000.0
                if rho_now is not None and rho_now > 0 and win.service_without_rho == 0:
                    # The detector wants the service time at the rho the stage has now. A GPU
                    # request's time scales as 1 / rho, so the window's samples are brought
                    # to full speed (x the rho each ran at) and then to the current rho. A rho
                    # change shows within one report instead of one window.
                    service_mean_s = win.service_x_rho_ms / n_service / rho_now / 1000.0
            if sojourn_pct is None:
                missing.append("sojourn_ms")
            else:
                # Convolution assumes wait and service independent.
                estimated.append("sojourn_ms")
            if spec.kind == "gpu":
                token_wait = token_wait_s

        # --- the queue, from JetStream.
        depth: int | None = None
        arrived_total: int | None = None
        growth: float | None = None
        arrival: float | None = None
        if st.queue and st.queue[-1][0] == now and st.queue[-1][1] is not None:
            depth = st.queue[-1][1]
            arrived_total = st.queue[-1][2]
        if depth is None:
            missing.append("queue_depth")
        growth = self._growth(st, now)
        if growth is None:
            missing.append("queue_growth_per_s")
        arrival = self._arrival(st)
        if arrival is None and throughput is not None and growth is not None:
            # Flow conservation: what arrives is what leaves plus what piles up.
            arrival = max(0.0, throughput + growth)
            estimated.append("arrival_rate_rps")
        if arrival is None:
            missing.append("arrival_rate_rps")

        billed = ready + starting + draining
        cost = billed * self.spec.replica_cost_per_h(spec, rho)
        metrics = StageMetrics(
            stage=spec.name,
            kind=spec.kind,
            replicas_ready=ready,
            replicas_starting=starting,
            replicas_draining=draining,
            replicas_desired=desired,
            reporting_replicas=reporting,
            arrival_rate_rps=arrival,
            throughput_rps=throughput,
            queue_depth=depth,
            queue_growth_per_s=growth,
            arrived_total=arrived_total,
            utilisation=utilisation,
            service_ms=service_pct,
            sojourn_ms=sojourn_pct,
            rho=rho,
            cost_per_h=cost,
            gpu_token_wait_s=token_wait,
            stale=stale,
            missing_fields=_unique(missing),
            estimated_fields=_unique(estimated),
        )
        servers = (ready if ready > 0 else reporting) * spec.concurrency
        load = StageLoad(
            name=spec.name,
            servers=servers,
            service_s=service_mean_s,
            arrival_rps=arrival,
            throughput_rps=throughput,
            queue_depth=depth,
            queue_growth_per_s=growth,
            utilisation=utilisation,
            servers_per_replica=spec.concurrency,
        )
        return metrics, load, short_of_replicas

    def _growth(self, st: _StageState, now: float) -> float | None:
        """Least-squares slope of queue depth over the growth window (requests/s)."""
        since = now - self.growth_window_s
        pts = [(t, d) for t, d, _ in st.queue if d is not None and t >= since]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < 1e-6:
            return None
        n = len(pts)
        mt = sum(t for t, _ in pts) / n
        md = sum(d for _, d in pts) / n
        var = sum((t - mt) ** 2 for t, _ in pts)
        if var <= 0:
            return None
        return sum((t - mt) * (d - md) for t, d in pts) / var

    def _arrival(self, st: _StageState) -> float | None:
        """Growth of the stage's cumulative arrivals over the window (requests/s)."""
        pts = [(t, a) for t, _, a in st.queue if a is not None]
        # A counter that goes back means the consumer was recreated: start after the reset.
        start = 0
        for i in range(1, len(pts)):
            if pts[i][1] < pts[i - 1][1]:
                start = i
        pts = pts[start:]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < 1e-6:
            return None
        return max(0.0, (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))

    def _pipeline(
        self, now: float, stages: list[StageMetrics], bottleneck: Bottleneck, short: list[str]
    ) -> PipelineTelemetry:
        n, n_within, pct = self._completion_window()
        span = self._effective_window_s(self._started_s, now)
        completed = n / span if span is not None and span >= SLOT_S else None
        cost = sum(m.cost_per_h for m in stages)
        whole = 0.0
        for m in stages:
            spec = self.spec.stage(m.stage)
            billed = m.replicas_ready + m.replicas_starting + m.replicas_draining
            full = 1.0 if spec.kind == "gpu" else None
            whole += billed * self.spec.replica_cost_per_h(spec, full)
        stale = [m.stage for m in stages if m.stale]
        degraded = bool(stale) or bool(short)
        return PipelineTelemetry(
            pipeline=self.spec.name,
            tick=self._tick,
            ts_s=now,
            window_s=self.window_s,
            stages=stages,
            arrival_rate_rps=stages[0].arrival_rate_rps,
            completed_rps=completed,
            e2e_p50_ms=pct.p50_ms if pct else None,
            e2e_p99_ms=pct.p99_ms if pct else None,
            slo_p99_ms=self.spec.slo_p99_ms,
            slo_attainment=n_within / n if n else None,
            cost_per_h=cost,
            whole_gpu_cost_per_h=whole,
            bottleneck=bottleneck.stage,
            bottleneck_confidence=bottleneck.confidence,
            stale_stages=stale,
            degraded=degraded,
        )


def pending_counts(pending: tuple[list[int], list[int]]) -> np.ndarray | None:
    """Dense counts of (indices, counts) pairs with one bincount, then clear them (None:
    there were none)."""
    keys, values = pending
    if not keys:
        return None
    if sum(values) >= 2**53:  # beyond float64's exact integers: exact, slower
        counts = np.zeros(N_BUCKETS, dtype=np.int64)
        np.add.at(counts, np.asarray(keys, dtype=np.intp), np.asarray(values, dtype=np.int64))
    else:
        counts = np.bincount(keys, weights=values, minlength=N_BUCKETS).astype(np.int64)
    keys.clear()
    values.clear()
    return counts


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))

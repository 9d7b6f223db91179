"""Discrete-event simulator of one pipeline: a tandem of multi-server FCFS queues.

Model
- Requests arrive at the first stage at given times (seeded, from `sair.loadgen.arrivals`).
- Each stage has replicas; each replica serves `concurrency` requests at once (one server per
  slot), first come first served from the stage's queue. A finished request joins the next
  stage's queue at once (the NATS hop is not modelled), or completes after the last stage.
- Service times: one draw per request from the stage's `StageProfile` (lognormal/gamma),
  stretched on GPU stages by the share rho (`StageProfile.scale`).
- `set_targets({stage: (replicas, rho)})` at any simulated time. A new replica serves only
  after `startup_s`. Scale-down removes starting replicas first, then idle ones, then busy ones
  (the one that finishes soonest); a removed replica finishes its in-flight request, takes no
  new one, reports once more as "draining" and is gone. A rho change applies to requests that
  start after it (in-flight ones keep their drawn end time).

How it runs (why it is fast): the event list of a tandem FCFS network is never materialised.
Time advances in windows that end at the next report boundary (or at the caller's target
time). Within a window, stage by stage, the queue is served by the Kiefer-Wolfowitz recursion
on a heap of server free times (`start = max(arrival, earliest free server)`), which is
exactly the event order of an FCFS multi-server queue; a request that cannot start before the
window ends stays queued, so a later `set_targets` still affects it. Departures feed the next
stage's arrivals (sorted, vectorised). The Python inner loop does one heap operation per
request and stage; everything else (service draws, histograms, per-replica sums) is numpy.

Outputs, at every report boundary (`report_interval_s`, 1 s like the live workers): one
`WorkerReport` per replica, exactly as `sair.worker.logic.ReportWindow` builds them (work is
counted when it completes; busy time is the service time of the requests completed in the
interval), and a `CompletionBatch` of requests that left the last stage. `queues()` gives each
stage's JetStream view: waiting + in service, and the total that ever arrived.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from schemas.histogram import (
    BUCKET_UPPER_BOUNDS_MS,
    N_BUCKETS,
    OVERFLOW_BUCKET,
    bucket_index,
)
from schemas.messages import Completion, WorkerReport, WorkerState
from schemas.pipeline import PipelineSpec, StageSpec

from .profiles import PipelineProfile, StageProfile

POOL_SIZE = 4096
"""Service times are drawn this many at a time (numpy), then consumed one by one."""
CHUNK = 2048
"""Queued requests looked at per step (an overloaded stage's backlog is not rescanned whole)."""

_BOUNDS = np.asarray(BUCKET_UPPER_BOUNDS_MS)
_LAST_BOUND = BUCKET_UPPER_BOUNDS_MS[-1]


def bucket_indices(values_ms: np.ndarray) -> np.ndarray:
    """`schemas.histogram.bucket_index` for an array of non-negative values (vectorised).

    `bucket_index(v)` is the first bucket whose upper bound is >= v (its log10 estimate only
    starts a search that corrects upwards): a binary search over the bounds. Above the last
    finite bound `bucket_index` decides from the logarithm alone, so those rare values are
    looked up one by one."""
    v = np.asarray(values_ms, dtype=np.float64)
    idx = np.searchsorted(_BOUNDS, v, side="left")
    if v.size and float(v.max()) > _LAST_BOUND:
        for k in np.flatnonzero(idx == OVERFLOW_BUCKET).tolist():
            idx[k] = bucket_index(float(v[k]))
    return idx


BURST_WINDOW_S = 0.25
"""The live bucket holds this many seconds of its rate (services/actuator/tokens.py)."""


def _bucketed(spec: StageSpec, prof: StageProfile) -> bool:
    """GPU stages with launches and a calibrated rate follow the live shared token bucket."""
    return spec.kind == "gpu" and prof.launches > 0 and spec.full_speed_launch_rate is not None


def _burst(rate: float) -> float:
    return float(max(1, int(np.ceil(rate * BURST_WINDOW_S))))


@dataclass(frozen=True)
class QueueState:
    """A stage queue as JetStream would show it."""

    depth: int
    """Waiting + in service (num_pending + num_ack_pending)."""
    arrived_total: int
    """Requests that ever entered the stage's queue."""


@dataclass(frozen=True)
class CompletionBatch:
    """Requests that left the last stage in one report interval (arrays, same order)."""

    pipeline: str
    job: np.ndarray
    created_s: np.ndarray
    done_s: np.ndarray
    stage_names: tuple[str, ...]
    stage_ms: np.ndarray
    """Service ms per stage, shape (stages, n)."""

    def __len__(self) -> int:
        return int(self.job.size)

    @property
    def e2e_ms(self) -> np.ndarray:
        out: np.ndarray = np.maximum(0.0, (self.done_s - self.created_s) * 1000.0)
        return out

    def messages(self) -> list[Completion]:
        """The `Completion` messages the last stage would publish (slow: pydantic per request)."""
        e2e = self.e2e_ms.tolist()
        created = self.created_s.tolist()
        done = self.done_s.tolist()
        per_stage = [row.tolist() for row in self.stage_ms]
        out: list[Completion] = []
        for i, j in enumerate(self.job.tolist()):
            out.append(
                Completion(
                    request_id=f"r{j}",
                    pipeline=self.pipeline,
                    created_ts_s=created[i],
                    done_ts_s=done[i],
                    e2e_ms=e2e[i],
                    stage_ms={n: per_stage[k][i] for k, n in enumerate(self.stage_names)},
                )
            )
        return out


@dataclass(frozen=True)
class StepOutput:
    """What happened while the engine advanced: reports and completions, in time order."""

    reports: list[WorkerReport]
    completions: list[CompletionBatch]


@dataclass(frozen=True)
class TrueStage:
    """A stage as it really is (the simulator's ground truth; never shown to a policy)."""

    name: str
    ready_servers: int
    starting_servers: int
    mean_service_s: float
    service_scv: float
    in_system: int
    rho: float | None


@dataclass
class _Replica:
    rid: int
    worker_id: str
    started_s: float
    ready_s: float
    last_report_s: float
    seq: int = 0
    draining: bool = False
    drain_until_s: float = 0.0


@dataclass
class _Stage:
    index: int
    spec: StageSpec
    profile: StageProfile
    rng: np.random.Generator
    rho: float | None
    factor: float
    bucketed: bool
    heap: list[tuple[float, int]] = field(default_factory=list)
    """(free time, replica id), one entry per server slot of every non-draining replica."""
    replicas: dict[int, _Replica] = field(default_factory=dict)
    wait_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Arrival times at this stage of the requests not started yet (from `head` on)."""
    wait_j: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    head: int = 0
    in_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    in_j: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    in_sorted: bool = True
    """Whether `in_t` (requests done upstream, not yet arrived here) is sorted by time."""
    pool: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pool_list: list[float] = field(default_factory=list)
    pos: int = 0
    rec: list[np.ndarray] = field(default_factory=list)
    """Started requests not yet reported, (5, n) arrays with rows replica id, end, service s,
    wait s, token wait s."""
    arrived_total: int = 0
    tokens: float = 0.0
    """GPU stages: launch tokens in the stage's shared bucket at `tok_t` (the live model)."""
    tok_t: float = 0.0

    @property
    def active(self) -> int:
        return sum(1 for r in self.replicas.values() if not r.draining)


class Engine:
    """The simulator of one pipeline; see the module docstring."""

    def __init__(
        self,
        spec: PipelineSpec,
        profile: PipelineProfile,
        arrivals_s: np.ndarray,
        seed: int,
        *,
        report_interval_s: float = 1.0,
    ) -> None:
        profile.check(spec)
        if not report_interval_s > 0:
            raise ValueError(f"report_interval_s={report_interval_s!r} must be > 0")
        arr = np.asarray(arrivals_s, dtype=np.float64)
        if arr.ndim != 1 or (arr.size and (not np.all(np.isfinite(arr)) or arr[0] < 0)):
            raise ValueError("arrivals_s must be a 1-d array of finite times >= 0")
        if arr.size > 1 and np.any(np.diff(arr) < 0):
            raise ValueError("arrivals_s must be sorted")
        self.spec = spec
        self.profile = profile
        self.now = 0.0
        self.report_interval_s = float(report_interval_s)
        self.arrivals_s = arr
        n = arr.size
        self.done_s = np.full(n, np.nan)
        self.stage_ms = np.zeros((len(spec.stages), n))
        self._next_job = 0
        self._report_k = 1
        self._next_rid = 0
        self._completions_pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.cost_usd = 0.0
        self.whole_gpu_cost_usd = 0.0
        rngs = np.random.default_rng(np.random.SeedSequence(seed)).spawn(len(spec.stages))
        self.stages: list[_Stage] = []
        for i, st in enumerate(spec.stages):
            prof = profile.stage(st.name)
            rho = st.start_rho
            bucketed = _bucketed(st, prof)
            factor = 1.0 if bucketed else prof.scale(rho)
            self.stages.append(_Stage(i, st, prof, rngs[i], rho, factor, bucketed))
        for s in self.stages:
            self._add_replicas(s, s.spec.initial_replicas, startup_s=0.0)
            if s.bucketed:
                s.tokens = _burst(self._token_rate(s))

    # ------------------------------------------------------------------ control

    def targets(self) -> dict[str, tuple[int, float | None]]:
        """Current (replicas, rho) per stage; draining replicas are not counted."""
        return {s.spec.name: (s.active, s.rho) for s in self.stages}

    def set_targets(self, targets: Mapping[str, tuple[int, float | None]]) -> None:
        """Scale stages now: {stage: (replicas, rho)}; rho None keeps the current share."""
        by_name = {s.spec.name: s for s in self.stages}
        for name, (replicas, rho) in targets.items():
            st = by_name.get(name)
            if st is None:
                raise ValueError(f"set_targets: unknown stage {name!r}")
            if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                raise ValueError(f"set_targets: {name}.replicas={replicas!r} must be an int >= 0")
            if rho is not None:
                if st.spec.kind != "gpu":
                    raise ValueError(f"set_targets: {name}.rho={rho!r} on a cpu stage")
                if not (isinstance(rho, int | float) and 0 < rho <= 1):
                    raise ValueError(f"set_targets: {name}.rho={rho!r} must lie in (0, 1]")
                if rho != st.rho:
                    self._set_rho(st, float(rho))
            diff = replicas - st.active
            if diff > 0:
                self._add_replicas(st, diff, st.spec.startup_s)
            elif diff < 0:
                self._remove_replicas(st, -diff)

    def _set_rho(self, st: _Stage, rho: float) -> None:
        if st.bucketed:  # the rate changes, the draws stay at full speed
            st.rho = rho
            return
        new = st.profile.scale(rho)
        if st.pos < st.pool.size:
            st.pool = st.pool[st.pos :] * (new / st.factor)
            st.pool_list = []
            st.pos = 0
        st.rho = rho
        st.factor = new

    def _add_replicas(self, st: _Stage, n: int, startup_s: float) -> None:
        ready = self.now + startup_s
        for _ in range(n):
            rid = self._next_rid
            self._next_rid += 1
            wid = f"sim-{st.spec.name}-{rid}"
            st.replicas[rid] = _Replica(rid, wid, self.now, ready, self.now)
            for _ in range(st.spec.concurrency):
                heapq.heappush(st.heap, (ready, rid))

    def _remove_replicas(self, st: _Stage, n: int) -> None:
        now = self.now
        free: dict[int, float] = {}
        for t, rid in st.heap:
            free[rid] = max(free.get(rid, 0.0), t)
        alive = [r for r in st.replicas.values() if not r.draining]
        starting = sorted((r for r in alive if r.ready_s > now), key=lambda r: -r.ready_s)
        ready = [r for r in alive if r.ready_s <= now]
        idle = [r for r in ready if free[r.rid] <= now]
        busy = sorted((r for r in ready if free[r.rid] > now), key=lambda r: free[r.rid])
        victims = (starting + idle + busy)[:n]
        gone = {r.rid for r in victims}
        for r in victims:
            r.draining = True
            r.drain_until_s = now if r.ready_s > now else max(now, free[r.rid])
        st.heap = [e for e in st.heap if e[1] not in gone]
        heapq.heapify(st.heap)

    # ------------------------------------------------------------------ time

    def advance(self, t_end: float) -> StepOutput:
        """Simulate until `t_end`; return the reports and completions produced on the way."""
        if t_end < self.now - 1e-12:
            raise ValueError(f"advance: t_end={t_end} is before now={self.now}")
        reports: list[WorkerReport] = []
        batches: list[CompletionBatch] = []
        while self.now < t_end:
            boundary = self._report_k * self.report_interval_s
            w_end = min(boundary, t_end)
            self._window(w_end)
            self._bill(self.now, w_end)
            self.now = w_end
            if w_end >= boundary - 1e-12:
                self.now = boundary
                self._report(boundary, reports, batches)
                self._report_k += 1
        return StepOutput(reports, batches)

    def _bill(self, t0: float, t1: float) -> None:
        spec = self.spec
        for st in self.stages:
            rate = spec.replica_cost_per_h(st.spec, st.rho)
            whole = spec.replica_cost_per_h(st.spec, 1.0 if st.spec.kind == "gpu" else None)
            alive_s = 0.0
            for r in st.replicas.values():
                end = min(t1, r.drain_until_s) if r.draining else t1
                alive_s += max(0.0, end - max(t0, r.started_s))
            self.cost_usd += rate * alive_s / 3600.0
            self.whole_gpu_cost_usd += whole * alive_s / 3600.0

    def _window(self, t_end: float) -> None:
        """Serve every stage, in order, for all requests that start before `t_end`."""
        last = len(self.stages) - 1
        arr = self.arrivals_s
        for st in self.stages:
            # --- requests that reach this stage before t_end join its queue, in time order.
            if st.index == 0:
                j1 = int(arr.searchsorted(t_end))
                if j1 > self._next_job:
                    self._enqueue(st, arr[self._next_job : j1],
                                  np.arange(self._next_job, j1, dtype=np.int64))  # fmt: skip
                    self._next_job = j1
            elif st.in_t.size:
                if not st.in_sorted:  # by time, ties in the order they left the stage before
                    order = st.in_t.argsort(kind="stable")
                    st.in_t = st.in_t[order]
                    st.in_j = st.in_j[order]
                    st.in_sorted = True
                j = int(st.in_t.searchsorted(t_end))
                if j:
                    self._enqueue(st, st.in_t[:j], st.in_j[:j])
                    st.in_t = st.in_t[j:]
                    st.in_j = st.in_j[j:]
            while st.head < st.wait_t.size and st.heap:
                i0 = st.head
                i1 = min(st.wait_t.size, i0 + CHUNK)
                svc: np.ndarray | None = None
                if st.bucketed:
                    starts, rids, svc = self._serve_bucket(st, i0, i1, t_end)
                elif len(st.heap) == 1:
                    starts, rids = self._serve_single(st, i0, i1, t_end)
                else:
                    starts, rids = self._serve_multi(st, i0, i1, t_end)
                if starts.size == 0:
                    break
                self._commit(st, i0, starts, rids, last, svc)
                if st.head < i1:
                    break

    @staticmethod
    def _enqueue(st: _Stage, times: np.ndarray, jobs: np.ndarray) -> None:
        """Append arrivals to the stage's queue (dropping the requests already started)."""
        st.wait_t = np.concatenate((st.wait_t[st.head :], times))
        st.wait_j = np.concatenate((st.wait_j[st.head :], jobs))
        st.head = 0
        st.arrived_total += int(times.size)

    @staticmethod
    def _draws(st: _Stage, need: int) -> None:
        """Make sure `need` service times are drawn and not yet used."""
        if st.pos + need > st.pool.size:
            fresh = st.profile.draw_s(st.rng, max(POOL_SIZE, need)) * st.factor
            st.pool = np.concatenate((st.pool[st.pos :], fresh))
            st.pool_list = []
            st.pos = 0

    def _serve_single(
        self, st: _Stage, i0: int, i1: int, t_end: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """One server: Lindley's recursion in closed form,
        end_n = cs_n + max(f0, cummax(a - cs_prev)) with cs the cumulative service."""
        f0, rid = st.heap[0]
        self._draws(st, i1 - i0)
        a = st.wait_t[i0:i1]
        s = st.pool[st.pos : st.pos + (i1 - i0)]
        cs = np.cumsum(s)
        lead = np.maximum.accumulate(a - (cs - s))
        end = cs + np.maximum(lead, f0)
        start = end - s
        m = int(np.searchsorted(start, t_end, side="left"))
        start = start[:m]
        if m:
            st.heap[0] = (float(end[m - 1]), rid)
        return start, np.full(m, rid, dtype=np.int64)

    def _serve_multi(
        self, st: _Stage, i0: int, i1: int, t_end: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Several servers: FCFS on the earliest-free server (Kiefer-Wolfowitz), one heap op
        per request."""
        self._draws(st, i1 - i0)
        if not st.pool_list:
            st.pool_list = st.pool.tolist()
        starts, rids = _heap_fcfs(
            st.heap, st.wait_t[i0:i1].tolist(), st.pool_list[st.pos : st.pos + (i1 - i0)], t_end
        )
        return np.asarray(starts), np.asarray(rids, dtype=np.int64)

    def _token_rate(self, st: _Stage) -> float:
        """Refill rate of the stage's shared bucket, as the actuator sets it:
        active replicas x rho x full-speed launch rate (services/actuator/tokens.py)."""
        assert st.spec.full_speed_launch_rate is not None
        return max(1, st.active) * (st.rho or 1.0) * st.spec.full_speed_launch_rate

    def _true_mean_service_s(self, st: _Stage) -> float:
        """Mean service time per server as capacity sees it. A bucketed GPU stage runs at full
        speed until its token rate binds: per server, min(1/S, rho x full speed / (L x conc))."""
        if not st.bucketed:
            return st.profile.mean_s(st.rho)
        full_s = st.profile.mean_s(1.0)
        per_server_rate = self._token_rate(st) / max(1, st.active) / st.spec.concurrency
        return max(full_s, st.profile.launches / per_server_rate)

    def _serve_bucket(
        self, st: _Stage, i0: int, i1: int, t_end: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A GPU stage as the live one works: a request runs at full speed while the stage's
        shared token bucket (rate R, burst of BURST_WINDOW_S x R) holds its launches; the
        launches it lacks wait for the refill, in start order across replicas.

        Only the requests that did wait get a new service time; the others keep their draw
        (a view of the pool, as on the other stages)."""
        n = i1 - i0
        self._draws(st, n)
        if not st.pool_list:
            st.pool_list = st.pool.tolist()
        prof = st.profile
        rate = self._token_rate(st)
        starts_l, rids_l, late, st.tokens, st.tok_t = _bucket_fcfs(
            st.heap, st.wait_t[i0:i1].tolist(), st.pool_list[st.pos : st.pos + n], t_end,
            st.tokens, st.tok_t, float(prof.launches), rate, _burst(rate),
            prof.fixed_ms / prof.mean_ms,
        )  # fmt: skip
        m = len(starts_l)
        svc = st.pool[st.pos : st.pos + m]
        if late:
            svc = svc.copy()
            for i, s in late:
                svc[i] = s
        return np.asarray(starts_l), np.asarray(rids_l, dtype=np.int64), svc

    def _commit(self, st: _Stage, i0: int, start: np.ndarray, rids: np.ndarray, last: int,
                svc: np.ndarray | None = None) -> None:  # fmt: skip
        """Record the requests just started: reports, next stage's arrivals, completions."""
        m = start.size
        i1 = i0 + m
        drawn = st.pool[st.pos : st.pos + m]
        s = drawn if svc is None else svc
        st.pos += m
        st.head = i1
        jobs = st.wait_j[i0:i1]
        # One (5, m) array: replica id (exact in a float), end, service s, wait s, token wait s.
        rec = np.empty((5, m))
        rec[0] = rids
        end = rec[1]
        np.add(start, s, out=end)
        rec[2] = s
        np.subtract(start, st.wait_t[i0:i1], out=rec[3])
        if svc is not None:
            np.subtract(svc, drawn, out=rec[4])
        elif st.factor != 1.0:
            np.multiply(s, 1.0 - 1.0 / st.factor, out=rec[4])
        else:
            rec[4] = 0.0
        st.rec.append(rec)
        self.stage_ms[st.index, jobs] = s * 1000.0
        if st.index == last:
            self.done_s[jobs] = end
            self._completions_pending.append((jobs, end))
        else:
            nxt = self.stages[st.index + 1]
            nxt.in_t = np.concatenate((nxt.in_t, end))
            nxt.in_j = np.concatenate((nxt.in_j, jobs))
            nxt.in_sorted = False

    # ------------------------------------------------------------------ reports

    def _report(
        self, now: float, reports: list[WorkerReport], batches: list[CompletionBatch]
    ) -> None:
        # Requests completed before `now`, every stage at once (replica ids are global), so
        # the per-replica sums and histograms cost one numpy pass per report boundary.
        parts: list[np.ndarray] = []
        for st in self.stages:
            if not st.rec:
                continue
            cols = st.rec[0] if len(st.rec) == 1 else np.concatenate(st.rec, axis=1)
            done = cols[1] <= now
            if done.all():
                st.rec = []
                parts.append(cols)
            else:
                st.rec = [cols[:, ~done]]
                if done.any():
                    parts.append(cols[:, done])
        per_rid: dict[int, _Sums] = {}
        if parts:
            per_rid = _group(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))
        for st in self.stages:
            self._stage_reports(st, now, per_rid, reports)
        if self._completions_pending:
            jobs = np.concatenate([j for j, _ in self._completions_pending])
            ends = np.concatenate([e for _, e in self._completions_pending])
            done = ends <= now
            self._completions_pending = [(jobs[~done], ends[~done])] if not done.all() else []
            if done.any():
                jd, ed = jobs[done], ends[done]
                order = np.argsort(ed, kind="stable")
                jd, ed = jd[order], ed[order]
                batches.append(
                    CompletionBatch(
                        pipeline=self.spec.name,
                        job=jd,
                        created_s=self.arrivals_s[jd],
                        done_s=ed,
                        stage_names=self.spec.stage_names,
                        stage_ms=self.stage_ms[:, jd],
                    )
                )

    def _stage_reports(
        self, st: _Stage, now: float, per_rid: dict[int, _Sums], out: list[WorkerReport]
    ) -> None:
        busy_slots: dict[int, int] = {}
        for t, rid in st.heap:
            if t > now:
                busy_slots[rid] = busy_slots.get(rid, 0) + 1
        launches = st.profile.launches
        pipeline, stage = self.spec.name, st.spec.name
        finished: list[int] = []
        for r in st.replicas.values():
            interval = now - r.last_report_s
            if interval <= 0:
                continue
            state: WorkerState
            if r.draining:
                state = "draining"
                in_flight = 1 if r.drain_until_s > now else 0
                if r.drain_until_s <= now:
                    finished.append(r.rid)
            else:
                state = "starting" if r.ready_s > now else "ready"
                in_flight = 0 if r.ready_s > now else busy_slots.get(r.rid, 0)
            processed, busy_s, svc, svc_sum, wq, wq_sum, tw_s = per_rid.get(r.rid, _NO_WORK)
            # Validated (one pydantic-core call for the report and its two histograms).
            out.append(
                WorkerReport.model_validate(
                    {
                        "pipeline": pipeline,
                        "stage": stage,
                        "worker_id": r.worker_id,
                        "seq": r.seq,
                        "state": state,
                        "ts_s": now,
                        "interval_s": interval,
                        "processed": processed,
                        "in_flight": in_flight,
                        "busy_s": busy_s,
                        "service_ms": {"counts": svc, "sum_ms": svc_sum},
                        "queue_wait_ms": {"counts": wq, "sum_ms": wq_sum},
                        "rho": st.rho,
                        "gpu_tokens_used": launches * processed,
                        "gpu_token_wait_s": tw_s,
                    }
                )
            )
            r.seq += 1
            r.last_report_s = now
        for rid in finished:
            del st.replicas[rid]

    # ------------------------------------------------------------------ views

    def queues(self) -> dict[str, QueueState]:
        """Each stage's queue now: waiting + in service, and the total ever arrived."""
        out: dict[str, QueueState] = {}
        now = self.now
        for st in self.stages:
            in_service = sum(int(np.count_nonzero(c[1] >= now)) for c in st.rec)
            waiting = st.wait_t.size - st.head
            out[st.spec.name] = QueueState(waiting + in_service, st.arrived_total)
        return out

    def true_stages(self, queues: Mapping[str, QueueState] | None = None) -> list[TrueStage]:
        """Ground truth for scoring (never passed to a policy); `queues`: `queues()` if the
        caller already has it for this instant."""
        q = self.queues() if queues is None else queues
        out: list[TrueStage] = []
        for st in self.stages:
            alive = [r for r in st.replicas.values() if not r.draining]
            ready = sum(1 for r in alive if r.ready_s <= self.now)
            conc = st.spec.concurrency
            out.append(
                TrueStage(
                    name=st.spec.name,
                    ready_servers=ready * conc,
                    starting_servers=(len(alive) - ready) * conc,
                    mean_service_s=self._true_mean_service_s(st),
                    service_scv=st.profile.scv,
                    in_system=q[st.spec.name].depth,
                    rho=st.rho,
                )
            )
        return out

    def replica_counts(self) -> dict[str, tuple[int, int, int]]:
        """(ready, starting, draining) replicas per stage now."""
        out: dict[str, tuple[int, int, int]] = {}
        for st in self.stages:
            ready = starting = draining = 0
            for r in st.replicas.values():
                if r.draining:
                    draining += 1
                elif r.ready_s > self.now:
                    starting += 1
                else:
                    ready += 1
            out[st.spec.name] = (ready, starting, draining)
        return out

    def cost_rate_per_h(self) -> float:
        """Effective cost rate now (GPU billed at its rho share)."""
        total = 0.0
        for st in self.stages:
            total += len(st.replicas) * self.spec.replica_cost_per_h(st.spec, st.rho)
        return total


def _heap_fcfs(
    heap: list[tuple[float, int]], wait_t: list[float], svc: list[float], t_end: float
) -> tuple[list[float], list[int]]:
    """FCFS on the earliest-free server (Kiefer-Wolfowitz) for the queued requests that start
    before `t_end`: start = max(arrival, earliest free), one heap operation per request.
    `svc[i]` is request i's service time; `heap` is updated in place."""
    starts: list[float] = []
    rids: list[int] = []
    push = starts.append
    push_rid = rids.append
    replace = heapq.heapreplace
    for a, s in zip(wait_t, svc, strict=False):
        f, rid = heap[0]
        start = a if a > f else f
        if start >= t_end:
            break
        replace(heap, (start + s, rid))
        push(start)
        push_rid(rid)
    return starts, rids


def _bucket_fcfs(
    heap: list[tuple[float, int]],
    wait_t: list[float],
    svc: list[float],
    t_end: float,
    tokens: float,
    tok_t: float,
    need: float,
    rate: float,
    burst: float,
    host: float,
) -> tuple[list[float], list[int], list[tuple[int, float]], float, float]:
    """`_heap_fcfs` through the stage's shared token bucket (see `Engine._serve_bucket`):
    starts, replica ids, (index, stretched service time) of the requests that waited for
    launches, and the bucket's level and its time after the last start."""
    starts: list[float] = []
    rids: list[int] = []
    late: list[tuple[int, float]] = []
    push = starts.append
    push_rid = rids.append
    replace = heapq.heapreplace
    for a, s in zip(wait_t, svc, strict=False):
        f, rid = heap[0]
        start = a if a > f else f
        if start >= t_end:
            break
        if start >= tok_t:
            tokens += rate * (start - tok_t)
            if tokens > burst:
                tokens = burst
            tok_t = start
        if tokens >= need:
            tokens -= need
        else:  # the missing launches come at the refill rate, after earlier takers
            ready = (tok_t if tok_t > start else start) + (need - tokens) / rate
            stretched = s * host + ready - start
            if stretched > s:
                s = stretched
                late.append((len(starts), s))
            tokens = 0.0
            tok_t = ready
        replace(heap, (start + s, rid))
        push(start)
        push_rid(rid)
    return starts, rids, late, tokens, tok_t


_Sums = tuple[int, float, dict[int, int], float, dict[int, int], float, float]
"""Per replica: processed, busy s, service-ms counts and sum, wait-ms counts and sum,
token wait s."""
_NO_WORK: _Sums = (0, 0.0, {}, 0.0, {}, 0.0, 0.0)


def _group(rec: np.ndarray) -> dict[int, _Sums]:
    """Sum completed requests per replica (one numpy pass for all replicas); `rec` as in
    `_Stage.rec`, rows replica id, end, service s, wait s, token wait s."""
    rid = rec[0].astype(np.int64)
    n = rid.size
    if n == 0:
        return {}
    # Replica ids are small non-negative ints: a bincount and a lookup instead of a sort.
    present = np.bincount(rid)
    uniq = np.flatnonzero(present)
    k = uniq.size
    inv = rid if k == present.size else (np.cumsum(present > 0) - 1)[rid]
    # Rows: service s, service ms, wait ms, token wait s; summed per replica in one bincount
    # (each sum adds its requests in the same order as a bincount of its own).
    v = np.empty((4, n))
    v[0] = rec[2]
    np.multiply(rec[2], 1000.0, out=v[1])
    np.multiply(rec[3], 1000.0, out=v[2])
    np.maximum(0.0, v[2], out=v[2])
    v[3] = rec[4]
    sums = np.bincount((inv + np.arange(0, 4 * k, k)[:, None]).ravel(), weights=v.ravel(),
                       minlength=4 * k).reshape(4, k).tolist()  # fmt: skip
    busy, s_sum, w_sum, tw_sum = sums
    # Both histograms in one bincount: row = replica, then service buckets, then wait buckets.
    key = bucket_indices(v[1:3].ravel()).reshape(2, n)
    key += inv * (2 * N_BUCKETS)
    key[1] += N_BUCKETS
    counts = np.bincount(key.ravel(), minlength=k * 2 * N_BUCKETS)
    # Non-zero cells in (replica, service | wait, bucket) order; each replica's two
    # histograms are runs of them, cut where the flat index crosses a multiple of N_BUCKETS.
    flat = np.flatnonzero(counts)
    cuts = np.searchsorted(flat, np.arange(0, (2 * k + 1) * N_BUCKETS, N_BUCKETS)).tolist()
    buckets = (flat % N_BUCKETS).tolist()
    vals = counts[flat].tolist()
    processed = present[uniq].tolist()
    out: dict[int, _Sums] = {}
    for i, r in enumerate(uniq.tolist()):
        a, m, z = cuts[2 * i], cuts[2 * i + 1], cuts[2 * i + 2]
        out[r] = (
            processed[i], busy[i], dict(zip(buckets[a:m], vals[a:m], strict=False)), s_sum[i],
            dict(zip(buckets[m:z], vals[m:z], strict=False)), w_sum[i], max(0.0, tw_sum[i]),
        )  # fmt: skip
    return out

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
    BUCKETS_PER_DECADE,
    MIN_BOUND_MS,
    N_BUCKETS,
    N_FINITE_BOUNDS,
    OVERFLOW_BUCKET,
    LatencyHistogram,
)
from schemas.messages import Completion, WorkerReport, WorkerState
from schemas.pipeline import PipelineSpec, StageSpec

from .profiles import PipelineProfile, StageProfile

POOL_SIZE = 4096
"""Service times are drawn this many at a time (numpy), then consumed one by one."""
COMPACT_AFTER = 8192
"""Consumed queue entries are dropped once this many have piled up at the head."""
CHUNK = 2048
"""Queued requests looked at per step (an overloaded stage's backlog is not rescanned whole)."""

_BOUNDS = np.asarray(BUCKET_UPPER_BOUNDS_MS)


def bucket_indices(values_ms: np.ndarray) -> np.ndarray:
    """`schemas.histogram.bucket_index` for an array of non-negative values (vectorised)."""
    v = np.asarray(values_ms, dtype=np.float64)
    with np.errstate(divide="ignore"):
        raw = np.ceil(np.log10(np.maximum(v, 1e-300) / MIN_BOUND_MS) * BUCKETS_PER_DECADE - 1e-9)
    idx = np.clip(raw, 0, N_FINITE_BOUNDS).astype(np.int64)
    idx[v <= MIN_BOUND_MS] = 0
    # As in bucket_index: a value just above its bucket's bound moves up one bucket.
    inner = idx < N_FINITE_BOUNDS - 1
    bump = inner & (v > _BOUNDS[np.minimum(idx, N_FINITE_BOUNDS - 1)])
    idx[bump] += 1
    idx[idx > N_FINITE_BOUNDS - 1] = OVERFLOW_BUCKET
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
    heap: list[tuple[float, int]] = field(default_factory=list)
    """(free time, replica id), one entry per server slot of every non-draining replica."""
    replicas: dict[int, _Replica] = field(default_factory=dict)
    wait_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Arrival times at this stage of the requests not started yet (from `head` on)."""
    wait_j: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    head: int = 0
    in_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    in_j: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pool: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pool_list: list[float] = field(default_factory=list)
    pos: int = 0
    rec: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    """Started requests not yet reported: (rid, end, service s, wait s, token wait s)."""
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
            factor = 1.0 if _bucketed(st, prof) else prof.scale(rho)
            self.stages.append(_Stage(i, st, prof, rngs[i], rho, factor))
        for s in self.stages:
            self._add_replicas(s, s.spec.initial_replicas, startup_s=0.0)
            if _bucketed(s.spec, s.profile):
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
        if _bucketed(st.spec, st.profile):  # the rate changes, the draws stay at full speed
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
                j1 = int(np.searchsorted(arr, t_end, side="left"))
                if j1 > self._next_job:
                    self._enqueue(st, arr[self._next_job : j1],
                                  np.arange(self._next_job, j1, dtype=np.int64))  # fmt: skip
                    self._next_job = j1
            elif st.in_t.size:
                now_mask = st.in_t < t_end
                if now_mask.any():
                    t_new = st.in_t[now_mask]
                    order = np.argsort(t_new, kind="stable")
                    self._enqueue(st, t_new[order], st.in_j[now_mask][order])
                    keep = ~now_mask
                    st.in_t = st.in_t[keep]
                    st.in_j = st.in_j[keep]
            while st.head < st.wait_t.size and st.heap:
                i0 = st.head
                i1 = min(st.wait_t.size, i0 + CHUNK)
                svc: np.ndarray | None = None
                if _bucketed(st.spec, st.profile):
                    starts, rids, svc = self._serve_bucket(st, i0, i1, t_end)
                elif len(st.heap) == 1:
                    starts, rids = self._serve_single(st, i0, i1, t_end)
                else:
                    starts, rids = self._serve_multi(st, i0, i1, t_end)
                m = starts.size
                if m == 0:
                    break
                self._commit(st, i0, starts, rids, last, svc)
                if st.head < i1:
                    break
            if st.head > COMPACT_AFTER:
                st.wait_t = st.wait_t[st.head :]
                st.wait_j = st.wait_j[st.head :]
                st.head = 0

    @staticmethod
    def _enqueue(st: _Stage, times: np.ndarray, jobs: np.ndarray) -> None:
        st.wait_t = np.concatenate((st.wait_t, times))
        st.wait_j = np.concatenate((st.wait_j, jobs))
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
        heap = st.heap
        wait_t = st.wait_t[i0:i1].tolist()
        pool = st.pool_list
        p = st.pos
        starts: list[float] = []
        rids: list[int] = []
        push = starts.append
        push_rid = rids.append
        replace = heapq.heapreplace
        for a in wait_t:
            f, rid = heap[0]
            start = a if a > f else f
            if start >= t_end:
                break
            replace(heap, (start + pool[p], rid))
            p += 1
            push(start)
            push_rid(rid)
        return np.asarray(starts), np.asarray(rids, dtype=np.int64)

    def _token_rate(self, st: _Stage) -> float:
        """Refill rate of the stage's shared bucket, as the actuator sets it:
        active replicas x rho x full-speed launch rate (services/actuator/tokens.py)."""
        assert st.spec.full_speed_launch_rate is not None
        return max(1, st.active) * (st.rho or 1.0) * st.spec.full_speed_launch_rate

    def _true_mean_service_s(self, st: _Stage) -> float:
        """Mean service time per server as capacity sees it. A bucketed GPU stage runs at full
        speed until its token rate binds: per server, min(1/S, rho x full speed / (L x conc))."""
        if not _bucketed(st.spec, st.profile):
            return st.profile.mean_s(st.rho)
        full_s = st.profile.mean_s(1.0)
        per_server_rate = self._token_rate(st) / max(1, st.active) / st.spec.concurrency
        return max(full_s, st.profile.launches / per_server_rate)

    def _serve_bucket(
        self, st: _Stage, i0: int, i1: int, t_end: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A GPU stage as the live one works: a request runs at full speed while the stage's
        shared token bucket (rate R, burst of BURST_WINDOW_S x R) holds its launches; the
        launches it lacks wait for the refill, in start order across replicas."""
        self._draws(st, i1 - i0)
        if not st.pool_list:
            st.pool_list = st.pool.tolist()
        prof = st.profile
        need = float(prof.launches)
        host = prof.fixed_ms / prof.mean_ms
        rate = self._token_rate(st)
        burst = _burst(rate)
        heap, pool, p = st.heap, st.pool_list, st.pos
        starts: list[float] = []
        rids: list[int] = []
        svc: list[float] = []
        for a in st.wait_t[i0:i1].tolist():
            f, rid = heap[0]
            start = a if a > f else f
            if start >= t_end:
                break
            s = pool[p]
            if start >= st.tok_t:
                st.tokens = min(burst, st.tokens + rate * (start - st.tok_t))
                st.tok_t = start
            if st.tokens >= need:
                st.tokens -= need
            else:  # the missing launches come at the refill rate, after earlier takers
                ready = max(st.tok_t, start) + (need - st.tokens) / rate
                s = max(s, s * host + ready - start)
                st.tokens, st.tok_t = 0.0, ready
            heapq.heapreplace(heap, (start + s, rid))
            p += 1
            starts.append(start)
            rids.append(rid)
            svc.append(s)
        return np.asarray(starts), np.asarray(rids, dtype=np.int64), np.asarray(svc)

    def _commit(self, st: _Stage, i0: int, start: np.ndarray, rids: np.ndarray, last: int,
                svc: np.ndarray | None = None) -> None:  # fmt: skip
        """Record the requests just started: reports, next stage's arrivals, completions."""
        m = start.size
        i1 = i0 + m
        drawn = st.pool[st.pos : st.pos + m]
        s = drawn if svc is None else svc
        st.pos += m
        st.head = i1
        end = start + s
        jobs = st.wait_j[i0:i1]
        wait = start - st.wait_t[i0:i1]
        if svc is not None:
            token_wait = svc - drawn
        else:
            token_wait = s * (1.0 - 1.0 / st.factor) if st.factor != 1.0 else np.zeros(m)
        st.rec.append((rids, end, s, wait, token_wait))
        self.stage_ms[st.index, jobs] = s * 1000.0
        if st.index == last:
            self.done_s[jobs] = end
            self._completions_pending.append((jobs, end))
        else:
            nxt = self.stages[st.index + 1]
            nxt.in_t = np.concatenate((nxt.in_t, end))
            nxt.in_j = np.concatenate((nxt.in_j, jobs))

    # ------------------------------------------------------------------ reports

    def _report(
        self, now: float, reports: list[WorkerReport], batches: list[CompletionBatch]
    ) -> None:
        # Requests completed before `now`, every stage at once (replica ids are global), so
        # the per-replica sums and histograms cost one numpy pass per report boundary.
        done_parts: list[tuple[np.ndarray, ...]] = []
        for st in self.stages:
            if not st.rec:
                continue
            cols = (
                [np.concatenate(c) for c in zip(*st.rec, strict=True)]
                if len(st.rec) > 1
                else list(st.rec[0])
            )
            done = cols[1] <= now
            if done.all():
                st.rec = []
                done_parts.append(tuple(cols))
            else:
                rest = ~done
                st.rec = [tuple(c[rest] for c in cols)]
                if done.any():
                    done_parts.append(tuple(c[done] for c in cols))
        per_rid: dict[int, _Sums] = {}
        if done_parts:
            if len(done_parts) == 1:
                rid, _, s, wait, tw = done_parts[0]
            else:
                rid, _, s, wait, tw = (np.concatenate(c) for c in zip(*done_parts, strict=True))
            per_rid = _group(rid, s, wait, tw)
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
            got = per_rid.get(r.rid, _NO_WORK)
            processed, busy_s, svc, svc_sum, wq, wq_sum, tw_s = got
            # Validated construction: as fast as model_construct here, and never invalid.
            out.append(
                WorkerReport(
                    pipeline=self.spec.name,
                    stage=st.spec.name,
                    worker_id=r.worker_id,
                    seq=r.seq,
                    state=state,
                    ts_s=now,
                    interval_s=interval,
                    processed=processed,
                    in_flight=in_flight,
                    busy_s=busy_s,
                    service_ms=LatencyHistogram(counts=svc, sum_ms=svc_sum),
                    queue_wait_ms=LatencyHistogram(counts=wq, sum_ms=wq_sum),
                    rho=st.rho,
                    gpu_tokens_used=launches * processed,
                    gpu_token_wait_s=tw_s,
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

    def true_stages(self) -> list[TrueStage]:
        """Ground truth for scoring (never passed to a policy)."""
        q = self.queues()
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


_Sums = tuple[int, float, dict[int, int], float, dict[int, int], float, float]
"""Per replica: processed, busy s, service-ms counts and sum, wait-ms counts and sum,
token wait s."""
_NO_WORK: _Sums = (0, 0.0, {}, 0.0, {}, 0.0, 0.0)


def _group(rid: np.ndarray, s: np.ndarray, wait: np.ndarray, tw: np.ndarray) -> dict[int, _Sums]:
    """Sum completed requests per replica (one numpy pass for all replicas)."""
    uniq, inv = np.unique(rid, return_inverse=True)
    k = uniq.size
    s_ms = s * 1000.0
    w_ms = np.maximum(0.0, wait * 1000.0)
    n = s.size
    # Both histograms in one bincount: row = replica, then service buckets, then wait buckets.
    b = bucket_indices(np.concatenate((s_ms, w_ms)))
    key = np.concatenate((inv * (2 * N_BUCKETS) + b[:n], inv * (2 * N_BUCKETS) + N_BUCKETS + b[n:]))
    counts = np.bincount(key, minlength=k * 2 * N_BUCKETS).reshape(k, 2 * N_BUCKETS)
    weights = np.stack((s, s_ms, w_ms, tw))
    sums = np.stack([np.bincount(inv, weights=w, minlength=k) for w in weights])
    processed = np.bincount(inv, minlength=k).tolist()
    busy, s_sum, w_sum, tw_sum = sums.tolist()
    nz_r, nz_c = np.nonzero(counts)
    vals = counts[nz_r, nz_c].tolist()
    hists: list[tuple[dict[int, int], dict[int, int]]] = [({}, {}) for _ in range(k)]
    for r, c, v in zip(nz_r.tolist(), nz_c.tolist(), vals, strict=True):
        if c < N_BUCKETS:
            hists[r][0][c] = v
        else:
            hists[r][1][c - N_BUCKETS] = v
    out: dict[int, _Sums] = {}
    for i, r in enumerate(uniq.tolist()):
        out[r] = (
            processed[i], busy[i], hists[i][0], s_sum[i], hists[i][1], w_sum[i],
            max(0.0, tw_sum[i]),
        )  # fmt: skip
    return out

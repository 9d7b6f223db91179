"""The engine's optimised paths against straightforward reference versions of the same model.

`ReferenceEngine` serves the GPU token bucket with the plain per-request loop (the service
time list built request by request), hands queued requests on with a mask and an argsort per
window, and groups reports with `np.unique` and one bincount per sum - the code the engine
used before those paths were tightened. Seeded runs must give identical results, bit for bit:
reports, completions, per-request times, queue views.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import pytest

from sair.loadgen.arrivals import arrivals
from sair.sim import engine as engine_mod
from sair.sim.engine import Engine, _Stage, bucket_indices
from sair.sim.profiles import Distribution, PipelineProfile, StageProfile, reference_profile
from schemas.histogram import N_BUCKETS
from schemas.pipeline import PipelineSpec, load_pipeline_spec

Plan = list[tuple[float, dict[str, tuple[int, float | None]]]]
_CHUNK = engine_mod.CHUNK


def _group_reference(rec: np.ndarray) -> dict[int, Any]:
    rid, s, wait, tw = rec[0].astype(np.int64), rec[2], rec[3], rec[4]
    uniq, inv = np.unique(rid, return_inverse=True)
    k = uniq.size
    s_ms = s * 1000.0
    w_ms = np.maximum(0.0, wait * 1000.0)
    n = s.size
    b = bucket_indices(np.concatenate((s_ms, w_ms)))
    key = np.concatenate((inv * (2 * N_BUCKETS) + b[:n], inv * (2 * N_BUCKETS) + N_BUCKETS + b[n:]))
    counts = np.bincount(key, minlength=k * 2 * N_BUCKETS).reshape(k, 2 * N_BUCKETS)
    sums = [np.bincount(inv, weights=w, minlength=k).tolist() for w in (s, s_ms, w_ms, tw)]
    processed = np.bincount(inv, minlength=k).tolist()
    hists: list[tuple[dict[int, int], dict[int, int]]] = [({}, {}) for _ in range(k)]
    nz_r, nz_c = np.nonzero(counts)
    for r, c, v in zip(nz_r.tolist(), nz_c.tolist(), counts[nz_r, nz_c].tolist(), strict=True):
        if c < N_BUCKETS:
            hists[r][0][c] = v
        else:
            hists[r][1][c - N_BUCKETS] = v
    busy, s_sum, w_sum, tw_sum = sums
    return {
        r: (processed[i], busy[i], hists[i][0], s_sum[i], hists[i][1], w_sum[i],
            max(0.0, tw_sum[i]))
        for i, r in enumerate(uniq.tolist())
    }  # fmt: skip


class ReferenceEngine(Engine):
    """The engine with the reference versions of its optimised paths (module docstring)."""

    def _window(self, t_end: float) -> None:
        last = len(self.stages) - 1
        for st in self.stages:
            if st.index == 0:
                j1 = int(np.searchsorted(self.arrivals_s, t_end, side="left"))
                if j1 > self._next_job:
                    self._append(st, self.arrivals_s[self._next_job : j1],
                                 np.arange(self._next_job, j1, dtype=np.int64))  # fmt: skip
                    self._next_job = j1
            elif st.in_t.size:
                now_mask = st.in_t < t_end
                if now_mask.any():
                    t_new = st.in_t[now_mask]
                    order = np.argsort(t_new, kind="stable")
                    self._append(st, t_new[order], st.in_j[now_mask][order])
                    st.in_t = st.in_t[~now_mask]
                    st.in_j = st.in_j[~now_mask]
            while st.head < st.wait_t.size and st.heap:
                i0 = st.head
                i1 = min(st.wait_t.size, i0 + _CHUNK)
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
    def _append(st: _Stage, times: np.ndarray, jobs: np.ndarray) -> None:
        st.wait_t = np.concatenate((st.wait_t, times))
        st.wait_j = np.concatenate((st.wait_j, jobs))
        st.arrived_total += int(times.size)

    def _serve_bucket(
        self, st: _Stage, i0: int, i1: int, t_end: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._draws(st, i1 - i0)
        pool = st.pool.tolist()
        prof = st.profile
        need = float(prof.launches)
        host = prof.fixed_ms / prof.mean_ms
        rate = self._token_rate(st)
        burst = engine_mod._burst(rate)
        p = st.pos
        starts: list[float] = []
        rids: list[int] = []
        svc: list[float] = []
        for a in st.wait_t[i0:i1].tolist():
            f, rid = st.heap[0]
            start = a if a > f else f
            if start >= t_end:
                break
            s = pool[p]
            if start >= st.tok_t:
                st.tokens = min(burst, st.tokens + rate * (start - st.tok_t))
                st.tok_t = start
            if st.tokens >= need:
                st.tokens -= need
            else:
                ready = max(st.tok_t, start) + (need - st.tokens) / rate
                s = max(s, s * host + ready - start)
                st.tokens, st.tok_t = 0.0, ready
            heapq.heapreplace(st.heap, (start + s, rid))
            p += 1
            starts.append(start)
            rids.append(rid)
            svc.append(s)
        return np.asarray(starts), np.asarray(rids, dtype=np.int64), np.asarray(svc)


def _trace(eng: Engine, plan: Plan, tick_s: float, duration_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"reports": [], "batches": [], "views": []}
    todo = list(plan)
    k = 1
    while k * tick_s <= duration_s + 1e-9:
        while todo and todo[0][0] <= eng.now:
            eng.set_targets(todo.pop(0)[1])
        step = eng.advance(k * tick_s)
        out["reports"] += [r.model_dump() for r in step.reports]
        out["batches"] += [(b.job.tolist(), b.done_s.tolist(), b.stage_ms.tolist())
                           for b in step.completions]  # fmt: skip
        out["views"].append((eng.queues(), eng.true_stages(), eng.cost_usd, eng.targets()))
        k += 1
    out["done"] = np.nan_to_num(eng.done_s, nan=-1.0).tolist()  # nan != nan in a list
    out["stage_ms"] = eng.stage_ms.tolist()
    return out


def _both(
    monkeypatch: pytest.MonkeyPatch,
    spec: PipelineSpec,
    prof: PipelineProfile,
    arr: np.ndarray,
    plan: Plan,
    report_s: float,
    tick_s: float,
    duration_s: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    fast = _trace(Engine(spec, prof, arr, 9, report_interval_s=report_s), plan, tick_s,
                  duration_s)  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(engine_mod, "_group", _group_reference)
        ref = _trace(ReferenceEngine(spec, prof, arr, 9, report_interval_s=report_s), plan,
                     tick_s, duration_s)  # fmt: skip
    return fast, ref


def _token_wait(trace: dict[str, Any], stage: str) -> float:
    return float(sum(r["gpu_token_wait_s"] for r in trace["reports"] if r["stage"] == stage))


@pytest.mark.parametrize(
    ("rate", "plan", "waits"),
    [
        # Full share, well below the bucket's rate: no request waits for launch tokens.
        (200.0, [(0.0, {"pre": (6, None), "infer": (3, 1.0), "post": (1, None)})], False),
        # Small shares and scaling both ways: the bucket binds, requests wait.
        (
            150.0,
            [
                (0.0, {"pre": (6, None)}),
                (20.0, {"infer": (2, 0.3)}),
                (40.0, {"infer": (3, 0.5), "pre": (3, None)}),
                (60.0, {"infer": (1, 0.1), "post": (2, None)}),
            ],
            True,
        ),
    ],
)
def test_imgcls_matches_the_reference_paths(
    monkeypatch: pytest.MonkeyPatch, rate: float, plan: Plan, waits: bool
) -> None:
    spec = load_pipeline_spec("sair/pipelines/specs/imgcls.toml")
    arr = arrivals("poisson", {"rate_rps": rate}, 80.0, 4)
    fast, ref = _both(monkeypatch, spec, reference_profile("imgcls"), arr, plan, 1.0, 2.0, 80.0)
    assert (_token_wait(fast, "infer") > 0) == waits
    assert fast == ref


@pytest.mark.parametrize("dist", ["deterministic", "exponential"])
@pytest.mark.parametrize("launch_rate", [None, 400.0, 2000.0])
def test_ties_and_token_buckets_match_the_reference_paths(
    monkeypatch: pytest.MonkeyPatch, dist: Distribution, launch_rate: float | None
) -> None:
    """Arrivals in bunches on a grid with deterministic service times: many equal times, so
    the order of ties (FCFS, then replica id) is exercised; reports every 0.7 s, ticks 1.3 s."""
    gpu: dict[str, Any] = dict(
        name="g", kind="gpu", initial_replicas=2, max_replicas=16, startup_s=1.0,
        rho_grid=[0.25, 0.5, 1.0], initial_rho=0.5, options={"launches": 10},
    )  # fmt: skip
    if launch_rate is not None:
        gpu["full_speed_launch_rate"] = launch_rate
    spec = PipelineSpec(
        name="mm",
        slo_p99_ms=1000.0,
        stages=[
            dict(name="a", kind="cpu", initial_replicas=2, max_replicas=16, startup_s=0.0),
            gpu,
            dict(name="b", kind="cpu", initial_replicas=1, max_replicas=16, startup_s=0.5,
                 concurrency=2),
        ],
    )  # fmt: skip
    launches = 10 if launch_rate is not None else 0
    prof = PipelineProfile(
        "mm",
        {
            "a": StageProfile(mean_ms=20.0, dist=dist),
            "g": StageProfile(mean_ms=10.0, dist=dist, gpu_ms=8.0, launches=launches),
            "b": StageProfile(mean_ms=30.0, dist=dist),
        },
    )
    arr = np.repeat(np.arange(0.0, 40.0, 0.05), 3)
    plan: Plan = [
        (10.0, {"a": (4, None), "g": (3, 0.25)}),
        (20.0, {"a": (1, None), "g": (1, 1.0), "b": (3, None)}),
        (30.0, {"g": (2, 0.5), "b": (1, None)}),
    ]
    fast, ref = _both(monkeypatch, spec, prof, arr, plan, 0.7, 1.3, 40.0)
    if launch_rate == 400.0:
        assert _token_wait(fast, "g") > 0, "a 400 launches/s bucket binds at 60 rps"
    assert fast == ref


@pytest.mark.parametrize("rids", [[0, 1, 2, 3], [3, 7, 8, 20], [5]])
def test_group_matches_the_reference(rids: list[int]) -> None:
    rng = np.random.default_rng(len(rids))
    n = 3000
    rec = np.empty((5, n))
    rec[0] = rng.choice(rids, n)
    rec[1] = rng.uniform(0, 10, n)
    rec[2] = rng.lognormal(-4, 1, n)
    rec[3] = np.where(rng.uniform(size=n) < 0.5, 0.0, rng.exponential(0.01, n))
    rec[4] = np.where(rng.uniform(size=n) < 0.8, 0.0, rng.exponential(0.002, n))
    fast = engine_mod._group(rec)
    assert sorted(fast) == sorted(set(rids))
    assert fast == _group_reference(rec)
    assert sum(v[0] for v in fast.values()) == n

"""The discrete-event engine: queueing theory, determinism, start-up, draining, reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sair.loadgen.arrivals import arrivals
from sair.sim.engine import Engine, bucket_indices
from sair.sim.profiles import PipelineProfile, StageProfile, reference_profile
from schemas.histogram import BUCKET_UPPER_BOUNDS_MS, bucket_index
from schemas.messages import WorkerReport
from schemas.pipeline import load_pipeline_spec

from .helpers import deterministic, exp_profile, one_stage


def erlang_c_wait_s(lam: float, mu: float, c: int) -> float:
    """Mean wait in queue of M/M/c, from the textbook closed form."""
    a = lam / mu
    rho = a / c
    head = sum(a**k / math.factorial(k) for k in range(c))
    tail = a**c / (math.factorial(c) * (1 - rho))
    p_wait = tail / (head + tail)
    return p_wait / (c * mu - lam)


@pytest.mark.parametrize(
    ("servers", "util", "duration_s"),
    [(1, 0.5, 10_000), (1, 0.8, 20_000), (3, 0.5, 4_000), (3, 0.8, 6_000)],
)
def test_mean_wait_matches_erlang_c(servers: int, util: float, duration_s: float) -> None:
    mean_s = 0.010
    lam = util * servers / mean_s
    arr = arrivals("poisson", {"rate_rps": lam}, duration_s, seed=11)
    eng = Engine(
        one_stage(servers), exp_profile(mean_s * 1000), arr, seed=12, report_interval_s=500.0
    )
    eng.advance(duration_s + 60)
    assert not np.isnan(eng.done_s).any()
    wait = (eng.done_s - arr) - eng.stage_ms[0] / 1000.0
    skip = arr.size // 100  # the empty start is not steady state
    measured = float(wait[skip:].mean())
    expected = erlang_c_wait_s(lam, 1 / mean_s, servers)
    assert measured == pytest.approx(expected, rel=0.05), (measured, expected)
    # Service times are what the profile says.
    assert float(eng.stage_ms[0].mean()) == pytest.approx(mean_s * 1000, rel=0.02)


def test_bucket_indices_match_the_schema() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate(
        (
            rng.lognormal(0, 3, 20_000),
            [0.0, 0.005, 0.01, 2e6, 1e6],
            np.asarray(BUCKET_UPPER_BOUNDS_MS),
            np.nextafter(np.asarray(BUCKET_UPPER_BOUNDS_MS), 1e9),
        )
    )
    expected = [bucket_index(float(v)) for v in values]
    assert bucket_indices(values).tolist() == expected


def _imgcls_engine(seed: int, rate: float = 150.0, duration_s: float = 60.0) -> Engine:
    spec = load_pipeline_spec("sair/pipelines/specs/imgcls.toml")
    arr = arrivals("poisson", {"rate_rps": rate}, duration_s, seed)
    eng = Engine(spec, reference_profile("imgcls"), arr, seed)
    eng.set_targets({"pre": (4, None), "infer": (2, 1.0), "post": (1, None)})
    return eng


def _dump(eng: Engine, t: float) -> list[dict[str, object]]:
    return [r.model_dump() for r in eng.advance(t).reports]


def test_same_seed_same_run_other_seed_differs() -> None:
    a, b, c = _imgcls_engine(5), _imgcls_engine(5), _imgcls_engine(6)
    ra, rb, rc = _dump(a, 60), _dump(b, 60), _dump(c, 60)
    assert ra == rb
    assert np.array_equal(a.done_s, b.done_s, equal_nan=True)
    assert ra != rc
    assert a.done_s.size != c.done_s.size or not np.array_equal(a.done_s, c.done_s, equal_nan=True)


def test_reports_account_for_every_request() -> None:
    eng = _imgcls_engine(7)
    reports: list[WorkerReport] = []
    for t in range(1, 71):
        reports += eng.advance(float(t)).reports
    n = eng.arrivals_s.size
    assert not np.isnan(eng.done_s).any(), "all requests finish 10 s after the last arrival"
    for k, stage in enumerate(eng.spec.stage_names):
        mine = [r for r in reports if r.stage == stage]
        assert sum(r.processed for r in mine) == n
        assert sum(r.service_ms.total for r in mine) == n
        assert sum(r.queue_wait_ms.total for r in mine) == n
        assert sum(r.busy_s for r in mine) == pytest.approx(eng.stage_ms[k].sum() / 1000)
        assert all(r.interval_s == pytest.approx(1.0) for r in mine)
        seqs: dict[str, int] = {}
        for r in mine:
            assert r.seq == seqs.get(r.worker_id, -1) + 1
            seqs[r.worker_id] = r.seq
    gpu = [r for r in reports if r.stage == "infer"]
    assert all(r.rho == 1.0 for r in gpu)
    assert sum(r.gpu_tokens_used for r in gpu) == 60 * n
    # Re-validating proves the messages honour the contract.
    for r in reports[:50]:
        WorkerReport.model_validate(r.model_dump())


def test_gpu_share_stretches_the_gpu_part_and_reports_token_wait() -> None:
    spec = one_stage(1, kind="gpu")
    prof = PipelineProfile("mm", {"s": StageProfile(mean_ms=10.0, cv=0.0, gpu_ms=8.0, launches=40)})
    arr = np.arange(0.0, 10.0, 0.1)  # 10 rps, far below capacity
    eng = Engine(spec, prof, arr, seed=1)
    eng.set_targets({"s": (1, 0.5)})
    reports = eng.advance(12.0).reports
    assert eng.stage_ms[0] == pytest.approx(np.full(arr.size, 2.0 + 8.0 / 0.5))
    assert sum(r.gpu_token_wait_s for r in reports) == pytest.approx(arr.size * 0.008)
    assert {r.rho for r in reports} == {0.5}


def test_scale_up_capacity_arrives_after_startup() -> None:
    spec = one_stage(1, startup_s=5.0)
    arr = np.arange(0.0, 30.0, 1 / 30)  # 30 rps against 10 rps per replica
    eng = Engine(spec, deterministic(100.0), arr, seed=1)
    out = eng.advance(10.0)
    eng.set_targets({"s": (3, None)})
    new_ids = {f"sim-s-{i}" for i in (1, 2)}
    reports = out.reports + eng.advance(30.0).reports
    fresh = [r for r in reports if r.worker_id in new_ids]
    before = [r for r in fresh if r.ts_s < 15.0]
    after = [r for r in fresh if r.ts_s > 15.0]
    assert before and all(r.state == "starting" and r.processed == 0 for r in before)
    assert after and all(r.state == "ready" and r.processed > 0 for r in after)
    # Completions per second: 10 until the new replicas are ready, then 30.
    done = eng.done_s[~np.isnan(eng.done_s)]
    assert np.count_nonzero((done >= 11.05) & (done < 15.05)) == pytest.approx(40, abs=1)
    assert np.count_nonzero((done >= 16.05) & (done < 20.05)) == pytest.approx(120, abs=2)


def test_scaled_down_replica_finishes_its_request_and_takes_no_more() -> None:
    spec = one_stage(2)
    arr = np.array([0.0, 0.0, 0.1, 0.2, 0.3])
    eng = Engine(spec, deterministic(1000.0), arr, seed=1)
    eng.advance(0.5)
    eng.set_targets({"s": (1, None)})
    reports = eng.advance(6.0).reports
    # Both requests in flight finish at 1.0 s; the other three run one by one on one replica.
    assert eng.done_s.tolist() == pytest.approx([1.0, 1.0, 2.0, 3.0, 4.0])
    by_worker: dict[str, list[WorkerReport]] = {}
    for r in reports:
        by_worker.setdefault(r.worker_id, []).append(r)
    drained = [w for w, rs in by_worker.items() if rs[0].state == "draining"]
    assert len(drained) == 1
    last = by_worker[drained[0]]
    assert len(last) == 1 and last[0].processed == 1, "reports once more, then is gone"
    assert eng.targets()["s"] == (1, None)


def test_scale_down_removes_starting_replicas_first() -> None:
    spec = one_stage(1, startup_s=5.0)
    eng = Engine(spec, deterministic(10.0), np.arange(0.0, 20.0, 0.5), seed=1)
    eng.advance(1.0)
    eng.set_targets({"s": (3, None)})
    eng.advance(2.0)
    eng.set_targets({"s": (1, None)})
    assert eng.replica_counts()["s"] == (1, 0, 2)
    reports = eng.advance(4.0).reports
    assert {r.worker_id for r in reports if r.ts_s == 4.0} == {"sim-s-0"}


def test_costs_bill_rho_share_and_whole_gpu() -> None:
    spec = one_stage(2, kind="gpu")
    eng = Engine(spec, exp_profile(5.0, gpu=True), np.zeros(0), seed=1)
    eng.set_targets({"s": (2, 0.25)})
    eng.advance(3600.0)
    st = spec.stages[0]
    assert eng.cost_usd == pytest.approx(2 * spec.replica_cost_per_h(st, 0.25))
    assert eng.whole_gpu_cost_usd == pytest.approx(2 * spec.replica_cost_per_h(st, 1.0))


def test_bad_targets_are_rejected_with_the_field() -> None:
    eng = Engine(one_stage(1), exp_profile(5.0), np.zeros(0), seed=1)
    with pytest.raises(ValueError, match=r"s\.rho"):
        eng.set_targets({"s": (1, 0.5)})  # cpu stage
    with pytest.raises(ValueError, match="unknown stage 'x'"):
        eng.set_targets({"x": (1, None)})
    with pytest.raises(ValueError, match="replicas=-1"):
        eng.set_targets({"s": (-1, None)})

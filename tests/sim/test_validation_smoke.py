"""Smoke test of bench/sim_validation.py's comparison arithmetic (no live run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from sair.loadgen.arrivals import arrivals
from sair.pipelines import load_spec
from sair.sim.profiles import reference_profile
from schemas.histogram import LatencyHistogram
from schemas.messages import WorkerReport

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sim_validation.py"


@pytest.fixture(scope="module")
def sv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sim_validation", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sim_validation"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_gap_pct_and_max(sv: ModuleType) -> None:
    assert sv.gap_pct(115.0, 100.0) == pytest.approx(15.0)
    assert sv.gap_pct(80.0, 100.0) == pytest.approx(-20.0)
    assert sv.gap_pct(None, 100.0) is None
    assert sv.gap_pct(1.0, 0.0) is None
    assert sv.max_abs([3.0, -20.0, None]) == 20.0
    assert sv.max_abs([None]) is None


def test_fixed_spec_capacity_and_loads(sv: ModuleType) -> None:
    spec = sv.fixed_spec(load_spec("nlp"), {"tokenise": 2, "encode": 2}, {"encode": 0.1})
    assert spec.stage("tokenise").initial_replicas == 2
    assert spec.stage("encode").start_rho == 0.1
    caps = sv.capacities_rps(spec, reference_profile("nlp"))
    # encode: 2 replicas x 1 / (0.3 ms + 5 ms / 0.1) = 39.76 rps; tokenise: 2 / 17 ms.
    assert caps["encode"] == pytest.approx(2000.0 / 50.3)
    assert caps["tokenise"] == pytest.approx(2000.0 / 17.0)
    wls = sv.make_workloads(caps["encode"], 0.6, quick=False)
    assert wls["poisson"].params["rate_rps"] == pytest.approx(0.6 * caps["encode"], abs=0.01)
    assert wls["burst"].params["burst_rps"] > caps["encode"] > wls["burst"].params["base_rps"]
    with pytest.raises(ValueError, match="load_factor"):
        sv.make_workloads(10.0, 1.5, quick=True)


def _report(stage: str, ts_s: float, waits_ms: list[float], busy_s: float) -> WorkerReport:
    return WorkerReport(
        pipeline="p", stage=stage, worker_id=f"w-{stage}", seq=int(ts_s), ts_s=ts_s,
        interval_s=1.0, state="ready", processed=len(waits_ms), busy_s=busy_s,
        service_ms=LatencyHistogram.from_values([1.0] * len(waits_ms)),
        queue_wait_ms=LatencyHistogram.from_values(waits_ms),
    )  # fmt: skip


def test_summarise_scores_after_warmup_and_counts_lost(sv: ModuleType) -> None:
    created = np.array([0.5, 2.0, 3.0, 4.0, 9.5])
    done = np.array([0.6, 2.1, 3.3, np.nan, 10.5])  # one lost, one done after the window
    data = sv.RunData(
        stage_names=("a",), created_s=created, done_s=done,
        stage_ms={"a": np.array([10.0, 20.0, 30.0, 40.0])},
        reports=[_report("a", 0.5, [100.0], 0.9), _report("a", 3.0, [2.0, 4.0], 0.5)],
        report_ts_s=[0.5, 3.0],
    )  # fmt: skip
    s = sv.summarise(data, warmup_s=1.0, duration_s=10.0)
    assert (s["requests"], s["completed"], s["lost"]) == (4, 3, 1)
    assert s["p50_ms"] == pytest.approx(300.0)
    # completions inside [1, 10] s: 2.1 and 3.3 -> 2 / 9 s
    assert s["throughput_rps"] == pytest.approx(2 / 9, abs=1e-3)
    a = s["stages"]["a"]
    assert a["service_mean_ms"] == pytest.approx(25.0)
    assert a["queue_wait_mean_ms"] == pytest.approx(3.0)  # the warm-up report is left out
    assert a["utilisation"] == pytest.approx(0.5)


def test_sim_side_runs_and_calibration_moves_the_service_times(sv: ModuleType) -> None:
    spec = sv.fixed_spec(load_spec("imgcls"), {"pre": 1, "infer": 1, "post": 1}, {"infer": 0.3})
    prof = reference_profile("imgcls")
    wl = sv.make_workloads(min(sv.capacities_rps(spec, prof).values()), 0.6, quick=True)
    offsets = arrivals(wl["poisson"].process, wl["poisson"].params, 10.0, 1)
    run = sv.run_sim(spec, prof, wl["poisson"], offsets, 1, 10.0, tail_s=10.0)
    sim = sv.summarise(run, 1.0, 10.0)
    assert sim["lost"] == 0 and sim["requests"] > 100
    # stable at 60 % load: throughput follows the offered rate
    assert sim["throughput_rps"] == pytest.approx(sim["offered_rps"], rel=0.1)
    # below the token-rate cap the GPU stage runs at full speed, as the live bucket does;
    # waits for refills only lengthen some requests, never beyond the stretched 1/rho mean
    full_ms = prof.stage("infer").mean_s(1.0) * 1000.0
    assert full_ms * 0.95 <= sim["stages"]["infer"]["service_mean_ms"] < 33.8
    # a live run that measured pre at 3x the profile: calibrated sim is slower
    live = {"stages": {"pre": {"service_mean_ms": 60.0, "service_cv": 0.2},
                       "infer": {"service_mean_ms": 20.0, "service_cv": 0.1},
                       "post": {"service_mean_ms": 1.0, "service_cv": None}}}  # fmt: skip
    cal = sv.calibrated_profile(prof, live)
    assert cal.stage("pre").mean_ms == 60.0 and cal.stage("infer").gpu_ms == 0.0
    slow = sv.summarise(sv.run_sim(spec, cal, wl["poisson"], offsets, 1, 10.0, tail_s=30.0),
                        1.0, 10.0)  # fmt: skip
    assert slow["p50_ms"] > sim["p50_ms"]
    row = sv.compare("imgcls", "poisson", slow, sim, None, prof, spec)
    assert row["p99_gap_pct"] == pytest.approx(sv.gap_pct(sim["p99_ms"], slow["p99_ms"]), abs=0.1)
    assert row["stages"]["infer"]["profile_service_ms"] == pytest.approx(33.833, abs=0.01)
    assert row["within_target"] is False


def test_saved_live_run_round_trips_and_refuses_other_settings(
    sv: ModuleType, tmp_path: Path
) -> None:
    run = sv.RunData(
        stage_names=("a",), created_s=np.array([0.0, 1.0]), done_s=np.array([0.1, np.nan]),
        stage_ms={"a": np.array([5.0])}, reports=[_report("a", 1.0, [2.0], 0.1)],
        report_ts_s=[1.0], load_avg_1m=3.5,
    )  # fmt: skip
    meta = {"pipeline": "p", "seed": 1, "workload": {"rate_rps": 2.0}}
    sv.save_run(tmp_path, "p", "poisson", run, meta)
    back = sv.load_run(tmp_path, "p", "poisson", meta)
    assert np.array_equal(back.created_s, run.created_s)
    assert np.isnan(back.done_s[1]) and back.stage_ms["a"].tolist() == [5.0]
    assert back.reports == run.reports and back.load_avg_1m == 3.5
    with pytest.raises(ValueError, match="saved with"):
        sv.load_run(tmp_path, "p", "poisson", {**meta, "seed": 2})

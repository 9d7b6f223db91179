"""Pure parts: arrival processes, reconciliation, retry policy, report windows, handlers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from sair import gpu_emulation
from sair.loadgen.arrivals import ArrivalError, arrivals, load_trace_csv, rate_at
from sair.pipelines import REFERENCE_PIPELINES, load_spec, make_payload, spec_names
from sair.stack import ManagedServer
from sair.supervisor.logic import ReplicaView, reconcile, restart_backoff_s
from sair.worker.logic import (
    ReportWindow,
    backoff_s,
    forward_request,
    load_handler,
    should_dead_letter,
)
from schemas.messages import StageRequest


def test_arrivals_are_seeded_sorted_and_at_the_asked_rate() -> None:
    a = arrivals("poisson", {"rate_rps": 50}, 200.0, seed=7)
    assert np.array_equal(a, arrivals("poisson", {"rate_rps": 50}, 200.0, seed=7))
    assert not np.array_equal(a, arrivals("poisson", {"rate_rps": 50}, 200.0, seed=8))
    assert np.all(np.diff(a) >= 0) and a[0] >= 0 and a[-1] < 200
    assert abs(len(a) / 200.0 - 50) < 3


def test_ramp_rises_then_falls() -> None:
    a = arrivals("ramp", {"low_rps": 5, "high_rps": 105}, 100.0, seed=1)
    counts = np.histogram(a, bins=10, range=(0, 100))[0]
    assert counts[4] > 3 * counts[0] and counts[5] > 3 * counts[9]
    assert rate_at("ramp", {"low_rps": 5, "high_rps": 105}, 50.0, 100.0) == pytest.approx(105)


def test_burst_has_spikes_of_the_given_height_width_and_period() -> None:
    p = {"base_rps": 10, "burst_rps": 200, "width_s": 2, "period_s": 20, "first_at_s": 5}
    a = arrivals("burst", p, 60.0, seed=3)
    per_s = np.histogram(a, bins=60, range=(0, 60))[0]
    spikes = [5, 6, 25, 26, 45, 46]
    assert per_s[spikes].mean() > 150
    assert np.delete(per_s, spikes).mean() < 15


def test_trace_replays_timestamps_and_rates(tmp_path: Path) -> None:
    ts = tmp_path / "ts.csv"
    ts.write_text("ts_s\n100.0\n100.5\n101.25\n")
    assert arrivals("trace", load_trace_csv(ts), 10.0, 0).tolist() == [0.0, 0.5, 1.25]
    rates = tmp_path / "rates.csv"
    rates.write_text("second,rate_rps\n0,0\n1,500\n2,0\n")
    a = arrivals("trace", load_trace_csv(rates), 10.0, 0)
    assert 400 < len(a) < 600 and np.all((a >= 1) & (a < 2))
    bad = tmp_path / "bad.csv"
    bad.write_text("ts_s\n1.0\noops\n")
    with pytest.raises(ArrivalError, match="oops"):
        load_trace_csv(bad)


def test_arrival_errors_name_the_field() -> None:
    with pytest.raises(ArrivalError, match="rate_rps=-1"):
        arrivals("poisson", {"rate_rps": -1}, 10.0, 0)
    with pytest.raises(ArrivalError, match="process='zipf'"):
        arrivals("zipf", {}, 10.0, 0)


def test_reconcile_starts_stops_and_prefers_starting_replicas() -> None:
    reps = [ReplicaView("r1", "ready", 1.0), ReplicaView("r2", "ready", 2.0),
            ReplicaView("s3", "starting", 3.0), ReplicaView("d4", "draining", 0.5)]  # fmt: skip
    assert reconcile(5, reps, 8).start == 2
    assert reconcile(5, reps, 4).start == 1  # never more than max
    assert reconcile(5, reps, 8, can_start=False).start == 0
    assert reconcile(2, reps, 8).stop == ("s3",)
    assert reconcile(1, reps, 8).stop == ("s3", "r2")
    assert reconcile(3, reps, 8).start == 0 and reconcile(3, reps, 8).stop == ()
    assert restart_backoff_s(0) == 0 and restart_backoff_s(1) < restart_backoff_s(3) <= 30


def test_retry_policy_and_report_window() -> None:
    assert not should_dead_letter(2, 3) and should_dead_letter(3, 3)
    assert backoff_s(1) < backoff_s(2) < backoff_s(3) and backoff_s(50) == 10.0
    w = ReportWindow("p", "s", "w1", started_s=100.0)
    w.record(5.0, 1.0)
    w.record(7.0, 0.0)
    w.record_failure(2.0)
    rep = w.report("ready", 101.0, in_flight=1, rho=0.5, gpu_tokens_total=40, gpu_wait_total_s=0.2)
    assert (rep.processed, rep.failed, rep.seq, rep.interval_s) == (2, 1, 0, 1.0)
    assert rep.busy_s == pytest.approx(0.014) and rep.service_ms.total == 2
    assert rep.gpu_tokens_used == 40
    rep2 = w.report("draining", 102.0, in_flight=0, gpu_tokens_total=50, gpu_wait_total_s=0.2)
    assert (rep2.processed, rep2.seq, rep2.gpu_tokens_used) == (0, 1, 10)
    assert rep2.gpu_token_wait_s == pytest.approx(0.0)


def test_all_reference_pipelines_run_end_to_end_in_process() -> None:
    assert set(REFERENCE_PIPELINES) <= set(spec_names())
    gpu_emulation.reset()
    rng = np.random.default_rng(0)
    for name in REFERENCE_PIPELINES:
        spec = load_spec(name)
        assert [s.kind for s in spec.stages] == ["cpu", "gpu", "cpu"]
        req = StageRequest(request_id=f"{name}-1", pipeline=name, created_ts_s=1.0,
                           enqueued_ts_s=1.0, payload=make_payload(name, rng, 0))  # fmt: skip
        for stage in spec.stages:
            assert stage.handler is not None
            out = load_handler(stage.handler)(dict(req.payload), dict(stage.options))
            req = forward_request(req, stage.name, 1.0, out, 2.0)  # validates the payload
        assert len(req.payload) > 0, name
    with pytest.raises(ValueError, match="pipeline='nope'"):
        load_spec("nope")


def test_handler_errors_name_the_payload_field() -> None:
    from sair.pipelines import imgcls

    with pytest.raises(ValueError, match="seed"):
        imgcls.preprocess({"height": 10}, {})


def test_gpu_tokens_throttle_launches_for_real(redis_server: ManagedServer) -> None:
    # rate 2000/s = 4 replicas x rho 0.5 x 1000/s: rho is stored as set, not derived from it.
    gpu_emulation.set_rate(redis_server.url, "gputest", "infer", rate=2000.0, burst=16, rho=0.5)
    dev = gpu_emulation.configure("gputest", "infer", 1e6, redis_server.url, take_batch=16)
    try:
        t0 = time.perf_counter()
        dev.launch(400)
        elapsed = time.perf_counter() - t0
        snap = dev.snapshot()
        # 16 tokens of burst, the other 384 at 2000/s: about 0.19 s, whatever the kernel time.
        assert elapsed > 0.12
        assert snap.tokens_used == 400 and snap.launches == 400
        assert snap.token_wait_s > 0.08
        assert snap.rate_tokens_per_s == pytest.approx(2000.0)
        assert dev.rho() == pytest.approx(0.5)
        # An unconfigured bucket is unthrottled.
        free = gpu_emulation.configure("gputest", "other", 1e6, redis_server.url)
        t0 = time.perf_counter()
        free.launch(400)
        assert time.perf_counter() - t0 < 0.1
        assert free.snapshot().rate_tokens_per_s is None
        assert free.rho() is None
        # A rate set without rho clears it: the share is unknown, never guessed from the rate.
        gpu_emulation.set_rate(redis_server.url, "gputest", "infer", rate=2000.0, burst=16)
        assert dev.rho() is None
    finally:
        gpu_emulation.reset()


def test_gpu_emulation_fails_open_without_redis() -> None:
    dev = gpu_emulation.EmulatedGpu(kernel_s=1e-4, redis_url="redis://127.0.0.1:1/0",
                                    bucket_key="sair:gpu:x:y")  # fmt: skip
    t0 = time.perf_counter()
    dev.launch(50)
    assert time.perf_counter() - t0 < 2.5
    assert dev.snapshot().launches == 50

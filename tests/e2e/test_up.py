"""End to end: `sair up` runs the whole closed loop on real NATS, Valkey and Qdrant (local
mode), with real worker processes, and leaves nothing running afterwards.

The two long tests take minutes (marked `slow`); the rest check the pure parts in a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import api as js_api

from sair.closedloop import (
    ClosedLoop,
    ClosedLoopConfig,
    ClosedLoopError,
    Reaper,
    default_params,
    live_descendants,
    pid_alive,
    spec_path,
)
from sair.liveview import RunRecord, compact_line, format_summary, plot_timeline, view_text
from sair.pipelines import load_spec
from sair.stack import NatsServer, free_port
from schemas import subjects
from schemas.context import ENCODING_VERSION, context_dim
from schemas.messages import (
    ActionResult,
    Completion,
    PipelineTelemetry,
    ReplicaStatus,
    ScalingAction,
    StageAction,
    StageMetrics,
    StageReplicas,
)

SAIR = [sys.executable, "-m", "sair.cli"]
DURATION_S = 90
QUIET_PRE_MS = 21.7
"""imgcls `pre` handler on a quiet machine of this kind (docs/pipelines.md)."""


def _heavier_gpu_imgcls(tmp_path: Path) -> Path:
    """The reference imgcls spec with a 4x slower GPU model (40 ms an image at rho 1, was 10)
    and an initial rho of 0.5 (was 0.2). The default burst tops out at 24 requests/s (more
    overloads a 2-core host); on a fast host one preprocessing replica serves that and one
    GPU replica at a higher rho too, so the right answer is a rho change alone. With the
    slower model a burst needs a second GPU replica whatever the host's CPU speed (emulated
    GPU time does not use this host's cores), so replicas have to change."""
    text = spec_path("imgcls").read_text()
    heavy = text.replace("full_speed_launch_rate = 6000.0", "full_speed_launch_rate = 1500.0")
    heavy = heavy.replace("initial_rho = 0.2", "initial_rho = 0.5")
    assert heavy.count("1500.0") == 1 and heavy.count("initial_rho = 0.5") == 1, "spec changed"
    path = tmp_path / "imgcls.toml"
    path.write_text(heavy)
    return path


def _run_watching(cmd: list[str], stderr_path: Path, timeout_s: float,
                  until: Any = None) -> tuple[subprocess.Popen[str], set[int]]:  # fmt: skip
    """Start `cmd`; every 0.5 s note every process below it, until it exits, `until()` holds
    or `timeout_s` passes. Returns the process (maybe still running) and the pids seen."""
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        seen.update(live_descendants(proc.pid))
        if until is not None and until():
            break
        time.sleep(0.5)
    return proc, seen


def _wait_gone(pids: set[int], timeout_s: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if pid_alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if pid_alive(p)]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


async def _read_audit(store: Path) -> tuple[list[ScalingAction], list[ActionResult], int]:
    """Start a NATS on the run's JetStream store and read the audit log and episodes."""
    server = NatsServer("nats-server", "127.0.0.1", free_port(), store)
    server.start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            actions = [ScalingAction.model_validate_json(m) for m in
                       await _all(js, subjects.ACTIONS_STREAM, subjects.actions("imgcls"))]  # fmt: skip
            results = [ActionResult.model_validate_json(m) for m in
                       await _all(js, subjects.ACTIONS_STREAM, subjects.action_results("imgcls"))]  # fmt: skip
            episodes = len(await _all(js, subjects.EPISODES_STREAM, subjects.episodes("imgcls")))
        finally:
            await nc.close()
    finally:
        server.stop()
    return actions, results, episodes


async def _all(js: Any, stream: str, subject: str) -> list[bytes]:
    info = await js.stream_info(stream)
    if not info.state.messages:
        return []
    sub = await js.pull_subscribe(
        subject, stream=stream,
        config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL,
                                     ack_policy=js_api.AckPolicy.NONE),
    )  # fmt: skip
    out: list[bytes] = []
    while True:
        try:
            msgs = await sub.fetch(100, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            break
        out.extend(m.data for m in msgs)
    await sub.unsubscribe()
    return out


def _qdrant_count(path: Path) -> int:
    from services.retriever.store import StoreFactory

    factory = StoreFactory("qdrant-local", None, str(path))
    try:
        return factory.open("imgcls", ENCODING_VERSION, context_dim(load_spec("imgcls"))).count()
    finally:
        factory.close()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sair_up_runs_the_closed_loop(tmp_path: Path) -> None:
    workdir = tmp_path / "up"
    cmd = [*SAIR, "up", "--pipeline", str(_heavier_gpu_imgcls(tmp_path)), "--workload", "burst",
           "--duration", str(DURATION_S), "--no-view", "--json", "--workdir", str(workdir),
           "--retriever-engine", "qdrant-local"]  # fmt: skip
    proc, seen = _run_watching(cmd, tmp_path / "stderr.txt", timeout_s=420)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    progress = _tail(tmp_path / "stderr.txt")
    assert proc.returncode == 0, progress
    summary = json.loads(out.strip().splitlines()[-1])
    why = f"{json.dumps(summary, indent=1)}\n{progress}"

    # Everything it started is gone: servers, services, supervisor, workers, load generator.
    assert len(seen) >= 9, why  # 2 servers + 4 services + supervisor + 3 workers + loadgen
    assert _wait_gone(seen | set(summary["pids"])) == [], why

    # The loop acted: actions on sair.actions.imgcls (the audit log), each with a result.
    actions, results, episodes_published = asyncio.run(_read_audit(workdir / "nats"))
    assert actions, why
    assert len(actions) == summary["actions"], why
    results_by_id = {r.action_id: r.status for r in results}
    assert all(results_by_id.get(a.action_id) in ("applied", "clamped") for a in actions), (
        results_by_id, why)  # fmt: skip

    # Replicas changed (the supervisor's desired count moved, more workers became ready).
    assert summary["replica_changes"] >= 1, why
    spec = load_spec("imgcls")
    assert any(summary["max_ready"][s.name] > s.initial_replicas for s in spec.stages), why
    assert summary["requests_sent"] > 0 and summary["requests_lost"] == 0, why
    assert (workdir / "summary.json").is_file()
    assert json.loads((workdir / "summary.json").read_text())["actions"] == summary["actions"]
    assert (workdir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["episodes_published"] == episodes_published, why

    # After the burst the P99 came back under the SLO; episodes were stored (the retriever
    # said so, and they are in Qdrant on disk; >=: one published while the policy was being
    # stopped may be stored after the count).
    tail = summary["tail_p99_ms"]
    problems = []
    if tail is None or not summary["tail_p99_under_slo"] or tail > spec.slo_p99_ms:
        problems.append(f"tail P99 {tail} ms is not under the SLO {spec.slo_p99_ms} ms")
    if not summary["episodes_stored"]:
        problems.append("no episode stored")
    elif not episodes_published >= summary["episodes_stored"]:
        problems.append(f"{summary['episodes_stored']} stored > {episodes_published} published")
    elif _qdrant_count(workdir / "qdrant") < summary["episodes_stored"]:
        problems.append("the episodes are not in Qdrant on disk")
    if not problems:
        return
    # Latency and learning need a machine with room to meet the SLO. On a machine busy with
    # other work (the first stage's handler much slower than quiet, or a run queue over twice
    # the cores) where the P99 had less than 20% headroom under the SLO already before the
    # burst, they cannot be judged: the test says so (xfail) instead of passing or failing.
    calibrated_ms = summary["calibration"]["service_ms"]
    load = os.getloadavg()[0]
    busy = calibrated_ms > 2 * QUIET_PRE_MS or load > 2 * (os.cpu_count() or 1)
    baseline = summary["baseline_p99_ms"]
    if busy and (baseline is None or baseline > 0.8 * spec.slo_p99_ms):
        pytest.xfail(
            f"{'; '.join(problems)}: machine too busy to judge (first stage {calibrated_ms} ms "
            f"here vs {QUIET_PRE_MS} ms quiet, load {load:.1f}, P99 {baseline} ms before the "
            f"burst vs SLO {spec.slo_p99_ms} ms)"
        )
    pytest.fail(f"{'; '.join(problems)}\n{why}")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_stopping_sair_up_mid_run_leaves_nothing(tmp_path: Path, sig: int) -> None:
    """Ctrl-C: a clean, bounded stop with a summary. SIGKILL: no clean-up is possible, yet
    every child goes (PR_SET_PDEATHSIG down the tree)."""
    workdir = tmp_path / "up"
    cmd = [*SAIR, "up", "--no-view", "--json", "--workdir", str(workdir)]

    def loaded() -> bool:  # the measured load has started (after the warm-up)
        return (workdir / "logs" / "loadgen.log").exists()

    proc, seen = _run_watching(cmd, tmp_path / "stderr.txt", timeout_s=200, until=loaded)
    try:
        assert proc.poll() is None, _tail(tmp_path / "stderr.txt")
        assert loaded(), _tail(tmp_path / "stderr.txt")
        time.sleep(8)  # the load generator has started and requests are in flight
        seen.update(live_descendants(proc.pid))
        assert len(seen) >= 9
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 0, _tail(tmp_path / "stderr.txt")
        assert stop_s < 60, stop_s
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["interrupted"] is True
        assert summary["requests_sent"] > 0
        assert (workdir / "summary.json").is_file() and (workdir / "timeline.png").is_file()
    left = _wait_gone(seen, timeout_s=45)
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]


# --------------------------------------------------------------------------- fast checks


def _telemetry(ts: float, p99: float | None, pre_ready: int, rho: float) -> PipelineTelemetry:
    stages = [
        StageMetrics(stage="pre", kind="cpu", replicas_ready=pre_ready, queue_depth=3,
                     utilisation=0.5, arrival_rate_rps=10.0),
        StageMetrics(stage="infer", kind="gpu", replicas_ready=1, rho=rho, queue_depth=0,
                     utilisation=0.4),
        StageMetrics(stage="post", kind="cpu", replicas_ready=1, queue_depth=0),
    ]  # fmt: skip
    return PipelineTelemetry(
        pipeline="imgcls", tick=int(ts), ts_s=ts, window_s=30.0, stages=stages,
        arrival_rate_rps=10.0, e2e_p99_ms=p99, slo_p99_ms=250.0, cost_per_h=1.0,
        whole_gpu_cost_per_h=2.0, bottleneck="pre", bottleneck_confidence=0.8,
    )  # fmt: skip


def _status(ts: float, pre_desired: int, pre_ready: int) -> ReplicaStatus:
    return ReplicaStatus(
        pipeline="imgcls", supervisor_id="up", ts_s=ts,
        stages=[StageReplicas(stage="pre", desired=pre_desired, ready=pre_ready),
                StageReplicas(stage="infer", desired=1, ready=1),
                StageReplicas(stage="post", desired=1, ready=1)],
    )  # fmt: skip


def test_run_record_summarises_what_it_saw(tmp_path: Path) -> None:
    spec = load_spec("imgcls")
    rec = RunRecord(spec, t0_s=1000.0)
    rec.load_started_s, rec.load_ended_s = 1000.0, 1100.0
    rec.on_replicas(_status(1001, 1, 1))
    for i in range(100):
        ts = 1000.0 + i
        rec.on_request(f"r{i}", ts)
        # slow during the "burst" (first 60 s), fast after
        e2e = 900.0 if i < 60 else 100.0
        rec.on_completion(Completion(request_id=f"r{i}", pipeline="imgcls", created_ts_s=ts,
                                     done_ts_s=ts + e2e / 1000, e2e_ms=e2e))  # fmt: skip
        rec.on_telemetry(_telemetry(ts, e2e, 1 if i < 30 else 2, 0.2 if i < 20 else 0.5))
    rec.on_completion(Completion(request_id="r5", pipeline="imgcls", created_ts_s=1005,
                                 done_ts_s=1006, e2e_ms=1.0))  # fmt: skip
    rec.warmup_until_s = 999.0  # the warm-up's requests do not count
    rec.on_request("w1", 998.0)
    rec.on_completion(Completion(request_id="w1", pipeline="imgcls", created_ts_s=998.0,
                                 done_ts_s=1001.0, e2e_ms=3000.0))  # fmt: skip
    rec.on_replicas(_status(1030, 2, 1))
    rec.on_replicas(_status(1035, 2, 2))
    action = ScalingAction(pipeline="imgcls", action_id="a1", ts_s=1030.0, source="reflex",
                           policy="sair", rationale="queue grows",
                           stages=[StageAction(stage="pre", target_replicas=2)])  # fmt: skip
    rec.on_action(action)
    rec.on_result(ActionResult(pipeline="imgcls", action_id="a1", ts_s=1030.5,
                               status="applied", backend="local"))  # fmt: skip
    s = rec.summary()
    assert s["requests_sent"] == 100 and s["requests_completed"] == 100
    assert s["duplicate_completions"] == 1
    assert s["p99_ms"] == 900.0 and s["slo_attainment"] == 0.4
    assert s["tail_window_s"] == 25.0 and s["tail_p99_ms"] == 100.0 and s["tail_p99_under_slo"]
    assert s["replica_changes"] == 1 and s["max_ready"]["pre"] == 2 and s["rho_changes"] == 1
    assert s["actions"] == 1 and s["actions_by_source"] == {"reflex": 1}
    assert s["results_by_status"] == {"applied": 1}
    assert s["effective_cost_per_h"] == 1.0 and s["whole_gpu_cost_per_h"] == 2.0
    # The load generator's own count wins over what the observer saw.
    rec.loadgen.append({"sent": 101, "completed": 100, "duplicates": 0})
    assert rec.summary()["requests_lost"] == 1

    text = format_summary({**rec.summary(), "workload": "burst", "policy": "sair"})
    assert "P99 900 ms (SLO 250 ms)" in text and "reflex 1" in text
    line = compact_line(rec, 1100.0)
    assert "pre 2r" in line and "rho 0.50" in line and "bottleneck pre (0.80)" in line
    view = view_text(rec, 1100.0, "SAIR test", 100.0)
    assert "pre *" in view and "queue grows" in view and "applied" in view
    png = plot_timeline(rec, tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_default_workload_puts_the_recovery_at_the_end() -> None:
    p = default_params("burst", 90.0, capacity_rps=20.0)
    assert p["base_rps"] == 4.0 and p["burst_rps"] == 20.0
    # one burst, after the first 30% (the first decision settles on base load), over at half
    # time: the last half of the run is base load
    assert p["first_at_s"] >= 27.0 and p["first_at_s"] + p["width_s"] <= 45.0
    assert p["period_s"] > 90.0
    slow = default_params("burst", 90.0, capacity_rps=2.0)
    assert slow["base_rps"] == 1.0 and slow["burst_rps"] == 3.0
    fast = default_params("burst", None, capacity_rps=200.0)
    assert fast["base_rps"] == 6.0 and fast["burst_rps"] == 24.0 and fast["period_s"] == 90.0
    with pytest.raises(ClosedLoopError, match="workload='zipf'"):
        default_params("zipf", 60.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workload": "zipf"}, "workload='zipf'"),
        ({"policy": "magic"}, "policy='magic'"),
        ({"pipeline": "nosuch"}, "pipeline='nosuch'"),
        ({"duration_s": -1.0}, "duration_s=-1.0"),
        ({"workload": "trace"}, "trace file"),
        ({"retriever_engine": "faiss"}, "retriever_engine='faiss'"),
    ],
)
def test_bad_configuration_is_refused_naming_the_value(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ClosedLoopError, match=message):
        ClosedLoop(ClosedLoopConfig(workdir=tmp_path, **change))


def test_cli_refuses_a_bad_option_before_starting_anything(tmp_path: Path) -> None:
    out = subprocess.run([*SAIR, "up", "--policy", "magic", "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "policy='magic'" in out.stderr
    assert not (tmp_path / "w").exists()  # nothing was started: no server, no log dir


def test_reaper_stops_what_the_launcher_left_even_if_it_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)"],
        start_new_session=True,
    )  # fmt: skip
    reaper = Reaper(grace_s=0.5)
    reaper.start()
    try:
        reaper.watch(stubborn.pid)
        time.sleep(0.3)
        assert stubborn.poll() is None
        assert reaper.proc is not None
        reaper_pid = reaper.proc.pid
        reaper.close(timeout_s=15)  # as if the launcher had died: EOF on the reaper's stdin
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
        assert not pid_alive(reaper_pid)
    finally:
        stubborn.kill()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_components_can_be_killed_and_restarted(tmp_path: Path) -> None:
    """The fault-injection API: kill and restart a service and the NATS server mid-run."""
    cl = ClosedLoop(ClosedLoopConfig(workdir=tmp_path / "cl", workload="poisson",
                                     params={"rate_rps": 2.0}, duration_s=15, calibrate=False,
                                     warmup_s=0))  # fmt: skip
    try:
        assert await cl.start()
        first = cl.pids()["policy"]
        assert first is not None
        await cl.kill("policy")
        assert cl.pids()["policy"] is None and not pid_alive(first)
        await cl.restart("policy")
        assert cl.pids()["policy"] not in (None, first)

        await cl.kill("nats")
        assert cl.pids()["nats"] is None
        await cl.start_component("nats")  # same port and store: everyone reconnects
        ticks = len(cl.record.timeline)
        deadline = time.monotonic() + 60
        while len(cl.record.timeline) < ticks + 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert len(cl.record.timeline) >= ticks + 3, "telemetry did not resume"
        await cl.run_load()
        workers = [p for p, cmd in cl.processes().items() if "sair.worker" in cmd]
        assert len(workers) >= 3
        summary = await cl.finish()
    finally:
        await cl.stop()
    assert summary["requests_sent"] > 0 and summary["requests_lost"] == 0, summary
    assert _wait_gone(set(cl.started_pids()) | set(workers)) == []
    assert cl.processes() == {}

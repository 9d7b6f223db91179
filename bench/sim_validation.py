"""Validate the simulator against the live system: same pipeline, replicas, rho, workload, seed.

For each pipeline (imgcls, nlp) and workload (poisson, burst):
- LIVE: its own nats-server and Redis (`sair.stack`), the real supervisor starting real
  workers at fixed replicas per stage (no policy, no actuator changes), each GPU stage's shared
  token bucket set the way the actuator sets it (`services.actuator.tokens`: rate = replicas x
  rho x full-speed launch rate, burst = `BURST_WINDOW_S` of it, through `GpuTokens.set_rate`
  and `schemas/lua/gpu_set_rate.lua`), and the load generator sending the seeded arrivals;
- SIM: `sair.sim.run.run_simulation` with the pipeline's reference profile
  (`sair.sim.profiles.reference_profile`), a fixed policy holding the same replicas and rho,
  and the very same arrival offsets (`sair.loadgen.arrivals.arrivals(process, params,
  duration, seed)`);
- SIM, calibrated (diagnostic): the same, with each stage's service-time mean and cv replaced
  by what the live run measured (handler time per request), so that the gap of the queueing
  model itself is separated from the gap of the service times (machine load, emulation
  overheads).

Both sides are scored identically: requests created after the warm-up, end-to-end P99 and
P50 (every request completes: the simulator runs on past the last arrival), throughput =
completions inside [warm-up, duration] / that span. Per stage: handler time mean (live, sim,
profile at rho), queue wait mean/P99 and utilisation from the merged worker reports.

Loads: the bottleneck stage's capacity at the fixed replicas and rho (from the profile);
Poisson at `--load-factor` (0.6) of it; burst at 0.5 of it with spikes at 1.2 x for
`width_s` every `period_s`.

    .venv/bin/python bench/sim_validation.py            # 60 s live per case
    .venv/bin/python bench/sim_validation.py --quick    # 20 s live per case

Last line: {"cases": [...], "max_p99_gap_pct": ..., "max_throughput_gap_pct": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sair.loadgen.arrivals import arrivals  # noqa: E402
from sair.sim.engine import CompletionBatch, QueueState  # noqa: E402
from sair.sim.profiles import PipelineProfile, StageProfile, reference_profile  # noqa: E402
from sair.sim.run import Workload, run_simulation  # noqa: E402
from schemas.histogram import LatencyHistogram, merge  # noqa: E402
from schemas.messages import (  # noqa: E402
    PipelineTelemetry,
    RetrievedEpisode,
    StageAction,
    WorkerReport,
)
from schemas.pipeline import PipelineSpec  # noqa: E402

PIPELINES = ("imgcls", "nlp")
WORKLOADS = ("poisson", "burst")
TARGET_GAP_PCT = 15.0

# Fixed replicas per stage and rho per GPU stage. imgcls: one replica per stage, the GPU stage
# (rho 0.3) is the bottleneck. nlp: two replicas on tokenise and on the GPU stage (rho 0.1
# each, one shared token bucket at 2 x 0.1 x full speed): multi-server stages on both kinds.
CONFIGS: dict[str, tuple[dict[str, int], dict[str, float]]] = {
    "imgcls": ({"pre": 1, "infer": 1, "post": 1}, {"infer": 0.3}),
    "nlp": ({"tokenise": 2, "encode": 2, "aggregate": 1}, {"encode": 0.1}),
}


# ---------------------------------------------------------------------------- pure parts


def fixed_spec(spec: PipelineSpec, replicas: Mapping[str, int],
               rho: Mapping[str, float]) -> PipelineSpec:  # fmt: skip
    """The spec with initial replicas and rho set to the fixed configuration (validated)."""
    data = spec.model_dump()
    for st in data["stages"]:
        name = st["name"]
        if name in replicas:
            st["initial_replicas"] = replicas[name]
            st["max_replicas"] = max(st["max_replicas"], replicas[name])
            st["min_replicas"] = min(st["min_replicas"], replicas[name])
        if name in rho:
            st["initial_rho"] = rho[name]
    return PipelineSpec.model_validate(data)


def capacities_rps(spec: PipelineSpec, profile: PipelineProfile) -> dict[str, float]:
    """Requests/s each stage serves at its initial replicas and rho, by the profile."""
    out: dict[str, float] = {}
    for st in spec.stages:
        mean_s = profile.stage(st.name).mean_s(st.start_rho)
        out[st.name] = st.initial_replicas * st.concurrency / mean_s
    return out


def make_workloads(bottleneck_rps: float, load_factor: float, quick: bool) -> dict[str, Workload]:
    """Poisson at load_factor x capacity; burst at 0.5 x with spikes at 1.2 x capacity."""
    if not 0 < load_factor < 1:
        raise ValueError(f"load_factor={load_factor!r} must lie in (0, 1)")
    width_s, period_s = (2.0, 10.0) if quick else (4.0, 20.0)
    return {
        "poisson": Workload("poisson", {"rate_rps": round(load_factor * bottleneck_rps, 2)}),
        "burst": Workload("burst", {
            "base_rps": round(0.5 * bottleneck_rps, 2),
            "burst_rps": round(1.2 * bottleneck_rps, 2),
            "width_s": width_s, "period_s": period_s,
        }),
    }  # fmt: skip


def gap_pct(sim: float | None, live: float | None) -> float | None:
    """(sim - live) / live in percent; None when either is missing or live is 0."""
    if sim is None or live is None or live == 0:
        return None
    return 100.0 * (sim - live) / live


@dataclass
class RunData:
    """One run, live or simulated, in the same shape: offsets in seconds from the start."""

    stage_names: tuple[str, ...]
    created_s: np.ndarray
    done_s: np.ndarray
    """NaN where the request never completed."""
    stage_ms: dict[str, np.ndarray]
    """Handler time per completed request (same order as the completed subset)."""
    reports: list[WorkerReport] = field(default_factory=list)
    report_ts_s: list[float] = field(default_factory=list)
    """Offset of each report (live reports carry wall time)."""
    load_avg_1m: float | None = None
    """Live runs: the machine's mean 1-minute load average during the run (2 cores here)."""


def summarise(data: RunData, warmup_s: float, duration_s: float) -> dict[str, Any]:
    """End-to-end and per-stage figures of one run, scored after `warmup_s`."""
    scored = data.created_s >= warmup_s
    done = data.done_s
    finished = scored & ~np.isnan(done)
    lat_ms = (done[finished] - data.created_s[finished]) * 1000.0
    span = duration_s - warmup_s
    n_in_window = int(np.count_nonzero((done >= warmup_s) & (done <= duration_s)))
    out: dict[str, Any] = {
        "requests": int(scored.sum()),
        "completed": int(finished.sum()),
        "lost": int(scored.sum() - finished.sum()),
        "offered_rps": round(float(scored.sum()) / span, 3) if span > 0 else None,
        "p50_ms": round(float(np.quantile(lat_ms, 0.5)), 2) if lat_ms.size else None,
        "p99_ms": round(float(np.quantile(lat_ms, 0.99)), 2) if lat_ms.size else None,
        "mean_ms": round(float(lat_ms.mean()), 2) if lat_ms.size else None,
        "throughput_rps": round(n_in_window / span, 3) if span > 0 else None,
    }
    stages: dict[str, Any] = {}
    for name in data.stage_names:
        vals = data.stage_ms.get(name, np.zeros(0))
        in_window = [
            r for r, ts in zip(data.reports, data.report_ts_s, strict=True)
            if r.stage == name and warmup_s <= ts <= duration_s + 1.0
        ]  # fmt: skip
        qw: LatencyHistogram = merge(r.queue_wait_ms for r in in_window)
        busy = sum(r.busy_s for r in in_window)
        interval = sum(r.interval_s for r in in_window)
        stages[name] = {
            "service_mean_ms": round(float(vals.mean()), 3) if vals.size else None,
            "service_cv": round(float(vals.std() / vals.mean()), 3)
            if vals.size > 1 and vals.mean() > 0 else None,
            "queue_wait_mean_ms": round(qw.mean_ms, 2) if qw.mean_ms is not None else None,
            "queue_wait_p99_ms": _round(qw.quantile_ms(0.99)),
            "utilisation": round(busy / interval, 3) if interval > 0 else None,
            "gpu_token_wait_s": round(sum(r.gpu_token_wait_s for r in in_window), 2),
        }
    out["stages"] = stages
    return out


def _round(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(v, nd)


def calibrated_profile(profile: PipelineProfile, live: Mapping[str, Any]) -> PipelineProfile:
    """The profile with each stage's mean and cv as measured live (handler time per request,
    token waits included); GPU stages become fixed-time (the live figure is already at rho)."""
    stages: dict[str, StageProfile] = {}
    for name, prof in profile.stages.items():
        m = live["stages"].get(name, {})
        mean, cv = m.get("service_mean_ms"), m.get("service_cv")
        if not mean or mean <= 0:
            stages[name] = prof
            continue
        stages[name] = StageProfile(mean_ms=mean, cv=cv if cv is not None else prof.cv,
                                    dist=prof.dist)  # fmt: skip
    return PipelineProfile(profile.pipeline, stages, source="calibrated to the live run")


def compare(pipeline: str, workload: str, live: Mapping[str, Any], sim: Mapping[str, Any],
            calibrated: Mapping[str, Any] | None, profile: PipelineProfile,
            spec: PipelineSpec) -> dict[str, Any]:  # fmt: skip
    """One row of the result: the headline gaps plus per-stage service times side by side."""
    p99_gap = gap_pct(sim["p99_ms"], live["p99_ms"])
    thr_gap = gap_pct(sim["throughput_rps"], live["throughput_rps"])
    row: dict[str, Any] = {
        "pipeline": pipeline,
        "workload": workload,
        "live_p99_ms": live["p99_ms"],
        "sim_p99_ms": sim["p99_ms"],
        "p99_gap_pct": _round(p99_gap, 1),
        "live_throughput_rps": live["throughput_rps"],
        "sim_throughput_rps": sim["throughput_rps"],
        "throughput_gap_pct": _round(thr_gap, 2),
        "live_p50_ms": live["p50_ms"],
        "sim_p50_ms": sim["p50_ms"],
        "within_target": p99_gap is not None and thr_gap is not None
        and abs(p99_gap) <= TARGET_GAP_PCT and abs(thr_gap) <= TARGET_GAP_PCT,
        "live_lost": live["lost"],
    }
    if calibrated is not None:
        row["sim_calibrated_p99_ms"] = calibrated["p99_ms"]
        row["calibrated_p99_gap_pct"] = _round(gap_pct(calibrated["p99_ms"], live["p99_ms"]), 1)
        row["sim_calibrated_throughput_rps"] = calibrated["throughput_rps"]
        row["calibrated_throughput_gap_pct"] = _round(
            gap_pct(calibrated["throughput_rps"], live["throughput_rps"]), 2
        )
    per_stage: dict[str, Any] = {}
    for st in spec.stages:
        prof = profile.stage(st.name)
        ls, ss = live["stages"][st.name], sim["stages"][st.name]
        per_stage[st.name] = {
            "profile_service_ms": round(prof.mean_ms * prof.scale(st.start_rho), 3),
            "live_service_ms": ls["service_mean_ms"],
            "sim_service_ms": ss["service_mean_ms"],
            "live_queue_wait_mean_ms": ls["queue_wait_mean_ms"],
            "sim_queue_wait_mean_ms": ss["queue_wait_mean_ms"],
            "live_queue_wait_p99_ms": ls["queue_wait_p99_ms"],
            "sim_queue_wait_p99_ms": ss["queue_wait_p99_ms"],
            "live_utilisation": ls["utilisation"],
            "sim_utilisation": ss["utilisation"],
            "live_gpu_token_wait_s": ls["gpu_token_wait_s"],
            "sim_gpu_token_wait_s": ss["gpu_token_wait_s"],
        }
    row["stages"] = per_stage
    return row


def max_abs(values: Sequence[float | None]) -> float | None:
    vals = [abs(v) for v in values if v is not None]
    return round(max(vals), 2) if vals else None


def save_run(folder: Path, pipeline: str, workload: str, run: RunData,
             meta: Mapping[str, Any]) -> None:  # fmt: skip
    """A live run as `<pipeline>-<workload>.npz` (arrays) + `.json` (meta and reports)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"{pipeline}-{workload}"
    arrays: dict[str, Any] = {"created_s": run.created_s, "done_s": run.done_s}
    arrays.update({f"stage_{k}": v for k, v in run.stage_ms.items()})
    np.savez(base.with_suffix(".npz"), **arrays)
    doc = {"meta": dict(meta), "stage_names": list(run.stage_names),
           "reports": [r.model_dump(mode="json") for r in run.reports],
           "report_ts_s": run.report_ts_s, "load_avg_1m": run.load_avg_1m}  # fmt: skip
    base.with_suffix(".json").write_text(json.dumps(doc))


def load_run(folder: Path, pipeline: str, workload: str, meta: Mapping[str, Any]) -> RunData:
    """A run saved by `save_run`; ValueError when it was made with other settings."""
    base = folder / f"{pipeline}-{workload}"
    doc = json.loads(base.with_suffix(".json").read_text())
    if doc["meta"] != json.loads(json.dumps(dict(meta))):
        raise ValueError(f"{base}.json was saved with {doc['meta']}, this run is {dict(meta)}")
    arrs = np.load(base.with_suffix(".npz"))
    names = tuple(doc["stage_names"])
    return RunData(
        stage_names=names, created_s=arrs["created_s"], done_s=arrs["done_s"],
        stage_ms={n: arrs[f"stage_{n}"] for n in names},
        reports=[WorkerReport.model_validate(r) for r in doc["reports"]],
        report_ts_s=list(doc["report_ts_s"]), load_avg_1m=doc.get("load_avg_1m"),
    )  # fmt: skip


# ---------------------------------------------------------------------------- simulator


@dataclass(frozen=True)
class _Decision:
    targets: tuple[StageAction, ...]
    hold: bool


class FixedPolicy:
    """Holds the spec's initial replicas and rho (the simulator starts there): never acts."""

    name = "fixed"

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> None:
        return None

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: None,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[_Decision, None]:
        targets = tuple(
            StageAction(stage=st.name, target_replicas=st.initial_replicas, rho=st.start_rho)
            for st in spec.stages
        )
        return _Decision(targets, hold=False), state  # full targets; the run loop sees no change


class RecordingTelemetry:
    """The monitor's aggregation (`MonitorTelemetry`), keeping every completion and report.

    Completions go through the aggregator's public `add_completion` (`exact_completions`):
    slower than the vectorised fold, which reaches into the aggregator's private slots, but
    a validation run has only a few thousand requests."""

    def __init__(self, spec: PipelineSpec) -> None:
        from sair.sim.adapters import MonitorTelemetry

        self.inner = MonitorTelemetry(spec, exact_completions=True)
        self.batches: list[CompletionBatch] = []
        self.reports: list[WorkerReport] = []

    def observe(
        self,
        now: float,
        reports: Sequence[WorkerReport],
        completions: Sequence[CompletionBatch],
        queues: Mapping[str, QueueState],
    ) -> PipelineTelemetry:
        self.batches.extend(b for b in completions if len(b))
        self.reports.extend(reports)
        return self.inner.observe(now, reports, completions, queues)


def run_sim(spec: PipelineSpec, profile: PipelineProfile, workload: Workload,
            offsets_s: np.ndarray, seed: int, duration_s: float,
            tail_s: float = 60.0) -> RunData:  # fmt: skip
    """Simulate the arrivals `offsets_s` (all inside duration_s), running on `tail_s` longer
    so that every request completes, as in the live run whose generator waits for them."""
    recorders: list[RecordingTelemetry] = []

    def factory(s: PipelineSpec) -> RecordingTelemetry:
        recorders.append(RecordingTelemetry(s))
        return recorders[-1]

    run_simulation(spec, profile, workload, FixedPolicy(), seed=seed,
                   duration_s=duration_s + tail_s, telemetry=factory, report_interval_s=1.0,
                   record_timeline=False, arrivals_s=offsets_s)  # fmt: skip
    rec = recorders[0]
    n = offsets_s.size
    done = np.full(n, np.nan)
    names = spec.stage_names
    ms = np.full((len(names), n), np.nan)
    for b in rec.batches:
        done[b.job] = b.done_s
        ms[:, b.job] = b.stage_ms
    fin = ~np.isnan(done)
    return RunData(
        stage_names=names, created_s=np.asarray(offsets_s, dtype=float), done_s=done,
        stage_ms={name: ms[i][fin] for i, name in enumerate(names)},
        reports=rec.reports, report_ts_s=[r.ts_s for r in rec.reports],
    )  # fmt: skip


# ---------------------------------------------------------------------------- live


async def run_live(spec: PipelineSpec, loads: Mapping[str, tuple[Workload, np.ndarray]],
                   seed: int, workdir: Path, csv_dir: Path | None,
                   log: Any) -> dict[str, RunData]:  # fmt: skip
    """One stack for the pipeline; the workloads one after the other on the same workers."""
    import nats
    from nats.aio.msg import Msg

    from sair.loadgen import LoadGenerator
    from sair.pipelines import make_payload
    from sair.settings import Settings
    from sair.stack import NatsServer, RedisServer, free_port
    from sair.supervisor import Supervisor
    from schemas import subjects
    from services.actuator.tokens import GpuTokens, gpu_burst, gpu_rate_per_s

    name = spec.name
    nats_srv = NatsServer("nats-server", "127.0.0.1", free_port(), workdir / name / "nats")
    redis_srv = RedisServer("redis-server", "127.0.0.1", free_port(), workdir / name / "redis")
    nats_srv.start()
    redis_srv.start()
    out: dict[str, RunData] = {}
    nc: Any = None
    try:
        settings = Settings(nats_url=nats_srv.url, redis_url=redis_srv.url, metrics_port=-1)
        tokens = GpuTokens.from_url(redis_srv.url)
        try:
            for st in spec.stages:
                rate = gpu_rate_per_s(st, st.initial_replicas, st.start_rho)
                if rate is not None:
                    burst = gpu_burst(rate)
                    await tokens.set_rate(name, st.name, rate, burst, st.start_rho)
                    log(f"  {name}/{st.name}: token bucket {rate:.0f}/s, burst {burst}")
        finally:
            await tokens.close()
        # The supervisor gets the fixed spec (its desired counts); workers load the built-in
        # spec by name (same handlers, options and launch rates).
        sup = Supervisor({name: spec}, settings, supervisor_id="val",
                         log_dir=workdir / name / "logs")  # fmt: skip
        nc = await nats.connect(nats_srv.url)
        reports: list[WorkerReport] = []

        async def on_report(msg: Msg) -> None:
            reports.append(WorkerReport.model_validate_json(msg.data))

        await nc.subscribe(subjects.reports_all(name), cb=on_report)
        await sup.start()
        runner = asyncio.create_task(sup.run())
        try:
            deadline = time.monotonic() + 120
            while not all(s.ready >= s.desired for s in sup.status(name).stages):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: workers not ready after 120 s")
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # first reports out, consumers settled
            for wl_name, (_wl, offsets) in loads.items():
                reports.clear()
                loads_seen: list[float] = []
                sampler = asyncio.create_task(_sample_load(loads_seen))
                gen = LoadGenerator(
                    nc, spec, f"val-{name}-{wl_name}",
                    payload_fn=lambda rng, i: make_payload(name, rng, i), seed=seed,
                )  # fmt: skip
                res = await gen.run(offsets.tolist(), drain_timeout_s=60.0)
                sampler.cancel()
                await asyncio.sleep(1.5)  # the last reports
                log(f"  live {name}/{wl_name}: {json.dumps(res.summary())}")
                if csv_dir is not None:
                    csv_dir.mkdir(parents=True, exist_ok=True)
                    res.write_csv(csv_dir / f"{name}-{wl_name}.csv")
                recs = list(res.records.values())  # in send order = arrival order
                t0 = res.started_s
                created = np.array([r.sent_s - t0 for r in recs])
                done = np.array([np.nan if r.done_s is None else r.done_s - t0 for r in recs])
                stage_ms = {
                    s: np.array([r.stage_ms[s] for r in recs if r.completions and s in r.stage_ms])
                    for s in spec.stage_names
                }
                snap = list(reports)
                load_avg = round(float(np.mean(loads_seen)), 2) if loads_seen else None
                out[wl_name] = RunData(spec.stage_names, created, done, stage_ms,
                                       snap, [r.ts_s - t0 for r in snap], load_avg)  # fmt: skip
                await asyncio.sleep(1.0)
        finally:
            sup.stop()
            await runner
    finally:
        if nc is not None:
            await nc.close()
        nats_srv.stop()
        redis_srv.stop()
    return out


async def _sample_load(into: list[float], every_s: float = 5.0) -> None:
    """Append the 1-minute load average every `every_s` until cancelled."""
    while True:
        into.append(os.getloadavg()[0])
        await asyncio.sleep(every_s)


# ---------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    duration_s = args.duration
    warmup_s = args.warmup
    if not 0 <= warmup_s < duration_s:
        raise SystemExit(f"--warmup={warmup_s} must lie in [0, --duration={duration_s})")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from sair.pipelines import load_spec

    cases: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        for pipeline in args.pipelines.split(","):
            replicas, rho = CONFIGS[pipeline]
            spec = fixed_spec(load_spec(pipeline), replicas, rho)
            profile = reference_profile(pipeline)
            caps = capacities_rps(spec, profile)
            bottleneck = min(caps, key=lambda s: caps[s])
            wls = make_workloads(caps[bottleneck], args.load_factor, args.quick)
            loads = {
                w: (wls[w], arrivals(wls[w].process, wls[w].params, duration_s, args.seed))
                for w in args.workloads.split(",")
            }
            shown = {k: round(v, 1) for k, v in caps.items()}
            log(f"{pipeline}: replicas {replicas}, rho {rho}; capacity rps {shown}, "
                f"bottleneck {bottleneck}")  # fmt: skip
            meta = {"pipeline": pipeline, "seed": args.seed, "duration_s": duration_s,
                    "replicas": replicas, "rho": rho}  # fmt: skip
            if args.live_from is not None:
                live_runs = {w: load_run(args.live_from, pipeline, w, {
                    **meta, "workload": dict(loads[w][0].params)}) for w in loads}  # fmt: skip
            else:
                t = time.monotonic()
                live_runs = await run_live(spec, loads, args.seed, Path(d), args.csv_dir, log)
                log(f"  live took {time.monotonic() - t:.0f} s")
                if args.save_live is not None:
                    for w, run in live_runs.items():
                        save_run(args.save_live, pipeline, w, run,
                                 {**meta, "workload": dict(loads[w][0].params)})  # fmt: skip
            for w, (wl, offsets) in loads.items():
                live = summarise(live_runs[w], warmup_s, duration_s)
                sim = summarise(run_sim(spec, profile, wl, offsets, args.seed, duration_s),
                                warmup_s, duration_s)  # fmt: skip
                cal_prof = calibrated_profile(profile, live)
                cal = summarise(run_sim(spec, cal_prof, wl, offsets, args.seed, duration_s),
                                warmup_s, duration_s)  # fmt: skip
                row = compare(pipeline, w, live, sim, cal, profile, spec)
                row["workload_params"] = dict(wl.params)
                row["replicas"] = replicas
                row["rho"] = rho
                row["live_load_avg_1m"] = live_runs[w].load_avg_1m
                cases.append(row)
                details.append({"pipeline": pipeline, "workload": w, "live": live, "sim": sim,
                                "sim_calibrated": cal})  # fmt: skip
                log(f"  {pipeline}/{w}: live p99 {row['live_p99_ms']} ms, sim p99 "
                    f"{row['sim_p99_ms']} ms ({row['p99_gap_pct']}%), calibrated sim p99 "
                    f"{row.get('sim_calibrated_p99_ms')} ms; throughput live "
                    f"{row['live_throughput_rps']} sim {row['sim_throughput_rps']} rps")
    if args.details is not None:
        args.details.write_text(json.dumps(details, indent=1))
    return {
        "cases": cases,
        "max_p99_gap_pct": max_abs([c["p99_gap_pct"] for c in cases]),
        "max_throughput_gap_pct": max_abs([c["throughput_gap_pct"] for c in cases]),
        "max_calibrated_p99_gap_pct": max_abs([c.get("calibrated_p99_gap_pct") for c in cases]),
        "max_calibrated_throughput_gap_pct": max_abs(
            [c.get("calibrated_throughput_gap_pct") for c in cases]
        ),
        "target_gap_pct": TARGET_GAP_PCT,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "seed": args.seed,
        "max_live_load_avg_1m": max_abs([c["live_load_avg_1m"] for c in cases]),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Simulator vs live system, same seed and config.")
    ap.add_argument("--quick", action="store_true", help="20 s live per case (default 60 s)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load per case")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds excluded from scoring (default 5; 3 with --quick)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--load-factor", type=float, default=0.6,
                    help="Poisson rate as a share of the bottleneck stage's capacity")
    ap.add_argument("--csv-dir", type=Path, default=None,
                    help="write the load generator's per-request CSV per case here")
    ap.add_argument("--save-live", type=Path, default=None,
                    help="keep each live run here (per-request arrays and reports)")
    ap.add_argument("--live-from", type=Path, default=None,
                    help="score the simulator against live runs saved with --save-live "
                         "(same seed, duration and loads) instead of running live")
    ap.add_argument("--details", type=Path, default=None,
                    help="write every summary (live, sim, calibrated sim) as JSON here")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.duration is None:
        args.duration = 20.0 if args.quick else 60.0
    if args.warmup is None:
        args.warmup = 3.0 if args.quick else 5.0
    for p in args.pipelines.split(","):
        if p not in CONFIGS:
            known = ", ".join(CONFIGS)
            raise SystemExit(f"--pipelines: {p!r} has no fixed configuration ({known})")
    for w in args.workloads.split(","):
        if w not in WORKLOADS:
            raise SystemExit(f"--workloads: {w!r} must be one of {', '.join(WORKLOADS)}")
    result = asyncio.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The benchmark grid: policies x pipelines x workloads x seeds on the simulator.

    python -m sair.sim.grid [--quick] [--jobs N] [--out DIR]      (also `bench/policies.py`)

Every run is a `RunSpec`; `expand` builds the grid, `run_grid` executes it in worker
processes (`ProcessPoolExecutor`, spawn) behind a rich progress bar, `execute` is one run:
the reference pipeline's spec and measured profile, a workload scaled to the pipeline's
capacity (`workload_for`), the policy by name through `services.policy.interface.get_policy`
(validator included) driven by the policy service's own `loop.step`, and for SAIR's policies
the episode memory of `sair.sim.memory` (stored and retrieved by the retriever's functions).
Writes `DIR/results.json` (a list of runs), `DIR/timelines.json` (per-tick timelines of the
burst runs of the first seed), `DIR/meta.json` (the command, grid and wall time),
`DIR/results.md` and `DIR/plots/*.png` (`sair.sim.report`);
prints one JSON summary as its last line.

Workloads (rates relative to `initial_capacity_rps`, the throughput the pipeline's initial
configuration can sustain, i.e. of its slowest stage; see docs/simulator.md):
- poisson: `POISSON_LOAD` x capacity (moderate: the initial configuration copes);
- ramp: `RAMP_LOW` -> `RAMP_HIGH` x capacity at mid-run -> back (over capacity at the top);
- burst: `BURST_BASE` x capacity with spikes to `BURST_PEAK` x capacity, `BURST_WIDTH_S`
  long every `BURST_PERIOD_S` (each spike needs scaling within seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from schemas.pipeline import PipelineSpec

from .profiles import PipelineProfile, reference_profile
from .run import RunResult, TickRecord, Workload, burst, poisson, ramp

PIPELINES = ("imgcls", "nlp", "textgen", "video")
WORKLOADS = ("poisson", "ramp", "burst")
LEARNING_POLICIES = ("sair", "llm")

POISSON_LOAD = 0.7
RAMP_LOW = 0.3
RAMP_HIGH = 1.6
BURST_BASE = 0.5
BURST_PEAK = 3.0
BURST_WIDTH_S = 20.0
BURST_PERIOD_S = 120.0

DEFAULT_SEEDS = 3
DEFAULT_DURATION_S = 900.0
DEFAULT_WARMUP_S = 60.0
QUICK_SEEDS = 1
QUICK_DURATION_S = 240.0
QUICK_WARMUP_S = 30.0
TIMELINE_WORKLOAD = "burst"

RESULT_KEYS = (
    "policy",
    "pipeline",
    "workload",
    "seed",
    "p99_ms",
    "p50_ms",
    "slo_violation_rate",
    "effective_cost",
    "whole_gpu_cost",
    "cost_per_1k_requests",
    "actions",
    "oscillations",
    "bottleneck_accuracy",
    "completed",
    "wall_s",
)
"""Keys every run record has (more follow: see `record`)."""


def baseline_names() -> tuple[str, ...]:
    """Every baseline of `services.policy.interface` (all policies but SAIR's own)."""
    from services.policy.interface import POLICY_NAMES

    return tuple(n for n in POLICY_NAMES if n not in LEARNING_POLICIES)


def default_policies(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """sair, the LLM policy when an endpoint is configured, and every baseline."""
    env = os.environ if env is None else env
    llm = ("llm",) if env.get("OPENAI_BASE_URL") else ()
    return ("sair", *llm, *baseline_names())


# --------------------------------------------------------------------------- workloads


def stage_capacity_rps(
    spec: PipelineSpec,
    profile: PipelineProfile,
    replicas: Mapping[str, int] | None = None,
    rho: Mapping[str, float | None] | None = None,
) -> dict[str, float]:
    """Requests/s each stage can serve: servers / mean service time (at its rho)."""
    out: dict[str, float] = {}
    for st in spec.stages:
        n = (replicas or {}).get(st.name, st.initial_replicas)
        r = (rho or {}).get(st.name, st.start_rho)
        out[st.name] = n * st.concurrency / profile.stage(st.name).mean_s(r)
    return out


def initial_capacity_rps(spec: PipelineSpec, profile: PipelineProfile) -> float:
    """Throughput of the initial configuration: its slowest stage's capacity."""
    return min(stage_capacity_rps(spec, profile).values())


def workload_for(name: str, capacity_rps: float) -> Workload:
    """The grid's workload `name`, rates scaled to `capacity_rps` (rounded to 0.1 rps)."""

    def r(x: float) -> float:
        return round(x * capacity_rps, 1)

    if name == "poisson":
        return poisson(r(POISSON_LOAD))
    if name == "ramp":
        return ramp(r(RAMP_LOW), r(RAMP_HIGH))
    if name == "burst":
        return burst(r(BURST_BASE), r(BURST_PEAK), BURST_WIDTH_S, BURST_PERIOD_S)
    raise ValueError(f"workload={name!r}: must be one of {', '.join(WORKLOADS)}")


def pipeline_spec(name: str) -> PipelineSpec:
    from sair.pipelines import resolve_spec

    return resolve_spec(name)


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    policy: str
    pipeline: str
    workload: str
    seed: int
    duration_s: float
    warmup_s: float
    profile: str = "reference"
    timeline: bool = False
    """Keep the per-tick timeline (for the plots)."""


def expand(
    policies: Sequence[str],
    pipelines: Sequence[str],
    workloads: Sequence[str],
    seeds: int,
    duration_s: float,
    warmup_s: float,
    *,
    profile: str = "reference",
    timeline_workload: str = TIMELINE_WORKLOAD,
) -> list[RunSpec]:
    """Every combination, pipeline-major; the first seed of `timeline_workload` keeps its
    timeline."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: must be >= 1")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s={duration_s!r}: must be finite and > 0")
    if not 0 <= warmup_s < duration_s:
        raise ValueError(f"warmup_s={warmup_s!r}: must lie in [0, duration_s={duration_s})")
    for label, names in (
        ("policies", policies),
        ("pipelines", pipelines),
        ("workloads", workloads),
    ):
        if not names:
            raise ValueError(f"{label}: at least one is needed")
        dup = sorted({n for n in names if list(names).count(n) > 1})
        if dup:
            raise ValueError(f"{label}: {', '.join(dup)} given more than once")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"workload={w!r}: must be one of {', '.join(WORKLOADS)}")
    return [
        RunSpec(
            policy=pol,
            pipeline=pipe,
            workload=w,
            seed=seed,
            duration_s=duration_s,
            warmup_s=warmup_s,
            profile=profile,
            timeline=(w == timeline_workload and seed == 0),
        )
        for pipe in pipelines
        for w in workloads
        for pol in policies
        for seed in range(seeds)
    ]


# --------------------------------------------------------------------------- one run


def execute(run: RunSpec) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One run: (record, timeline or None). Pure function of `run` (except wall times)."""
    from services.policy.interface import get_policy

    from .memory import LoopPolicy, SimMemory
    from .run import run_simulation

    spec = pipeline_spec(run.pipeline)
    profile = reference_profile(run.pipeline, run.profile)
    workload = workload_for(run.workload, initial_capacity_rps(spec, profile))
    memory = SimMemory(spec) if run.policy in LEARNING_POLICIES else None
    policy = LoopPolicy(get_policy(run.policy), memory)
    res = run_simulation(
        spec,
        profile,
        workload,
        policy,
        seed=run.seed,
        duration_s=run.duration_s,
        warmup_s=run.warmup_s,
        retriever=memory.retriever if memory is not None else None,
        record_timeline=run.timeline,
    )
    rec = record(res, workload, policy, memory)
    tl = timeline(res, spec) if run.timeline else None
    return rec, tl


def record(
    res: RunResult, workload: Workload, policy: Any = None, memory: Any = None
) -> dict[str, Any]:
    """The run's JSON record (`RESULT_KEYS` first)."""
    llm = getattr(policy, "llm", None) if res.policy == "llm" else None
    rec: dict[str, Any] = {
        "policy": res.policy,
        "pipeline": res.pipeline,
        "workload": res.workload,
        "seed": res.seed,
        "p99_ms": res.p99_ms,
        "p50_ms": res.p50_ms,
        "slo_violation_rate": res.slo_violation_rate,
        "effective_cost": res.cost_usd,
        "whole_gpu_cost": res.whole_gpu_cost_usd,
        "cost_per_1k_requests": res.cost_per_1k_usd,
        "actions": res.scaling_actions,
        "oscillations": res.oscillations,
        "bottleneck_accuracy": res.bottleneck_accuracy,
        "completed": res.completed,
        "wall_s": res.wall_s,
        "whole_gpu_cost_per_1k_requests": res.whole_gpu_cost_per_1k_usd,
        "slo_window_violation_rate": res.slo_window_violation_rate,
        "slo_p99_ms": res.slo_p99_ms,
        "bottleneck_accuracy_clear": res.bottleneck_accuracy_clear,
        "requests": res.requests,
        "incomplete": res.incomplete,
        "duration_s": res.duration_s,
        "warmup_s": res.warmup_s,
        "speedup": res.speedup,
        "workload_params": dict(workload.params),
        "episodes_stored": len(memory) if memory is not None else None,
        "llm_calls": llm.calls if llm is not None else None,
        "llm_tokens": llm.prompt_tokens + llm.completion_tokens if llm is not None else None,
        "llm_fallbacks": llm.fallbacks if llm is not None else None,
    }
    return rec


def timeline(res: RunResult, spec: PipelineSpec) -> dict[str, Any]:
    """The run's timeline as columns (JSON-ready)."""
    ticks: tuple[TickRecord, ...] = res.timeline
    stages = list(spec.stage_names)
    return {
        "policy": res.policy,
        "pipeline": res.pipeline,
        "workload": res.workload,
        "seed": res.seed,
        "slo_p99_ms": res.slo_p99_ms,
        "warmup_s": res.warmup_s,
        "stages": stages,
        "gpu_stages": [st.name for st in spec.stages if st.kind == "gpu"],
        "t_s": [t.t_s for t in ticks],
        "load_rps": [t.load_rps for t in ticks],
        "completed_rps": [t.completed_rps for t in ticks],
        "p99_ms": [t.p99_ms for t in ticks],
        "cost_per_h": [t.cost_per_h for t in ticks],
        "replicas": {s: [t.replicas[s] for t in ticks] for s in stages},
        "ready": {s: [t.ready[s] for t in ticks] for s in stages},
        "rho": {s: [t.rho[s] for t in ticks] for s in stages},
        "queue_depth": {s: [t.queue_depth[s] for t in ticks] for s in stages},
    }


# --------------------------------------------------------------------------- parallel


def _worker_init() -> None:
    # one process per core already: keep numpy's BLAS from oversubscribing the machine
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def mp_context() -> BaseContext:
    """fork where there is one: the workers inherit the modules `preload` imported (seconds
    per worker under load); spawn elsewhere."""
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def preload(policies: Sequence[str]) -> None:
    """Import what every run needs, once, before the workers fork."""
    from services.monitor import aggregate  # noqa: F401
    from services.policy.interface import get_policy

    from . import memory, run  # noqa: F401

    for name in policies:
        if name != "llm":  # no client is built before the workers exist
            get_policy(name)


def _cost_hint(run: RunSpec) -> float:
    """Rough relative cost of a run: longest first keeps every worker busy to the end."""
    return run.duration_s * (2.0 if run.policy in LEARNING_POLICIES else 1.0)


def run_grid(
    runs: Sequence[RunSpec], jobs: int, *, progress: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Execute `runs` on `jobs` processes (in this process when jobs == 1).

    Returns (records, timelines, errors); records sorted by pipeline, workload, policy, seed.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: must be >= 1")
    records: list[dict[str, Any]] = []
    timelines: list[dict[str, Any]] = []
    errors: list[str] = []
    ordered = sorted(runs, key=_cost_hint, reverse=True)

    def take(run: RunSpec, out: tuple[dict[str, Any], dict[str, Any] | None]) -> None:
        rec, tl = out
        records.append(rec)
        if tl is not None:
            timelines.append(tl)

    if jobs == 1:
        with _progress(progress, len(ordered)) as advance:
            for run in ordered:
                try:
                    take(run, execute(run))
                except Exception as exc:  # report every failed run, keep the others
                    errors.append(f"{_label(run)}: {_describe(exc)}")
                advance(_label(run))
    else:
        _worker_init()
        preload(sorted({r.policy for r in runs}))
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=mp_context(), initializer=_worker_init
        ) as pool:
            # every worker starts at the first submit, before the progress bar's thread
            futures: dict[Future[tuple[dict[str, Any], dict[str, Any] | None]], RunSpec]
            futures = {pool.submit(execute, run): run for run in ordered}
            with _progress(progress, len(ordered)) as advance:
                for fut in as_completed(futures):
                    run = futures[fut]
                    try:
                        take(run, fut.result())
                    except Exception as exc:
                        errors.append(f"{_label(run)}: {_describe(exc)}")
                    advance(_label(run))
    # the grid's own order (pipeline, workload, policy as given, seed)
    rank = {(r.pipeline, r.workload, r.policy, r.seed): i for i, r in enumerate(runs)}

    def pos(rec: dict[str, Any]) -> int:
        return rank.get((rec["pipeline"], rec["workload"], rec["policy"], rec["seed"]), -1)

    records.sort(key=pos)
    timelines.sort(key=pos)
    return records, timelines, errors


def _describe(exc: BaseException) -> str:
    """The exception and where it was raised (the innermost frame)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    cause = exc.__cause__
    if cause is not None:  # a worker's traceback travels as the cause
        return f"{exc.__class__.__name__}: {exc}{where}; {cause}".replace("\n", " | ")[:2000]
    return f"{exc.__class__.__name__}: {exc}{where}"


def _label(run: RunSpec) -> str:
    return f"{run.pipeline}/{run.workload}/{run.policy}/seed {run.seed}"


class _progress:
    """A rich progress bar (or nothing); the context value advances it by one run."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda label: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]sair bench"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=Console(stderr=True),
        )
        self._bar.__enter__()
        self._task = self._bar.add_task("", total=self.total)

        def advance(label: str) -> None:
            self._bar.update(self._task, advance=1, description=label)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


# --------------------------------------------------------------------------- CLI


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sair bench",
        description="Every policy x pipeline x workload x seed on the simulator: "
        "results.json, results.md, plots/.",
    )
    p.add_argument(
        "--policies",
        type=_names,
        default=None,
        help="comma-separated (default: sair, llm if OPENAI_BASE_URL is set, every baseline)",
    )
    p.add_argument(
        "--pipelines",
        type=_names,
        default=list(PIPELINES),
        help="comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--workloads",
        type=_names,
        default=list(WORKLOADS),
        help="comma-separated, of poisson, ramp, burst (default: all)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per cell (default {DEFAULT_SEEDS}; --quick: {QUICK_SEEDS})",
    )
    p.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help=f"simulated seconds per run (default {DEFAULT_DURATION_S:g}; "
        f"--quick: {QUICK_DURATION_S:g})",
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help=f"unscored start (default {DEFAULT_WARMUP_S:g}; --quick: {QUICK_WARMUP_S:g})",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: the number of CPUs)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one seed, shorter runs: the whole grid in a few minutes",
    )
    p.add_argument(
        "--profile",
        default="reference",
        choices=("reference", "typical"),
        help="service-time profiles (sair/sim/profiles.py)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output directory (default %(default)s)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`sair bench`: run the grid, write the results, print a JSON summary last."""
    from services.policy.interface import POLICY_NAMES

    from . import report

    parser = build_parser()
    args = parser.parse_args(argv)
    policies = args.policies if args.policies is not None else list(default_policies())
    for name in policies:
        if name not in POLICY_NAMES:
            parser.error(f"--policies: {name!r} is unknown (known: {', '.join(POLICY_NAMES)})")
    for name in args.pipelines:
        if name not in PIPELINES:
            parser.error(f"--pipelines: {name!r} is unknown (known: {', '.join(PIPELINES)})")
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    duration = (
        args.duration_s
        if args.duration_s is not None
        else (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    )
    warmup = (
        args.warmup_s
        if args.warmup_s is not None
        else min(QUICK_WARMUP_S if args.quick else DEFAULT_WARMUP_S, duration / 4)
    )
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: must be >= 1")
    try:
        runs = expand(
            policies, args.pipelines, args.workloads, seeds, duration, warmup, profile=args.profile
        )
    except ValueError as exc:
        parser.error(str(exc))
    wall0 = time.perf_counter()
    records, timelines, errors = run_grid(runs, args.jobs, progress=not args.no_progress)
    grid_wall_s = time.perf_counter() - wall0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "timelines.json").write_text(json.dumps(timelines) + "\n")
    meta = {
        "command": "sair bench " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "runs": len(runs),
        "policies": policies,
        "pipelines": args.pipelines,
        "workloads": args.workloads,
        "seeds": seeds,
        "duration_s": duration,
        "warmup_s": warmup,
        "profile": args.profile,
        "jobs": args.jobs,
        "wall_s": round(grid_wall_s, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    report.write_report(records, timelines, out, meta=meta, plots=not args.no_plots, jobs=args.jobs)
    summary = report.headline(records)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(
        json.dumps(
            {
                "runs": len(records),
                "errors": len(errors),
                "wall_s": round(grid_wall_s, 1),
                "out": str(out),
                **summary,
            }
        )
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

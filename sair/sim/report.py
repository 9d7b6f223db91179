"""The benchmark grid's report: Markdown tables and PNG plots from `results.json`.

    python -m sair.sim.report DIR          # (re)write DIR/results.md and DIR/plots/

- One table per metric: a row per pipeline x workload cell, a column per policy, mean ± std
  across seeds (sample std, shown with the mean's precision), the best mean of the row in
  bold (lowest, or highest for accuracy; every mean that reads the same as the best, too).
  `actions` has no "best".
- SAIR against the field: per cell, whether SAIR is best or tied-best (within `TOLERANCE`
  of the best mean) on P99 and on effective cost, and its burst P99 against HPA's.
- Plots (matplotlib, Agg): per cell a P99-vs-effective-cost scatter of all policies
  (`plots/scatter_<pipeline>_<workload>.png`), and per pipeline the burst timeline of the
  first seed (`plots/timeline_<pipeline>_burst.png`): offered and completed load, replicas
  per stage, rho of the GPU stages, per-tick P99, one line per policy.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Direction = Literal["min", "max"] | None
Record = Mapping[str, Any]

TOLERANCE = 0.05
FOCUS = "sair"
REFERENCE_BASELINE = "hpa"
PIPELINE_ORDER = ("imgcls", "nlp", "textgen", "video")
WORKLOAD_ORDER = ("poisson", "ramp", "burst")


def _ms(v: float, ref: float | None = None) -> str:
    """ms with the precision of `ref` (the mean, for a std), else of the value itself."""
    r = abs(v if ref is None else ref)
    if r >= 100:
        return f"{v:,.0f}"
    if r >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _pct(v: float, ref: float | None = None) -> str:
    return f"{100 * v:.1f}"


def _usd(v: float, ref: float | None = None) -> str:
    """Three significant digits of `ref` (else of the value)."""
    r = abs(v if ref is None else ref)
    if r == 0:
        return f"{v:.3g}"
    digits = max(0, 3 - math.floor(math.log10(r)) - 1)
    return f"{v:.{digits}f}"


def _count(v: float, ref: float | None = None) -> str:
    return f"{v:.1f}" if v != int(v) or (ref is not None and ref != int(ref)) else f"{v:.0f}"


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    direction: Direction
    fmt: Callable[[float, float | None], str]
    """Formats a value; given a reference (the mean, for a std), with its precision."""


METRICS: tuple[Metric, ...] = (
    Metric("p99_ms", "End-to-end P99 (ms)", "min", _ms),
    Metric("p50_ms", "End-to-end P50 (ms)", "min", _ms),
    Metric(
        "slo_violation_rate", "SLO violation rate (% of requests slower than the SLO)", "min", _pct
    ),
    Metric(
        "effective_cost",
        "Effective cost (US$ over the scored period, GPU billed at its rho share)",
        "min",
        _usd,
    ),
    Metric(
        "whole_gpu_cost",
        "Whole-GPU cost (US$, every GPU replica billed as a whole GPU)",
        "min",
        _usd,
    ),
    Metric("cost_per_1k_requests", "Effective cost per 1K requests (US$)", "min", _usd),
    Metric("actions", "Scaling actions (after warm-up)", None, _count),
    Metric("oscillations", "Oscillations (reversals within 2 control intervals)", "min", _count),
    Metric("bottleneck_accuracy", "Bottleneck detection accuracy (% of ticks)", "max", _pct),
)
LLM_METRICS: tuple[Metric, ...] = (
    Metric("llm_calls", "LLM calls", None, _count),
    Metric("llm_tokens", "LLM tokens (prompt + completion)", None, _count),
    Metric("llm_fallbacks", "LLM fallbacks to the embedded policy", None, _count),
)


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int

    def text(self, fmt: Callable[[float, float | None], str]) -> str:
        mean = fmt(self.mean, None)
        return mean if self.n < 2 else f"{mean} ± {fmt(self.std, self.mean)}"


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + sorted(v for v in seen if v not in preferred)


def cells(records: Sequence[Record]) -> list[tuple[str, str]]:
    """(pipeline, workload) cells present, in the canonical order."""
    pipes = _order((r["pipeline"] for r in records), PIPELINE_ORDER)
    loads = _order((r["workload"] for r in records), WORKLOAD_ORDER)
    have = {(r["pipeline"], r["workload"]) for r in records}
    return [(p, w) for p in pipes for w in loads if (p, w) in have]


def policies(records: Sequence[Record]) -> list[str]:
    """Policies present: SAIR's first, then in order of first appearance."""
    names = list(dict.fromkeys(r["policy"] for r in records))
    first = [n for n in (FOCUS, "llm") if n in names]
    return first + [n for n in names if n not in first]


def stat(
    records: Sequence[Record], pipeline: str, workload: str, policy: str, key: str
) -> Stat | None:
    """Mean and sample std of `key` over the seeds of one cell and policy (None values are
    left out; None when nothing is left)."""
    vals = [
        float(r[key])
        for r in records
        if r["pipeline"] == pipeline
        and r["workload"] == workload
        and r["policy"] == policy
        and r.get(key) is not None
    ]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Stat(statistics.fmean(vals), std, len(vals))


def best_policies(stats: Mapping[str, Stat | None], direction: Direction) -> set[str]:
    """Policies whose mean equals the best mean (relative tolerance 1e-9)."""
    known = {p: s.mean for p, s in stats.items() if s is not None}
    if direction is None or not known:
        return set()
    best = min(known.values()) if direction == "min" else max(known.values())
    tol = 1e-9 * max(abs(best), 1e-12)
    return {p for p, m in known.items() if abs(m - best) <= tol}


def within(
    stats: Mapping[str, Stat | None],
    policy: str,
    direction: Direction,
    tolerance: float = TOLERANCE,
) -> bool | None:
    """Whether `policy` is best or within `tolerance` (relative) of the best mean."""
    s = stats.get(policy)
    known = [x.mean for x in stats.values() if x is not None]
    if s is None or not known or direction is None:
        return None
    if direction == "min":
        best = min(known)
        return s.mean <= best * (1 + tolerance) + 1e-12
    best = max(known)
    return s.mean >= best * (1 - tolerance) - 1e-12


# --------------------------------------------------------------------------- Markdown


def markdown_table(records: Sequence[Record], metric: Metric) -> str:
    """One metric: a row per cell, a column per policy, best mean of each row in bold."""
    pols = policies(records)
    lines = [
        "| pipeline | workload | " + " | ".join(pols) + " |",
        "|---|---|" + "---:|" * len(pols),
    ]
    for pipe, load in cells(records):
        stats = {p: stat(records, pipe, load, p, metric.key) for p in pols}
        best = best_policies(stats, metric.direction)
        if best:
            # every mean that reads the same as the best one is bold too (0.0 and 0.0)
            top = stats[next(iter(best))]
            shown = metric.fmt(top.mean, None) if top is not None else None
            best |= {
                p for p, v in stats.items() if v is not None and metric.fmt(v.mean, None) == shown
            }
        row = []
        for p in pols:
            s = stats[p]
            text = "–" if s is None else s.text(metric.fmt)
            row.append(f"**{text}**" if p in best else text)
        lines.append(f"| {pipe} | {load} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def focus_summary(
    records: Sequence[Record], focus: str = FOCUS, tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """Per cell: is `focus` best/tied-best on P99, on effective cost, on both; and its burst
    P99 over HPA's per pipeline."""
    pols = policies(records)
    per_cell: list[dict[str, Any]] = []
    for pipe, load in cells(records):
        p99 = {p: stat(records, pipe, load, p, "p99_ms") for p in pols}
        cost = {p: stat(records, pipe, load, p, "effective_cost") for p in pols}
        ok_p99 = within(p99, focus, "min", tolerance)
        ok_cost = within(cost, focus, "min", tolerance)
        # cost among the policies whose mean P99 meets the SLO: the cheapest policy is often
        # one that adds nothing and breaks the SLO
        slo = _slo(records, pipe)
        meeting = {
            p: cost[p]
            for p, s in p99.items()
            if s is not None and slo is not None and s.mean <= slo
        }
        ok_cost_slo = within(meeting, focus, "min", tolerance) if focus in meeting else False

        def best_of(stats: Mapping[str, Stat | None]) -> str | None:
            known = {p: s.mean for p, s in stats.items() if s is not None}
            return min(known, key=lambda p: known[p]) if known else None

        per_cell.append(
            {
                "pipeline": pipe,
                "workload": load,
                "p99": ok_p99,
                "cost": ok_cost,
                "both": (ok_p99 and ok_cost)
                if ok_p99 is not None and ok_cost is not None
                else None,
                "cost_slo": ok_cost_slo,
                "best_p99": best_of(p99),
                "best_cost": best_of(cost),
                "best_cost_slo": best_of(meeting),
            }
        )
    burst: dict[str, float | None] = {}
    for pipe, load in cells(records):
        if load != "burst":
            continue
        mine = stat(records, pipe, load, focus, "p99_ms")
        ref = stat(records, pipe, load, REFERENCE_BASELINE, "p99_ms")
        if mine is not None and ref is not None and ref.mean > 0:
            burst[pipe] = mine.mean / ref.mean
    return {"cells": per_cell, "burst_p99_vs_hpa": burst}


def _slo(records: Sequence[Record], pipeline: str) -> float | None:
    for r in records:
        if r["pipeline"] == pipeline and r.get("slo_p99_ms") is not None:
            return float(r["slo_p99_ms"])
    return None


def headline(records: Sequence[Record], focus: str = FOCUS) -> dict[str, Any]:
    """The grid in a few numbers (the JSON summary's keys)."""
    if not records or focus not in {r["policy"] for r in records}:
        return {"cells": len(cells(records))}
    s = focus_summary(records, focus)
    per = s["cells"]
    return {
        "cells": len(per),
        f"{focus}_best_p99": sum(bool(c["p99"]) for c in per),
        f"{focus}_best_cost": sum(bool(c["cost"]) for c in per),
        f"{focus}_best_both": sum(bool(c["both"]) for c in per),
        f"{focus}_best_cost_meeting_slo": sum(bool(c["cost_slo"]) for c in per),
        f"{focus}_burst_p99_over_hpa": {k: round(v, 3) for k, v in s["burst_p99_vs_hpa"].items()},
    }


def markdown(records: Sequence[Record], meta: Mapping[str, Any] | None = None) -> str:
    """The whole results.md."""
    out = ["# Benchmark grid results", ""]
    if meta:
        cmd = meta.get("command")
        if cmd:
            out += [f"Command: `{cmd}`", ""]
        facts = ", ".join(f"{k} {v}" for k, v in meta.items() if k != "command")
        out += [facts, ""]
    out += [
        "Mean ± sample std across seeds; **bold**: the best mean of the row. Costs cover the "
        "scored period (after warm-up).",
        "",
    ]
    pols = policies(records)
    if FOCUS in pols:
        s = focus_summary(records)
        per = s["cells"]
        n = len(per)

        def mark(v: bool | None) -> str:
            return "–" if v is None else ("yes" if v else "no")

        out += [
            f"## {FOCUS} against the field (best or within {TOLERANCE:.0%} of the best mean)",
            "",
            f"P99: {sum(bool(c['p99']) for c in per)}/{n} cells; effective cost: "
            f"{sum(bool(c['cost']) for c in per)}/{n}; both: "
            f"{sum(bool(c['both']) for c in per)}/{n}; effective cost among the policies "
            f"whose mean P99 meets the SLO: {sum(bool(c['cost_slo']) for c in per)}/{n}.",
            "",
            "| pipeline | workload | P99 | cost | both | cost (SLO met) | best P99 | best cost "
            "| best cost (SLO met) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in per:
            out.append(
                f"| {c['pipeline']} | {c['workload']} | {mark(c['p99'])} | {mark(c['cost'])} "
                f"| {mark(c['both'])} | {mark(c['cost_slo'])} | {c['best_p99']} "
                f"| {c['best_cost']} | {c['best_cost_slo'] or '–'} |"
            )
        if s["burst_p99_vs_hpa"]:
            out += [
                "",
                f"Burst P99 of {FOCUS} / P99 of {REFERENCE_BASELINE} (< 1: {FOCUS} better):",
                "",
            ]
            out += [f"- {p}: {v:.3f}" for p, v in s["burst_p99_vs_hpa"].items()]
        out.append("")
    metrics = list(METRICS)
    if any(r.get("llm_calls") is not None for r in records):
        metrics += list(LLM_METRICS)
    for m in metrics:
        out += [f"## {m.title}", "", markdown_table(records, m), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scatter(records: Sequence[Record], pipeline: str, workload: str, path: Path) -> Path:
    """P99 against effective cost, one point (mean, with std bars) per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=100)
    slo = next((r.get("slo_p99_ms") for r in records if r["pipeline"] == pipeline), None)
    ys: list[float] = []
    for p in policies(records):
        c = stat(records, pipeline, workload, p, "effective_cost")
        y = stat(records, pipeline, workload, p, "p99_ms")
        if c is None or y is None:
            continue
        focus = p == FOCUS
        ax.errorbar(
            c.mean,
            y.mean,
            xerr=c.std,
            yerr=y.std,
            fmt="*" if focus else "o",
            markersize=12 if focus else 6,
            color="black" if focus else None,
            capsize=2,
            label=p,
        )
        ax.annotate(p, (c.mean, y.mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ys.append(y.mean)
    if slo:
        ax.axhline(slo, color="red", linestyle="--", linewidth=0.8, label=f"SLO {slo:g} ms")
    if ys and max(ys) > 20 * max(min(ys), 1e-9):
        ax.set_yscale("log")
    ax.set_xlabel("effective cost over the scored period (US$)")
    ax.set_ylabel("end-to-end P99 (ms)")
    ax.set_title(f"{pipeline} / {workload}: P99 vs effective cost")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_timeline(timelines: Sequence[Record], pipeline: str, path: Path) -> Path | None:
    """Load, replicas per stage, rho per GPU stage and per-tick P99, one line per policy."""
    runs = [t for t in timelines if t["pipeline"] == pipeline]
    if not runs:
        return None
    runs.sort(key=lambda t: (t["policy"] != FOCUS, t["policy"]))
    stages: list[str] = list(runs[0]["stages"])
    gpu: list[str] = list(runs[0]["gpu_stages"])
    rows = 1 + len(stages) + len(gpu) + 1
    plt = _pyplot()
    fig, axes = plt.subplots(rows, 1, figsize=(10, 1.9 * rows), sharex=True, dpi=90)
    first = runs[0]
    ax = axes[0]
    ax.plot(first["t_s"], first["load_rps"], color="grey", linewidth=2, label="offered")
    for t in runs:
        ax.plot(t["t_s"], t["completed_rps"], linewidth=0.8, label=f"{t['policy']} completed")
    ax.set_ylabel("rps")
    ax.set_title(f"{pipeline} under burst (seed {first['seed']})")
    ax.legend(fontsize=6, ncol=4, loc="upper right")

    def lines(ax: Any, field: str, stage: str | None, label: str) -> None:
        for t in runs:
            focus = t["policy"] == FOCUS
            series = t[field] if stage is None else t[field][stage]
            ax.step(
                t["t_s"],
                [math.nan if v is None else v for v in series],
                where="post",
                linewidth=2.2 if focus else 0.9,
                color="black" if focus else None,
                alpha=1.0 if focus else 0.75,
                label=t["policy"],
            )
        ax.set_ylabel(label, fontsize=8)

    i = 1
    for s in stages:
        lines(axes[i], "replicas", s, f"{s}\nreplicas")
        i += 1
    for s in gpu:
        lines(axes[i], "rho", s, f"{s}\nrho")
        axes[i].set_ylim(0, 1.05)
        i += 1
    ax = axes[i]
    lines(ax, "p99_ms", None, "P99 per tick\n(ms)")
    ax.axhline(first["slo_p99_ms"], color="red", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("simulated time (s)")
    axes[1].legend(fontsize=6, ncol=5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- files


def _plot_task(task: tuple[str, Sequence[Record], str, str, Path]) -> Path | None:
    kind, rows, pipeline, workload, path = task
    if kind == "scatter":
        return plot_scatter(rows, pipeline, workload, path)
    return plot_timeline(rows, pipeline, path)


def write_report(
    records: Sequence[Record],
    timelines: Sequence[Record],
    out_dir: Path,
    *,
    meta: Mapping[str, Any] | None = None,
    plots: bool = True,
    jobs: int = 1,
) -> list[Path]:
    """Write `results.md` and, with `plots`, `plots/*.png` (on `jobs` processes); returns
    the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text(markdown(records, meta))
    written = [md]
    if not plots:
        return written
    pdir = out_dir / "plots"
    pdir.mkdir(exist_ok=True)
    tasks: list[tuple[str, Sequence[Record], str, str, Path]] = []
    for pipe, load in cells(records):
        # only the cell's rows travel to a worker, but the whole pipeline's order of policies
        rows = [r for r in records if r["pipeline"] == pipe]
        tasks.append(("scatter", rows, pipe, load, pdir / f"scatter_{pipe}_{load}.png"))
    for pipe in _order((t["pipeline"] for t in timelines), PIPELINE_ORDER):
        rows = [t for t in timelines if t["pipeline"] == pipe]
        load = rows[0]["workload"]
        tasks.append(("timeline", rows, pipe, load, pdir / f"timeline_{pipe}_{load}.png"))
    if jobs > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_all_start_methods, get_context

        _pyplot()  # imported once here, inherited by forked workers
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=get_context(method)) as pool:
            done = list(pool.map(_plot_task, tasks))
    else:
        done = [_plot_task(t) for t in tasks]
    written.extend(p for p in done if p is not None)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Re-render DIR/results.md and DIR/plots from DIR/results.json (+ timelines.json)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sair.sim.report DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    records = json.loads((out / "results.json").read_text())
    tl_path = out / "timelines.json"
    timelines = json.loads(tl_path.read_text()) if tl_path.exists() else []
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    for p in write_report(records, timelines, out, meta=meta, jobs=2):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What `sair up` shows: the run record, the live terminal view, the summary, the timeline plot.

`RunRecord` folds the messages the launcher's observer receives (telemetry, actions, action
results, replica status, requests and completions) into plain state; it does no I/O and reads
no clock of its own (every `on_*` takes `now`), so tests and the view share it. The renderers
read a record: `render_view` (a rich renderable, refreshed ~2/s), `compact_line` (one line per
telemetry tick, for logs and non-TTY output), `format_summary` and `plot_timeline` (a PNG,
matplotlib Agg).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.messages import (
    ActionResult,
    Completion,
    PipelineTelemetry,
    ReplicaStatus,
    ScalingAction,
)
from schemas.pipeline import PipelineSpec

RECENT_ACTIONS = 8
MAX_TIMELINE_POINTS = 50_000
"""Telemetry points kept for the plot (about 28 h at a 2 s tick)."""
MAX_MARKERS = 10_000
RATIONALE_CHARS = 110


@dataclass(frozen=True)
class StagePoint:
    ready: int
    starting: int
    draining: int
    desired: int | None
    rho: float | None
    queue: int | None
    utilisation: float | None


@dataclass(frozen=True)
class TimelinePoint:
    t_s: float
    """Seconds since the record started."""
    arrival_rps: float | None
    completed_rps: float | None
    e2e_p99_ms: float | None
    cost_per_h: float
    whole_gpu_cost_per_h: float
    bottleneck: str | None
    stages: dict[str, StagePoint]


@dataclass(frozen=True)
class ActionMark:
    t_s: float
    action_id: str
    source: str
    targets: str
    rationale: str
    bottleneck: str | None


def describe_targets(action: ScalingAction) -> str:
    return ", ".join(
        f"{a.stage}={a.target_replicas}" + (f"@{a.rho:g}" if a.rho is not None else "")
        for a in action.stages
    )


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    # nearest-rank: the value below which q of the sample lies (no interpolation)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


@dataclass
class RunRecord:
    """Everything seen during one run, folded from bus messages (pure)."""

    spec: PipelineSpec
    t0_s: float
    """Wall clock (epoch seconds) the record counts from."""
    load_started_s: float | None = None
    load_ended_s: float | None = None
    baseline_until_s: float | None = None
    """Requests sent before this (wall clock) form the baseline: the load before any burst."""
    warmup_until_s: float | None = None
    """Requests created before this are the warm-up's: not counted (inf while warming up)."""
    latest: PipelineTelemetry | None = None
    replicas: ReplicaStatus | None = None
    timeline: deque[TimelinePoint] = field(
        default_factory=lambda: deque(maxlen=MAX_TIMELINE_POINTS)
    )
    recent: deque[ActionMark] = field(default_factory=lambda: deque(maxlen=RECENT_ACTIONS))
    marks: deque[ActionMark] = field(default_factory=lambda: deque(maxlen=MAX_MARKERS))
    actions_total: int = 0
    actions_by_source: Counter[str] = field(default_factory=Counter)
    results_by_status: Counter[str] = field(default_factory=Counter)
    result_of: dict[str, str] = field(default_factory=dict)
    episodes_published: int = 0
    episodes_stored: int | None = None
    replica_changes: int = 0
    rho_changes: int = 0
    max_ready: dict[str, int] = field(default_factory=dict)
    min_ready: dict[str, int] = field(default_factory=dict)
    sent_ids: set[str] = field(default_factory=set)
    completed_ids: set[str] = field(default_factory=set)
    duplicate_completions: int = 0
    failed_completions: int = 0
    created_s: array[float] = field(default_factory=lambda: array("d"))
    e2e_ms: array[float] = field(default_factory=lambda: array("d"))
    loadgen: list[dict[str, Any]] = field(default_factory=list)
    """The load generator's own end-of-run summaries (one per segment)."""
    _desired: dict[str, int] = field(default_factory=dict)
    _rho: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ folding messages

    def rel(self, ts_s: float) -> float:
        return ts_s - self.t0_s

    def on_telemetry(self, t: PipelineTelemetry) -> None:
        self.latest = t
        stages = {
            s.stage: StagePoint(
                ready=s.replicas_ready,
                starting=s.replicas_starting,
                draining=s.replicas_draining,
                desired=s.replicas_desired,
                rho=s.rho,
                queue=s.queue_depth,
                utilisation=s.utilisation,
            )
            for s in t.stages
        }
        for s in t.stages:
            if s.rho is not None:
                old = self._rho.get(s.stage)
                if old is not None and not math.isclose(old, s.rho):
                    self.rho_changes += 1
                self._rho[s.stage] = s.rho
        self.timeline.append(
            TimelinePoint(
                t_s=self.rel(t.ts_s),
                arrival_rps=t.arrival_rate_rps,
                completed_rps=t.completed_rps,
                e2e_p99_ms=t.e2e_p99_ms,
                cost_per_h=t.cost_per_h,
                whole_gpu_cost_per_h=t.whole_gpu_cost_per_h,
                bottleneck=t.bottleneck,
                stages=stages,
            )
        )

    def on_replicas(self, status: ReplicaStatus) -> None:
        self.replicas = status
        for s in status.stages:
            old = self._desired.get(s.stage)
            if old is not None and old != s.desired:
                self.replica_changes += 1
            self._desired[s.stage] = s.desired
            self.max_ready[s.stage] = max(self.max_ready.get(s.stage, 0), s.ready)
            if s.ready > 0:
                self.min_ready[s.stage] = min(self.min_ready.get(s.stage, s.ready), s.ready)

    def on_action(self, action: ScalingAction) -> None:
        self.actions_total += 1
        self.actions_by_source[action.source] += 1
        mark = ActionMark(
            t_s=self.rel(action.ts_s),
            action_id=action.action_id,
            source=action.source,
            targets=describe_targets(action),
            rationale=action.rationale,
            bottleneck=action.bottleneck,
        )
        self.recent.append(mark)
        self.marks.append(mark)

    def on_result(self, result: ActionResult) -> None:
        self.results_by_status[result.status] += 1
        self.result_of[result.action_id] = result.status
        if len(self.result_of) > 4 * MAX_MARKERS:  # keep the map bounded on long runs
            for key in list(self.result_of)[: MAX_MARKERS]:
                del self.result_of[key]

    def _warmup(self, created_ts_s: float) -> bool:
        return self.warmup_until_s is not None and created_ts_s < self.warmup_until_s

    def on_request(self, request_id: str, created_ts_s: float) -> None:
        if not self._warmup(created_ts_s):
            self.sent_ids.add(request_id)

    def on_completion(self, c: Completion) -> None:
        if self._warmup(c.created_ts_s):
            return
        if c.request_id in self.completed_ids:
            self.duplicate_completions += 1
            return
        self.completed_ids.add(c.request_id)
        if not c.ok:
            self.failed_completions += 1
        self.created_s.append(c.created_ts_s)
        self.e2e_ms.append(c.e2e_ms)

    def on_episode(self) -> None:
        self.episodes_published += 1

    # ------------------------------------------------------------------ derived figures

    def elapsed_s(self, now: float) -> float:
        return now - self.t0_s

    def load_rps(self) -> float | None:
        return self.latest.arrival_rate_rps if self.latest else None

    def _load_window(self) -> tuple[float, float]:
        start = self.load_started_s if self.load_started_s is not None else self.t0_s
        end = self.load_ended_s if self.load_ended_s is not None else math.inf
        return start, end

    def tail_window_s(self) -> float:
        """How much of the end of the load the 'after the burst' figures look at."""
        start, end = self._load_window()
        span = (end - start) if math.isfinite(end) else 60.0
        return max(5.0, min(30.0, 0.25 * span))

    def tail_p99_ms(self) -> float | None:
        """P99 of the requests sent during the last `tail_window_s` of the load."""
        start, end = self._load_window()
        if not math.isfinite(end):
            end = max(self.created_s, default=start)
        lo = end - self.tail_window_s()
        tail = [e for c, e in zip(self.created_s, self.e2e_ms, strict=True) if c >= lo]
        return _quantile(tail, 0.99)

    def baseline_p99_ms(self) -> float | None:
        """P99 of the requests sent before `baseline_until_s` (the load before the burst)."""
        if self.baseline_until_s is None:
            return None
        until = self.baseline_until_s
        return _quantile([e for c, e in zip(self.created_s, self.e2e_ms, strict=True)
                          if c < until], 0.99)  # fmt: skip

    def mean_cost(self) -> tuple[float | None, float | None]:
        """Time-averaged effective and whole-GPU cost per hour over the load period."""
        start, end = self._load_window()
        pts = [p for p in self.timeline if self.rel(start) <= p.t_s <= self.rel(end)]
        if not pts:
            pts = list(self.timeline)
        if not pts:
            return None, None
        eff = sum(p.cost_per_h for p in pts) / len(pts)
        whole = sum(p.whole_gpu_cost_per_h for p in pts) / len(pts)
        return eff, whole

    def summary(self) -> dict[str, Any]:
        slo = self.spec.slo_p99_ms
        lat = list(self.e2e_ms)
        eff, whole = self.mean_cost()
        start, end = self._load_window()
        hours = ((end - start) / 3600.0) if math.isfinite(end) else None
        gen = self._loadgen_totals()
        sent = gen["sent"] if gen else len(self.sent_ids)
        completed = gen["completed"] if gen else len(self.completed_ids)
        final_p99 = self.latest.e2e_p99_ms if self.latest else None
        tail = self.tail_p99_ms()
        return {
            "pipeline": self.spec.name,
            "slo_p99_ms": slo,
            "load_s": _r(end - start) if math.isfinite(end) else None,
            "requests_sent": sent,
            "requests_completed": completed,
            "requests_lost": sent - completed,
            "duplicate_completions": (gen["duplicates"] if gen else self.duplicate_completions),
            "p50_ms": _r(_quantile(lat, 0.50)),
            "p99_ms": _r(_quantile(lat, 0.99)),
            "slo_attainment": (
                round(sum(1 for x in lat if x <= slo) / len(lat), 4) if lat else None
            ),
            "baseline_p99_ms": _r(self.baseline_p99_ms()),
            "tail_window_s": _r(self.tail_window_s()),
            "tail_p99_ms": _r(tail),
            "tail_p99_under_slo": (tail is not None and tail <= slo),
            "final_window_p99_ms": _r(final_p99),
            "effective_cost_per_h": _r(eff, 4),
            "whole_gpu_cost_per_h": _r(whole, 4),
            "effective_cost": _r(eff * hours, 5) if eff is not None and hours else None,
            "actions": self.actions_total,
            "actions_by_source": dict(self.actions_by_source),
            "results_by_status": dict(self.results_by_status),
            "replica_changes": self.replica_changes,
            "rho_changes": self.rho_changes,
            "max_ready": dict(self.max_ready),
            "min_ready": dict(self.min_ready),
            "episodes_published": self.episodes_published,
            "episodes_stored": self.episodes_stored,
            "telemetry_ticks": len(self.timeline),
        }

    def _loadgen_totals(self) -> dict[str, int] | None:
        if not self.loadgen:
            return None
        return {
            key: sum(int(s.get(key) or 0) for s in self.loadgen)
            for key in ("sent", "completed", "duplicates")
        }


# --------------------------------------------------------------------------- text


def _fmt(x: float | None, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def compact_line(record: RunRecord, now: float) -> str:
    """One line per telemetry tick (non-TTY output and logs)."""
    t = record.latest
    head = f"t={record.elapsed_s(now):6.1f}s"
    if t is None:
        return f"{head} waiting for telemetry"
    parts = [f"{head} load {_fmt(t.arrival_rate_rps, '.1f')} rps"]
    for s in t.stages:
        rho = f" rho {s.rho:.2f}" if s.rho is not None else ""
        parts.append(
            f"{s.stage} {s.replicas_ready}r"
            + (f"+{s.replicas_starting}" if s.replicas_starting else "")
            + (f"-{s.replicas_draining}" if s.replicas_draining else "")
            + f"{rho} q {_fmt(s.queue_depth, 'd')} u {_fmt(s.utilisation, '.2f')}"
        )
    parts.append(f"p99 {_fmt(t.e2e_p99_ms)}/{t.slo_p99_ms:.0f} ms")
    if t.bottleneck:
        parts.append(f"bottleneck {t.bottleneck} ({t.bottleneck_confidence:.2f})")
    parts.append(f"actions {record.actions_total}")
    return " | ".join(parts)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as a few human lines."""
    slo = summary["slo_p99_ms"]
    att = summary["slo_attainment"]
    lines = [
        f"SAIR run summary: {summary['pipeline']} "
        f"({summary.get('workload', '?')} load, policy {summary.get('policy', '?')}, "
        f"{_fmt(summary['load_s'])} s)",
        f"  requests     {summary['requests_sent']} sent, {summary['requests_completed']} "
        f"completed, {summary['requests_lost']} lost",
        f"  latency      P50 {_fmt(summary['p50_ms'])} ms, P99 {_fmt(summary['p99_ms'])} ms "
        f"(SLO {slo:.0f} ms), attainment {'-' if att is None else f'{100 * att:.1f}%'}",
        f"  recovery     P99 {_fmt(summary['baseline_p99_ms'])} ms before the burst, "
        f"{_fmt(summary['tail_p99_ms'])} ms over the last {_fmt(summary['tail_window_s'])} s "
        f"of load ({'under' if summary['tail_p99_under_slo'] else 'NOT under'} the SLO)",
        f"  cost         {_fmt(summary['effective_cost_per_h'], '.3f')} $/h effective "
        f"(whole-GPU billing {_fmt(summary['whole_gpu_cost_per_h'], '.3f')} $/h)",
        f"  actions      {summary['actions']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(summary['actions_by_source'].items()))}); "
        f"results {', '.join(f'{k} {v}' for k, v in sorted(summary['results_by_status'].items()))}",
        f"  replicas     {summary['replica_changes']} changes; max ready "
        f"{', '.join(f'{k} {v}' for k, v in summary['max_ready'].items())}; "
        f"rho changes {summary['rho_changes']}",
        f"  learning     {summary['episodes_published']} episodes published, "
        f"{_fmt(summary['episodes_stored'], 'd')} stored in the retriever",
    ]
    if summary.get("summary_path"):
        lines.append(f"  written      {summary['summary_path']}, {summary.get('timeline_path')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- rich view


def render_view(record: RunRecord, now: float, title: str, duration_s: float | None) -> Any:
    """The live view: stage table, end-to-end line, the last actions."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = record.latest
    elapsed = record.elapsed_s(now)
    load_s = record.elapsed_s(now) - (
        record.rel(record.load_started_s) if record.load_started_s is not None else elapsed
    )
    clock = f"{elapsed:5.0f} s"
    if record.load_started_s is None:
        clock += " (warm-up)" if record.warmup_until_s is not None else " (starting workers)"
    elif duration_s is not None:
        done = load_s >= duration_s
        clock += f" (load {min(load_s, duration_s):.0f}/{duration_s:.0f} s" + (
            ", draining)" if done else ")")
    header = Text.assemble(
        (f"{title}  ", "bold"), ("elapsed ", "dim"), clock,
        ("   load ", "dim"), f"{_fmt(record.load_rps(), '.1f')} rps",
    )  # fmt: skip

    stages = Table(expand=False, header_style="bold", box=None, pad_edge=False)
    for col, justify in (
        ("stage", "left"), ("kind", "left"), ("want", "right"), ("ready", "right"),
        ("start", "right"), ("drain", "right"), ("rho", "right"), ("queue", "right"),
        ("util", "right"), ("arrive rps", "right"), ("P99 in stage ms", "right"),
    ):  # fmt: skip
        stages.add_column(col, justify=justify)  # type: ignore[arg-type]
    if t is not None:
        for s in t.stages:
            bottleneck = t.bottleneck == s.stage
            p99 = s.sojourn_ms.p99_ms if s.sojourn_ms else None
            stages.add_row(
                Text(s.stage + (" *" if bottleneck else ""), "bold red" if bottleneck else ""),
                s.kind,
                _fmt(s.replicas_desired, "d"),
                str(s.replicas_ready),
                str(s.replicas_starting or ""),
                str(s.replicas_draining or ""),
                _fmt(s.rho, ".2f"),
                _fmt(s.queue_depth, "d"),
                _fmt(s.utilisation, ".2f"),
                _fmt(s.arrival_rate_rps, ".1f"),
                _fmt(p99),
            )
    slo = record.spec.slo_p99_ms
    e2e = t.e2e_p99_ms if t else None
    ok = e2e is not None and e2e <= slo
    att = t.slo_attainment if t else None
    e2e_line = Text.assemble(
        ("end-to-end P99 ", "dim"),
        (f"{_fmt(e2e)} ms", "bold green" if ok else ("bold red" if e2e is not None else "")),
        f" / SLO {slo:.0f} ms",
        ("   attainment ", "dim"), "-" if att is None else f"{100 * att:.1f}%",
        ("   cost ", "dim"), f"{_fmt(t.cost_per_h if t else None, '.3f')} $/h",
        ("  (whole-GPU ", "dim"),
        f"{_fmt(t.whole_gpu_cost_per_h if t else None, '.3f')}", (")", "dim"),
    )  # fmt: skip
    bn = (
        f"{t.bottleneck} (confidence {t.bottleneck_confidence:.2f})"
        if t is not None and t.bottleneck
        else "none"
    )
    bn_line = Text.assemble(
        ("bottleneck ", "dim"), (bn, "bold"),
        ("   actions ", "dim"), str(record.actions_total),
        ("   episodes ", "dim"), str(record.episodes_published),
        ("   completed ", "dim"), f"{len(record.completed_ids)}/{len(record.sent_ids)}",
    )  # fmt: skip

    acts = Table(expand=False, header_style="bold", box=None, pad_edge=False)
    for col in ("t s", "source", "targets", "result", "rationale"):
        acts.add_column(col, overflow="fold" if col == "rationale" else "ellipsis")
    for m in reversed(record.recent):
        acts.add_row(
            f"{m.t_s:.0f}",
            m.source,
            m.targets,
            record.result_of.get(m.action_id, "…"),
            m.rationale[:RATIONALE_CHARS] + ("…" if len(m.rationale) > RATIONALE_CHARS else ""),
        )
    if not record.recent:
        acts.add_row("", "", "(no action yet)", "", "")
    return Group(header, Text(""), stages, Text(""), e2e_line, bn_line, Text(""),
                 Text("last actions", style="bold"), acts)  # fmt: skip


def view_text(record: RunRecord, now: float, title: str, duration_s: float | None,
              width: int = 130) -> str:  # fmt: skip
    """The live view rendered once as plain text (for docs and logs)."""
    import io

    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(render_view(record, now, title, duration_s))
    return console.export_text()


# --------------------------------------------------------------------------- timeline plot


def plot_timeline(record: RunRecord, path: Path) -> Path:
    """Load, replicas per stage, rho, P99 with the SLO line; actions as vertical marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = list(record.timeline)
    origin = record.rel(record.load_started_s) if record.load_started_s is not None else 0.0
    xs = [p.t_s - origin for p in pts]
    names = record.spec.stage_names
    gpu = [s.name for s in record.spec.stages if s.kind == "gpu"]
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    ax_load, ax_rep, ax_rho, ax_p99 = axes
    window = f"{record.latest.window_s:.0f} s" if record.latest else "monitor"
    ax_load.plot(xs, [p.arrival_rps for p in pts], label=f"arrivals ({window} window)",
                 color="tab:blue")  # fmt: skip
    ax_load.plot(xs, [p.completed_rps for p in pts], label="completed", color="tab:green",
                 alpha=0.7)  # fmt: skip
    ax_load.set_ylabel("requests/s")
    ax_load.legend(loc="upper right", fontsize=8)
    for name in names:
        ax_rep.step(xs, [p.stages[name].ready if name in p.stages else None for p in pts],
                    where="post", label=name)  # fmt: skip
    ax_rep.set_ylabel("ready replicas")
    ax_rep.legend(loc="upper right", fontsize=8)
    for name in gpu:
        ax_rho.step(xs, [p.stages[name].rho if name in p.stages else None for p in pts],
                    where="post", label=name)  # fmt: skip
    ax_rho.set_ylabel("rho (GPU share)")
    ax_rho.set_ylim(0, 1.05)
    if gpu:
        ax_rho.legend(loc="upper right", fontsize=8)
    ax_p99.plot(xs, [p.e2e_p99_ms for p in pts], color="tab:red", label=f"P99 ({window} window)")
    ax_p99.axhline(record.spec.slo_p99_ms, color="black", linestyle="--", label="SLO")
    ax_p99.set_ylabel("end-to-end ms")
    if any(p.e2e_p99_ms for p in pts):
        ax_p99.set_yscale("log")
    ax_p99.legend(loc="upper right", fontsize=8)
    ax_p99.set_xlabel("seconds since the load started")
    colours = {"reflex": "tab:orange", "embedded": "tab:purple", "llm": "tab:cyan",
               "explore": "tab:olive", "baseline": "tab:gray", "manual": "tab:brown"}  # fmt: skip
    for m in record.marks:
        for ax in axes:
            ax.axvline(m.t_s - origin, color=colours.get(m.source, "gray"), alpha=0.35, lw=1)
    if record.load_ended_s is not None:
        for ax in axes:
            ax.axvline(record.rel(record.load_ended_s) - origin, color="black", alpha=0.3, lw=1)
    fig.suptitle(f"SAIR closed loop: {record.spec.name} (vertical lines: actions)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- reporter


class Reporter:
    """Shows a running record: `rich` (live view), `lines` (one line per tick) or `none`."""

    def __init__(self, record: RunRecord, mode: str, title: str, duration_s: float | None,
                 stream: Any = None) -> None:  # fmt: skip
        if mode not in ("rich", "lines", "none"):
            raise ValueError(f"mode={mode!r}: must be rich, lines or none")
        self.record = record
        self.mode = mode
        self.title = title
        self.duration_s = duration_s
        self.stream = stream
        self._live: Any = None

    def start(self, now: float) -> None:
        if self.mode == "rich":
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream) if self.stream is not None else Console()
            self._live = Live(
                render_view(self.record, now, self.title, self.duration_s),
                console=console, auto_refresh=False, transient=False,
                redirect_stdout=False, redirect_stderr=False,
            )  # fmt: skip
            self._live.start()

    def on_telemetry(self, now: float) -> None:
        if self.mode == "lines":
            import sys

            print(compact_line(self.record, now), file=self.stream or sys.stdout, flush=True)

    def refresh(self, now: float) -> None:
        if self._live is not None:
            self._live.update(
                render_view(self.record, now, self.title, self.duration_s), refresh=True
            )

    def close(self, now: float) -> None:
        if self._live is not None:
            self.refresh(now)
            self._live.stop()
            self._live = None

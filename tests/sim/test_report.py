"""The grid's report: Markdown tables (mean ± std, best in bold), SAIR's summary, PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from sair.sim import report
from sair.sim.report import METRICS, markdown_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(policy: str, pipeline: str, workload: str, seed: int, **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "policy": policy, "pipeline": pipeline, "workload": workload, "seed": seed,
        "p99_ms": 100.0, "p50_ms": 50.0, "slo_violation_rate": 0.0, "effective_cost": 1.0,
        "whole_gpu_cost": 2.0, "cost_per_1k_requests": 0.01, "actions": 3, "oscillations": 0,
        "bottleneck_accuracy": 0.5, "completed": 1000, "wall_s": 1.0, "slo_p99_ms": 250.0,
    }  # fmt: skip
    base.update(values)
    return base


def _hand_made() -> list[dict[str, Any]]:
    """Two cells, three policies, two seeds each, numbers chosen by hand."""
    recs = []
    # imgcls/burst: sair p99 100/120 (mean 110), hpa 300/500 (400), kpa 105/111 (108: best)
    for pol, p99s, costs, acc in (
        ("sair", (100.0, 120.0), (2.0, 2.2), (0.9, 0.8)),
        ("hpa", (300.0, 500.0), (1.0, 1.0), (0.5, 0.5)),
        ("kpa", (105.0, 111.0), (3.0, 3.0), (0.85, 0.85)),
    ):
        for seed in (0, 1):
            recs.append(_rec(pol, "imgcls", "burst", seed, p99_ms=p99s[seed],
                             effective_cost=costs[seed], bottleneck_accuracy=acc[seed]))  # fmt: skip
    # nlp/poisson: sair and hpa tie on p99 (both 90), kpa has no P99 (None: no requests)
    for pol, p99, cost in (("sair", 90.0, 1.02), ("hpa", 90.0, 1.0), ("kpa", None, 5.0)):
        for seed in (0, 1):
            recs.append(_rec(pol, "nlp", "poisson", seed, p99_ms=p99, effective_cost=cost))
    return recs


def _rows(table: str) -> dict[tuple[str, str], list[str]]:
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].startswith("|---")
    out: dict[tuple[str, str], list[str]] = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        out[(cells[0], cells[1])] = cells[2:]
    assert header[:2] == ["pipeline", "workload"]
    return out


def metric(key: str) -> report.Metric:
    return next(m for m in METRICS if m.key == key)


def test_table_shows_mean_and_std_and_bolds_the_lowest_p99() -> None:
    table = markdown_table(_hand_made(), metric("p99_ms"))
    assert table.splitlines()[0] == "| pipeline | workload | sair | hpa | kpa |"
    rows = _rows(table)
    # sample std, with the mean's precision: 14.14 -> 14, 141.4 -> 141, 4.24 -> 4
    assert math.sqrt(((100 - 110) ** 2 + (120 - 110) ** 2) / 1) == pytest.approx(14.14, 1e-3)
    assert rows[("imgcls", "burst")] == ["110 ± 14", "400 ± 141", "**108 ± 4**"]
    # a tie bolds both; a policy without a value shows a dash
    assert rows[("nlp", "poisson")] == ["**90.0 ± 0.0**", "**90.0 ± 0.0**", "–"]


def test_higher_is_better_for_accuracy_and_actions_have_no_best() -> None:
    acc = _rows(markdown_table(_hand_made(), metric("bottleneck_accuracy")))
    assert acc[("imgcls", "burst")][0].startswith("**85.0")  # sair 0.9/0.8 -> 85.0%
    assert acc[("imgcls", "burst")][2].startswith("**85.0")  # kpa 85.0% ties
    assert not acc[("imgcls", "burst")][1].startswith("**")
    acts = _rows(markdown_table(_hand_made(), metric("actions")))
    assert all("**" not in c for row in acts.values() for c in row)


def test_means_that_read_the_same_as_the_best_are_bold_too() -> None:
    recs = [
        _rec("sair", "video", "ramp", 0, slo_violation_rate=0.0),
        _rec("hpa", "video", "ramp", 0, slo_violation_rate=0.00001),  # shows as 0.0 %
        _rec("kpa", "video", "ramp", 0, slo_violation_rate=0.002),  # 0.2 %
    ]
    rows = _rows(markdown_table(recs, metric("slo_violation_rate")))
    assert rows[("video", "ramp")] == ["**0.0**", "**0.0**", "0.2"]


def test_single_seed_has_no_std() -> None:
    recs = [_rec("sair", "video", "ramp", 0, p99_ms=321.0), _rec("hpa", "video", "ramp", 0)]
    rows = _rows(markdown_table(recs, metric("p99_ms")))
    assert rows[("video", "ramp")] == ["321", "**100**"]


def test_focus_summary_counts_cells_within_five_percent() -> None:
    s = report.focus_summary(_hand_made())
    by = {(c["pipeline"], c["workload"]): c for c in s["cells"]}
    burst = by[("imgcls", "burst")]
    assert burst["p99"] is True  # 110 <= 108 x 1.05
    assert burst["cost"] is False  # 2.1 vs 1.0
    assert burst["both"] is False and burst["best_p99"] == "kpa" and burst["best_cost"] == "hpa"
    # among the policies meeting the 250 ms SLO (sair, kpa; hpa's 400 misses it) sair is cheapest
    assert burst["cost_slo"] is True and burst["best_cost_slo"] == "sair"
    pois = by[("nlp", "poisson")]
    assert pois["p99"] is True and pois["cost"] is True and pois["both"] is True  # 1.02 <= 1.05
    assert s["burst_p99_vs_hpa"] == {"imgcls": pytest.approx(110 / 400)}
    head = report.headline(_hand_made())
    assert head["cells"] == 2 and head["sair_best_p99"] == 2 and head["sair_best_both"] == 1


def test_markdown_report_has_every_metric_table() -> None:
    md = report.markdown(_hand_made(), {"command": "sair bench --quick", "seeds": 2})
    assert "`sair bench --quick`" in md
    for m in METRICS:
        assert f"## {m.title}" in md
    assert "P99: 2/2 cells" in md


def test_plots_are_valid_png_files(tmp_path: Path) -> None:
    recs = _hand_made()
    t = [float(2 * i) for i in range(1, 31)]
    timelines = [
        {
            "policy": pol,
            "pipeline": "imgcls",
            "workload": "burst",
            "seed": 0,
            "slo_p99_ms": 250.0,
            "warmup_s": 10.0,
            "stages": ["pre", "infer", "post"],
            "gpu_stages": ["infer"],
            "t_s": t,
            "load_rps": [20.0 if i % 10 < 5 else 60.0 for i in range(30)],
            "completed_rps": [19.0] * 30,
            "p99_ms": [None] + [120.0 + k for k in range(29)],
            "cost_per_h": [1.0] * 30,
            "replicas": {"pre": [1] * 15 + [2] * 15, "infer": [1] * 30, "post": [1] * 30},
            "ready": {"pre": [1] * 30, "infer": [1] * 30, "post": [1] * 30},
            "rho": {"pre": [None] * 30, "infer": [0.2] * 10 + [0.6] * 20, "post": [None] * 30},
            "queue_depth": {"pre": [0] * 30, "infer": [3] * 30, "post": [0] * 30},
        }
        for pol in ("sair", "hpa")
    ]
    written = report.write_report(recs, timelines, tmp_path, jobs=2)
    names = sorted(p.name for p in written)
    assert names == sorted([
        "results.md", "scatter_imgcls_burst.png", "scatter_nlp_poisson.png",
        "timeline_imgcls_burst.png",
    ])  # fmt: skip
    for p in written:
        if p.suffix != ".png":
            continue
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300

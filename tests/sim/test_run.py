"""The run loop: policy isolation, scoring, the monitor adapter, ground truth."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from sair.sim.adapters import MonitorTelemetry
from sair.sim.engine import Engine, TrueStage
from sair.sim.profiles import reference_profile
from sair.sim.run import RunResult, poisson, run_simulation
from sair.sim.truth import true_bottleneck
from schemas.messages import PipelineTelemetry
from schemas.pipeline import PipelineSpec, load_pipeline_spec

from .helpers import HoldPolicy, ScaleAt

Plan = list[tuple[float, dict[str, tuple[int, float | None]]]]


def imgcls() -> PipelineSpec:
    return load_pipeline_spec("sair/pipelines/specs/imgcls.toml")


def _same(a: RunResult, b: RunResult) -> bool:
    skip = {"wall_s", "speedup"}
    da = {k: v for k, v in a.summary().items() if k not in skip}
    db = {k: v for k, v in b.summary().items() if k not in skip}
    return da == db and a.timeline == b.timeline


def test_policy_gets_only_telemetry_spec_and_its_own_state() -> None:
    spec = imgcls()
    policy = HoldPolicy()
    res = run_simulation(
        spec, reference_profile("imgcls"), poisson(80), policy, seed=3, duration_s=40
    )
    assert len(policy.calls) == 20 == len(res.timeline)
    for i, (got_spec, tel, state, now, retrieved) in enumerate(policy.calls):
        assert got_spec is spec
        assert type(tel) is PipelineTelemetry
        assert state == i, "the state is the policy's own, passed back unchanged"
        assert now == pytest.approx(2.0 * (i + 1))
        assert retrieved == ()
        # Nothing of the simulator's ground truth is reachable from what the policy got.
        for value in (got_spec, tel, state, now, retrieved):
            assert not isinstance(value, Engine | TrueStage)
        assert "bottleneck_true" not in tel.model_dump_json()


def test_same_seed_same_result_other_seed_differs() -> None:
    spec, prof = imgcls(), reference_profile("imgcls")
    plan: Plan = [(10.0, {"pre": (3, None), "infer": (2, 0.5)})]
    a = run_simulation(spec, prof, poisson(120), ScaleAt(list(plan)), seed=1, duration_s=60)
    b = run_simulation(spec, prof, poisson(120), ScaleAt(list(plan)), seed=1, duration_s=60)
    c = run_simulation(spec, prof, poisson(120), ScaleAt(list(plan)), seed=2, duration_s=60)
    assert _same(a, b)
    assert not _same(a, c)
    assert a.p99_ms != c.p99_ms


def test_actions_and_oscillations_are_counted() -> None:
    spec = imgcls()  # control interval 30 s: a reversal within 60 s is an oscillation
    plan: Plan = [
        (10.0, {"pre": (2, None)}),
        (30.0, {"pre": (1, None)}),  # reversal after 20 s
        (200.0, {"pre": (2, None)}),  # reversal after 170 s: not an oscillation
        (204.0, {"pre": (2, None)}),  # no change: not an action
    ]
    res = run_simulation(
        spec, reference_profile("imgcls"), poisson(30), ScaleAt(plan), seed=1, duration_s=240
    )
    assert res.scaling_actions == 3
    assert res.oscillations == 1
    acted = [r.t_s for r in res.timeline if r.action]
    assert acted == [10.0, 30.0, 200.0]
    assert res.timeline[-1].replicas["pre"] == 2


def test_metrics_of_an_overloaded_and_a_comfortable_run() -> None:
    spec, prof = imgcls(), reference_profile("imgcls")
    # infer at rho 0.2: ~50 ms per image, 20 rps capacity against 40 rps.
    bad = run_simulation(spec, prof, poisson(40), HoldPolicy(), seed=4, duration_s=120, warmup_s=20)
    ok = run_simulation(
        spec,
        prof,
        poisson(40),
        ScaleAt([(0.0, {"pre": (2, None), "infer": (1, 1.0)})]),
        seed=4,
        duration_s=120,
        warmup_s=20,
    )
    assert bad.p99_ms is not None and ok.p99_ms is not None
    assert bad.p99_ms > 10 * spec.slo_p99_ms > ok.p99_ms
    assert bad.incomplete > 1000 and ok.incomplete < 10
    assert bad.slo_violation_rate is not None and bad.slo_violation_rate > 0.9
    assert ok.slo_violation_rate is not None and ok.slo_violation_rate < 0.01
    assert bad.slo_window_violation_rate == 1.0 and ok.slo_window_violation_rate == 0.0
    # Truth and the monitor agree that the starved GPU stage is the bottleneck.
    assert bad.bottleneck_accuracy_clear is not None and bad.bottleneck_accuracy_clear > 0.9
    assert {r.bottleneck_true for r in bad.timeline if r.t_s > 20} == {"infer"}
    # Cost: rho-share billing is below whole-GPU billing; 100 s at the configured scale.
    st = {s.name: s for s in spec.stages}
    rate = (
        2 * spec.replica_cost_per_h(st["pre"], None)
        + spec.replica_cost_per_h(st["post"], None)
        + spec.replica_cost_per_h(st["infer"], 1.0)
    )
    assert ok.cost_usd == pytest.approx(rate * 100 / 3600)
    assert bad.cost_usd < bad.whole_gpu_cost_usd
    assert ok.cost_per_1k_usd == pytest.approx(
        ok.cost_usd / (ok.completed + ok.incomplete) * 1000, rel=0.05
    )
    assert ok.summary()["requests"] == ok.requests
    assert "timeline" not in ok.summary()


def test_fast_completion_path_gives_identical_telemetry() -> None:
    spec, prof = imgcls(), reference_profile("imgcls")
    got: dict[bool, list[PipelineTelemetry]] = {True: [], False: []}

    def producer(exact: bool) -> Callable[[PipelineSpec], MonitorTelemetry]:
        def make(s: PipelineSpec) -> MonitorTelemetry:
            inner = MonitorTelemetry(s, exact_completions=exact)
            orig = inner.observe

            def observe(*args: Any, **kwargs: Any) -> PipelineTelemetry:
                tel = orig(*args, **kwargs)
                got[exact].append(tel)
                return tel

            inner.observe = observe  # type: ignore[method-assign]
            return inner

        return make

    for exact in (True, False):
        run_simulation(
            spec, prof, poisson(60), HoldPolicy(), seed=9, duration_s=40, telemetry=producer(exact)
        )
    assert [t.model_dump() for t in got[True]] == [t.model_dump() for t in got[False]]
    assert got[True][-1].e2e_p99_ms is not None


def test_truth_names_the_stage_whose_replica_helps_most() -> None:
    def st(name: str, servers: int, mean_s: float, n: int = 0) -> TrueStage:
        return TrueStage(name, servers, 0, mean_s, 0.1, n, None)

    # 100 rps: pre at 0.9 utilisation, infer at 0.5, post idle.
    stages = [st("pre", 1, 0.009), st("infer", 1, 0.005), st("post", 1, 0.001)]
    tb = true_bottleneck(stages, 100.0)
    assert tb.stage == "pre" and tb.clear
    assert tb.gains_ms["pre"] > tb.gains_ms["infer"] > tb.gains_ms["post"] >= 0
    # An overloaded downstream stage with a backlog beats a busy but stable upstream one.
    stages = [st("pre", 2, 0.015), st("infer", 1, 0.012, n=300), st("post", 1, 0.001)]
    assert true_bottleneck(stages, 100.0).stage == "infer"
    assert true_bottleneck(stages, 0.0).stage is None


def test_timeline_records_every_tick() -> None:
    spec = imgcls()
    res = run_simulation(
        spec, reference_profile("imgcls"), poisson(50), HoldPolicy(), seed=2, duration_s=21
    )
    assert [r.t_s for r in res.timeline] == [2.0 * k for k in range(1, 11)] + [21.0]
    row = res.timeline[-1]
    assert set(row.replicas) == set(spec.stage_names)
    assert row.load_rps == 50.0 and row.rho["infer"] == 0.2
    assert dataclasses.asdict(row)["queue_depth"].keys() == set(spec.stage_names)
    assert np.isfinite(res.speedup)

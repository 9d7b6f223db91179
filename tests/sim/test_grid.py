"""The benchmark grid: run specification, workloads, SAIR's in-sim memory, a parallel run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sair.sim import grid
from sair.sim.memory import LoopPolicy, SimMemory
from sair.sim.profiles import reference_profile
from sair.sim.run import burst, run_simulation
from schemas.context import ENCODING_VERSION, context_dim
from schemas.messages import Episode, EpisodeOutcome, RetrieveRequest, StageAction
from services.policy.interface import POLICY_NAMES, get_policy
from services.retriever.logic import retrieve
from services.retriever.store import NumpyEpisodeStore


def test_expand_covers_every_combination_in_order() -> None:
    runs = grid.expand(["sair", "hpa"], ["imgcls", "nlp"], ["poisson", "burst"], 3, 300, 30)
    assert len(runs) == 2 * 2 * 2 * 3
    keys = {(r.policy, r.pipeline, r.workload, r.seed) for r in runs}
    assert len(keys) == len(runs)
    assert runs[0] == grid.RunSpec("sair", "imgcls", "poisson", 0, 300, 30)
    assert [r.seed for r in runs[:3]] == [0, 1, 2]
    assert all(r.duration_s == 300 and r.warmup_s == 30 for r in runs)
    # timelines: the burst runs of the first seed only, one per policy and pipeline
    kept = [(r.pipeline, r.policy) for r in runs if r.timeline]
    assert sorted(kept) == sorted((p, q) for p in ("imgcls", "nlp") for q in ("sair", "hpa"))
    assert all(r.workload == "burst" and r.seed == 0 for r in runs if r.timeline)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((["sair"], ["imgcls"], ["poisson"], 0, 300, 30), "seeds=0"),
        ((["sair", "sair"], ["imgcls"], ["poisson"], 1, 300, 30), "policies: sair"),
        ((["sair"], ["imgcls"], ["steady"], 1, 300, 30), "workload='steady'"),
        ((["sair"], ["imgcls"], ["poisson"], 1, 300, 300), "warmup_s=300"),
        ((["sair"], [], ["poisson"], 1, 300, 30), "pipelines"),
    ],
)
def test_expand_rejects_bad_grids(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grid.expand(*args)


def test_default_policies_are_sair_and_every_baseline_llm_only_with_an_endpoint() -> None:
    base = grid.baseline_names()
    assert set(base) == set(POLICY_NAMES) - {"sair", "llm"}
    assert grid.default_policies({}) == ("sair", *base)
    assert grid.default_policies({"OPENAI_BASE_URL": "http://x"}) == ("sair", "llm", *base)


def test_workloads_are_scaled_to_the_initial_capacity() -> None:
    spec = grid.pipeline_spec("imgcls")
    cap = grid.initial_capacity_rps(spec, reference_profile("imgcls"))
    # infer at rho 0.2: 0.5 ms host + 10 ms / 0.2 = 50.5 ms per request on one replica
    assert cap == pytest.approx(1000 / 50.5)
    per_stage = grid.stage_capacity_rps(spec, reference_profile("imgcls"))
    assert per_stage["pre"] == pytest.approx(50.0)
    p = grid.workload_for("poisson", cap).params
    assert 0.5 * cap < p["rate_rps"] < cap  # moderate: under capacity
    r = grid.workload_for("ramp", cap).params
    assert r["low_rps"] < 0.5 * cap and r["high_rps"] > cap  # light -> over capacity
    b = grid.workload_for("burst", cap).params
    assert b["base_rps"] < cap < b["burst_rps"]  # spikes need scaling
    for name in grid.PIPELINES:  # every pipeline gets its own rates
        s = grid.pipeline_spec(name)
        c = grid.initial_capacity_rps(s, reference_profile(name))
        assert grid.workload_for("poisson", c).params["rate_rps"] == round(0.7 * c, 1)


def _episode(i: int, dim: int, reward: float, rng: np.random.Generator) -> Episode:
    return Episode(
        pipeline="imgcls",
        episode_id=f"ep-{i}",
        ts_s=float(i),
        encoding_version=ENCODING_VERSION,
        context=rng.uniform(0, 1, dim).round(3).tolist(),
        action=[StageAction(stage="pre", target_replicas=1 + i % 3)],
        reward=reward,
        outcome=EpisodeOutcome(p99_ms=100.0, cost_per_h=1.0),
        source="embedded",
    )


def test_sim_memory_stores_and_retrieves_like_the_retriever(tmp_path: Path) -> None:
    spec = grid.pipeline_spec("imgcls")
    dim = context_dim(spec)
    rng = np.random.default_rng(5)
    episodes = [_episode(i, dim, float(rng.uniform(-1, 2)), rng) for i in range(60)]
    mem = SimMemory(spec)
    live = NumpyEpisodeStore(tmp_path / "store", dim)
    stored = [mem.offer(e) for e in episodes]
    assert stored == [e.reward > 0 for e in episodes]  # positive rewards only
    live.ingest([e for e in episodes if e.reward > 0], 10_000)
    assert len(mem) == live.count() == sum(stored)
    query = rng.uniform(0, 1, dim).tolist()
    req = RetrieveRequest(pipeline="imgcls", encoding_version=ENCODING_VERSION, context=query)
    want = retrieve(live, req)
    got = retrieve(mem.store, req)
    assert [e.episode.episode_id for e in got.episodes] == [
        e.episode.episode_id for e in want.episodes
    ]
    assert [e.score for e in got.episodes] == pytest.approx([e.score for e in want.episodes])
    assert len(got.episodes) == 15
    live.close()


def test_sair_learns_and_retrieves_its_own_episodes_in_sim() -> None:
    spec = grid.pipeline_spec("imgcls")
    prof = reference_profile("imgcls")
    mem = SimMemory(spec)
    seen: list[int] = []

    class Spy(LoopPolicy):
        def decide(self, spec, telemetry, state, now, retrieved=()):  # type: ignore[no-untyped-def]
            seen.append(len(retrieved))
            return super().decide(spec, telemetry, state, now, retrieved)

    policy = Spy(get_policy("sair"), mem)
    run_simulation(spec, prof, burst(10, 60, 20, 120), policy, seed=1, duration_s=300,
                   retriever=mem.retriever, record_timeline=False)  # fmt: skip
    assert policy.episodes >= 1 and len(mem) == policy.episodes
    # one retrieval per strategic decision (every control interval), none in between
    assert mem.retrievals == 300 // spec.control_interval_s
    assert max(seen) >= 1, "later decisions get the stored episodes back"


def test_tiny_grid_in_parallel_writes_every_required_key(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    rc = grid.main([
        "--policies", "sair,hpa", "--pipelines", "imgcls", "--workloads", "burst",
        "--seeds", "2", "--duration-s", "40", "--warmup-s", "10", "--jobs", "2",
        "--out", str(out), "--no-progress", "--no-plots",
    ])  # fmt: skip
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())
    assert len(runs) == 4
    assert {(r["policy"], r["seed"]) for r in runs} == {
        (p, s) for p in ("sair", "hpa") for s in (0, 1)
    }
    for r in runs:
        for key in grid.RESULT_KEYS:
            assert key in r, key
        assert r["pipeline"] == "imgcls" and r["workload"] == "burst"
        assert r["p99_ms"] > 0 and r["effective_cost"] > 0 and r["completed"] > 0
        assert r["whole_gpu_cost"] >= r["effective_cost"]
        assert 0 <= r["bottleneck_accuracy"] <= 1
        assert r["llm_calls"] is None  # not an LLM run
    by = {(r["policy"], r["seed"]): r for r in runs}
    assert by[("sair", 0)]["p99_ms"] != by[("sair", 1)]["p99_ms"]
    # the same run in this process gives the same numbers as in the worker
    again, _ = grid.execute(grid.RunSpec("hpa", "imgcls", "burst", 1, 40, 10))
    for key in ("p99_ms", "effective_cost", "actions", "bottleneck_accuracy", "completed"):
        assert again[key] == by[("hpa", 1)][key], key
    timelines = json.loads((out / "timelines.json").read_text())
    assert {t["policy"] for t in timelines} == {"sair", "hpa"}
    assert all(len(t["t_s"]) == 20 for t in timelines)
    md = (out / "results.md").read_text()
    assert "| imgcls | burst |" in md
    meta = json.loads((out / "meta.json").read_text())
    assert meta["runs"] == 4 and meta["seeds"] == 2 and meta["jobs"] == 2

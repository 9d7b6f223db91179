"""Small pipelines, profiles and policies for the simulator tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sair.sim.profiles import PipelineProfile, StageProfile
from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageAction
from schemas.pipeline import PipelineSpec


def one_stage(servers: int, *, startup_s: float = 0.0, kind: str = "cpu") -> PipelineSpec:
    stage: dict[str, Any] = dict(
        name="s", kind=kind, initial_replicas=servers, max_replicas=16, startup_s=startup_s
    )
    if kind == "gpu":
        stage.update(rho_grid=[0.25, 0.5, 1.0], initial_rho=1.0)
    return PipelineSpec(name="mm", slo_p99_ms=1000.0, stages=[stage])


def exp_profile(mean_ms: float, stage: str = "s", gpu: bool = False) -> PipelineProfile:
    prof = StageProfile(mean_ms=mean_ms, dist="exponential", gpu_ms=mean_ms if gpu else 0.0)
    return PipelineProfile("mm", {stage: prof})


def deterministic(mean_ms: float, stage: str = "s") -> PipelineProfile:
    return PipelineProfile("mm", {stage: StageProfile(mean_ms=mean_ms, dist="deterministic")})


@dataclass(frozen=True)
class Decision:
    targets: tuple[StageAction, ...]
    hold: bool
    source: str = "baseline"
    policy: str = "test"


class HoldPolicy:
    """Never changes anything; records what it was given."""

    name = "hold"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> int:
        return 0

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: int,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, int]:
        self.calls.append((spec, telemetry, state, now, retrieved))
        return Decision((), True), state + 1


@dataclass
class ScaleAt:
    """Sets fixed targets at given times: [(t, {stage: (replicas, rho)})]."""

    plan: list[tuple[float, dict[str, tuple[int, float | None]]]] = field(default_factory=list)
    name: str = "scale-at"

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> int:
        return 0

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: int,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, int]:
        if state < len(self.plan) and now >= self.plan[state][0]:
            targets = tuple(
                StageAction(stage=s, target_replicas=n, rho=r)
                for s, (n, r) in self.plan[state][1].items()
            )
            return Decision(targets, False), state + 1
        return Decision((), True), state

"""Pipeline and stage specifications: what SAIR may do to a pipeline, and what it costs.

A `PipelineSpec` is loaded from a TOML file (see `pipelines/*.toml`) with `load_pipeline_spec`.
Stages are listed in order (the request flows from the first to the last).
"""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from .common import (
    MAX_STAGES,
    Count,
    Fraction,
    Name,
    NonNegFloat,
    PosFloat,
    Rho,
    SairModel,
    StageKind,
    Text,
    check_unique,
)

RESERVED_STAGE_NAMES = frozenset({"done", "result"})
"""Names that would collide with `sair.pipe.<p>.done` or `sair.actions.<p>.result`."""

HandlerPath = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", max_length=200)]
"""`package.module:function` of a stage handler."""


class KubernetesTarget(SairModel):
    """Where a stage lives in a cluster (the `kubernetes` scaling backend)."""

    namespace: Name = "default"
    deployment: Name


class StageSpec(SairModel):
    name: Name
    kind: StageKind
    handler: HandlerPath | None = None
    min_replicas: Count = 1
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 8
    initial_replicas: Count = 1
    max_step: Annotated[int, Field(ge=1, le=1000)] = 2
    """Largest change of replicas in one action."""
    rho_grid: list[Rho] = Field(default_factory=list, max_length=64)
    """Allowed GPU shares of a GPU replica, ascending; empty for CPU stages."""
    initial_rho: Rho | None = None
    cpu_cores: PosFloat = 1.0
    """CPU cores requested per replica (the HPA target is a percentage of this)."""
    memory_gb: PosFloat = 1.0
    startup_s: NonNegFloat = 0.0
    """Time from start to ready of a replica (a GPU model load takes seconds)."""
    full_speed_launch_rate: PosFloat | None = None
    """GPU stages: kernel launches/s of one replica at rho = 1 (token refill = rho x this)."""
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 1
    """Requests one replica processes at once."""
    options: dict[Name, float | int | str | bool] = Field(default_factory=dict, max_length=64)
    """Free handler options (synthetic sizes, model names)."""
    kubernetes: KubernetesTarget | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_STAGE_NAMES:
            raise ValueError(f"stage name {name!r} is reserved")
        return name

    @field_validator("rho_grid")
    @classmethod
    def _grid_ascending(cls, grid: list[float]) -> list[float]:
        for a, b in itertools.pairwise(grid):
            if not a < b:
                raise ValueError(f"rho_grid must be strictly ascending, got {grid!r}")
        if any(r <= 0 for r in grid):
            raise ValueError(f"rho_grid values must be > 0, got {grid!r}")
        return grid

    @model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}"
            )
        if not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas={self.initial_replicas} outside "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        if self.kind == "gpu":
            if not self.rho_grid:
                raise ValueError(f"gpu stage {self.name!r} needs a non-empty rho_grid")
            if self.initial_rho is not None and self.initial_rho not in self.rho_grid:
                raise ValueError(f"initial_rho={self.initial_rho} is not on rho_grid")
        else:
            if self.rho_grid:
                raise ValueError(f"cpu stage {self.name!r} must not have a rho_grid")
            if self.initial_rho is not None:
                raise ValueError(f"cpu stage {self.name!r} must not have initial_rho")
        return self

    @property
    def start_rho(self) -> float | None:
        """rho a GPU replica starts with: initial_rho, else the top of the grid; None for CPU."""
        if self.kind != "gpu":
            return None
        return self.initial_rho if self.initial_rho is not None else self.rho_grid[-1]


class Prices(SairModel):
    """US$ per hour; defaults are typical on-demand cloud list prices (documented in docs/)."""

    cpu_core_per_h: NonNegFloat = 0.034
    memory_gb_per_h: NonNegFloat = 0.0045
    gpu_per_h: NonNegFloat = 0.79


class RewardWeights(SairModel):
    """Weights of the shaped reward (see services/policy/reward.py)."""

    latency_gain: NonNegFloat = 1.0
    cost: NonNegFloat = 0.5
    slo_penalty: NonNegFloat = 2.0
    proactive_bonus: NonNegFloat = 0.2
    pareto: NonNegFloat = 1.0


class PipelineSpec(SairModel):
    name: Name
    description: Text = ""
    stages: list[StageSpec] = Field(min_length=1, max_length=MAX_STAGES)
    slo_p99_ms: PosFloat
    control_interval_s: PosFloat = 30.0
    settle_s: NonNegFloat = 30.0
    tick_s: PosFloat = 2.0
    cost_budget_per_h: PosFloat | None = None
    prices: Prices = Field(default_factory=Prices)
    reward: RewardWeights = Field(default_factory=RewardWeights)
    slo_target_attainment: Fraction = 0.99

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: list[StageSpec]) -> list[StageSpec]:
        check_unique([s.name for s in stages], "stages")
        return stages

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"stage {name!r} is not in pipeline {self.name!r}")

    def next_stage(self, name: str) -> StageSpec | None:
        names = self.stage_names
        i = names.index(name)
        return self.stages[i + 1] if i + 1 < len(names) else None

    def replica_cost_per_h(self, stage: StageSpec, rho: float | None) -> float:
        """Effective cost of one replica: CPU and memory, plus rho x GPU price for GPU stages."""
        cost = stage.cpu_cores * self.prices.cpu_core_per_h
        cost += stage.memory_gb * self.prices.memory_gb_per_h
        if stage.kind == "gpu":
            cost += (rho if rho is not None else 1.0) * self.prices.gpu_per_h
        return cost


def load_pipeline_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline spec TOML file."""
    p = Path(path)
    with p.open("rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    return PipelineSpec.model_validate(data)

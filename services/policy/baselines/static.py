"""Static: fixed replicas and rho = top of the grid (1.0) for the whole run (baselines.md).

Sizing (the paper's is unpublished; ours): per stage, enough replicas to keep utilisation
<= `target_utilisation` (0.7) at the workload's mean rate, from the measured service time:
    replicas = ceil(rate_rps x service_s / (target_utilisation x rho_factor)), clamped to bounds
where rate_rps is `StaticConfig.rate_rps` (the workload's known mean; "peak-provisioned" when
given the peak) or else the arrival rate seen at the first decision, and service_s is the
stage's service rate at rho = 1, estimated as throughput / (utilisation x ready x rho)
(else the service p50). Explicit `replicas` override the sizing. Sized once, then frozen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.messages import PipelineTelemetry, RetrievedEpisode, StageMetrics
from schemas.pipeline import PipelineSpec, StageSpec

from ..interface import Decision, measured_rho, stage_metrics
from . import baseline_decision


@dataclass(frozen=True)
class StaticConfig:
    replicas: Mapping[str, int] = field(default_factory=dict)
    rate_rps: float | None = None
    target_utilisation: float = 0.7


@dataclass(frozen=True)
class StaticState:
    sized: tuple[tuple[str, int], ...] | None = None


def service_rate_at_full_rho(st: StageSpec, m: StageMetrics | None) -> float | None:
    """Requests/s of one replica at rho = 1 (None if nothing measured yet)."""
    if m is None:
        return None
    rho = measured_rho(m, st) or 1.0
    if m.utilisation and m.throughput_rps and m.replicas_ready > 0 and m.utilisation > 0.01:
        return m.throughput_rps / (m.utilisation * m.replicas_ready * rho)
    if m.service_ms is not None and m.service_ms.p50_ms > 0:
        return 1000.0 / m.service_ms.p50_ms * st.concurrency / rho
    return None


def static_size(
    st: StageSpec, rate_rps: float, mu1_rps: float | None, target_utilisation: float
) -> int:
    """ceil(rate / (mu x target)), within the stage's bounds; initial replicas if mu unknown."""
    if mu1_rps is None or mu1_rps <= 0:
        return st.initial_replicas
    n = math.ceil(rate_rps / (mu1_rps * target_utilisation) - 1e-9)
    return min(max(n, st.min_replicas, 1 if rate_rps > 0 else 0), st.max_replicas)


class StaticPolicy:
    is_baseline = True

    def __init__(self, config: StaticConfig | None = None, name: str = "static") -> None:
        self.config = config or StaticConfig()
        self.name = name

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> StaticState:
        return StaticState()

    def period_s(self, spec: PipelineSpec) -> float:
        return spec.control_interval_s

    def wants_retrieval(self, spec: PipelineSpec, state: StaticState, now: float) -> bool:
        return False

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: StaticState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, StaticState]:
        why: list[str] = []
        if state.sized is None:
            sized: dict[str, int] = {}
            for st in spec.stages:
                if st.name in self.config.replicas:
                    sized[st.name] = self.config.replicas[st.name]
                    why.append(f"{st.name}: configured {sized[st.name]} replicas")
                    continue
                m = stage_metrics(telemetry, st.name)
                rate = self.config.rate_rps
                if rate is None:
                    rate = telemetry.arrival_rate_rps or 0.0
                mu = service_rate_at_full_rho(st, m)
                sized[st.name] = static_size(st, rate, mu, self.config.target_utilisation)
                why.append(
                    f"{st.name}: sized {sized[st.name]} = ceil({rate:.1f} rps / "
                    f"({mu or 0:.2f} rps x {self.config.target_utilisation}))"
                )
            state = StaticState(tuple(sorted(sized.items())))
        else:
            why.append("static: fixed")
        assert state.sized is not None
        replicas = dict(state.sized)
        rho = {st.name: st.rho_grid[-1] for st in spec.stages if st.kind == "gpu"}
        return baseline_decision(spec, telemetry, self.name, replicas, why, rho), state

"""Specs and actions for the actuator tests (defaults, changed per test with arguments)."""

from __future__ import annotations

import time
import uuid

from schemas.messages import ScalingAction, StageAction
from schemas.pipeline import KubernetesTarget, PipelineSpec, StageSpec

FULL_SPEED_LAUNCHES_PER_S = 1000.0


def make_spec(name: str | None = None, namespace: str = "ml") -> PipelineSpec:
    """pre (cpu, 1..8, step 2) -> infer (gpu, 1..4, step 1, rho grid) -> post (cpu, 0..6)."""
    return PipelineSpec(
        name=name or f"act-{uuid.uuid4().hex[:10]}",
        slo_p99_ms=500.0,
        stages=[
            StageSpec(
                name="pre", kind="cpu", min_replicas=1, max_replicas=8, initial_replicas=1,
                max_step=2, kubernetes=KubernetesTarget(namespace=namespace, deployment="pre"),
            ),
            StageSpec(
                name="infer", kind="gpu", min_replicas=1, max_replicas=4, initial_replicas=1,
                max_step=1, rho_grid=[0.25, 0.5, 0.75, 1.0], initial_rho=0.5,
                full_speed_launch_rate=FULL_SPEED_LAUNCHES_PER_S,
                kubernetes=KubernetesTarget(namespace=namespace, deployment="infer"),
            ),
            StageSpec(
                name="post", kind="cpu", min_replicas=0, max_replicas=6, initial_replicas=1,
                max_step=2,
            ),
        ],
    )  # fmt: skip


def make_action(
    spec: PipelineSpec,
    *stages: StageAction,
    action_id: str | None = None,
    advisory: bool = False,
    ts_s: float | None = None,
) -> ScalingAction:
    return ScalingAction(
        pipeline=spec.name,
        action_id=action_id or f"a-{uuid.uuid4().hex[:12]}",
        ts_s=time.time() if ts_s is None else ts_s,
        stages=list(stages) or [StageAction(stage="pre", target_replicas=2)],
        source="manual",
        policy="test",
        advisory=advisory,
    )


def sa(stage: str, replicas: int, rho: float | None = None) -> StageAction:
    return StageAction(stage=stage, target_replicas=replicas, rho=rho)

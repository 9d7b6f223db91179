"""Pure reconciliation of one stage: which replicas to start or stop to meet the desired count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ReplicaState = Literal["starting", "ready", "draining"]

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
CRASH_FORGET_S = 60.0
"""A replica that stayed up this long resets the stage's crash backoff."""


@dataclass(frozen=True)
class ReplicaView:
    worker_id: str
    state: ReplicaState
    started_s: float


@dataclass(frozen=True)
class Plan:
    start: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)


def clamp_desired(desired: int, max_replicas: int) -> int:
    """Never more than the stage's max_replicas (the actuator's guardrails do the rest)."""
    return max(0, min(desired, max_replicas))


def reconcile(
    desired: int, replicas: list[ReplicaView], max_replicas: int, can_start: bool = True
) -> Plan:
    """Start or stop replicas so that starting + ready == min(desired, max_replicas).

    Draining replicas are already leaving and are not counted. Scale-down stops starting
    replicas first (they serve nothing yet), newest first, then ready ones, newest first
    (the oldest have warm caches and the longest crash-free record).
    """
    target = clamp_desired(desired, max_replicas)
    live = [r for r in replicas if r.state != "draining"]
    if len(live) < target:
        return Plan(start=target - len(live) if can_start else 0)
    if len(live) > target:
        extra = len(live) - target
        starting = sorted((r for r in live if r.state == "starting"), key=lambda r: -r.started_s)
        ready = sorted((r for r in live if r.state == "ready"), key=lambda r: -r.started_s)
        return Plan(stop=tuple(r.worker_id for r in (starting + ready)[:extra]))
    return Plan()


def restart_backoff_s(recent_crashes: int) -> float:
    """Delay before the next start after `recent_crashes` crashes in a row (exponential)."""
    if recent_crashes <= 0:
        return 0.0
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (recent_crashes - 1)))

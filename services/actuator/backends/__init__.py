"""Scaling backends: where desired replicas go. One small interface, chosen by configuration.

- `local`: the NATS KV bucket `sair_desired`, which the local supervisor reconciles;
- `kubernetes`: the `scale` subresource of each stage's Deployment;
- `dry-run`: logs what it would do and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from schemas.messages import StageAction
from schemas.pipeline import PipelineSpec

from ..guard import CurrentStage

BACKEND_NAMES = ("local", "kubernetes", "dry-run")


class BackendUnavailable(RuntimeError):
    """The backend cannot be reached right now; the action is retried, not dropped."""


@dataclass(frozen=True)
class ApplyOutcome:
    """What a backend did with the stages it was given."""

    applied: tuple[StageAction, ...] = ()
    failures: tuple[str, ...] = ()
    """One line per stage that could not be applied for good (retrying will not help)."""
    notes: tuple[str, ...] = ()
    """Things worth telling that are not failures (e.g. already applied before a restart)."""


@dataclass(frozen=True)
class ActionRef:
    """Which decision a write belongs to (kept beside desired state where the backend can)."""

    action_id: str
    ts_s: float


class Backend(Protocol):
    name: str
    applies: bool
    """False for backends that change nothing (dry-run): results say "recorded"."""

    async def current(self, spec: PipelineSpec) -> dict[str, CurrentStage]:
        """Desired state per stage as the backend holds it now (stages it knows of)."""
        ...

    async def apply(
        self, spec: PipelineSpec, ref: ActionRef, stages: Sequence[StageAction]
    ) -> ApplyOutcome:
        """Set each stage's replicas (and rho where the backend keeps it). Idempotent: applying
        the same action twice leaves the same state. Raises BackendUnavailable when the
        backend cannot be reached."""
        ...

    async def close(self) -> None: ...

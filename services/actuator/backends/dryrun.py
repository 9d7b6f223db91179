"""The `dry-run` backend: logs what it would do, changes nothing (advisory deployments).

It remembers what it would have set, so the step limit of the next action is measured from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from schemas.messages import StageAction
from schemas.pipeline import PipelineSpec

from ..guard import CurrentStage
from . import ActionRef, ApplyOutcome

log = logging.getLogger("sair.actuator.dryrun")


class DryRunBackend:
    name = "dry-run"
    applies = False

    def __init__(self) -> None:
        self._would: dict[tuple[str, str], CurrentStage] = {}

    async def current(self, spec: PipelineSpec) -> dict[str, CurrentStage]:
        return {
            stage: self._would[(spec.name, stage)]
            for stage in spec.stage_names
            if (spec.name, stage) in self._would
        }

    async def apply(
        self, spec: PipelineSpec, ref: ActionRef, stages: Sequence[StageAction]
    ) -> ApplyOutcome:
        notes = []
        for action in stages:
            line = (
                f"dry-run: would set {spec.name}/{action.stage} to {action.target_replicas} "
                f"replicas" + (f", rho={action.rho}" if action.rho is not None else "")
            )
            log.info("%s (action %s)", line, ref.action_id)
            notes.append(line)
            self._would[(spec.name, action.stage)] = CurrentStage(
                action.target_replicas, action.rho
            )
        return ApplyOutcome(tuple(stages), (), tuple(notes))

    async def close(self) -> None:
        return None

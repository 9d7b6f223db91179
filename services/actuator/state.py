"""The actuator's memory, kept in the NATS KV bucket `sair_state` (pure functions, no I/O).

One record per pipeline, key `actuator.<pipeline>`:
- `seen_ids`: the ids of the last `MAX_SEEN_IDS` actions handled (idempotency: a redelivered
  or re-published action is not applied twice);
- `recent`: the last `MAX_RECENT_RESULTS` results, so a redelivery after a crash can publish
  the result the crashed run never got to send;
- `unpublished`: ids whose result was recorded but not yet confirmed published (a crash in
  between); a redelivery publishes those, and only those, again;
- `desired`: per stage, the last setting that was applied and the action it came from (what
  a restarted actuator re-asserts).
The app writes the record with compare-and-set on its KV revision.
"""

from __future__ import annotations

from pydantic import Field

from schemas.common import Identifier, Name, Rho, SairModel, TimestampS
from schemas.messages import ActionResult, StageAction

MAX_SEEN_IDS = 1024
MAX_RECENT_RESULTS = 32


def record_key(pipeline: str) -> str:
    return f"actuator.{pipeline}"


class StageSetting(SairModel):
    stage: Name
    target_replicas: int = Field(ge=0, le=1000)
    rho: Rho | None = None
    action_id: Identifier
    ts_s: TimestampS

    def as_action(self) -> StageAction:
        return StageAction(stage=self.stage, target_replicas=self.target_replicas, rho=self.rho)


class ActuatorRecord(SairModel):
    pipeline: Name
    seen_ids: list[Identifier] = Field(default_factory=list, max_length=MAX_SEEN_IDS)
    recent: list[ActionResult] = Field(default_factory=list, max_length=MAX_RECENT_RESULTS)
    unpublished: list[Identifier] = Field(default_factory=list, max_length=MAX_RECENT_RESULTS)
    desired: list[StageSetting] = Field(default_factory=list, max_length=64)

    def seen(self, action_id: str) -> bool:
        return action_id in self.seen_ids

    def result_of(self, action_id: str) -> ActionResult | None:
        for result in reversed(self.recent):
            if result.action_id == action_id:
                return result
        return None

    def setting(self, stage: str) -> StageSetting | None:
        for s in self.desired:
            if s.stage == stage:
                return s
        return None


def with_result(
    record: ActuatorRecord, result: ActionResult, action_ts_s: float, applied_to_backend: bool
) -> ActuatorRecord:
    """The record after `result`: id remembered, result kept, applied stages merged into
    `desired` (only when the backend really changed something)."""
    seen = [*record.seen_ids, result.action_id][-MAX_SEEN_IDS:]
    recent = [*record.recent, result][-MAX_RECENT_RESULTS:]
    desired = {s.stage: s for s in record.desired}
    if applied_to_backend:
        for action in result.applied:
            desired[action.stage] = StageSetting(
                stage=action.stage,
                target_replicas=action.target_replicas,
                rho=action.rho,
                action_id=result.action_id,
                ts_s=action_ts_s,
            )
    unpublished = [*record.unpublished, result.action_id][-MAX_RECENT_RESULTS:]
    return record.model_copy(
        update={
            "seen_ids": seen,
            "recent": recent,
            "unpublished": unpublished,
            "desired": list(desired.values()),
        }
    )


def with_published(record: ActuatorRecord, action_id: str) -> ActuatorRecord:
    """The record once the result of `action_id` is in the stream."""
    return record.model_copy(
        update={"unpublished": [i for i in record.unpublished if i != action_id]}
    )


def reassert_groups(record: ActuatorRecord) -> list[tuple[str, float, list[StageAction]]]:
    """The desired settings grouped by the action they came from: (action_id, ts_s, stages),
    oldest first, so re-asserting them replays the same writes in the same order."""
    groups: dict[tuple[float, str], list[StageAction]] = {}
    for s in record.desired:
        groups.setdefault((s.ts_s, s.action_id), []).append(s.as_action())
    return [(aid, ts, stages) for (ts, aid), stages in sorted(groups.items())]

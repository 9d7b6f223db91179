"""The `local` backend: desired replicas in the NATS KV bucket `sair_desired`.

Key `<pipeline>.<stage>`, value `StageDesired` JSON. The local supervisor watches the bucket and
starts or stops worker processes to match. Every write is a compare-and-set on the key's
revision (`create` for a new key, `update(last=revision)` otherwise), and a value written for a
newer action (larger `ts_s`) is never overwritten by an older one, so two actuators, or a
restarted one replaying an old action, cannot interleave into a state nobody decided.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas import subjects
from schemas.common import describe_error
from schemas.messages import StageAction, StageDesired
from schemas.pipeline import PipelineSpec

from ..guard import CurrentStage
from . import ActionRef, ApplyOutcome, BackendUnavailable

log = logging.getLogger("sair.actuator.local")

KV_TIMEOUT_S = 5.0
MAX_CAS_ATTEMPTS = 20
"""A key that changes under us this often is contended by something that never stops."""

_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)


class LocalBackend:
    name = "local"
    applies = True

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await asyncio.wait_for(
                    self.js.key_value(subjects.DESIRED_BUCKET), KV_TIMEOUT_S
                )
            except _TRANSIENT as exc:
                raise BackendUnavailable(f"KV bucket {subjects.DESIRED_BUCKET}: {exc!r}") from exc
        return self._kv

    async def read(self, pipeline: str, stage: str) -> tuple[StageDesired | None, int | None]:
        """The stage's desired value and its revision; (None, None) when absent or deleted,
        (None, revision) when the stored value is unreadable (it is then overwritten)."""
        kv = await self._bucket()
        key = subjects.desired_key(pipeline, stage)
        try:
            entry = await asyncio.wait_for(kv.get(key), KV_TIMEOUT_S)
        except nats.js.errors.KeyNotFoundError:
            return None, None
        except _TRANSIENT as exc:
            raise BackendUnavailable(f"KV get {key}: {exc!r}") from exc
        if entry.value is None:
            return None, entry.revision
        try:
            return StageDesired.model_validate_json(entry.value), entry.revision
        except ValidationError as exc:
            log.warning(
                "KV %s holds an unreadable value (%s); treating it as unknown",
                key,
                describe_error(exc),
            )
            return None, entry.revision

    async def current(self, spec: PipelineSpec) -> dict[str, CurrentStage]:
        out: dict[str, CurrentStage] = {}
        for stage in spec.stage_names:
            value, _rev = await self.read(spec.name, stage)
            if value is not None:
                out[stage] = CurrentStage(replicas=value.replicas, rho=value.rho)
        return out

    async def apply(
        self, spec: PipelineSpec, ref: ActionRef, stages: Sequence[StageAction]
    ) -> ApplyOutcome:
        applied: list[StageAction] = []
        failures: list[str] = []
        notes: list[str] = []
        for action in stages:
            status = await self._apply_stage(spec.name, ref, action)
            if status is None:
                applied.append(action)
            elif status.startswith("already"):
                applied.append(action)
                notes.append(status)
            else:
                failures.append(status)
        return ApplyOutcome(tuple(applied), tuple(failures), tuple(notes))

    async def _apply_stage(self, pipeline: str, ref: ActionRef, action: StageAction) -> str | None:
        """Write one stage with compare-and-set; None when written, else why not."""
        kv = await self._bucket()
        key = subjects.desired_key(pipeline, action.stage)
        value = StageDesired(
            replicas=action.target_replicas, rho=action.rho, action_id=ref.action_id, ts_s=ref.ts_s
        )
        for _attempt in range(MAX_CAS_ATTEMPTS):
            held, revision = await self.read(pipeline, action.stage)
            if held is not None and held.action_id == ref.action_id:
                # Written before a crash or by a redelivery: do not write it again.
                return f"already set for {ref.action_id} (revision {revision})"
            if held is not None and held.ts_s > ref.ts_s:
                return (
                    f"stage {action.stage!r}: desired state was set by a newer action "
                    f"{held.action_id} (ts_s={held.ts_s} > {ref.ts_s}); not overwritten"
                )
            data = value.model_dump_json().encode()
            try:
                if revision is None:
                    await asyncio.wait_for(kv.create(key, data), KV_TIMEOUT_S)
                else:
                    await asyncio.wait_for(kv.update(key, data, last=revision), KV_TIMEOUT_S)
                return None
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone wrote in between: read again and decide again
            except _TRANSIENT as exc:
                raise BackendUnavailable(f"KV write {key}: {exc!r}") from exc
        return (
            f"stage {action.stage!r}: key {key} kept changing, "
            f"gave up after {MAX_CAS_ATTEMPTS} tries"
        )

    async def close(self) -> None:
        return None

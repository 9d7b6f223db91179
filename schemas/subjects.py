"""NATS subject names, one function per subject of the design (prefix `sair.`).

Every function validates the names it puts into a subject, so a bad name fails where it is
used, with the field and value, instead of producing a subject nobody listens to.
Streams, consumers and KV buckets that hold these subjects are named here too.
"""

from __future__ import annotations

import re

from .common import MAX_NAME_CHARS, NAME_PATTERN
from .pipeline import RESERVED_STAGE_NAMES

PREFIX = "sair"
_NAME_RE = re.compile(NAME_PATTERN)

# JetStream streams and buckets (see docs/architecture.md)
ACTIONS_STREAM = "SAIR_ACTIONS"
"""Audit log of every action and result: `sair.actions.>`."""
EPISODES_STREAM = "SAIR_EPISODES"
"""Durable hand-over of episodes to the retriever: `sair.episodes.>`."""
DLQ_STREAM = "SAIR_DLQ"
"""Every rejected message, kept: `sair.dlq.>`."""
DESIRED_BUCKET = "sair_desired"
"""KV bucket: key `<pipeline>.<stage>` -> desired replicas (the local supervisor reconciles)."""
STATE_BUCKET = "sair_state"
"""KV bucket: last applied action per pipeline, replica states (for reconciliation)."""


def check_name(value: str, field: str = "name") -> str:
    """Return `value` if it is a valid pipeline/stage/service name, else raise ValueError."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{field}={value!r}: must be a string of 1..{MAX_NAME_CHARS} characters")
    if not _NAME_RE.match(value):
        raise ValueError(f"{field}={value!r}: must match {NAME_PATTERN}")
    return value


def check_stage(value: str) -> str:
    check_name(value, "stage")
    if value in RESERVED_STAGE_NAMES:
        raise ValueError(f"stage={value!r}: reserved name")
    return value


def pipe_stage(pipeline: str, stage: str) -> str:
    """Requests for one stage (JetStream work queue)."""
    return f"{PREFIX}.pipe.{check_name(pipeline, 'pipeline')}.{check_stage(stage)}"


def pipe_done(pipeline: str) -> str:
    """Completions with end-to-end timing (published on core NATS, kept in `done_stream`)."""
    return f"{PREFIX}.pipe.{check_name(pipeline, 'pipeline')}.done"


def pipe_dlq(pipeline: str, stage: str) -> str:
    """Requests whose handler kept failing, with the error."""
    return f"{PREFIX}.dlq.pipe.{check_name(pipeline, 'pipeline')}.{check_stage(stage)}"


def reports(pipeline: str, stage: str) -> str:
    return f"{PREFIX}.reports.{check_name(pipeline, 'pipeline')}.{check_stage(stage)}"


def reports_all(pipeline: str) -> str:
    return f"{PREFIX}.reports.{check_name(pipeline, 'pipeline')}.*"


def telemetry(pipeline: str) -> str:
    return f"{PREFIX}.telemetry.{check_name(pipeline, 'pipeline')}"


def episodes(pipeline: str) -> str:
    return f"{PREFIX}.episodes.{check_name(pipeline, 'pipeline')}"


def retrieve(pipeline: str) -> str:
    return f"{PREFIX}.retrieve.{check_name(pipeline, 'pipeline')}"


def actions(pipeline: str) -> str:
    return f"{PREFIX}.actions.{check_name(pipeline, 'pipeline')}"


def action_results(pipeline: str) -> str:
    return f"{PREFIX}.actions.{check_name(pipeline, 'pipeline')}.result"


def replicas(pipeline: str) -> str:
    """The supervisor's replica counts per stage (`ReplicaStatus`)."""
    return f"{PREFIX}.replicas.{check_name(pipeline, 'pipeline')}"


def dlq(service: str) -> str:
    """Dead letters of one service."""
    return f"{PREFIX}.dlq.{check_name(service, 'service')}"


def pipe_stream(pipeline: str) -> str:
    """Work-queue stream holding every stage queue of a pipeline."""
    return "SAIR_PIPE_" + check_name(pipeline, "pipeline").upper().replace("-", "_")


def done_stream(pipeline: str) -> str:
    """Limits stream keeping a pipeline's completions for a while, so a subscriber that was
    disconnected (e.g. over a NATS restart) can read the ones it missed."""
    return "SAIR_DONE_" + check_name(pipeline, "pipeline").upper().replace("-", "_")


def stage_consumer(stage: str) -> str:
    """Durable pull consumer shared by all replicas of a stage."""
    return f"stage-{check_stage(stage)}"


def desired_key(pipeline: str, stage: str) -> str:
    """KV key of a stage's `StageDesired` in `DESIRED_BUCKET`."""
    return f"{check_name(pipeline, 'pipeline')}.{check_stage(stage)}"


def gpu_bucket_key(pipeline: str, stage: str) -> str:
    """Redis hash of a GPU stage's shared launch-token bucket (docs/gpu-tokens.md)."""
    return f"sair:gpu:{check_name(pipeline, 'pipeline')}:{check_stage(stage)}"


ALL_SUBJECT_FUNCTIONS = (
    pipe_stage,
    pipe_done,
    reports,
    telemetry,
    episodes,
    retrieve,
    actions,
    action_results,
    replicas,
    dlq,
)

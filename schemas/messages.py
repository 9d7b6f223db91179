"""Every message that crosses NATS. See docs/architecture.md for who sends what where.

Optional numbers are `None` when unknown: a consumer can always tell "idle" (0) from
"unknown" (None). Messages that name stages can be checked against a pipeline spec by passing
it as validation context: `Model.model_validate_json(raw, context={"spec": spec})`; a stage
name that the pipeline does not have is then rejected, naming the field and the value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .common import (
    MAX_STAGES,
    Count,
    Fraction,
    Identifier,
    Name,
    NonNegFloat,
    PosFloat,
    Rho,
    SairModel,
    StageKind,
    Text,
    TimestampS,
    check_unique,
)
from .histogram import LatencyHistogram
from .pipeline import PipelineSpec

MAX_CONTEXT_DIM = 512
MAX_EPISODES_PER_REPLY = 64

WorkerState = Literal["starting", "ready", "draining"]
ActionSource = Literal["llm", "embedded", "reflex", "explore", "baseline", "manual"]
ResultStatus = Literal["applied", "clamped", "failed", "recorded", "duplicate"]


def _check_stage_known(stage: str, info: ValidationInfo, field: str) -> None:
    ctx = info.context
    if not ctx:
        return
    spec = ctx.get("spec")
    if isinstance(spec, PipelineSpec) and stage not in spec.stage_names:
        raise ValueError(
            f"{field}: unknown stage {stage!r} (pipeline {spec.name!r} has "
            f"{', '.join(spec.stage_names)})"
        )


def _check_pipeline_known(pipeline: str, info: ValidationInfo) -> None:
    ctx = info.context
    if not ctx:
        return
    spec = ctx.get("spec")
    if isinstance(spec, PipelineSpec) and pipeline != spec.name:
        raise ValueError(f"pipeline {pipeline!r} is not {spec.name!r}")


class PipelineScoped(SairModel):
    """A message about one pipeline; with a spec in context the name must match it."""

    pipeline: Name

    @field_validator("pipeline")
    @classmethod
    def _pipeline_known(cls, pipeline: str, info: ValidationInfo) -> str:
        _check_pipeline_known(pipeline, info)
        return pipeline


# --------------------------------------------------------------------------- workers


class WorkerReport(PipelineScoped):
    """What one stage worker did during its last report interval (sent every second)."""

    stage: Name
    worker_id: Identifier
    seq: Count
    """Report counter of this worker process; a drop means the worker restarted."""
    state: WorkerState
    ts_s: TimestampS
    interval_s: PosFloat
    processed: Count = 0
    failed: Count = 0
    in_flight: Count = 0
    busy_s: NonNegFloat = 0.0
    service_ms: LatencyHistogram = Field(default_factory=LatencyHistogram)
    queue_wait_ms: LatencyHistogram = Field(default_factory=LatencyHistogram)
    rho: Rho | None = None
    gpu_tokens_used: Count = 0
    gpu_token_wait_s: NonNegFloat = 0.0

    @field_validator("stage")
    @classmethod
    def _stage_known(cls, stage: str, info: ValidationInfo) -> str:
        _check_stage_known(stage, info, "stage")
        return stage


class StageRequest(SairModel):
    """Envelope of one request travelling through a pipeline's stage queues."""

    request_id: Identifier
    pipeline: Name
    created_ts_s: TimestampS
    """When the load generator (or client) sent it: the start of end-to-end latency."""
    enqueued_ts_s: TimestampS
    """When it was published to the current stage's queue: the start of queue wait."""
    payload: dict[str, float | int | str | bool | list[float] | list[int]] = Field(
        default_factory=dict, max_length=64
    )
    stage_ms: dict[Name, NonNegFloat] = Field(default_factory=dict, max_length=MAX_STAGES)
    """Service time per stage so far."""


class Completion(SairModel):
    """Sent on `sair.pipe.<pipeline>.done` by the last stage."""

    request_id: Identifier
    pipeline: Name
    created_ts_s: TimestampS
    done_ts_s: TimestampS
    e2e_ms: NonNegFloat
    stage_ms: dict[Name, NonNegFloat] = Field(default_factory=dict, max_length=MAX_STAGES)
    ok: bool = True
    error: Text | None = None


# --------------------------------------------------------------------------- telemetry


class Percentiles(SairModel):
    p50_ms: NonNegFloat
    p95_ms: NonNegFloat
    p99_ms: NonNegFloat

    @model_validator(mode="after")
    def _ordered(self) -> Percentiles:
        if not self.p50_ms <= self.p95_ms <= self.p99_ms:
            raise ValueError(
                f"percentiles must be ordered p50 <= p95 <= p99, got "
                f"{self.p50_ms}, {self.p95_ms}, {self.p99_ms}"
            )
        return self


class StageMetrics(SairModel):
    """One stage over the monitor's sliding window. None = unknown, never an invented 0."""

    stage: Name
    kind: StageKind
    replicas_ready: Count
    replicas_starting: Count = 0
    replicas_draining: Count = 0
    replicas_desired: Count | None = None
    reporting_replicas: Count = 0
    arrival_rate_rps: NonNegFloat | None = None
    throughput_rps: NonNegFloat | None = None
    queue_depth: Count | None = None
    queue_growth_per_s: float | None = None
    arrived_total: Count | None = None
    """Requests that ever entered the stage's queue, read with `queue_depth` (JetStream's
    counter): its difference between two ticks is what arrived in between, fresh and exact."""
    utilisation: NonNegFloat | None = None
    """busy / (replicas x window); for GPU stages divided by rho (utilisation of the quota)."""
    service_ms: Percentiles | None = None
    sojourn_ms: Percentiles | None = None
    rho: Rho | None = None
    cost_per_h: NonNegFloat = 0.0
    gpu_token_wait_s: NonNegFloat | None = None
    stale: bool = False
    missing_fields: list[Name] = Field(default_factory=list, max_length=32)
    estimated_fields: list[Name] = Field(default_factory=list, max_length=32)

    @field_validator("stage")
    @classmethod
    def _stage_known(cls, stage: str, info: ValidationInfo) -> str:
        _check_stage_known(stage, info, "stage")
        return stage


class PipelineTelemetry(PipelineScoped):
    """The monitor's picture of a pipeline, published every tick on `sair.telemetry.<p>`."""

    tick: Count
    ts_s: TimestampS
    window_s: PosFloat
    stages: list[StageMetrics] = Field(min_length=1, max_length=MAX_STAGES)
    arrival_rate_rps: NonNegFloat | None = None
    completed_rps: NonNegFloat | None = None
    e2e_p50_ms: NonNegFloat | None = None
    e2e_p99_ms: NonNegFloat | None = None
    slo_p99_ms: PosFloat
    slo_attainment: Fraction | None = None
    """Share of completions in the window with end-to-end latency <= slo_p99_ms."""
    cost_per_h: NonNegFloat
    """Effective cost rate: GPU billed at its rho share."""
    whole_gpu_cost_per_h: NonNegFloat
    """Cost rate with every GPU replica billed as a whole GPU."""
    bottleneck: Name | None = None
    bottleneck_confidence: Fraction = 0.0
    stale_stages: list[Name] = Field(default_factory=list, max_length=MAX_STAGES)
    degraded: bool = False
    """True when any stage is stale or reported by fewer replicas than expected."""

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: list[StageMetrics]) -> list[StageMetrics]:
        check_unique([s.stage for s in stages], "stages")
        return stages

    @model_validator(mode="after")
    def _bottleneck_is_a_stage(self) -> PipelineTelemetry:
        names = {s.stage for s in self.stages}
        if self.bottleneck is not None and self.bottleneck not in names:
            raise ValueError(f"bottleneck: unknown stage {self.bottleneck!r}")
        for name in self.stale_stages:
            if name not in names:
                raise ValueError(f"stale_stages: unknown stage {name!r}")
        return self

    def stage(self, name: str) -> StageMetrics:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(f"stage {name!r} not in telemetry of {self.pipeline!r}")


# --------------------------------------------------------------------------- actions


class StageAction(SairModel):
    stage: Name
    target_replicas: Annotated[int, Field(ge=0, le=1000)]
    rho: Rho | None = None
    """GPU stages only; None keeps the current share."""

    @field_validator("stage")
    @classmethod
    def _stage_known(cls, stage: str, info: ValidationInfo) -> str:
        _check_stage_known(stage, info, "stage")
        return stage


def _unique_stage_actions(actions: list[StageAction]) -> list[StageAction]:
    check_unique([a.stage for a in actions], "stages")
    return actions


class ScalingAction(PipelineScoped):
    """A decision, published on `sair.actions.<pipeline>` (the audit log)."""

    action_id: Identifier
    ts_s: TimestampS
    stages: list[StageAction] = Field(min_length=1, max_length=MAX_STAGES)
    source: ActionSource
    policy: Name
    rationale: Text = ""
    bottleneck: Name | None = None
    predicted_p99_ms: NonNegFloat | None = None
    predicted_reward: float | None = None
    based_on_tick: Count | None = None
    advisory: bool = False
    """Decided and published but not to be applied."""
    fallback_reason: Text | None = None
    """Why the LLM's answer was replaced (timeout, malformed, out of range)."""
    validator_reasons: list[Text] = Field(default_factory=list, max_length=64)

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: list[StageAction]) -> list[StageAction]:
        return _unique_stage_actions(stages)


class ActionResult(PipelineScoped):
    """The actuator's answer to one action, on `sair.actions.<pipeline>.result`."""

    action_id: Identifier
    ts_s: TimestampS
    status: ResultStatus
    backend: Name
    applied: list[StageAction] = Field(default_factory=list, max_length=MAX_STAGES)
    reasons: list[Text] = Field(default_factory=list, max_length=64)


# --------------------------------------------------------------------------- learning


class EpisodeOutcome(SairModel):
    p99_ms: NonNegFloat | None
    cost_per_h: NonNegFloat
    slo_attainment: Fraction | None = None
    throughput_rps: NonNegFloat | None = None


class Episode(PipelineScoped):
    """A decision and its measured result: (context, action, reward)."""

    episode_id: Identifier
    ts_s: TimestampS
    encoding_version: Annotated[int, Field(ge=1)]
    context: list[float] = Field(min_length=1, max_length=MAX_CONTEXT_DIM)
    action: list[StageAction] = Field(min_length=1, max_length=MAX_STAGES)
    reward: float
    outcome: EpisodeOutcome
    source: ActionSource
    action_id: Identifier | None = None

    @field_validator("action")
    @classmethod
    def _unique(cls, stages: list[StageAction]) -> list[StageAction]:
        return _unique_stage_actions(stages)


class RetrieveRequest(PipelineScoped):
    """Query on `sair.retrieve.<pipeline>` (request/reply)."""

    encoding_version: Annotated[int, Field(ge=1)]
    context: list[float] = Field(min_length=1, max_length=MAX_CONTEXT_DIM)
    m: Annotated[int, Field(ge=1, le=MAX_EPISODES_PER_REPLY)] = 15
    candidates: Annotated[int, Field(ge=1, le=1024)] = 128


class RetrievedEpisode(SairModel):
    episode: Episode
    similarity: Fraction
    surprisal: NonNegFloat
    score: NonNegFloat


class RetrieveReply(PipelineScoped):
    episodes: list[RetrievedEpisode] = Field(
        default_factory=list, max_length=MAX_EPISODES_PER_REPLY
    )
    stored: Count = 0
    cold_start: bool = False
    """Fewer than m episodes were stored: everything that exists was returned."""
    error: Text | None = None


# --------------------------------------------------------------------------- desired state


class StageDesired(SairModel):
    """Value of KV key `<pipeline>.<stage>` in bucket `sair_desired` (the local backend)."""

    replicas: Annotated[int, Field(ge=0, le=1000)]
    rho: Rho | None = None
    action_id: Identifier | None = None
    ts_s: TimestampS


class StageReplicas(SairModel):
    stage: Name
    desired: Count
    starting: Count = 0
    ready: Count = 0
    draining: Count = 0
    crashed_total: Count = 0


class ReplicaStatus(PipelineScoped):
    """The supervisor's view of each stage's worker processes, on `sair.replicas.<pipeline>`."""

    supervisor_id: Identifier
    ts_s: TimestampS
    stages: list[StageReplicas] = Field(min_length=1, max_length=MAX_STAGES)


# --------------------------------------------------------------------------- dead letters


class DeadLetter(SairModel):
    """What a service publishes on `sair.dlq.<service>` when it rejects a message."""

    service: Name
    subject: Annotated[str, Field(max_length=256)]
    reason: Text
    ts_s: TimestampS
    payload: Annotated[str, Field(max_length=65536)]
    """The rejected payload (decoded as UTF-8 with replacement, cut at 64 KiB)."""


ALL_MESSAGES: tuple[type[SairModel], ...] = (
    WorkerReport,
    StageRequest,
    Completion,
    StageMetrics,
    PipelineTelemetry,
    StageAction,
    ScalingAction,
    ActionResult,
    Episode,
    RetrieveRequest,
    RetrieveReply,
    DeadLetter,
    StageDesired,
    ReplicaStatus,
    PipelineSpec,
)

"""The message contract shared by every SAIR service (single source of truth)."""

from .common import SCHEMA_VERSION, SairModel, describe_error
from .histogram import LatencyHistogram
from .messages import (
    ActionResult,
    Completion,
    DeadLetter,
    Episode,
    EpisodeOutcome,
    Percentiles,
    PipelineTelemetry,
    RetrievedEpisode,
    RetrieveReply,
    RetrieveRequest,
    ScalingAction,
    StageAction,
    StageMetrics,
    StageRequest,
    WorkerReport,
)
from .pipeline import PipelineSpec, Prices, RewardWeights, StageSpec, load_pipeline_spec

__all__ = [
    "SCHEMA_VERSION",
    "ActionResult",
    "Completion",
    "DeadLetter",
    "Episode",
    "EpisodeOutcome",
    "LatencyHistogram",
    "Percentiles",
    "PipelineSpec",
    "PipelineTelemetry",
    "Prices",
    "RetrieveReply",
    "RetrieveRequest",
    "RetrievedEpisode",
    "RewardWeights",
    "SairModel",
    "ScalingAction",
    "StageAction",
    "StageMetrics",
    "StageRequest",
    "StageSpec",
    "WorkerReport",
    "describe_error",
    "load_pipeline_spec",
]

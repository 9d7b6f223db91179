"""The context vector of a decision: how a telemetry snapshot becomes a point in [0, 1]^d.

Versioned: `ENCODING_VERSION` is stored with every episode and sent with every query, and
the retriever keeps one collection per (pipeline, version), so vectors of a changed encoding
never mix with old ones. Change the layout => bump the version.

Layout, version 1 (d = 2 + 6 x stages), every feature clipped to [0, 1]:
- pipeline: log load  = log1p(arrival_rps) / log1p(MAX_RPS)
            latency   = min(e2e_p99 / SLO, 3) / 3
- per stage, in pipeline order:
            log load  = log1p(arrival_rps) / log1p(MAX_RPS)
            util      = min(utilisation, 2) / 2          (GPU: of the rho quota)
            queue     = log1p(queue_depth) / log1p(MAX_QUEUE)
            p99       = min(sojourn_p99 / SLO, 3) / 3
            replicas  = replicas_ready / max_replicas
            rho       = rho (1 for CPU stages)
An unknown value (None in telemetry) encodes as the feature's neutral value 0, and the
telemetry's missing-field flags travel separately; a policy should not trust a context whose
telemetry is degraded.
"""

from __future__ import annotations

import math

from .messages import PipelineTelemetry
from .pipeline import PipelineSpec

ENCODING_VERSION = 1
MAX_RPS = 10_000.0
MAX_QUEUE = 100_000.0
PIPELINE_FEATURES = ("log_load", "e2e_p99_slo")
STAGE_FEATURES = ("log_load", "utilisation", "log_queue", "p99_slo", "replicas", "rho")


def context_dim(spec: PipelineSpec) -> int:
    return len(PIPELINE_FEATURES) + len(STAGE_FEATURES) * len(spec.stages)


def feature_names(spec: PipelineSpec) -> list[str]:
    names = [f"pipeline.{f}" for f in PIPELINE_FEATURES]
    for stage in spec.stage_names:
        names.extend(f"{stage}.{f}" for f in STAGE_FEATURES)
    return names


def _clip01(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def _log_scaled(x: float | None, top: float) -> float:
    return 0.0 if x is None else _clip01(math.log1p(max(x, 0.0)) / math.log1p(top))


def _ratio(x: float | None, slo: float, cap: float = 3.0) -> float:
    return 0.0 if x is None else _clip01(min(x / slo, cap) / cap)


def encode_context(telemetry: PipelineTelemetry, spec: PipelineSpec) -> list[float]:
    """Encode a telemetry snapshot (stages matched by name, in the spec's order)."""
    if telemetry.pipeline != spec.name:
        raise ValueError(f"telemetry.pipeline={telemetry.pipeline!r} is not {spec.name!r}")
    slo = spec.slo_p99_ms
    vec = [
        _log_scaled(telemetry.arrival_rate_rps, MAX_RPS),
        _ratio(telemetry.e2e_p99_ms, slo),
    ]
    by_name = {s.stage: s for s in telemetry.stages}
    for stage in spec.stages:
        m = by_name.get(stage.name)
        if m is None:
            vec.extend([0.0] * len(STAGE_FEATURES))
            continue
        util = None if m.utilisation is None else min(m.utilisation, 2.0) / 2.0
        vec.extend(
            [
                _log_scaled(m.arrival_rate_rps, MAX_RPS),
                0.0 if util is None else _clip01(util),
                _log_scaled(None if m.queue_depth is None else float(m.queue_depth), MAX_QUEUE),
                _ratio(m.sojourn_ms.p99_ms if m.sojourn_ms else None, slo),
                _clip01(m.replicas_ready / stage.max_replicas),
                1.0 if stage.kind == "cpu" else (m.rho if m.rho is not None else 1.0),
            ]
        )
    return vec

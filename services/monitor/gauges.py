"""The monitor's figures as Prometheus gauges in the service runtime's registry.

An unknown figure (None) removes its series instead of exporting a made-up 0, so a scrape
tells "idle" (0) from "unknown" (absent), as the telemetry message does.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Gauge

from schemas.messages import PipelineTelemetry, StageMetrics

_STAGE_FIGURES: dict[str, str] = {
    "arrival_rate_rps": "Requests per second entering the stage queue",
    "throughput_rps": "Requests per second the stage finished",
    "queue_depth": "Requests waiting or in service (JetStream pending + ack pending)",
    "queue_growth_per_s": "Slope of the queue depth",
    "utilisation": "Busy share of the replicas (GPU: of the rho quota)",
    "service_p50_ms": "Service time P50",
    "service_p95_ms": "Service time P95",
    "service_p99_ms": "Service time P99",
    "sojourn_p50_ms": "Queue wait + service P50",
    "sojourn_p95_ms": "Queue wait + service P95",
    "sojourn_p99_ms": "Queue wait + service P99",
    "rho": "GPU share of one replica",
    "cost_per_h": "Effective cost rate of the stage (US$/h)",
    "replicas_ready": "Ready replicas",
    "replicas_starting": "Starting replicas",
    "replicas_draining": "Draining replicas",
    "replicas_desired": "Desired replicas (supervisor)",
    "reporting_replicas": "Replicas whose reports are fresh",
    "stale": "1 when the stage has not reported for longer than the stale limit",
}

_PIPELINE_FIGURES: dict[str, str] = {
    "arrival_rate_rps": "Requests per second entering the pipeline",
    "completed_rps": "Completions per second",
    "e2e_p50_ms": "End-to-end latency P50",
    "e2e_p99_ms": "End-to-end latency P99",
    "slo_attainment": "Share of completions within the P99 SLO",
    "cost_per_h": "Effective cost rate (GPU billed by rho share), US$/h",
    "whole_gpu_cost_per_h": "Cost rate with whole GPUs billed, US$/h",
    "bottleneck_confidence": "Confidence of the suspected bottleneck",
    "degraded": "1 when any stage is stale or short of reporting replicas",
    "tick": "Telemetry tick counter",
    "tick_lateness_s": "How late the last telemetry tick was published",
}


def _stage_value(m: StageMetrics, figure: str) -> float | None:
    if figure.startswith(("service_p", "sojourn_p")):
        pct = m.service_ms if figure.startswith("service") else m.sojourn_ms
        if pct is None:
            return None
        return float(getattr(pct, figure.split("_", 1)[1]))
    value = getattr(m, figure)
    if value is None:
        return None
    return float(value)


class MonitorGauges:
    """One gauge per figure, labelled by pipeline (and stage)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stage = {
            f: Gauge(f"sair_monitor_stage_{f}", d, ["pipeline", "stage"], registry=registry)
            for f, d in _STAGE_FIGURES.items()
        }
        self.pipeline = {
            f: Gauge(f"sair_monitor_{f}", d, ["pipeline"], registry=registry)
            for f, d in _PIPELINE_FIGURES.items()
        }
        self.bottleneck = Gauge(
            "sair_monitor_bottleneck",
            "1 for the suspected bottleneck stage, 0 for the others",
            ["pipeline", "stage"],
            registry=registry,
        )
        self.reports = Gauge(
            "sair_monitor_reports", "Worker reports absorbed", ["pipeline"], registry=registry
        )
        self.restarts = Gauge(
            "sair_monitor_worker_restarts",
            "Worker restarts seen (report counter went back)",
            ["pipeline"],
            registry=registry,
        )
        self.lost_reports = Gauge(
            "sair_monitor_lost_reports",
            "Reports missing from a worker's counter sequence",
            ["pipeline"],
            registry=registry,
        )

    @staticmethod
    def _set(g: Gauge, labels: tuple[str, ...], value: float | None) -> None:
        if value is None:
            with contextlib.suppress(KeyError):
                g.remove(*labels)
        else:
            g.labels(*labels).set(value)

    def update(
        self,
        t: PipelineTelemetry,
        lateness_s: float,
        reports: int,
        restarts: int,
        lost_reports: int,
    ) -> None:
        p = t.pipeline
        for m in t.stages:
            for figure, g in self.stage.items():
                self._set(g, (p, m.stage), _stage_value(m, figure))
            self.bottleneck.labels(p, m.stage).set(1.0 if t.bottleneck == m.stage else 0.0)
        for figure, g in self.pipeline.items():
            if figure == "tick_lateness_s":
                value: float | None = lateness_s
            else:
                raw = getattr(t, figure)
                value = None if raw is None else float(raw)
            self._set(g, (p,), value)
        self.reports.labels(p).set(reports)
        self.restarts.labels(p).set(restarts)
        self.lost_reports.labels(p).set(lost_reports)

"""The message contract: round trips, the rules every model enforces, exported schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import subjects
from schemas.common import describe_error
from schemas.export import JSON_DIR, render_all
from schemas.messages import (
    ALL_MESSAGES,
    PipelineTelemetry,
    ScalingAction,
    StageAction,
    WorkerReport,
)
from schemas.pipeline import PipelineSpec, load_pipeline_spec
from tests.foundation.samples import ACTION, REPORT, SAMPLES, SPEC, TELEMETRY


def test_every_message_has_a_sample() -> None:
    assert {m.__name__ for m in ALL_MESSAGES} == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_through_json(name: str) -> None:
    sample = SAMPLES[name]
    raw = sample.model_dump_json()
    again = type(sample).model_validate_json(raw)
    assert again == sample
    assert json.loads(raw)["schema_version"] == 1


def _mutate(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(base))
    keys = path.split(".")
    node: Any = data
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


NAN = float("nan")
BAD_INPUTS: list[tuple[str, type[Any], dict[str, Any], str, Any, str]] = [
    # (id, model, base sample as dict, field path, bad value, field named in the error)
    ("report-unknown-field", WorkerReport, REPORT.model_dump(), "bogus", 1, "bogus"),
    ("report-negative-processed", WorkerReport, REPORT.model_dump(), "processed", -1, "processed"),
    ("report-nan-busy", WorkerReport, REPORT.model_dump(), "busy_s", NAN, "busy_s"),
    ("report-inf-busy", WorkerReport, REPORT.model_dump(), "busy_s", float("inf"), "busy_s"),
    ("report-rho-above-1", WorkerReport, REPORT.model_dump(), "rho", 1.5, "rho"),
    ("report-rho-negative", WorkerReport, REPORT.model_dump(), "rho", -0.1, "rho"),
    ("report-empty-stage", WorkerReport, REPORT.model_dump(), "stage", "", "stage"),
    ("report-uppercase-stage", WorkerReport, REPORT.model_dump(), "stage", "Infer", "stage"),
    ("report-dotted-pipeline", WorkerReport, REPORT.model_dump(), "pipeline", "a.b", "pipeline"),
    ("report-bad-state", WorkerReport, REPORT.model_dump(), "state", "sleeping", "state"),
    ("report-zero-interval", WorkerReport, REPORT.model_dump(), "interval_s", 0, "interval_s"),
    (
        "report-wrong-version",
        WorkerReport,
        REPORT.model_dump(),
        "schema_version",
        2,
        "schema_version",
    ),
    (
        "report-bucket-out-of-layout",
        WorkerReport,
        REPORT.model_dump(),
        "service_ms.counts",
        {"999": 1},
        "service_ms.counts",
    ),
    (
        "report-negative-bucket-count",
        WorkerReport,
        REPORT.model_dump(),
        "service_ms.counts",
        {"3": -2},
        "service_ms.counts.3",
    ),
    (
        "report-long-worker-id",
        WorkerReport,
        REPORT.model_dump(),
        "worker_id",
        "w" * 200,
        "worker_id",
    ),
    (
        "action-negative-replicas",
        ScalingAction,
        ACTION.model_dump(),
        "stages.0.target_replicas",
        -1,
        "stages.0.target_replicas",
    ),
    ("action-rho-nan", ScalingAction, ACTION.model_dump(), "stages.0.rho", NAN, "stages.0.rho"),
    ("action-unknown-source", ScalingAction, ACTION.model_dump(), "source", "oracle", "source"),
    (
        "action-oversized-rationale",
        ScalingAction,
        ACTION.model_dump(),
        "rationale",
        "x" * 5000,
        "rationale",
    ),
    ("action-no-stages", ScalingAction, ACTION.model_dump(), "stages", [], "stages"),
    (
        "action-duplicate-stage",
        ScalingAction,
        ACTION.model_dump(),
        "stages.1.stage",
        "infer",
        "stages",
    ),
    (
        "telemetry-attainment-above-1",
        PipelineTelemetry,
        TELEMETRY.model_dump(),
        "slo_attainment",
        1.2,
        "slo_attainment",
    ),
    (
        "telemetry-unknown-bottleneck",
        PipelineTelemetry,
        TELEMETRY.model_dump(),
        "bottleneck",
        "gpu9",
        "bottleneck",
    ),
    (
        "telemetry-unordered-percentiles",
        PipelineTelemetry,
        TELEMETRY.model_dump(),
        "stages.1.service_ms.p99_ms",
        1.0,
        "stages.1.service_ms",
    ),
    (
        "telemetry-negative-queue",
        PipelineTelemetry,
        TELEMETRY.model_dump(),
        "stages.0.queue_depth",
        -5,
        "stages.0.queue_depth",
    ),
    (
        "spec-min-above-max",
        PipelineSpec,
        SPEC.model_dump(),
        "stages.0.min_replicas",
        20,
        "stages.0",
    ),
    (
        "spec-reserved-stage",
        PipelineSpec,
        SPEC.model_dump(),
        "stages.0.name",
        "done",
        "stages.0.name",
    ),
    (
        "spec-rho-grid-unsorted",
        PipelineSpec,
        SPEC.model_dump(),
        "stages.1.rho_grid",
        [0.5, 0.25],
        "stages.1.rho_grid",
    ),
    ("spec-gpu-without-grid", PipelineSpec, SPEC.model_dump(), "stages.1.rho_grid", [], "stages.1"),
    ("spec-zero-slo", PipelineSpec, SPEC.model_dump(), "slo_p99_ms", 0, "slo_p99_ms"),
]


@pytest.mark.parametrize(
    ("model", "base", "path", "value", "field"),
    [row[1:] for row in BAD_INPUTS],
    ids=[row[0] for row in BAD_INPUTS],
)
def test_bad_input_is_rejected_naming_the_field(
    model: type[Any], base: dict[str, Any], path: str, value: Any, field: str
) -> None:
    data = _mutate(base, path, value)
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    described = describe_error(info.value)
    assert field in described, described
    # The value is named too (NaN and long strings are shown by repr, possibly cut).
    shown = repr(value)[:20] if not isinstance(value, (list, dict)) else ""
    if shown and path.split(".")[-1] == field.split(".")[-1]:
        assert shown[:15] in described, described


def test_nan_is_rejected_from_raw_json_too() -> None:
    raw = REPORT.model_dump_json().replace('"busy_s":0.8', '"busy_s":NaN')
    with pytest.raises(ValidationError, match="busy_s"):
        WorkerReport.model_validate_json(raw)


def test_unknown_stage_is_rejected_with_the_spec_as_context() -> None:
    data = ACTION.model_dump()
    data["stages"][0]["stage"] = "decode"
    ScalingAction.model_validate(data)  # no spec: the name is merely well-formed
    with pytest.raises(ValidationError, match="unknown stage 'decode'"):
        ScalingAction.model_validate(data, context={"spec": SPEC})
    with pytest.raises(ValidationError, match="pipeline 'other'"):
        WorkerReport.model_validate(
            {**REPORT.model_dump(), "pipeline": "other"}, context={"spec": SPEC}
        )


def test_messages_are_frozen() -> None:
    with pytest.raises(ValidationError):
        ACTION.advisory = True  # type: ignore[misc]


def test_json_schemas_are_current() -> None:
    rendered = render_all()
    on_disk = {p.name: p.read_text() for p in JSON_DIR.glob("*.json")}
    stale = sorted(n for n in rendered if on_disk.get(n) != rendered[n])
    extra = sorted(set(on_disk) - set(rendered))
    assert not stale and not extra, f"run `python -m schemas.export` (stale {stale}, extra {extra})"


def test_exported_schema_forbids_unknown_fields() -> None:
    schema = json.loads((JSON_DIR / "StageAction.json").read_text())
    assert schema["additionalProperties"] is False


def test_asyncapi_document_is_current() -> None:
    from sair.asyncapi import DOC_PATH, SUBJECTS, render

    assert json.loads(DOC_PATH.read_text()) == json.loads(render()), "run `python -m sair.asyncapi`"
    channels = json.loads(render())["channels"]
    for subject, _model, _desc in SUBJECTS:
        assert subject in channels


def test_pipeline_spec_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        """
name = "tiny"
slo_p99_ms = 100
[[stages]]
name = "pre"
kind = "cpu"
[[stages]]
name = "infer"
kind = "gpu"
rho_grid = [0.5, 1.0]
full_speed_launch_rate = 1000
"""
    )
    spec = load_pipeline_spec(path)
    assert spec.stage_names == ("pre", "infer")
    assert spec.stage("infer").start_rho == 1.0
    assert spec.next_stage("pre") is not None and spec.next_stage("infer") is None
    # 1 core x 0.034 + 1 GB x 0.0045 + 0.5 x 0.79 = 0.4335 $/h
    assert spec.replica_cost_per_h(spec.stage("infer"), 0.5) == pytest.approx(0.4335)


SUBJECT_CASES = [
    (subjects.pipe_stage, ("imgcls", "pre"), "sair.pipe.imgcls.pre"),
    (subjects.pipe_done, ("imgcls",), "sair.pipe.imgcls.done"),
    (subjects.reports, ("imgcls", "infer"), "sair.reports.imgcls.infer"),
    (subjects.reports_all, ("imgcls",), "sair.reports.imgcls.*"),
    (subjects.telemetry, ("nlp",), "sair.telemetry.nlp"),
    (subjects.episodes, ("nlp",), "sair.episodes.nlp"),
    (subjects.retrieve, ("nlp",), "sair.retrieve.nlp"),
    (subjects.actions, ("video",), "sair.actions.video"),
    (subjects.action_results, ("video",), "sair.actions.video.result"),
    (subjects.replicas, ("video",), "sair.replicas.video"),
    (subjects.dlq, ("monitor",), "sair.dlq.monitor"),
    (subjects.gpu_bucket_key, ("imgcls", "infer"), "sair:gpu:imgcls:infer"),
    (subjects.pipe_stream, ("text-gen",), "SAIR_PIPE_TEXT_GEN"),
    (subjects.done_stream, ("text-gen",), "SAIR_DONE_TEXT_GEN"),
]


@pytest.mark.parametrize(
    ("fn", "args", "expected"), SUBJECT_CASES, ids=[c[2] for c in SUBJECT_CASES]
)
def test_subject_names(fn: Any, args: tuple[str, ...], expected: str) -> None:
    assert fn(*args) == expected


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("a.b", "pre"), "pipeline"),
        (("p", "*"), "stage"),
        (("p", "done"), "stage"),
        (("", "x"), "pipeline"),
        (("p", ">"), "stage"),
    ],
)
def test_subject_functions_reject_bad_names(args: tuple[str, str], field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}="):
        subjects.pipe_stage(*args)


def test_stage_action_accepts_cpu_without_rho() -> None:
    assert StageAction(stage="pre", target_replicas=0).rho is None

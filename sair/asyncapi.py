"""Generate the AsyncAPI document of SAIR's subjects with FastStream.

Each subject of the design is declared on a FastStream NATS broker with the `schemas/` model
it carries; FastStream renders the document. Nothing connects: the broker is only described.
Run `python -m sair.asyncapi` to rewrite `docs/asyncapi.json` (a test checks it is current).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from schemas import SCHEMA_VERSION
from schemas.messages import (
    ActionResult,
    Completion,
    DeadLetter,
    Episode,
    PipelineTelemetry,
    ReplicaStatus,
    RetrieveReply,
    RetrieveRequest,
    ScalingAction,
    StageRequest,
    WorkerReport,
)

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"

# (subject pattern, model, who publishes -> who consumes)
SUBJECTS: tuple[tuple[str, type[Any], str], ...] = (
    ("sair.pipe.{pipeline}.{stage}", StageRequest, "previous stage / loadgen -> workers"),
    ("sair.pipe.{pipeline}.done", Completion,
     "last stage -> load generator, monitor (core NATS; kept an hour in SAIR_DONE_<P>)"),
    ("sair.reports.{pipeline}.{stage}", WorkerReport, "each worker, every second -> monitor"),
    ("sair.replicas.{pipeline}", ReplicaStatus, "supervisor, every second -> monitor"),
    ("sair.telemetry.{pipeline}", PipelineTelemetry, "monitor, every tick -> policy, anyone"),
    ("sair.episodes.{pipeline}", Episode, "policy -> retriever (JetStream)"),
    ("sair.retrieve.{pipeline}", RetrieveRequest, "policy -> retriever (request; RetrieveReply)"),
    ("sair.actions.{pipeline}", ScalingAction, "policy -> actuator, subscribers (audit log)"),
    ("sair.actions.{pipeline}.result", ActionResult, "actuator -> anyone (JetStream audit log)"),
    ("sair.dlq.{service}", DeadLetter, "any service -> operators (JetStream)"),
)  # fmt: skip


def build_broker() -> NatsBroker:
    broker = NatsBroker("nats://localhost:4222")
    for subject, model, description in SUBJECTS:
        _declare(broker, subject, model, description)
    # The retrieve reply is published on the requester's inbox.
    broker.publisher(
        "sair.retrieve.{pipeline}.reply", schema=RetrieveReply, description="retriever -> policy"
    )
    return broker


def _declare(broker: NatsBroker, subject: str, model: type[Any], description: str) -> None:
    async def handler(msg: Any) -> None:  # documentation only: never subscribed
        return None

    handler.__annotations__["msg"] = model
    handler.__name__ = "on_" + subject.replace(".", "_").replace("{", "").replace("}", "")
    broker.subscriber(subject, description=description, title=subject)(handler)


def render() -> str:
    spec = AsyncAPI(
        build_broker(),
        title="SAIR",
        version=f"schema-v{SCHEMA_VERSION}",
        description="Subjects and messages of the SAIR autoscaler (all JSON, schemas/ models).",
    )
    return str(spec.to_specification().to_json())


def main() -> int:
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(render())
    print(DOC_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())

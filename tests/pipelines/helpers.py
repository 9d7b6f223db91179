"""Shared set-up of the pipeline tests: small specs on disk, tuned consumers, waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from nats.js import JetStreamContext

from sair.runtime import ensure_core_streams, ensure_pipeline_streams
from schemas import subjects
from schemas.pipeline import PipelineSpec, load_pipeline_spec


def write_spec(tmp_path: Path, name: str, stages: list[tuple[str, str, int, str]]) -> tuple[
    Path, PipelineSpec
]:
    """stages: (name, handler, initial replicas, extra TOML lines)."""
    lines = [f'name = "{name}"', "slo_p99_ms = 1000.0", ""]
    for stage, handler, initial, extra in stages:
        lines += [
            "[[stages]]", f'name = "{stage}"', 'kind = "cpu"', f'handler = "{handler}"',
            f"initial_replicas = {initial}", "max_replicas = 4", "startup_s = 0.0", extra, "",
        ]  # fmt: skip
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path, load_pipeline_spec(path)


async def make_streams(js: JetStreamContext, spec: PipelineSpec, ack_wait_s: float = 4.0) -> None:
    """The pipeline's stream and consumers, with a short ack_wait so that requests held by a
    SIGKILLed worker come back within the test's time."""
    await ensure_core_streams(js)
    await ensure_pipeline_streams(js, spec)
    stream = subjects.pipe_stream(spec.name)
    for stage in spec.stage_names:
        info = await js.consumer_info(stream, subjects.stage_consumer(stage))
        cfg = info.config
        cfg.ack_wait = ack_wait_s
        await js.add_consumer(stream, cfg)


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)

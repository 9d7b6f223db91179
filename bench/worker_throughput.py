"""Throughput of one no-op stage at 1, 2, 4 worker replicas vs a raw nats-py pull loop, and
the latency a stage hop adds.

Throughput: N requests are preloaded into the stage's queue, the consumers are started, and
the rate at which forwarded requests arrive in the next stage's queue is measured between
10% and 90% of N (so process start-up is excluded). The raw baseline is the loop a developer
would write with nats-py: fetch(16), JetStream-publish each message onward with a msg id,
ack; no parsing, no reports. Both run as separate processes against the same nats-server.

Hop latency: a 3-stage no-op pipeline (one worker each) under Poisson load well below
capacity; per request (end-to-end - sum of handler times) / 3.

Last line: {"rps_1", "rps_2", "rps_4", "raw_rps", "ratio", "hop_p50_ms", "hop_p99_ms"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import numpy as np
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sair.loadgen import LoadGenerator  # noqa: E402
from sair.loadgen.arrivals import arrivals  # noqa: E402
from sair.runtime import ensure_core_streams, ensure_pipeline_streams  # noqa: E402
from sair.stack import NatsServer, free_port  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.messages import StageRequest, WorkerReport  # noqa: E402
from schemas.pipeline import PipelineSpec, load_pipeline_spec  # noqa: E402


def write_spec(d: Path, name: str, stages: list[str]) -> tuple[Path, PipelineSpec]:
    lines = [f'name = "{name}"', "slo_p99_ms = 1000.0"]
    for s in stages:
        lines += ["[[stages]]", f'name = "{s}"', 'kind = "cpu"',
                  'handler = "sair.pipelines.testing:noop"', "max_replicas = 8"]  # fmt: skip
    path = d / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, load_pipeline_spec(path)


async def raw_child(url: str, pipeline: str) -> None:
    """The baseline consumer loop (run in its own process)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = subjects.pipe_stream(pipeline)
    psub = await js.pull_subscribe(
        subjects.pipe_stage(pipeline, "hop"), durable=subjects.stage_consumer("hop"), stream=stream
    )
    out = subjects.pipe_stage(pipeline, "sink")
    while True:
        try:
            msgs = await psub.fetch(16, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            await js.publish(out, m.data, headers={"Nats-Msg-Id": f"{m.metadata.sequence.stream}"})
            await m.ack()


async def preload(js: nats.js.JetStreamContext, pipeline: str, n: int) -> None:
    subject = subjects.pipe_stage(pipeline, "hop")
    now = time.time()
    for start in range(0, n, 500):
        await asyncio.gather(*[
            js.publish(subject, StageRequest(
                request_id=f"b{i}", pipeline=pipeline, created_ts_s=now, enqueued_ts_s=now,
                payload={"seq": i}).model_dump_json().encode())
            for i in range(start, min(n, start + 500))
        ])  # fmt: skip


async def measure(url: str, workdir: Path, label: str, replicas: int, n: int) -> float:
    """Requests/s through the `hop` stage with `replicas` workers (0 = the raw loop)."""
    name = f"tput-{label}"
    path, spec = write_spec(workdir, name, ["hop", "sink"])
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_core_streams(js)
    await ensure_pipeline_streams(js, spec)
    await preload(js, name, n)
    env = {**os.environ, "SAIR_NATS_URL": url, "SAIR_METRICS_PORT": "off"}
    if replicas == 0:
        cmds = [[sys.executable, __file__, "--raw-child", url, name]]
    else:
        cmds = [[sys.executable, "-m", "sair.worker", "--pipeline", str(path), "--stage", "hop",
                 "--worker-id", f"{name}-{i}", "--log-level", "WARNING"]
                for i in range(replicas)]  # fmt: skip
    procs = [subprocess.Popen(c, env=env, cwd=ROOT) for c in cmds]
    samples: list[tuple[float, int]] = []
    stream = subjects.pipe_stream(name)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = await js.consumer_info(stream, subjects.stage_consumer("sink"))
            samples.append((time.monotonic(), int(info.num_pending)))
            if info.num_pending >= n:
                break
            await asyncio.sleep(0.02)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        await js.delete_stream(stream)
        await nc.close()
    lo = next(t for t, c in samples if c >= 0.1 * n)
    hi = next((t for t, c in samples if c >= 0.9 * n), samples[-1][0])
    return 0.8 * n / max(1e-9, hi - lo)


async def hop_latency(url: str, workdir: Path, rate_rps: float, duration_s: float) -> list[float]:
    name = "tput-lat"
    path, spec = write_spec(workdir, name, ["s1", "s2", "s3"])
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_core_streams(js)
    await ensure_pipeline_streams(js, spec)
    env = {**os.environ, "SAIR_NATS_URL": url, "SAIR_METRICS_PORT": "off"}
    ready: set[str] = set()

    async def on_report(msg: Msg) -> None:
        rep = WorkerReport.model_validate_json(msg.data)
        if rep.state == "ready":
            ready.add(rep.stage)

    await nc.subscribe(subjects.reports_all(name), cb=on_report)
    procs = [subprocess.Popen([sys.executable, "-m", "sair.worker", "--pipeline", str(path),
                               "--stage", s, "--log-level", "WARNING"], env=env, cwd=ROOT)
             for s in spec.stage_names]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(ready) < 3 and time.monotonic() < deadline:  # worker start-up
            await asyncio.sleep(0.1)
        gen = LoadGenerator(nc, spec, "lat")
        result = await gen.run(arrivals("poisson", {"rate_rps": rate_rps}, duration_s, 1).tolist())
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=15)
        await nc.close()
    return [
        (r.e2e_ms - sum(r.stage_ms.values())) / 3
        for r in result.records.values() if r.e2e_ms is not None
    ]


async def main_async(quick: bool) -> dict[str, float]:
    n = 2000 if quick else 6000
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        server = NatsServer("nats-server", "127.0.0.1", free_port(), workdir / "nats")
        server.start()
        try:
            raw = await measure(server.url, workdir, "raw", 0, n)
            print(f"raw nats-py loop: {raw:.0f} req/s", flush=True)
            rps = {}
            for r in (1, 2, 4):
                rps[r] = await measure(server.url, workdir, f"r{r}", r, n)
                print(f"{r} replica(s): {rps[r]:.0f} req/s", flush=True)
            hops = await hop_latency(server.url, workdir, 50.0, 4.0 if quick else 15.0)
        finally:
            server.stop()
    return {
        "rps_1": round(rps[1], 1), "rps_2": round(rps[2], 1), "rps_4": round(rps[4], 1),
        "raw_rps": round(raw, 1), "ratio": round(rps[1] / raw, 3),
        "hop_p50_ms": round(float(np.percentile(hops, 50)), 3),
        "hop_p99_ms": round(float(np.percentile(hops, 99)), 3),
    }  # fmt: skip


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--raw-child":
        asyncio.run(raw_child(sys.argv[2], sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer requests, shorter latency run")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args.quick))))


if __name__ == "__main__":
    main()

"""Request/reply round trip through the service runtime vs raw nats-py, in the same run.

Both sides use the same nats-server (started here on a free loopback port) and the same
payload; the runtime adds parsing into a schemas/ model on both ends, the handler call,
metrics and serialisation. Rounds alternate in blocks so that machine noise hits both alike.

    .venv/bin/python bench/bus_roundtrip.py [--n 5000] [--quick]

Last line: {"runtime_p50_ms", "runtime_p99_ms", "raw_p50_ms", "raw_p99_ms", "ratio_p50"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import nats
import numpy as np
from nats.aio.msg import Msg

from sair.runtime import ServiceRuntime
from sair.settings import Settings
from sair.stack import NatsServer, free_port
from schemas.messages import ScalingAction, StageAction

ACTION = ScalingAction(
    pipeline="bench",
    action_id="act-1",
    ts_s=1.0,
    stages=[
        StageAction(stage="pre", target_replicas=2),
        StageAction(stage="infer", target_replicas=3, rho=0.5),
    ],
    source="embedded",
    policy="sair",
    rationale="benchmark payload",
)


async def run(n: int, block: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer("nats-server", "127.0.0.1", free_port(), Path(tmp))
        server.start()
        try:
            return await _measure(server.url, n, block)
        finally:
            server.stop()


async def _measure(url: str, n: int, block: int) -> dict[str, float]:
    settings = Settings(nats_url=url, metrics_port=-1)
    responder = ServiceRuntime("benchserver", settings)
    requester = ServiceRuntime("benchclient", settings)
    await responder.start()
    await requester.start()

    async def echo(action: ScalingAction) -> ScalingAction:
        return action

    await responder.serve("bench.runtime", ScalingAction, echo)

    raw_server = await nats.connect(url)
    raw_client = await nats.connect(url)

    async def raw_echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await raw_server.subscribe("bench.raw", cb=raw_echo)
    await raw_server.flush()
    await responder.nc.flush()
    payload = ACTION.model_dump_json().encode()

    runtime_ms: list[float] = []
    raw_ms: list[float] = []
    # warm-up
    for _ in range(200):
        await requester.request("bench.runtime", ACTION, ScalingAction)
        await raw_client.request("bench.raw", payload, timeout=5)
    done = 0
    while done < n:
        for _ in range(block):
            t0 = time.perf_counter()
            reply = await requester.request("bench.runtime", ACTION, ScalingAction)
            runtime_ms.append((time.perf_counter() - t0) * 1000)
        assert reply.action_id == ACTION.action_id
        for _ in range(block):
            t0 = time.perf_counter()
            await raw_client.request("bench.raw", payload, timeout=5)
            raw_ms.append((time.perf_counter() - t0) * 1000)
        done += block

    await raw_server.close()
    await raw_client.close()
    await requester.close()
    await responder.close()
    rt = np.array(runtime_ms)
    raw = np.array(raw_ms)
    return {
        "runtime_p50_ms": round(float(np.percentile(rt, 50)), 4),
        "runtime_p99_ms": round(float(np.percentile(rt, 99)), 4),
        "raw_p50_ms": round(float(np.percentile(raw, 50)), 4),
        "raw_p99_ms": round(float(np.percentile(raw, 99)), 4),
        "ratio_p50": round(float(np.percentile(rt, 50) / np.percentile(raw, 50)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="round trips per side")
    parser.add_argument("--block", type=int, default=100, help="round trips per alternation")
    parser.add_argument("--quick", action="store_true", help="1000 round trips per side")
    args = parser.parse_args()
    n = 1000 if args.quick else args.n
    result = asyncio.run(run(n, args.block))
    print(f"runtime: p50 {result['runtime_p50_ms']} ms, p99 {result['runtime_p99_ms']} ms")
    print(f"raw:     p50 {result['raw_p50_ms']} ms, p99 {result['raw_p99_ms']} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

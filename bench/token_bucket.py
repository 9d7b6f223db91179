"""GPU token grants per second through the Lua script (batch 1, 16, 64) vs a plain INCRBY loop.

One client, sequential round trips to a loopback Redis started for the run (or --redis-url),
each measurement for --seconds. The bucket's rate is set so high that every request is granted
in full: this measures the cost of the script, not throttling. Baseline: INCRBY 1 per call, the
cheapest possible shared counter, in the same run against the same server.

    .venv/bin/python bench/token_bucket.py [--quick] [--seconds S] [--redis-url URL]

Last line: {"grants_per_s_batch1": ..., "grants_per_s_batch16": ..., "grants_per_s_batch64": ...,
"incrby_per_s": ...} (tokens granted per second; INCRBY calls per second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from sair.stack import RedisServer, free_port
from services.actuator.tokens import GpuTokens

HUGE_RATE_PER_S = 1e12


async def lua_grants(tokens: GpuTokens, batch: int, seconds: float) -> tuple[float, float]:
    """(tokens granted per second, script calls per second)."""
    await tokens.set_rate("bench", f"b{batch}", HUGE_RATE_PER_S, 10**15)
    granted = calls = 0
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end:
        grant = await tokens.take("bench", f"b{batch}", batch)
        granted += grant.granted
        calls += 1
    elapsed = time.perf_counter() - started
    return granted / elapsed, calls / elapsed


async def incrby_loop(client: aioredis.Redis, seconds: float) -> float:
    calls = 0
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end:
        await client.incrby("bench:incrby", 1)
        calls += 1
    return calls / (time.perf_counter() - started)


async def run(url: str, seconds: float) -> dict[str, float]:
    tokens = GpuTokens.from_url(url)
    try:
        await tokens.take("bench", "warmup", 1)  # loads the script, opens the connection
        out: dict[str, float] = {}
        for batch in (1, 16, 64):
            per_s, calls_per_s = await lua_grants(tokens, batch, seconds)
            out[f"grants_per_s_batch{batch}"] = round(per_s, 1)
            print(f"lua take batch={batch:>2}: {per_s:12.0f} tokens/s  {calls_per_s:8.0f} calls/s "
                  f"({1e6 / calls_per_s:.0f} us per call)")  # fmt: skip
        incr = await incrby_loop(tokens.redis, seconds)
        out["incrby_per_s"] = round(incr, 1)
        print(f"INCRBY baseline     : {incr:12.0f} calls/s  ({1e6 / incr:.0f} us per call)")
        return out
    finally:
        await tokens.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 s per measurement")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--redis-url", default=None, help="use this server instead of a fresh one")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else args.seconds
    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer("bench-redis", "127.0.0.1", free_port(), Path(tempfile.mkdtemp()))
        server.start()
        url = server.url
    try:
        result = asyncio.run(run(url, seconds))
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

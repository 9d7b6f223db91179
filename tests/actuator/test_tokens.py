"""GPU token buckets on a real Redis: shared rate across concurrent consumers, rate changes,
argument checks, fail modes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from sair.stack import ManagedServer
from services.actuator.tokens import (
    GpuTokens,
    TokenConsumer,
    TokenScriptError,
    gpu_burst,
    gpu_rate_per_s,
)
from tests.actuator.factories import make_spec


@pytest_asyncio.fixture
async def tokens(redis_server: ManagedServer) -> AsyncIterator[GpuTokens]:
    client = GpuTokens.from_url(redis_server.url)
    yield client
    await client.close()


def stage_name() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


async def run_consumers(consumers: list[TokenConsumer], until: float) -> None:
    async def loop(c: TokenConsumer) -> None:
        while time.monotonic() < until:
            await c.acquire(c.batch)

    await asyncio.gather(*(loop(c) for c in consumers))


def test_rate_is_replicas_times_rho_times_full_speed() -> None:
    infer = make_spec().stage("infer")  # 1000 launches/s at rho 1
    assert gpu_rate_per_s(infer, 3, 0.5) == 1500.0
    assert gpu_rate_per_s(infer, 0, 0.5) == 0.0
    assert gpu_rate_per_s(make_spec().stage("pre"), 3, None) is None
    assert gpu_burst(1500.0) == 375  # 0.25 s of the rate
    assert gpu_burst(0.0) == 1


async def test_concurrent_consumers_get_rate_times_time_plus_burst(tokens: GpuTokens) -> None:
    rate, duration_s = 2000.0, 5.0
    burst = gpu_burst(rate)
    stage = stage_name()
    consumers = [TokenConsumer(tokens, "tok", stage, batch=16) for _ in range(4)]
    await tokens.set_rate("tok", stage, rate, burst)  # a new bucket starts full
    await run_consumers(consumers, time.monotonic() + duration_s)
    granted = sum(c.granted_total for c in consumers)
    expected = rate * duration_s + burst
    assert abs(granted - expected) <= 0.05 * expected, (granted, expected)
    assert all(c.granted_total > 0 for c in consumers)  # shared, nobody starved


async def test_rate_change_takes_effect_within_one_batch(tokens: GpuTokens) -> None:
    high, low, batch, n = 2000.0, 500.0, 16, 4
    stage = stage_name()
    consumers = [TokenConsumer(tokens, "tok", stage, batch=batch) for _ in range(n)]
    await tokens.set_rate("tok", stage, high, gpu_burst(high))
    start = time.monotonic()
    task = asyncio.create_task(run_consumers(consumers, start + 4.5))
    await asyncio.sleep(2.0)
    before_change = sum(c.granted_total for c in consumers)
    changed_at = time.monotonic()
    await tokens.set_rate("tok", stage, low, gpu_burst(low))
    await asyncio.sleep(2.0)
    after = sum(c.granted_total for c in consumers)
    window_s = time.monotonic() - changed_at
    await task
    # Old rate before the change: R1 x 2 s plus the initial burst.
    assert before_change == pytest.approx(high * 2.0 + gpu_burst(high), rel=0.1)
    # After it: R2 x window, give or take what was already on its way: the new burst carried
    # over and at most one batch per consumer (the batch period).
    slack = gpu_burst(low) + n * batch
    got = after - before_change
    assert low * window_s - slack <= got <= low * window_s + slack, (got, low * window_s, slack)


async def test_bad_arguments_are_refused_before_reaching_the_script(tokens: GpuTokens) -> None:
    stage = stage_name()
    await tokens.set_rate("tok", stage, 10.0, 5)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(TokenScriptError, match="requested"):
            await tokens.take("tok", stage, bad)  # type: ignore[arg-type]
    with pytest.raises(TokenScriptError, match="rate_per_s"):
        await tokens.set_rate("tok", stage, float("nan"), 5)
    with pytest.raises(TokenScriptError, match="burst"):
        await tokens.set_rate("tok", stage, 1.0, 0)
    for bad_rho in (0.0, 1.5, float("nan")):
        with pytest.raises(TokenScriptError, match="rho"):
            await tokens.set_rate("tok", stage, 1.0, 5, bad_rho)
    fields = await tokens.read("tok", stage)
    assert fields is not None and fields["tokens"] <= 5


async def test_unconfigured_bucket_follows_the_fail_mode(tokens: GpuTokens) -> None:
    stage = stage_name()
    grant = await tokens.take("tok", stage, 4)
    assert not grant.configured and grant.granted == -1
    open_ = TokenConsumer(tokens, "tok", stage, fail_mode="open")
    assert await open_.acquire(1) == 0.0 and open_.degraded
    closed = TokenConsumer(tokens, "tok", stage, fail_mode="closed", max_wait_s=0.02)
    # The same acquire blocks while the bucket is unconfigured and proceeds once it is set
    # (no cancellation in between: a cancelled Redis call is not what is under test).
    waiting = asyncio.ensure_future(closed.acquire(1))
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done, "closed mode must block on an unconfigured bucket"
    await tokens.set_rate("tok", stage, 100.0, 10)
    done, _ = await asyncio.wait({waiting}, timeout=5.0)
    assert done and waiting.result() >= 0.0
    assert closed.degraded is None

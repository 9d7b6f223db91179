"""GPU launch tokens in Redis: one shared bucket per GPU stage (see docs/gpu-tokens.md).

The actuator sets each bucket's refill rate and burst (`GpuTokens.set_rate`); every GPU worker
of the stage, on any host, takes tokens in batches (`GpuTokens.take`, or `TokenConsumer`, which
keeps a local bucket). Both go through the Lua scripts in `schemas/lua/`, the same ones the C
interceptor loads, so the semantics live in one place.

The rate and burst formulas are pure functions here so the simulator and tests can use them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import redis.asyncio as aioredis
import redis.exceptions

from schemas import subjects
from schemas.pipeline import StageSpec

BURST_WINDOW_S = 0.25
"""A bucket holds at most this many seconds of its refill rate (and at least one token): a GPU
idle for a while may run at full speed for this long, no longer. Consumers must come back
within this window or refill is lost, which is what caps banking of idle time."""

REDIS_TIMEOUT_S = 2.0


class TokenStoreUnavailable(RuntimeError):
    """Redis cannot be reached (retry later)."""


class TokenScriptError(ValueError):
    """The Lua script rejected its arguments (a bug in the caller; do not retry)."""


def load_script(name: str) -> str:
    """Source of `schemas/lua/<name>`, from the installed schemas package."""
    return resources.files("schemas").joinpath("lua", name).read_text(encoding="utf-8")


def gpu_rate_per_s(stage: StageSpec, replicas: int, rho: float | None) -> float | None:
    """Refill rate of a stage's shared bucket: replicas x rho x full_speed_launch_rate.

    The bucket is shared by all replicas of the stage, so its rate is the sum of the per-replica
    quotas. None when the stage is not a GPU stage or has no calibrated full-speed rate."""
    if stage.kind != "gpu" or stage.full_speed_launch_rate is None:
        return None
    share = rho if rho is not None else (stage.start_rho or 1.0)
    return replicas * share * stage.full_speed_launch_rate


def gpu_burst(rate_per_s: float, window_s: float = BURST_WINDOW_S) -> int:
    """Bucket capacity in whole tokens: `window_s` of the rate, at least 1."""
    return max(1, math.ceil(rate_per_s * window_s))


@dataclass(frozen=True)
class Grant:
    granted: int
    """Tokens granted (0..requested); -1 when the bucket has not been configured."""
    rate_per_s: float
    """The bucket's refill rate now (0 when not configured)."""

    @property
    def configured(self) -> bool:
        return self.granted >= 0


class GpuTokens:
    """Async client of the GPU token buckets (one Redis connection pool)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(load_script("gpu_take.lua"))
        self._set_rate = client.register_script(load_script("gpu_set_rate.lua"))

    @classmethod
    def from_url(cls, url: str, timeout_s: float = REDIS_TIMEOUT_S) -> GpuTokens:
        client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        return cls(client)

    async def close(self) -> None:
        await self.redis.aclose()

    async def set_rate(
        self, pipeline: str, stage: str, rate_per_s: float, burst: int, rho: float | None = None
    ) -> int:
        """Set refill rate and burst (and the per-replica share `rho` the workers report);
        tokens accrued so far are kept (capped at the new burst), a new bucket starts full.
        Returns the whole tokens in the bucket now."""
        if not math.isfinite(rate_per_s) or rate_per_s < 0:
            raise TokenScriptError(f"rate_per_s={rate_per_s!r}: must be a finite number >= 0")
        if not isinstance(burst, int) or burst < 1:
            raise TokenScriptError(f"burst={burst!r}: must be an integer >= 1")
        key = subjects.gpu_bucket_key(pipeline, stage)
        # repr keeps every digit of the float; Lua's tonumber reads it back exactly.
        args: list[Any] = [repr(float(rate_per_s)), burst]
        if rho is not None:
            if not (math.isfinite(rho) and 0 < rho <= 1):
                raise TokenScriptError(f"rho={rho!r}: must be in (0, 1]")
            args.append(repr(float(rho)))
        result: Any = await self._call(self._set_rate, key, args)
        return int(result)

    async def take(self, pipeline: str, stage: str, requested: int) -> Grant:
        """Take up to `requested` tokens in one round trip."""
        # Validated here because the script trusts tonumber(): "nan" or 1.5 would corrupt the
        # bucket (see docs/gpu-tokens.md, "Known script issues").
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise TokenScriptError(f"requested={requested!r}: must be an integer >= 1")
        key = subjects.gpu_bucket_key(pipeline, stage)
        reply: Any = await self._call(self._take, key, [requested])
        return Grant(int(reply[0]), int(reply[1]) / 1000.0)

    async def read(self, pipeline: str, stage: str) -> dict[str, float] | None:
        """The bucket's stored fields (rate, burst, tokens, ts_us), None when absent."""
        key = subjects.gpu_bucket_key(pipeline, stage)
        try:
            raw = await self.redis.hgetall(key)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise TokenStoreUnavailable(f"redis: {exc}") from exc
        if not raw:
            return None
        return {_text(k): float(v) for k, v in raw.items()}

    async def _call(self, script: object, key: str, args: list[object]) -> object:
        try:
            return await script(keys=[key], args=args)  # type: ignore[operator]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise TokenStoreUnavailable(f"redis unreachable for {key}: {exc}") from exc
        except redis.exceptions.ResponseError as exc:
            raise TokenScriptError(f"{key}: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


FailMode = Literal["open", "closed"]


class TokenConsumer:
    """A GPU worker's side: a local bucket refilled from the shared one in batches.

    `acquire(n)` returns at once while the local bucket has tokens (no network); otherwise it
    takes a batch from Redis and, when the shared bucket is empty too, sleeps for about the time
    one batch takes to accrue (between 1 ms and `max_wait_s`) and tries again. A rate change
    therefore reaches this consumer with its next batch.

    When Redis is unreachable or the bucket is not configured, `fail_mode` decides: "open" runs
    unthrottled, "closed" waits. (The C interceptor also has "hold"; see docs/gpu-tokens.md.)
    """

    def __init__(
        self,
        tokens: GpuTokens,
        pipeline: str,
        stage: str,
        batch: int = 16,
        fail_mode: FailMode = "closed",
        max_wait_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch={batch}: must be >= 1")
        self.tokens = tokens
        self.pipeline = pipeline
        self.stage = stage
        self.batch = batch
        self.fail_mode = fail_mode
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.local = 0
        self.granted_total = 0
        self.round_trips = 0
        self.rate_per_s = 0.0
        self.degraded: str | None = None
        """Why the consumer is not enforcing the shared rate right now (None when it is)."""

    async def acquire(self, n: int = 1) -> float:
        """Take `n` tokens (n <= batch); returns the seconds spent waiting."""
        if n > self.batch:
            raise ValueError(f"n={n}: more than one batch ({self.batch})")
        waited_s = 0.0
        while self.local < n:
            try:
                grant = await self.tokens.take(self.pipeline, self.stage, self.batch)
                self.round_trips += 1
            except TokenStoreUnavailable as exc:
                grant = None
                self.degraded = str(exc)
            if grant is not None and grant.configured:
                self.degraded = None
                self.rate_per_s = grant.rate_per_s
                self.local += grant.granted
                self.granted_total += grant.granted
                if self.local >= n:
                    break
                pause_s = self._pause_s()
            else:
                if grant is not None:
                    self.degraded = f"bucket {self.pipeline}/{self.stage} is not configured"
                if self.fail_mode == "open":
                    return waited_s
                pause_s = self.max_wait_s
            started = self.clock()
            await asyncio.sleep(pause_s)
            waited_s += self.clock() - started
        self.local -= n
        return waited_s

    def _pause_s(self) -> float:
        if self.rate_per_s <= 0:
            return self.max_wait_s
        return min(self.max_wait_s, max(0.001, self.batch / self.rate_per_s))

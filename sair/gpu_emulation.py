"""GPU-stage emulation: inference as a calibrated sequence of kernel launches under rate tokens.

Without a GPU (and without PyTorch) a GPU stage still has to behave like one under SAIR's
control: its speed must follow the share `rho` the actuator grants. A model forward is
emulated as `n` kernel launches of `kernel_s = 1 / full_speed_launch_rate` each (so one
replica at rho = 1 launches exactly at the calibrated full-speed rate). Every launch first
takes one token from the stage's shared Redis bucket (`schemas/lua/gpu_take.lua`, key
`schemas.subjects.gpu_bucket_key`), in batches of `take_batch` to keep Redis off the hot
path, then sleeps the kernel time. The bucket is shared by all replicas of the stage and
refills at replicas x rho x full-speed tokens/s (set by the actuator, docs/gpu-tokens.md), so
each replica gets rho of a GPU and a low rho throttles the stage for real.

- Bucket not configured (the script answers -1): launches are unthrottled.
- Redis unreachable: fail open (unthrottled) with one warning per minute; the stage keeps
  serving rather than stalling the pipeline because the control plane is down.

Tokens used and time spent waiting for tokens are counted for the worker's `WorkerReport`.
Handlers reach the process's device through `device()`; the worker calls `configure()` once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from schemas import subjects

log = logging.getLogger("sair.gpu_emulation")

DEFAULT_TAKE_BATCH = 16
DEFAULT_KERNEL_S = 1e-4
MAX_TOKEN_POLL_S = 0.05
"""Longest sleep while waiting for the bucket to refill (keeps rate changes prompt)."""
MIN_SLEEP_S = 0.001
"""Kernel time is slept in chunks of at least this much (time.sleep overhead is ~60 us)."""
WARN_EVERY_S = 60.0
OFFLINE_RETRY_S = 1.0
"""After Redis failed, launches run unthrottled this long before Redis is tried again."""


def _lua(name: str) -> str:
    return resources.files("schemas").joinpath("lua", name).read_text()


@dataclass
class GpuCounters:
    tokens_used: int = 0
    token_wait_s: float = 0.0
    launches: int = 0
    rate_tokens_per_s: float | None = None
    """Refill rate last seen in the bucket; None = unconfigured (unthrottled) or unknown."""


class EmulatedGpu:
    """One process's emulated GPU: token-gated kernel launches (thread-safe)."""

    def __init__(
        self,
        kernel_s: float = DEFAULT_KERNEL_S,
        redis_url: str | None = None,
        bucket_key: str | None = None,
        take_batch: int = DEFAULT_TAKE_BATCH,
    ) -> None:
        if not kernel_s > 0:
            raise ValueError(f"kernel_s={kernel_s!r} must be > 0")
        if take_batch < 1:
            raise ValueError(f"take_batch={take_batch!r} must be >= 1")
        self.kernel_s = kernel_s
        self.bucket_key = bucket_key
        self.take_batch = take_batch
        self._lock = threading.Lock()
        self._local_tokens = 0
        self._counters = GpuCounters()
        self._sleep_debt_s = 0.0
        self._redis: Any = None
        self._take_sha: str | None = None
        self._last_warn = 0.0
        self._offline_until = 0.0
        if redis_url and bucket_key:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2.0)

    # ------------------------------------------------------------------ tokens

    def _take_remote(self, n: int) -> tuple[int, float]:
        """(granted, rate tokens/s) from Redis; granted -1 = unconfigured or unreachable."""
        if self._redis is None or self.bucket_key is None:
            return -1, 0.0
        if time.monotonic() < self._offline_until:
            return -1, 0.0
        import redis

        try:
            if self._take_sha is None:
                self._take_sha = str(self._redis.script_load(_lua("gpu_take.lua")))
            try:
                reply = self._redis.evalsha(self._take_sha, 1, self.bucket_key, n)
            except redis.exceptions.NoScriptError:  # Redis restarted: load again
                self._take_sha = str(self._redis.script_load(_lua("gpu_take.lua")))
                reply = self._redis.evalsha(self._take_sha, 1, self.bucket_key, n)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            now = time.monotonic()
            self._offline_until = now + OFFLINE_RETRY_S
            if now - self._last_warn > WARN_EVERY_S:
                self._last_warn = now
                log.warning("GPU token bucket unreachable (%s); running unthrottled", exc)
            return -1, 0.0
        granted, rate_milli = int(reply[0]), int(reply[1])
        return granted, rate_milli / 1000.0

    def _acquire(self) -> None:
        """Block until one launch token is held (called with the lock held)."""
        if self._local_tokens > 0:
            self._local_tokens -= 1
            self._counters.tokens_used += 1
            return
        t_start = time.perf_counter()
        starved = False
        while True:
            granted, rate = self._take_remote(self.take_batch)
            if granted < 0:  # unthrottled: use a batch locally, then ask the bucket again
                self._counters.rate_tokens_per_s = None
                self._local_tokens += self.take_batch - 1
                self._counters.tokens_used += 1
                break
            self._counters.rate_tokens_per_s = rate
            if granted > 0:
                self._local_tokens += granted - 1
                self._counters.tokens_used += 1
                break
            # Empty bucket: wait about as long as a batch takes to refill, capped so that a
            # raised rate takes effect within MAX_TOKEN_POLL_S.
            starved = True
            pause = MAX_TOKEN_POLL_S if rate <= 0 else min(MAX_TOKEN_POLL_S, self.take_batch / rate)
            time.sleep(max(pause, 0.0005))
        if starved:  # from the first empty answer until a token was held, Redis trips included
            self._counters.token_wait_s += time.perf_counter() - t_start

    def launch(self, n: int = 1, kernel_s: float | None = None) -> None:
        """Run `n` kernel launches: each takes a token, then occupies the GPU for kernel time."""
        ks = self.kernel_s if kernel_s is None else kernel_s
        with self._lock:  # one stream per replica: launches are serial
            for _ in range(n):
                self._acquire()
                self._counters.launches += 1
                self._sleep_debt_s += ks
                if self._sleep_debt_s >= MIN_SLEEP_S:
                    self._sleep_for_debt()
            if self._sleep_debt_s > 0:
                self._sleep_for_debt()

    def _sleep_for_debt(self) -> None:
        start = time.perf_counter()
        time.sleep(self._sleep_debt_s)
        # Carry oversleep forward as credit so the long-run rate stays calibrated.
        self._sleep_debt_s -= time.perf_counter() - start

    def snapshot(self) -> GpuCounters:
        with self._lock:
            c = self._counters
            return GpuCounters(c.tokens_used, c.token_wait_s, c.launches, c.rate_tokens_per_s)

    def rho(self) -> float | None:
        """The per-replica share the actuator set (the bucket's `rho` field); None when the
        bucket has none, is unconfigured or Redis does not answer (never a guess)."""
        if self._redis is None or self.bucket_key is None:
            return None
        return read_rho(self._redis, self.bucket_key)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def read_rho(client: Any, bucket_key: str) -> float | None:
    """The `rho` field of a stage bucket (see gpu_set_rate.lua), or None."""
    import redis

    try:
        raw = client.hget(bucket_key, "rho")
    except redis.exceptions.RedisError as exc:
        log.debug("rho not read: %s", exc)
        return None
    if raw is None:
        return None
    try:
        rho = float(raw)
    except ValueError:
        return None
    return rho if 0 < rho <= 1 else None


_device: EmulatedGpu | None = None
_device_lock = threading.Lock()


def configure(
    pipeline: str,
    stage: str,
    full_speed_launch_rate: float,
    redis_url: str | None,
    take_batch: int = DEFAULT_TAKE_BATCH,
) -> EmulatedGpu:
    """Set this process's device (the worker does this once for a GPU stage)."""
    global _device
    if not full_speed_launch_rate > 0:
        raise ValueError(f"full_speed_launch_rate={full_speed_launch_rate!r} must be > 0")
    dev = EmulatedGpu(
        kernel_s=1.0 / full_speed_launch_rate,
        redis_url=redis_url,
        bucket_key=subjects.gpu_bucket_key(pipeline, stage),
        take_batch=take_batch,
    )
    with _device_lock:
        if _device is not None:
            _device.close()
        _device = dev
    return dev


def device() -> EmulatedGpu:
    """The process's device; an unthrottled default when nobody configured one."""
    global _device
    with _device_lock:
        if _device is None:
            _device = EmulatedGpu()
        return _device


def reset() -> None:
    """Forget the configured device (tests)."""
    global _device
    with _device_lock:
        if _device is not None:
            _device.close()
        _device = None


def torch_cuda_available() -> bool:
    """True when PyTorch with a CUDA device is importable (the real-model path)."""
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except Exception:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def set_rate(
    redis_url: str, pipeline: str, stage: str, rate: float, burst: float, rho: float | None = None
) -> int:
    """Configure a stage bucket with gpu_set_rate.lua (tests and benchmarks; the actuator's job)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        key = subjects.gpu_bucket_key(pipeline, stage)
        extra = () if rho is None else (rho,)
        return int(r.eval(_lua("gpu_set_rate.lua"), 1, key, rate, burst, *extra))
    finally:
        r.close()

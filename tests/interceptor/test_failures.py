"""The shim never crashes or hangs its program: Redis killed, paused, absent or not
configured; a driver without an entry point; a driver linked without -Bsymbolic.

Each program is a subprocess with a timeout: a hang fails the test instead of the suite.
Times are the program's own (seconds since its first launch).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.interceptor.support import (
    MODE_DISABLED,
    MODE_HOLD,
    MODE_OPEN,
    MODE_THROTTLED,
    MODE_UNCONFIGURED,
    PATH_COUNTERS,
    Build,
    ValkeyServer,
    bucket_key,
    free_port,
    kernel_rate,
    run,
    set_rate,
    shim_env,
    start,
)

RATE = 1000.0
# 200 ms of tokens: a refill thread starved by a loaded machine for longer than the burst
# loses tokens (Redis caps the bucket), which is not what these tests are about.
BURST = 200.0
# With 20 us kernels the unthrottled program runs tens of thousands of launches/s ("full
# speed"); on a loaded 2-core machine less, so "unthrottled" is asserted as > 3x the rate.
KERNEL_US = 20.0


def sleep_until(started_mono: float, t: float) -> None:
    time.sleep(max(0.0, started_mono + t - time.monotonic()))


def test_redis_killed_fail_open_runs_unthrottled_then_recovers(
    interceptor_build: Build, killable_redis: ValkeyServer
) -> None:
    key = bucket_key("fail", "open")
    set_rate(killable_redis.client(), key, RATE, BURST)
    env = shim_env(
        interceptor_build,
        redis_url=killable_redis.url,
        pipeline="fail",
        stage="open",
        fail_mode="open",
        kernel_us=KERNEL_US,
    )
    proc = start(interceptor_build, "proc_v2_ptsz", env, "--seconds", "2.2")
    sleep_until(proc.started_mono, 0.6)
    killable_redis.kill()
    sleep_until(proc.started_mono, 1.2)
    killable_redis.start()  # same port, empty: the controller sets the rate again
    set_rate(killable_redis.client(), key, RATE, BURST)
    report = proc.result(timeout_s=15)

    before = kernel_rate(report, 0.25, 0.55)
    during = kernel_rate(report, 0.75, 1.15)
    after = kernel_rate(report, 1.7)
    print(f"open: before {before:.0f}/s, Redis dead {during:.0f}/s, after restart {after:.0f}/s")
    assert abs(before / RATE - 1) <= 0.10  # a 0.3 s window: +-1 batch is 3%, plus jitter
    assert during > 3 * RATE  # unthrottled
    assert abs(after / RATE - 1) <= 0.10  # throttled again once Redis answers
    shim = report["shim"]
    assert shim["mode"] == MODE_THROTTLED
    assert shim["redis_errors"] >= 1
    assert report["errors"] == 0
    assert "running unthrottled (open)" in report["stderr"]
    assert report["stderr"].count("Redis unreachable") == 1  # logged once


def test_redis_killed_fail_hold_keeps_the_last_rate(
    interceptor_build: Build, killable_redis: ValkeyServer
) -> None:
    set_rate(killable_redis.client(), bucket_key("fail", "hold"), RATE, BURST)
    env = shim_env(
        interceptor_build,
        redis_url=killable_redis.url,
        pipeline="fail",
        stage="hold",
        fail_mode="hold",
        kernel_us=KERNEL_US,
    )
    proc = start(interceptor_build, "direct", env, "--seconds", "1.6")
    sleep_until(proc.started_mono, 0.6)
    killable_redis.kill()
    report = proc.result(timeout_s=15)

    before = kernel_rate(report, 0.25, 0.55)
    after = kernel_rate(report, 0.8)
    print(f"hold: before {before:.0f}/s, Redis dead {after:.0f}/s")
    assert abs(before / RATE - 1) <= 0.10  # a 0.3 s window: +-1 batch is 3%, plus jitter
    assert abs(after / RATE - 1) <= 0.05
    shim = report["shim"]
    assert shim["mode"] == MODE_HOLD
    assert shim["hold_tokens"] > 0
    assert shim["redis_errors"] >= 1
    assert "holding the last rate" in report["stderr"]


def test_redis_paused_fail_hold_times_out_and_holds(
    interceptor_build: Build, killable_redis: ValkeyServer
) -> None:
    """A Redis that stops answering (SIGSTOP) costs one command timeout, not a hang."""
    set_rate(killable_redis.client(), bucket_key("fail", "pause"), RATE, BURST)
    env = shim_env(
        interceptor_build,
        redis_url=killable_redis.url,
        pipeline="fail",
        stage="pause",
        fail_mode="hold",
        extra={"SAIR_REDIS_TIMEOUT_MS": "100"},
    )
    proc = start(interceptor_build, "graph", env, "--seconds", "1.6")
    sleep_until(proc.started_mono, 0.5)
    killable_redis.pause()
    try:
        report = proc.result(timeout_s=15)
    finally:
        killable_redis.resume()
    after = kernel_rate(report, 0.8)
    print(f"hold with Redis paused: {after:.0f} kernels/s")
    assert abs(after / RATE - 1) <= 0.10
    assert report["shim"]["mode"] == MODE_HOLD


def test_redis_down_from_the_start_fails_open(interceptor_build: Build) -> None:
    """Nothing listens on the port. Hold without any rate seen falls back to open."""
    env = shim_env(
        interceptor_build,
        redis_url=f"redis://127.0.0.1:{free_port()}",
        fail_mode="hold",
        kernel_us=KERNEL_US,
    )
    report = run(interceptor_build, "direct", env, "--seconds", "0.5", timeout_s=10)
    assert report["shim"]["mode"] == MODE_OPEN
    assert kernel_rate(report, 0.1) > 3 * RATE
    assert "before any rate was seen" in report["stderr"]


def test_unconfigured_bucket_runs_unthrottled_until_configured(
    interceptor_build: Build, killable_redis: ValkeyServer
) -> None:
    env = shim_env(
        interceptor_build,
        redis_url=killable_redis.url,
        pipeline="fail",
        stage="unconfigured",
        kernel_us=KERNEL_US,
    )
    proc = start(interceptor_build, "direct", env, "--seconds", "1.4")
    sleep_until(proc.started_mono, 0.5)
    set_rate(killable_redis.client(), bucket_key("fail", "unconfigured"), RATE, BURST)
    report = proc.result(timeout_s=15)
    free = kernel_rate(report, 0.1, 0.45)
    throttled = kernel_rate(report, 0.9)
    print(f"unconfigured: {free:.0f}/s, then configured: {throttled:.0f}/s")
    assert free > 3 * RATE
    assert abs(throttled / RATE - 1) <= 0.05
    assert report["shim"]["mode"] == MODE_THROTTLED
    assert report["stderr"].count("is not configured in Redis") == 1


def test_unconfigured_mode_is_reported(
    interceptor_build: Build, killable_redis: ValkeyServer
) -> None:
    env = shim_env(interceptor_build, redis_url=killable_redis.url, stage="never-set")
    report = run(interceptor_build, "ex", env, "--launches", "2000", timeout_s=10)
    assert report["shim"]["mode"] == MODE_UNCONFIGURED
    assert report["shim"]["launches_kernel_ex"] == report["driver_path_calls"] == 2000


def test_without_configuration_the_shim_passes_through(interceptor_build: Build) -> None:
    env = shim_env(interceptor_build, redis_url=None)
    report = run(interceptor_build, "coop_ptsz_proc", env, "--launches", "5000", timeout_s=10)
    assert report["shim"]["mode"] == MODE_DISABLED
    assert report["shim"]["launches_cooperative_ptsz"] == report["driver_path_calls"] == 5000
    assert report["shim"]["redis_calls"] == 0


def test_missing_driver_entry_point_returns_an_error_not_a_crash(
    interceptor_build: Build,
) -> None:
    """The minimal fake driver has no cuLaunchKernelEx: the wrapper says so and returns
    CUDA_ERROR_NOT_FOUND (500) instead of calling NULL."""
    env = shim_env(interceptor_build, redis_url=None, driver_dir=interceptor_build.fake_minimal)
    report = run(interceptor_build, "ex", env, "--launches", "100", timeout_s=10)
    assert report["errors"] == 100
    assert report["first_error"] == 500
    assert report["driver_path_calls"] == 0
    assert report["shim"]["missing_real"] == 100
    assert report["stderr"].count("no driver entry point for cuLaunchKernelEx") == 1


@pytest.fixture(scope="module")
def nosym_reports(
    interceptor_build: Build, interceptor_redis: ValkeyServer
) -> dict[str, dict[str, Any]]:
    """Every path on the driver linked without -Bsymbolic, all at once."""
    runs = {}
    for path in PATH_COUNTERS:
        stage = f"nosym-{path}"
        set_rate(interceptor_redis.client(), bucket_key("nosym", stage), 4000, 200)
        env = shim_env(
            interceptor_build,
            redis_url=interceptor_redis.url,
            pipeline="nosym",
            stage=stage,
            driver_dir=interceptor_build.fake_nosym,
        )
        runs[path] = start(interceptor_build, path, env, "--launches", "300")
    return {path: r.result(timeout_s=15) for path, r in runs.items()}


@pytest.mark.parametrize("path", list(PATH_COUNTERS))
def test_driver_without_bsymbolic_does_not_recurse(
    nosym_reports: dict[str, dict[str, Any]], path: str
) -> None:
    """Regression: a driver linked without -Bsymbolic answers cuGetProcAddress with the
    shim's own wrapper (its `&cuLaunchKernel` resolves through the global scope). Taking
    that as the real function would make the wrapper call itself until the stack overflows.
    """
    report = nosym_reports[path]
    shim = report["shim"]
    assert report["errors"] == 0
    assert report["driver_path_calls"] == shim[PATH_COUNTERS[path]] == report["launches"]
    assert shim["tokens_used"] == report["driver_kernels"]
    if "proc" in path:
        # The driver did hand back the shim's own function: the pitfall was there.
        assert shim["recursion_avoided"] >= 1

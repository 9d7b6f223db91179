"""A change of the stage's rate in Redis reaches a running program within 200 ms.

The program (proc_v2_ptsz: the libcudart path) counts its kernels per 10 ms window on its
own monotonic clock; the test sets the rate with gpu_set_rate.lua at known monotonic times
(same clock: CLOCK_MONOTONIC). The moment the launch rate changed is where the line fitted
to the cumulative count before the change crosses the line fitted 0.25-0.7 s after it.
"""

from __future__ import annotations

import time

from tests.interceptor.support import (
    Build,
    ValkeyServer,
    bucket_key,
    change_lag,
    kernel_rate,
    set_rate,
    shim_env,
    start,
)

MAX_LAG_S = 0.2


def test_rate_change_takes_effect_within_200ms(
    interceptor_build: Build, interceptor_redis: ValkeyServer
) -> None:
    client = interceptor_redis.client()
    key = bucket_key("change", "stage")
    set_rate(client, key, 1000, 50)
    env = shim_env(
        interceptor_build, redis_url=interceptor_redis.url, pipeline="change", stage="stage"
    )
    proc = start(interceptor_build, "proc_v2_ptsz", env, "--seconds", "2.3", "--window-ms", "10")
    time.sleep(max(0.0, proc.started_mono + 0.7 - time.monotonic()))
    t_up = time.monotonic()
    set_rate(client, key, 3000, 150)  # rho 0.25 -> 0.75 of a 4000/s stage
    time.sleep(max(0.0, proc.started_mono + 1.5 - time.monotonic()))
    t_down = time.monotonic()
    set_rate(client, key, 500, 25)  # -> 0.125
    report = proc.result(timeout_s=15)

    up_at = t_up - report["t0_mono_s"]
    down_at = t_down - report["t0_mono_s"]
    lag_up = change_lag(report, up_at, before_s=0.4, after=(0.25, 0.7))
    lag_down = change_lag(report, down_at, before_s=0.5, after=(0.25, 0.7))
    rates = (
        kernel_rate(report, up_at - 0.4, up_at),
        kernel_rate(report, up_at + 0.25, down_at),
        kernel_rate(report, down_at + 0.25),
    )
    print(
        f"rates {rates[0]:.0f} -> {rates[1]:.0f} -> {rates[2]:.0f}/s; "
        f"lag up {lag_up * 1000:.1f} ms, down {lag_down * 1000:.1f} ms"
    )
    for achieved, configured in zip(rates, (1000, 3000, 500), strict=True):
        assert abs(achieved / configured - 1) <= 0.05
    assert lag_up <= MAX_LAG_S
    assert lag_down <= MAX_LAG_S

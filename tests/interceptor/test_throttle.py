"""Every launch path is throttled to the stage's rate, and counted once by shim and driver.

One module fixture runs the whole matrix at once (11 access paths x 3 shares, one bucket
each, 1.6 s on the fake driver with 0 kernel time, so the token rate is the only limit);
the tests then check it row by row.

Rates: the stage's calibrated full speed is 4000 launches/s, so rho 0.25 / 0.5 / 1.0 set
1000 / 2000 / 4000 tokens/s, with a burst of rate/20 (50 ms worth). The first 0.3 s (burst
plus the shim's first local batch) are left out of the measured rate.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.interceptor.support import (
    GRAPH_PATHS,
    MODE_THROTTLED,
    PATH_COUNTERS,
    Build,
    ValkeyServer,
    bucket_key,
    kernel_rate,
    set_rate,
    shim_env,
    start,
)

FULL_SPEED = 4000.0
RHOS = (0.25, 0.5, 1.0)
RUN_S = 1.6
MEASURE_FROM_S = 0.3
TOLERANCE = 0.05
GRAPH_KERNELS = 3  # kernel nodes in the top graph; launch_paths adds a child graph of 1

Matrix = dict[tuple[str, float], dict[str, Any]]


@pytest.fixture(scope="module")
def matrix(interceptor_build: Build, interceptor_redis: ValkeyServer) -> Matrix:
    client = interceptor_redis.client()
    runs = {}
    for rho in RHOS:
        for path in PATH_COUNTERS:
            stage = f"{path}-rho{rho}"
            rate = rho * FULL_SPEED
            set_rate(client, bucket_key("matrix", stage), rate, max(1.0, rate / 20))
            env = shim_env(
                interceptor_build,
                redis_url=interceptor_redis.url,
                pipeline="matrix",
                stage=stage,
            )
            runs[(path, rho)] = start(
                interceptor_build,
                path,
                env,
                "--seconds",
                str(RUN_S),
                "--graph-kernels",
                str(GRAPH_KERNELS),
            )
    return {key: r.result(timeout_s=30) for key, r in runs.items()}


@pytest.mark.parametrize("rho", RHOS, ids=lambda r: f"rho{r}")
@pytest.mark.parametrize("path", list(PATH_COUNTERS))
def test_every_path_is_throttled_to_the_configured_rate(
    matrix: Matrix, path: str, rho: float
) -> None:
    report = matrix[(path, rho)]
    configured = rho * FULL_SPEED  # tokens/s = kernels/s (a graph costs its kernel nodes)
    achieved = kernel_rate(report, MEASURE_FROM_S)
    print(f"{path} rho={rho}: configured {configured:.0f}/s, achieved {achieved:.1f}/s")
    assert report["shim"]["mode"] == MODE_THROTTLED
    assert abs(achieved / configured - 1) <= TOLERANCE, (
        f"{path} at rho {rho}: {achieved:.1f} kernels/s, configured {configured:.0f}"
    )


@pytest.mark.parametrize("path", list(PATH_COUNTERS))
def test_driver_sees_exactly_what_the_shim_intercepted(matrix: Matrix, path: str) -> None:
    for rho in RHOS:
        report = matrix[(path, rho)]
        shim = report["shim"]
        assert report["errors"] == 0
        assert report["driver_path_calls"] == report["launches"]
        assert shim[PATH_COUNTERS[path]] == report["launches"]
        # Every other launch counter stays at 0: the call went through one wrapper once.
        others = {c for c in PATH_COUNTERS.values() if c != PATH_COUNTERS[path]}
        assert all(shim[c] == 0 for c in others)
        assert report["driver_kernels"] == report["launches"] * report["kernels_per_call"]
        assert shim["tokens_used"] == report["driver_kernels"]
        assert shim["missing_real"] == 0


@pytest.mark.parametrize("path", sorted(GRAPH_PATHS))
def test_graph_launch_costs_its_kernel_nodes(matrix: Matrix, path: str) -> None:
    report = matrix[(path, 0.5)]
    shim = report["shim"]
    # 3 kernel nodes + 1 empty node + a child graph holding 1 kernel node = 4 tokens.
    assert report["kernels_per_call"] == GRAPH_KERNELS + 1
    assert shim["graph_execs_tracked"] == 1
    assert shim["graph_launches_untracked"] == 0
    assert shim["graph_kernel_nodes"] == report["launches"] * (GRAPH_KERNELS + 1)
    assert shim["tokens_used"] == shim["graph_kernel_nodes"]


def test_lookups_hand_out_wrappers(matrix: Matrix) -> None:
    """dlsym and cuGetProcAddress(_v2) answered with the shim's wrappers."""
    assert matrix[("dlsym", 1.0)]["shim"]["wrapped_dlsym"] == 1
    assert matrix[("proc", 1.0)]["shim"]["wrapped_proc_address"] == 1
    # dlsym(cuGetProcAddress_v2), then through it cuGetProcAddress itself and the launch.
    v2 = matrix[("proc_v2_ptsz", 1.0)]["shim"]
    assert v2["wrapped_dlsym"] == 1
    assert v2["wrapped_proc_address"] == 2
    # A driver linked with -Bsymbolic never hands back the shim's own functions.
    assert all(r["shim"]["recursion_avoided"] == 0 for r in matrix.values())

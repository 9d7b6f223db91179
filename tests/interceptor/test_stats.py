"""The counters a worker reads: the C API, the shared-memory file and its Python reader;
plus fork children, threads, and the exact take script in Redis."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest

from gpu_interceptor import stats as stats_reader
from tests.interceptor.support import (
    MODE_THROTTLED,
    TAKE_LUA,
    Build,
    ValkeyServer,
    bucket_key,
    kernel_rate,
    run,
    set_rate,
    shim_env,
)


def test_python_reader_matches_the_c_layout(interceptor_build: Build) -> None:
    out = subprocess.run(
        [str(interceptor_build.launch_paths), "--layout"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    layout = json.loads(out)
    assert [name for name, _ in layout["fields"]] == list(stats_reader.FIELDS)
    assert [offset for _, offset in layout["fields"]] == [
        8 * i for i in range(len(stats_reader.FIELDS))
    ]
    assert layout["size"] == stats_reader.SIZE
    assert layout["magic"] == stats_reader.MAGIC
    assert layout["version"] == stats_reader.VERSION


def test_stats_file_holds_what_the_c_api_returns(
    interceptor_build: Build, interceptor_redis: ValkeyServer, tmp_path: Path
) -> None:
    set_rate(interceptor_redis.client(), bucket_key("stats", "file"), 20000, 1000)
    env = shim_env(
        interceptor_build,
        redis_url=interceptor_redis.url,
        pipeline="stats",
        stage="file",
        extra={"SAIR_GPU_STATS_PATH": str(tmp_path / "gpu-{pid}.stats")},
    )
    report = run(interceptor_build, "graph", env, "--launches", "2000", timeout_s=15)
    from_file = stats_reader.read_stats(tmp_path / f"gpu-{report['pid']}.stats")
    shim = report["shim"]
    assert from_file["pid"] == report["pid"]
    assert stats_reader.mode_name(from_file) == "throttled"
    # Counters of launches stop moving when the program stops launching.
    for name in ("launches_graph", "tokens_used", "graph_kernel_nodes", "graph_execs_tracked"):
        assert from_file[name] == shim[name], name
    assert from_file["launches_graph"] == 2000
    assert from_file["tokens_used"] == 2000 * report["kernels_per_call"]
    assert from_file["refills"] >= 1
    assert from_file["rate_milli"] == 20000 * 1000
    assert from_file["local_tokens"] >= -report["kernels_per_call"]


def test_parse_stats_rejects_what_is_not_a_stats_page() -> None:
    with pytest.raises(stats_reader.StatsFileError, match="expected at least"):
        stats_reader.parse_stats(b"\0" * 16)
    with pytest.raises(stats_reader.StatsFileError, match="magic"):
        stats_reader.parse_stats(b"\0" * stats_reader.SIZE)
    page = bytearray(stats_reader.SIZE)
    struct.pack_into("<QQ", page, 0, stats_reader.MAGIC, stats_reader.VERSION + 1)
    with pytest.raises(stats_reader.StatsFileError, match="version"):
        stats_reader.parse_stats(bytes(page))


def test_negative_local_tokens_read_as_negative() -> None:
    page = bytearray(stats_reader.SIZE)
    struct.pack_into("<QQ", page, 0, stats_reader.MAGIC, stats_reader.VERSION)
    struct.pack_into("<q", page, 8 * stats_reader.FIELDS.index("local_tokens"), -3)
    assert stats_reader.parse_stats(bytes(page))["local_tokens"] == -3


def test_fork_child_gets_its_own_refill_thread_and_page(
    interceptor_build: Build, interceptor_redis: ValkeyServer, tmp_path: Path
) -> None:
    """Parent and child share the stage bucket: together they get the stage's rate."""
    set_rate(interceptor_redis.client(), bucket_key("stats", "fork"), 2000, 100)
    env = shim_env(
        interceptor_build,
        redis_url=interceptor_redis.url,
        pipeline="stats",
        stage="fork",
        extra={"SAIR_GPU_STATS_PATH": str(tmp_path / "gpu-{pid}.stats")},
    )
    report = run(interceptor_build, "direct", env, "--seconds", "1.2", "--fork", timeout_s=15)
    reports = report["all_reports"]
    assert sorted(r["forked_child"] for r in reports) == [False, True]
    total = 0.0
    for r in reports:
        page = stats_reader.read_stats(tmp_path / f"gpu-{r['pid']}.stats")
        assert page["pid"] == r["pid"]
        assert page["launches_kernel"] == r["launches"] == r["shim"]["launches_kernel"]
        assert r["shim"]["mode"] == MODE_THROTTLED
        total += kernel_rate(r, 0.3)
    print(f"parent + child: {total:.0f} launches/s of 2000")
    assert abs(total / 2000 - 1) <= 0.05


def test_threads_share_the_local_bucket(
    interceptor_build: Build, interceptor_redis: ValkeyServer
) -> None:
    set_rate(interceptor_redis.client(), bucket_key("stats", "threads"), 2000, 100)
    env = shim_env(
        interceptor_build, redis_url=interceptor_redis.url, pipeline="stats", stage="threads"
    )
    report = run(
        interceptor_build, "ex_ptsz_proc", env, "--seconds", "1.2", "--threads", "4", timeout_s=15
    )
    achieved = kernel_rate(report, 0.3)
    print(f"4 threads: {achieved:.0f} launches/s of 2000")
    assert abs(achieved / 2000 - 1) <= 0.05
    assert report["driver_path_calls"] == report["shim"]["launches_kernel_ex_ptsz"]
    assert report["shim"]["tokens_used"] == report["launches"]


def test_shim_runs_the_exact_take_script(
    interceptor_build: Build, interceptor_redis: ValkeyServer
) -> None:
    """The Makefile compiles schemas/lua/gpu_take.lua in verbatim: after a run, Redis's
    script cache holds a script whose SHA1 is that of the file's bytes."""
    set_rate(interceptor_redis.client(), bucket_key("stats", "sha"), 1000, 50)
    env = shim_env(
        interceptor_build, redis_url=interceptor_redis.url, pipeline="stats", stage="sha"
    )
    run(interceptor_build, "direct", env, "--launches", "20", timeout_s=10)
    sha = hashlib.sha1(TAKE_LUA.read_bytes()).hexdigest()
    assert interceptor_redis.client().script_exists(sha) == [True]
    generated = (interceptor_build.shim.parent / "gen" / "gpu_take_lua.h").read_text()
    assert f'"{sha}"' in generated

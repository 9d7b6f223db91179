"""Real-GPU check of libsair_intercept.so with PyTorch (run by device_check.sh).

Two processes, one Redis-compatible server (started by device_check.sh):
  1. `baseline`: the workload without the shim: iterations/s, with and without CUDA graphs;
  2. `shim`: the same workload with the shim preloaded. It first runs with a huge rate
     (tokens always there) to measure launches per iteration (from the shim's own counters)
     and the full-speed launch rate R, then for each rho sets the stage's rate to rho * R
     with schemas/lua/gpu_set_rate.lua (the rate changes live, no restart) and measures the
     share it achieves: iterations/s at rho / iterations/s at full speed.

The workload is launch-bound on purpose: K tiny in-place adds on a small tensor per
iteration (K kernels), eagerly or replayed as one captured CUDA graph of K kernel nodes.

Prints a table and, last, one JSON line with every figure. Stdlib + torch only (a minimal
RESP client talks to Redis), so it runs on a GPU machine with nothing else installed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: make gpu_interceptor importable

from gpu_interceptor.stats import FIELDS  # noqa: E402  (stdlib only)

SET_RATE_LUA = ROOT / "schemas" / "lua" / "gpu_set_rate.lua"
HUGE_RATE = 1e12
RHOS = (0.25, 0.5, 0.75, 1.0)


# ---- a minimal RESP client (no redis-py on the GPU machine) ----


def _encode(*args: str | bytes | float | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Resp:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.buf = self.sock.makefile("rb")

    def _read(self) -> Any:
        line = self.buf.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.buf.read(n + 2)[:n]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"bad RESP reply {line!r}")

    def call(self, *args: str | bytes | float | int) -> Any:
        self.sock.sendall(_encode(*args))
        return self._read()


def set_rate(redis_url: str, key: str, rate: float, burst: float) -> None:
    hostport = redis_url.removeprefix("redis://").split("/")[0]
    host, _, port = hostport.partition(":")
    Resp(host or "127.0.0.1", int(port or 6379)).call(
        "EVAL", SET_RATE_LUA.read_text(), 1, key, f"{rate:.6f}", f"{burst:.6f}"
    )


# ---- the shim's counters, through its C API ----

STATS_FIELDS = FIELDS  # the layout of struct sair_intercept_stats


def shim_stats() -> dict[str, int] | None:
    try:
        fn = ctypes.CDLL(None).sair_intercept_stats
    except AttributeError:
        return None
    buf = (ctypes.c_uint64 * len(STATS_FIELDS))()
    fn(ctypes.byref(buf))
    return dict(zip(STATS_FIELDS, (int(v) for v in buf), strict=True))


# ---- the workload ----


class Workload:
    def __init__(self, kernels: int, graphs: bool) -> None:
        import torch

        self.torch = torch
        self.kernels = kernels
        self.x = torch.zeros(256, device="cuda")
        self.graph: Any = None
        if graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._eager()  # warm-up before capture, as PyTorch requires
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._eager()
        torch.cuda.synchronize()

    def _eager(self) -> None:
        for _ in range(self.kernels):
            self.x.add_(1.0)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager()

    def measure(self, seconds: float, window_s: float = 0.1) -> dict[str, Any]:
        """Iterations/s over `seconds`, and per window (for the worst 1 s error)."""
        torch = self.torch
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        windows: list[int] = []
        n = 0
        next_edge = t0 + window_s
        while True:
            self.step()
            n += 1
            now = time.perf_counter()
            if now >= next_edge:
                windows.append(n - sum(windows))
                next_edge += window_s
                if now - t0 >= seconds:
                    break
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        return {"iters": n, "elapsed_s": elapsed, "iters_per_s": n / elapsed, "windows": windows}


def one_second_rates(windows: list[int], window_s: float = 0.1) -> list[float]:
    per = round(1.0 / window_s)
    return [sum(windows[i : i + per]) / 1.0 for i in range(0, len(windows) - per + 1, per)]


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for graphs in (False, True):
        w = Workload(args.kernels, graphs)
        w.measure(0.5)
        out["graphs" if graphs else "eager"] = w.measure(args.seconds)
    return out


def run_shim(args: argparse.Namespace) -> dict[str, Any]:
    key = f"sair:gpu:{os.environ['SAIR_PIPELINE']}:{os.environ['SAIR_STAGE']}"
    url = os.environ["SAIR_REDIS_URL"]
    results: dict[str, Any] = {}
    for graphs in (False, True):
        set_rate(url, key, HUGE_RATE, HUGE_RATE)
        w = Workload(args.kernels, graphs)
        w.measure(0.5)
        before = shim_stats()
        full = w.measure(args.seconds)
        after = shim_stats()
        if before is None or after is None:
            raise SystemExit("the shim is not loaded (LD_PRELOAD)")
        tokens = after["tokens_used"] - before["tokens_used"]
        launch_calls = sum(after[k] - before[k] for k in STATS_FIELDS if k.startswith("launches_"))
        per_iter_tokens = tokens / full["iters"]
        full_rate = full["iters_per_s"] * per_iter_tokens  # tokens/s at full speed
        mode: dict[str, Any] = {
            "full": full,
            "tokens_per_iter": per_iter_tokens,
            "launch_calls_per_iter": launch_calls / full["iters"],
            "full_speed_tokens_per_s": full_rate,
            "rho": {},
        }
        for rho in RHOS:
            rate = rho * full_rate
            set_rate(url, key, rate, max(1.0, rate / 20))
            w.measure(0.3)  # settle: the burst and the old local batch drain
            m = w.measure(args.seconds)
            share = m["iters_per_s"] / full["iters_per_s"]
            per_s = one_second_rates(m["windows"])
            errs = [abs(r / full["iters_per_s"] - rho) for r in per_s]
            mode["rho"][str(rho)] = {
                **m,
                "configured_share": rho,
                "achieved_share": share,
                "mean_abs_error_1s": statistics.mean(errs) if errs else None,
                "worst_abs_error_1s": max(errs) if errs else None,
            }
        results["graphs" if graphs else "eager"] = mode
    results["stats"] = shim_stats()
    return results


def summarize(baseline: dict[str, Any], shim: dict[str, Any]) -> dict[str, Any]:
    """Achieved vs configured share, and the shim's cost per launch call, per mode."""
    summary: dict[str, Any] = {"device": shim.get("device"), "torch": shim.get("torch")}
    for mode in ("eager", "graphs"):
        base, s = baseline[mode], shim[mode]
        t_base = 1.0 / base["iters_per_s"]
        t_shim = 1.0 / s["full"]["iters_per_s"]
        calls = s["launch_calls_per_iter"]
        summary[mode] = {
            "baseline_iters_per_s": base["iters_per_s"],
            "shim_full_speed_iters_per_s": s["full"]["iters_per_s"],
            "launch_calls_per_iter": calls,
            "tokens_per_iter": s["tokens_per_iter"],
            "full_speed_tokens_per_s": s["full_speed_tokens_per_s"],
            "overhead_us_per_launch_call": (t_shim - t_base) / calls * 1e6 if calls else None,
            "shares": {
                rho: {
                    "configured": r["configured_share"],
                    "achieved": r["achieved_share"],
                    "mean_abs_error_1s": r["mean_abs_error_1s"],
                    "worst_abs_error_1s": r["worst_abs_error_1s"],
                }
                for rho, r in s["rho"].items()
            },
        }
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"device: {summary['device']}, torch {summary['torch']}")
    for mode in ("eager", "graphs"):
        m = summary[mode]
        overhead = m["overhead_us_per_launch_call"]
        print(
            f"{mode}: {m['launch_calls_per_iter']:.1f} launch calls and "
            f"{m['tokens_per_iter']:.1f} tokens per iteration; "
            f"{m['baseline_iters_per_s']:.0f} it/s without the shim, "
            f"{m['shim_full_speed_iters_per_s']:.0f} it/s with it at rho 1 "
            f"({'n/a' if overhead is None else f'{overhead:+.3f}'} us per launch call)"
        )
        for rho, r in m["shares"].items():
            print(
                f"  rho {rho}: achieved share {r['achieved']:.3f} "
                f"(1 s windows: mean |error| {r['mean_abs_error_1s']:.3f}, "
                f"worst {r['worst_abs_error_1s']:.3f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["baseline", "shim", "summary"])
    parser.add_argument("--kernels", type=int, default=20, help="kernels per iteration")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--baseline-json", type=Path, help="summary: the baseline's output")
    parser.add_argument("--shim-json", type=Path, help="summary: the shim run's output")
    args = parser.parse_args()
    if args.role == "summary":
        summary = summarize(
            json.loads(args.baseline_json.read_text().strip().splitlines()[-1]),
            json.loads(args.shim_json.read_text().strip().splitlines()[-1]),
        )
        print_summary(summary)
        print(json.dumps(summary))
        return
    try:
        import torch
    except ImportError:
        print(json.dumps({"error": "PyTorch is not installed"}))
        sys.exit(2)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to PyTorch"}))
        sys.exit(2)
    result = run_baseline(args) if args.role == "baseline" else run_shim(args)
    result["device"] = torch.cuda.get_device_name(0)
    result["torch"] = torch.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()

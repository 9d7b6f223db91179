"""Service time of the four GPU-stage PyTorch models on CUDA (for a machine with a GPU).

    python -m sair.pipelines.torch_device_check [--n 50] [--allow-cpu]

For each reference pipeline: make `n` seeded requests, run the real stage-1 handler on each
(CPU, not timed), build and warm the model (load time reported), then time the real GPU
stage handler on the torch backend request by request (the handler synchronises CUDA, so
the time is the model's service time) and check that stage 3 accepts every output. Prints a
table and, last, one JSON object: `device`, `torch`, `interceptor` and per pipeline
`<p>_p50_ms`, `<p>_p90_ms`, `<p>_mean_ms`, `<p>_load_s` (and `textgen_ms_per_token`); with
the interceptor preloaded also `<p>_launches_per_request` and `<p>_full_speed_launch_rate`
(launches/s at rho = 1: what the stage's spec should say on that GPU). Also written to
`$OUT/torch_device_check.json` when `$OUT` is set.

Exit code 2 without CUDA unless `--allow-cpu` (then the figures are CPU figures).
Needs torch (CUDA build), numpy and pydantic; no Redis, no NATS: nothing is throttled here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sair.pipelines.torch_device_check",
        description="Service time of the GPU-stage PyTorch models on CUDA.",
    )
    p.add_argument("--n", type=int, default=50, help="timed requests per pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipelines", default="imgcls,nlp,textgen,video")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA")
    args = p.parse_args(argv)
    if args.n < 1:
        print(f"--n={args.n}: must be >= 1", file=sys.stderr)
        return 2

    os.environ["SAIR_GPU_BACKEND"] = "torch"
    try:
        import torch
    except ImportError as exc:
        print(f"torch is not installed: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device (torch.cuda.is_available() is False); --allow-cpu to run on the "
              "CPU", file=sys.stderr)  # fmt: skip
        return 2

    from sair.pipelines import load_spec, make_payload, torch_models
    from sair.worker.logic import load_handler

    device = torch_models.torch_device()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "interceptor": torch_models.interceptor_mode(),
        "n": args.n,
    }
    print(f"device {result['device']}, torch {result['torch']}, "
          f"interceptor {result['interceptor']}")  # fmt: skip
    shim_cols = f" {'launches':>9} {'launch/s':>10}" if result["interceptor"] else ""
    print(f"{'pipeline':8} {'load s':>7} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}{shim_cols}")
    for name in args.pipelines.split(","):
        spec = load_spec(name)
        pre, gpu, post = (load_handler(s.handler or "") for s in spec.stages)
        opts = [dict(s.options) for s in spec.stages]
        rng = np.random.default_rng(args.seed)
        inputs = [pre(make_payload(name, rng, i), opts[0]) for i in range(args.n)]
        t0 = time.perf_counter()
        torch_models.warmup(name, opts[1])
        load_s = time.perf_counter() - t0
        times_ms: list[float] = []
        tokens = 0
        shim_before = torch_models.interceptor_counters()
        for payload in inputs:
            t = time.perf_counter()
            out = gpu(dict(payload), opts[1])
            times_ms.append((time.perf_counter() - t) * 1000.0)
            post(out, opts[2])  # stage 3 accepts it
            tokens += len(out.get("ids", [])) if name == "textgen" else 0
        p50, p90 = _quantile(times_ms, 0.5), _quantile(times_ms, 0.9)
        mean = statistics.fmean(times_ms)
        result.update({f"{name}_p50_ms": round(p50, 3), f"{name}_p90_ms": round(p90, 3),
                       f"{name}_mean_ms": round(mean, 3), f"{name}_load_s": round(load_s, 3)})
        if name == "textgen" and tokens:
            result["textgen_ms_per_token"] = round(sum(times_ms) / tokens, 3)
        shim_after = torch_models.interceptor_counters()
        extra = ""
        if shim_before is not None and shim_after is not None:
            # With the shim preloaded: the model's real launches per request, and the stage's
            # full_speed_launch_rate to put in its spec (launches/s at rho = 1).
            launches = (torch_models.interceptor_launches(shim_after)
                        - torch_models.interceptor_launches(shim_before)) / args.n  # fmt: skip
            rate = launches / (mean / 1000.0)
            result[f"{name}_launches_per_request"] = round(launches, 1)
            result[f"{name}_full_speed_launch_rate"] = round(rate, 1)
            extra = f" {launches:9.1f} {rate:10.0f}"
        print(f"{name:8} {load_s:7.2f} {p50:8.2f} {p90:8.2f} {mean:8.2f}{extra}")
    line = json.dumps(result)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "torch_device_check.json").write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

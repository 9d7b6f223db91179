"""Load generator: `python -m sair.loadgen --pipeline imgcls --process poisson --param rate_rps=10`.

Arrival processes live in `sair.loadgen.arrivals` (pure; the simulator reuses them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

import nats

from sair.runtime import configure_logging
from sair.settings import Settings, SettingsError

from .app import LoadGenerator, LoadResult, RequestRecord
from .arrivals import PROCESSES, ArrivalError, arrivals, load_trace_csv, parse_params

__all__ = ["LoadGenerator", "LoadResult", "RequestRecord", "build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sair loadgen", description="Open-loop load into a pipeline.")
    p.add_argument("--pipeline", required=True, help="built-in name or spec .toml path")
    p.add_argument("--process", choices=PROCESSES, default="poisson")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="process parameter, e.g. rate_rps=20 (repeat)")
    p.add_argument("--trace", default=None, help="CSV for --process trace (ts_s or rate_rps)")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default=None, help="request id prefix (default: time based)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0)
    p.add_argument("--csv", default=None, help="write one row per request here")
    p.add_argument("--nats-url", default=None, help="default: SAIR_NATS_URL")
    p.add_argument("--log-level", default="WARNING")
    return p  # fmt: skip


async def run(args: argparse.Namespace) -> LoadResult:
    from sair.pipelines import make_payload, resolve_spec
    from sair.worker.app import ensure_pipeline_exists

    spec = resolve_spec(args.pipeline)
    params = parse_params(args.param)
    if args.process == "trace":
        if not args.trace:
            raise ArrivalError("--process trace needs --trace FILE")
        params.update(load_trace_csv(args.trace))
    offsets = arrivals(args.process, params, args.duration_s, args.seed)
    url = args.nats_url or Settings.from_env().nats_url
    nc = await nats.connect(url, name="sair-loadgen")
    try:
        await ensure_pipeline_exists(nc.jetstream(), spec)
        run_id = args.run_id or f"r{int(time.time() * 1000)}"
        gen = LoadGenerator(
            nc, spec, run_id, payload_fn=lambda rng, i: make_payload(spec.name, rng, i),
            seed=args.seed,
        )  # fmt: skip
        return await gen.run(offsets.tolist(), drain_timeout_s=args.drain_timeout_s)
    finally:
        await nc.drain()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        result = asyncio.run(run(args))
    except (ArrivalError, SettingsError, ValueError, OSError) as exc:
        print(f"sair loadgen: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        result.write_csv(args.csv)
    print(json.dumps(result.summary()))
    return 0 if result.completed == result.sent else 1

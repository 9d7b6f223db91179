"""Stage worker runtime: `python -m sair.worker --pipeline imgcls --stage pre`.

See `sair.worker.app` for the request flow and docs/pipelines.md for the handler contract.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence

from sair.runtime import BusError, configure_logging
from sair.settings import Settings, SettingsError

from .app import StageWorker, WorkerConfig
from .logic import DEFAULT_MAX_FAILURES, HandlerLoadError, safe_identifier

__all__ = ["StageWorker", "WorkerConfig", "build_parser", "main"]

log = logging.getLogger("sair.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sair worker", description="Serve one stage of a pipeline.")
    p.add_argument("--pipeline", required=True,
                   help="built-in pipeline name (imgcls, nlp, textgen, video) or a spec .toml path")
    p.add_argument("--stage", required=True, help="stage name within the pipeline")
    p.add_argument("--worker-id", default=None, help="report id (default <stage>-<host>-<pid>)")
    p.add_argument("--max-failures", type=int, default=DEFAULT_MAX_FAILURES,
                   help="failed deliveries before a request is dead-lettered")
    p.add_argument("--prefetch", type=int, default=1,
                   help="requests fetched ahead of the free handler slots")
    p.add_argument("--startup-s", type=float, default=None,
                   help="override the spec's startup_s (model load time)")
    p.add_argument("--report-interval-s", type=float, default=1.0)
    p.add_argument("--nats-url", default=None, help="default: SAIR_NATS_URL")
    p.add_argument("--redis-url", default=None, help="default: SAIR_REDIS_URL (GPU tokens)")
    p.add_argument("--log-level", default="INFO")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from sair.pipelines import resolve_spec

    try:
        settings = Settings.from_env()
        if args.nats_url or args.redis_url:
            settings = Settings(
                **{**settings.__dict__,
                   "nats_url": args.nats_url or settings.nats_url,
                   "redis_url": args.redis_url or settings.redis_url}
            )  # fmt: skip
        spec = resolve_spec(args.pipeline)
        worker_id = args.worker_id or safe_identifier(
            f"{args.stage}-{socket.gethostname()}-{os.getpid()}"
        )
        cfg = WorkerConfig(
            spec=spec, stage=args.stage, worker_id=worker_id, max_failures=args.max_failures,
            report_interval_s=args.report_interval_s, prefetch=args.prefetch,
            startup_s=args.startup_s,
        )  # fmt: skip
        worker = StageWorker(cfg, settings)
    except (ValueError, KeyError, OSError, SettingsError, HandlerLoadError) as exc:
        print(f"sair worker: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(worker.run())
    except BusError as exc:
        print(f"sair worker: {exc}", file=sys.stderr)
        return 1
    return 0

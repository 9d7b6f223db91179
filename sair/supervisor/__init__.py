"""The local backend's supervisor: `python -m sair.supervisor --pipeline imgcls`."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from sair.runtime import BusError, configure_logging
from sair.settings import Settings, SettingsError
from sair.worker.logic import safe_identifier

from .app import Replica, Supervisor

__all__ = ["Replica", "Supervisor", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sair supervisor",
                                description="Keep each stage's workers at the desired count.")
    p.add_argument("--pipeline", action="append", required=True,
                   help="built-in pipeline name or spec .toml path (repeat for several)")
    p.add_argument("--stages", default=None,
                   help="comma-separated stage names this supervisor manages (default: all)")
    p.add_argument("--supervisor-id", default=None, help="default: host name")
    p.add_argument("--log-dir", default=None, help="one log file per worker here")
    p.add_argument("--drain-timeout-s", type=float, default=30.0)
    p.add_argument("--poll-s", type=float, default=0.25)
    p.add_argument("--worker-arg", action="append", default=[],
                   help="extra argument passed to every worker (repeat)")
    p.add_argument("--nats-url", default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--log-level", default="INFO")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from sair.pipelines import resolve_spec

    try:
        settings = Settings.from_env()
        settings = Settings(**{**settings.__dict__,
                               "nats_url": args.nats_url or settings.nats_url,
                               "redis_url": args.redis_url or settings.redis_url})  # fmt: skip
        specs = {src: resolve_spec(src) for src in args.pipeline}
        sup = Supervisor(
            specs, settings,
            supervisor_id=args.supervisor_id or safe_identifier(socket.gethostname()),
            stages=set(args.stages.split(",")) if args.stages else None,
            worker_args=args.worker_arg,
            log_dir=Path(args.log_dir) if args.log_dir else None,
            poll_s=args.poll_s, drain_timeout_s=args.drain_timeout_s,
        )  # fmt: skip
    except (ValueError, OSError, SettingsError) as exc:
        print(f"sair supervisor: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(sup.serve_forever())
    except BusError as exc:
        print(f"sair supervisor: {exc}", file=sys.stderr)
        return 1
    return 0

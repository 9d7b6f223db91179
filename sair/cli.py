"""The `sair` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .stack import EmbeddedStack, StackUrls

app = typer.Typer(
    help="SAIR: autoscaling for multi-stage ML inference pipelines.",
    no_args_is_help=True,
    add_completion=False,
)


async def check_health(urls: StackUrls, timeout_s: float = 10.0) -> dict[str, str]:
    """Reach each server for real: NATS with JetStream, Redis PING, Qdrant collections."""
    import nats
    import redis.asyncio as aioredis

    from .runtime import ensure_core_streams

    health: dict[str, str] = {}
    nc = await asyncio.wait_for(nats.connect(urls.nats_url, allow_reconnect=False), timeout_s)
    try:
        js = nc.jetstream()
        await ensure_core_streams(js)
        info = await js.account_info()
        health["nats"] = f"ok (JetStream, {info.streams} streams)"
    finally:
        await nc.close()
    r = aioredis.Redis.from_url(urls.redis_url, socket_timeout=timeout_s)
    try:
        pong = await r.ping()
        health["redis"] = "ok" if pong else "no PONG"
    finally:
        await r.aclose()
    health["qdrant"] = await asyncio.to_thread(_qdrant_health, urls)
    return health


def _qdrant_health(urls: StackUrls) -> str:
    from qdrant_client import QdrantClient

    client = (
        QdrantClient(url=urls.qdrant_url, timeout=5)
        if urls.qdrant_url
        else QdrantClient(path=urls.qdrant_path)
    )
    try:
        n = len(client.get_collections().collections)
    finally:
        client.close()
    where = urls.qdrant_url or f"local mode at {urls.qdrant_path}"
    return f"ok ({where}, {n} collections)"


@app.command()
def up(
    workdir: Annotated[Path, typer.Option(help="Where servers keep their data and logs.")] = Path(
        ".sair"
    ),
    nats_url: Annotated[
        str | None,
        typer.Option(envvar="SAIR_NATS_URL", help="Use this NATS instead of starting one."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(envvar="SAIR_REDIS_URL", help="Use this Redis instead of starting one."),
    ] = None,
    qdrant_url: Annotated[
        str | None,
        typer.Option(
            envvar="SAIR_QDRANT_URL", help="Use this Qdrant server instead of local mode."
        ),
    ] = None,
    nats_port: Annotated[int | None, typer.Option(help="Port for the embedded NATS.")] = None,
    redis_port: Annotated[int | None, typer.Option(help="Port for the embedded Redis.")] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop by itself after this many seconds.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print URLs as one JSON line.")
    ] = False,
) -> None:
    """Start the embedded stack (NATS + JetStream, Redis/Valkey, Qdrant), check it, and run
    until Ctrl-C (or --duration); then stop everything it started."""
    stack = EmbeddedStack(
        workdir.resolve(),
        nats_url=nats_url,
        redis_url=redis_url,
        qdrant_url=qdrant_url,
        nats_port=nats_port,
        redis_port=redis_port,
    )
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        urls = stack.start()
        health = asyncio.run(check_health(urls))
        if json_output:
            print(json.dumps({**urls.as_env(), "health": health, "pids": stack.pids()}), flush=True)
        else:
            typer.echo("SAIR embedded stack is up:")
            for key, value in urls.as_env().items():
                typer.echo(f"  {key}={value}")
            for name, status in health.items():
                typer.echo(f"  {name}: {status}")
            typer.echo("Press Ctrl-C to stop.")
        deadline = None if duration is None else time.monotonic() + duration
        while not stop_requested and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):
            stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo("SAIR embedded stack stopped.", err=json_output)


@app.command()
def version() -> None:
    """Print the version and the message schema version."""
    from schemas import SCHEMA_VERSION

    from . import __version__

    typer.echo(f"sair {__version__} (schema v{SCHEMA_VERSION})")


def main() -> None:  # pragma: no cover - console script
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""The `sair` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .stack import EmbeddedStack, StackUrls
from .watch import watch_app

app = typer.Typer(
    help="SAIR: autoscaling for multi-stage ML inference pipelines.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(watch_app, name="watch")


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
    pipeline: Annotated[
        str, typer.Option(help="Built-in pipeline (imgcls, nlp, textgen, video) or spec .toml.")
    ] = "imgcls",
    workload: Annotated[
        str, typer.Option(help="Arrival process: poisson, ramp, burst or trace.")
    ] = "burst",
    policy: Annotated[
        str, typer.Option(help="sair, llm, or a baseline: static, hpa, vpa, threshold, keda, "
                               "kpa, ray.")
    ] = "sair",
    duration: Annotated[
        float | None,
        typer.Option(help="Seconds of load, then stop and summarise (default: until Ctrl-C)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the arrivals and of exploration.")] = 0,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Workload parameter NAME=VALUE, e.g. burst_rps=40 (repeat)."),
    ] = None,
    trace: Annotated[
        Path | None, typer.Option(help="CSV for --workload trace (ts_s or rate_rps column).")
    ] = None,
    workdir: Annotated[
        Path, typer.Option(help="Where servers keep their data, logs, summary and plot.")
    ] = Path(".sair"),
    infra_only: Annotated[
        bool,
        typer.Option("--infra-only", help="Only the servers (NATS, Redis, Qdrant), no loop."),
    ] = False,
    no_view: Annotated[
        bool, typer.Option("--no-view", help="No live view: one line per telemetry tick.")
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON line: the summary (with --infra-only: "
                                    "the URLs, health and pids)."),
    ] = False,
    advisory: Annotated[
        bool, typer.Option("--advisory", help="Publish actions without applying them.")
    ] = False,
    retriever_engine: Annotated[
        str, typer.Option(help="Episode store: auto, numpy, qdrant-local or qdrant-server.")
    ] = "auto",
    host_cap: Annotated[
        bool,
        typer.Option("--host-cap/--no-host-cap",
                     help="Lower CPU stages' max_replicas to what this host's cores run."),
    ] = True,
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
) -> None:
    """Run the whole closed loop: the embedded stack, the four services, the supervisor with
    the pipeline's workers and the load generator, with a live view. Ctrl-C stops everything;
    with --duration it ends by itself, prints a summary and writes WORKDIR/summary.json and
    WORKDIR/timeline.png."""
    if infra_only:
        _up_infra(workdir, nats_url, redis_url, qdrant_url, nats_port, redis_port, duration,
                  json_output)  # fmt: skip
        return
    from .closedloop import ClosedLoop, ClosedLoopConfig, ClosedLoopError

    try:
        params = _parse_params(param or [])
        config = ClosedLoopConfig(
            pipeline=pipeline, workload=workload, params=params, trace=trace, policy=policy,
            duration_s=duration, seed=seed, workdir=workdir, nats_url=nats_url,
            redis_url=redis_url, qdrant_url=qdrant_url, nats_port=nats_port,
            redis_port=redis_port, advisory=advisory, retriever_engine=retriever_engine,
            host_cap=host_cap,
        )  # fmt: skip
        loop = ClosedLoop(config)
    except (ClosedLoopError, ValueError) as exc:
        typer.echo(f"sair up: {exc}", err=True)
        raise typer.Exit(2) from exc
    # Without a terminal (or asked not to): one line per telemetry tick instead of the view.
    mode = "lines" if json_output or no_view or not sys.stdout.isatty() else "rich"
    summary = asyncio.run(_run_loop(loop, mode, quiet=json_output))
    if json_output:
        print(json.dumps(summary), flush=True)
    else:
        from .liveview import format_summary

        typer.echo(format_summary(summary))
    if summary.get("error"):
        raise typer.Exit(1)


def _parse_params(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"param={item!r}: expected NAME=VALUE")
        try:
            out[name.strip()] = float(raw)
        except ValueError as exc:
            raise ValueError(f"param {name}={raw!r}: not a number") from exc
    return out


async def _run_loop(loop: Any, mode: str, quiet: bool) -> dict[str, Any]:
    """Start, run the load, stop on the first SIGINT/SIGTERM (a second one kills at once)."""
    import logging

    from .liveview import Reporter

    workdir: Path = loop.workdir
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "logs" / "up.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sair")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    cfg = loop.config
    title = f"SAIR · {loop.spec.name} · {cfg.workload} load · policy {cfg.policy}"
    reporter = Reporter(loop.record, mode, title, cfg.duration_s,
                        stream=sys.stderr if quiet else None)  # fmt: skip
    loop.on_telemetry = lambda _t: reporter.on_telemetry(time.time())
    stop = asyncio.Event()
    aio = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:  # impatient: no graceful drain
            for comp in list(loop.components.values()):
                comp.signal(signal.SIGKILL, group=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        aio.add_signal_handler(sig, on_signal)

    async def refresh() -> None:
        while True:
            reporter.refresh(time.time())
            await asyncio.sleep(0.5)

    if not quiet and mode != "rich":
        typer.echo(f"{title}: starting (logs in {workdir / 'logs'})")
    reporter.start(time.time())
    refresher = asyncio.create_task(refresh())
    error: str | None = None
    try:
        await loop.start(stop)
        if stop.is_set():
            loop.interrupted = True
        else:
            await loop.run_load(stop)
    except Exception as exc:
        error = str(exc)
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        reporter.close(time.time())
        typer.echo("stopping..." if error is None else f"error: {error}; stopping...",
                   err=quiet)
        summary: dict[str, Any] = await loop.finish()
        if error is not None:
            summary["error"] = error
        root.removeHandler(handler)
        handler.close()
    return summary


def _up_infra(
    workdir: Path,
    nats_url: str | None,
    redis_url: str | None,
    qdrant_url: str | None,
    nats_port: int | None,
    redis_port: int | None,
    duration: float | None,
    json_output: bool,
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


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Run every policy x pipeline x workload x seed in the simulator and write results.json,
    a Markdown table and plots (`sair bench --quick --out DIR`; `sair bench --help`)."""
    from .sim.grid import main as grid_main

    raise typer.Exit(grid_main(list(ctx.args)))


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

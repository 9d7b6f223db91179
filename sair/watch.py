"""`sair watch actions|telemetry|results`: follow SAIR's streams from a terminal or a script.

    sair watch actions [--pipeline P] [--json] [--from-start] [--count N] [--timeout-s S]

| feed | subject (without --pipeline) | model | kept in JetStream |
|---|---|---|---|
| actions | `sair.actions.<p>` (`.*`) | `ScalingAction` | yes, `SAIR_ACTIONS` |
| results | `sair.actions.<p>.result` (`.*.result`) | `ActionResult` | yes, `SAIR_ACTIONS` |
| telemetry | `sair.telemetry.<p>` (`.*`) | `PipelineTelemetry` | no (core NATS) |

Live (the default) is a plain core-NATS subscription: it sees what is published from now on.
`--from-start` asks the server which stream holds the subject and reads it with an ordered,
ephemeral consumer from its first message (deliver policy "all"), then keeps following; it
is refused, saying so, for a subject no stream keeps. Watching never creates streams or
durable consumers: it only reads.

Output: one human-readable line per message, or with `--json` the message as its schema's
JSON, one per line, on stdout. Notes (what is watched, reconnects) and errors go to stderr. A
message that does not validate against the model is shown on stderr as
`error: <subject>: <Model>: <field>=<value>: <why>` and watching continues; it does not count
towards `--count`.

Exit status: 0 when `--count` messages were shown, `--timeout-s` ran out without `--count`,
or on Ctrl-C; 1 when the timeout came before `--count` messages or NATS cannot be reached;
2 for bad arguments (pipeline name, URL, `--from-start` on a subject nothing keeps).

Wired into the `sair` command as `app.add_typer(watch_app, name="watch")`; also runs as
`python -m sair.watch ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import nats
import nats.errors
import nats.js.errors
import typer
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api
from pydantic import ValidationError

from schemas import subjects
from schemas.common import SairModel, describe_error
from schemas.messages import ActionResult, PipelineTelemetry, ScalingAction, StageAction

from .settings import Settings, SettingsError

CONNECT_TIMEOUT_S = 10.0
RATIONALE_CHARS = 240
"""Human lines cut the rationale here; `--json` carries all of it."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class WatchError(Exception):
    """Watching cannot start or go on; `code` is the process exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Feed:
    """One thing to watch: its subjects and the model its messages carry."""

    name: str
    model: type[SairModel]
    one: Callable[[str], str]
    """Subject of one pipeline."""
    every: str
    """Subject of all pipelines (wildcard)."""

    def subject(self, pipeline: str | None) -> str:
        return self.every if pipeline is None else self.one(pipeline)


FEEDS: dict[str, Feed] = {
    "actions": Feed("actions", ScalingAction, subjects.actions, f"{subjects.PREFIX}.actions.*"),
    "results": Feed(
        "results", ActionResult, subjects.action_results, f"{subjects.PREFIX}.actions.*.result"
    ),
    "telemetry": Feed(
        "telemetry", PipelineTelemetry, subjects.telemetry, f"{subjects.PREFIX}.telemetry.*"
    ),
}

PERSISTED_PATTERNS = (
    f"{subjects.PREFIX}.actions.> ({subjects.ACTIONS_STREAM})",
    f"{subjects.PREFIX}.episodes.> ({subjects.EPISODES_STREAM})",
    f"{subjects.PREFIX}.dlq.> ({subjects.DLQ_STREAM})",
)
"""What SAIR's own services keep (sair.runtime.ensure_core_streams), for error messages."""


# --------------------------------------------------------------------------- formatting (pure)


def _clock(ts_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts_s))


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _cut(text: str, limit: int = RATIONALE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_targets(stages: list[StageAction]) -> str:
    """`pre=2 infer=3@0.50`: replicas per stage, `@rho` on GPU stages that set one."""
    return " ".join(
        f"{a.stage}={a.target_replicas}" + ("" if a.rho is None else f"@{a.rho:.2f}")
        for a in stages
    )


def format_action(a: ScalingAction) -> str:
    parts = [
        _clock(a.ts_s),
        a.pipeline,
        "action",
        f"{a.source}/{a.policy}",
        format_targets(a.stages),
    ]
    if a.bottleneck:
        parts.append(f"bottleneck={a.bottleneck}")
    if a.predicted_p99_ms is not None:
        parts.append(f"predicted P99 {a.predicted_p99_ms:.0f} ms")
    if a.advisory:
        parts.append("ADVISORY (not applied)")
    if a.fallback_reason:
        parts.append(f"fallback: {_cut(a.fallback_reason, 120)}")
    parts.append(f"id={a.action_id}")
    line = "  ".join(parts)
    return f"{line}  | {_cut(a.rationale)}" if a.rationale else line


def format_telemetry(t: PipelineTelemetry) -> str:
    if t.e2e_p99_ms is None:
        p99 = f"P99 - (no completions) / SLO {t.slo_p99_ms:.0f} ms"
    else:
        verdict = "OVER" if t.e2e_p99_ms > t.slo_p99_ms else "ok"
        p99 = f"P99 {t.e2e_p99_ms:.0f} ms / SLO {t.slo_p99_ms:.0f} ms {verdict}"
    if t.slo_attainment is not None:
        p99 += f" (attained {_pct(t.slo_attainment)})"
    head = [_clock(t.ts_s), t.pipeline, "telemetry", f"tick {t.tick}", p99]
    if t.bottleneck:
        head.append(f"bottleneck={t.bottleneck} ({t.bottleneck_confidence:.2f})")
    else:
        head.append("bottleneck=-")
    head.append(f"${t.cost_per_h:.2f}/h")
    stages = []
    for s in t.stages:
        replicas = f"{s.replicas_ready}r"
        if s.replicas_starting:
            replicas += f"+{s.replicas_starting}s"
        if s.replicas_desired is not None and s.replicas_desired != s.replicas_ready:
            replicas += f"->{s.replicas_desired}"
        text = f"{s.stage} {replicas} u{_pct(s.utilisation)} q{_num(s.queue_depth, 'd')}"
        if s.rho is not None:
            text += f" rho{s.rho:.2f}"
        if s.stale:
            text += " STALE"
        stages.append(text)
    line = "  ".join(head) + "  | " + " | ".join(stages)
    return line + "  [degraded]" if t.degraded else line


def format_result(r: ActionResult) -> str:
    parts = [_clock(r.ts_s), r.pipeline, "result", r.status, r.backend, f"id={r.action_id}"]
    if r.applied:
        parts.append(format_targets(r.applied))
    line = "  ".join(parts)
    return f"{line}  | {_cut('; '.join(r.reasons))}" if r.reasons else line


def format_message(message: SairModel) -> str:
    """The human-readable line of a watched message."""
    if isinstance(message, ScalingAction):
        return format_action(message)
    if isinstance(message, PipelineTelemetry):
        return format_telemetry(message)
    if isinstance(message, ActionResult):
        return format_result(message)
    return message.model_dump_json()


def render(feed: Feed, subject: str, data: bytes, as_json: bool) -> tuple[str | None, str | None]:
    """(line for stdout, None) for a valid message, (None, error line) for a malformed one."""
    try:
        message = feed.model.model_validate_json(data)
    except ValidationError as exc:
        return None, f"error: {subject}: {feed.model.__name__}: {describe_error(exc)}"
    return (message.model_dump_json() if as_json else format_message(message)), None


# --------------------------------------------------------------------------- the bus


def redact(url: str) -> str:
    """The URL with any user:password / token hidden."""
    return str(Settings(nats_url=url).redacted()["nats_url"])


def resolve_url(nats_url: str | None) -> str:
    """--nats-url, else SAIR_NATS_URL, else the default; checked like every SAIR setting."""
    try:
        if nats_url is None:
            return Settings.from_env().nats_url
        return Settings.from_env({"SAIR_NATS_URL": nats_url}).nats_url
    except SettingsError as exc:
        raise WatchError(str(exc), EXIT_USAGE) from exc


async def connect(url: str, note: Callable[[str], None], closing: asyncio.Event) -> NatsClient:
    """Connect, reconnecting forever later on (a watcher outlives a NATS restart); refused
    credentials or no server within CONNECT_TIMEOUT_S end it with a WatchError."""
    shown = redact(url)
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_disconnect() -> None:
        if not closing.is_set():
            note(f"disconnected from NATS at {shown}; reconnecting")

    async def on_reconnect() -> None:
        note(f"reconnected to NATS at {shown}")

    async def on_error(exc: Exception) -> None:
        auth = isinstance(exc, nats.errors.AuthorizationError) or "Authorization" in str(exc)
        if (auth or isinstance(exc, ssl.SSLCertVerificationError)) and not refused.done():
            refused.set_result(exc)  # retrying with the same credentials/CA cannot help
        elif not closing.is_set():
            note(f"NATS error: {exc}")

    connecting = asyncio.ensure_future(
        nats.connect(
            url,
            name="sair-watch",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
    )
    either: set[asyncio.Future[Any]] = {connecting, refused}
    done, _ = await asyncio.wait(
        either, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    if connecting in done and connecting.exception() is None:
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    if refused.done():
        why = f"{refused.result()} (check the credentials in the URL, or the CA: SSL_CERT_FILE)"
    elif connecting in done and connecting.exception() is not None:
        exc = connecting.exception()
        why = f"{exc.__class__.__name__} {exc}".rstrip()
    else:
        why = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    refused.cancel()
    raise WatchError(f"cannot connect to NATS at {shown}: {why}")


async def stream_holding(nc: NatsClient, feed: Feed, subject: str, url: str) -> str:
    """Name of the JetStream stream that keeps `subject`; WatchError (usage) if none does."""
    try:
        return await nc.jetstream().find_stream_name_by_subject(subject)
    except nats.js.errors.NotFoundError as exc:
        if feed.name == "telemetry":
            why = (
                "telemetry is published on core NATS and not kept: there is no history to "
                "replay. Run without --from-start to follow it live"
            )
        else:
            why = (
                f"{subjects.ACTIONS_STREAM} does not exist there yet (every SAIR service "
                f"creates it when it starts); run without --from-start, or start a service"
            )
        raise WatchError(
            f"--from-start: no JetStream stream on {redact(url)} keeps {subject}: {why}. "
            f"SAIR keeps {', '.join(PERSISTED_PATTERNS)}.",
            EXIT_USAGE,
        ) from exc
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
        raise WatchError(
            f"--from-start: JetStream is not enabled on {redact(url)}", EXIT_USAGE
        ) from exc


@dataclass
class WatchOutcome:
    shown: int = 0
    malformed: int = 0
    timed_out: bool = False


async def watch(
    feed: Feed,
    *,
    pipeline: str | None = None,
    as_json: bool = False,
    from_start: bool = False,
    nats_url: str | None = None,
    count: int | None = None,
    timeout_s: float | None = None,
    out: Callable[[str], None] = print,
    note: Callable[[str], None] = print,
) -> WatchOutcome:
    """Follow `feed` until `count` messages were shown or `timeout_s` passed (else forever).

    `out` gets one line per valid message; `note` gets notes and error lines."""
    if pipeline is not None:
        try:
            subjects.check_name(pipeline, "pipeline")
        except ValueError as exc:
            raise WatchError(f"--pipeline: {exc}", EXIT_USAGE) from exc
    if count is not None and count < 1:
        raise WatchError(f"--count={count}: must be >= 1", EXIT_USAGE)
    if timeout_s is not None and not timeout_s > 0:
        raise WatchError(f"--timeout-s={timeout_s}: must be > 0", EXIT_USAGE)
    url = resolve_url(nats_url)
    subject = feed.subject(pipeline)
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await queue.put(msg)

    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    closing = asyncio.Event()
    nc = await connect(url, note, closing)
    try:
        if from_start:
            stream = await stream_holding(nc, feed, subject, url)
            # Ordered consumer: ephemeral, no acks, redelivers nothing, restarts itself at the
            # next sequence after a gap; deliver policy ALL = from the stream's first message.
            await nc.jetstream().subscribe(
                subject,
                stream=stream,
                cb=on_msg,
                ordered_consumer=True,
                manual_ack=True,
                deliver_policy=js_api.DeliverPolicy.ALL,
            )
            how = f"replaying stream {stream} from its first message, then following"
        else:
            await nc.subscribe(subject, cb=on_msg)
            how = "live"
        await nc.flush()
        note(f"watching {subject} on {redact(url)} ({how}); Ctrl-C to stop")
        outcome = WatchOutcome()
        while count is None or outcome.shown < count:
            wait = None if deadline is None else deadline - loop.time()
            if wait is not None and wait <= 0:
                outcome.timed_out = True
                break
            try:
                msg = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                outcome.timed_out = True
                break
            line, error = render(feed, msg.subject, msg.data, as_json)
            if line is not None:
                out(line)
                outcome.shown += 1
            elif error is not None:
                note(error)
                outcome.malformed += 1
        return outcome
    finally:
        closing.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5.0)


# --------------------------------------------------------------------------- the commands

watch_app = typer.Typer(
    help="Follow SAIR's action, result and telemetry streams (one line or one JSON per message).",
    no_args_is_help=True,
    add_completion=False,
)

PipelineOpt = Annotated[
    str | None,
    typer.Option("--pipeline", "-p", help="Only this pipeline (default: every pipeline)."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print each message as its schema's JSON, one per line.")
]
FromStartOpt = Annotated[
    bool,
    typer.Option(
        "--from-start",
        help="Replay the JetStream audit log from its first message, then follow "
        "(actions and results only: telemetry is not kept).",
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--nats-url", help="NATS URL (default: SAIR_NATS_URL, else nats://127.0.0.1:4222)."
    ),
]
CountOpt = Annotated[
    int | None, typer.Option("--count", "-n", help="Exit after this many messages.")
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout-s", help="Exit after this many seconds (status 1 if --count is unmet)."
    ),
]


def run_feed(
    name: str,
    pipeline: str | None,
    as_json: bool,
    from_start: bool,
    nats_url: str | None,
    count: int | None,
    timeout_s: float | None,
) -> None:
    """Run one watch command to its end and exit with the documented status."""
    feed = FEEDS[name]

    def out(line: str) -> None:
        typer.echo(line)

    def note(line: str) -> None:
        typer.echo(line, err=True)

    try:
        outcome = asyncio.run(
            watch(
                feed,
                pipeline=pipeline,
                as_json=as_json,
                from_start=from_start,
                nats_url=nats_url,
                count=count,
                timeout_s=timeout_s,
                out=out,
                note=note,
            )
        )
    except WatchError as exc:
        note(f"sair watch {name}: {exc}")
        raise typer.Exit(exc.code) from exc
    except KeyboardInterrupt:
        note("stopped")
        raise typer.Exit(EXIT_OK) from None
    if count is not None and outcome.shown < count:
        note(f"timed out after {timeout_s:g} s: {outcome.shown} of {count} messages")
        raise typer.Exit(EXIT_FAILED)


@watch_app.command("actions")
def actions_cmd(
    pipeline: PipelineOpt = None,
    as_json: JsonOpt = False,
    from_start: FromStartOpt = False,
    nats_url: UrlOpt = None,
    count: CountOpt = None,
    timeout_s: TimeoutOpt = None,
) -> None:
    """Scaling actions (sair.actions.<p>): targets, rho, source, rationale."""
    run_feed("actions", pipeline, as_json, from_start, nats_url, count, timeout_s)


@watch_app.command("results")
def results_cmd(
    pipeline: PipelineOpt = None,
    as_json: JsonOpt = False,
    from_start: FromStartOpt = False,
    nats_url: UrlOpt = None,
    count: CountOpt = None,
    timeout_s: TimeoutOpt = None,
) -> None:
    """The actuator's results (sair.actions.<p>.result): applied, clamped, failed, why."""
    run_feed("results", pipeline, as_json, from_start, nats_url, count, timeout_s)


@watch_app.command("telemetry")
def telemetry_cmd(
    pipeline: PipelineOpt = None,
    as_json: JsonOpt = False,
    from_start: FromStartOpt = False,
    nats_url: UrlOpt = None,
    count: CountOpt = None,
    timeout_s: TimeoutOpt = None,
) -> None:
    """The monitor's telemetry (sair.telemetry.<p>): bottleneck, P99 vs SLO, per stage."""
    run_feed("telemetry", pipeline, as_json, from_start, nats_url, count, timeout_s)


def main(argv: list[str] | None = None) -> Any:
    """`python -m sair.watch actions ...` (the same as `sair watch actions ...`)."""
    return watch_app(args=argv)


if __name__ == "__main__":  # pragma: no cover - command line
    main()

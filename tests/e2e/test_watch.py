"""`sair watch` on a real nats-server: live and --from-start, --json and human lines,
malformed messages, credentials kept out of the output.

Live watches run as `python -m sair.watch` subprocesses (the test publishes once the watcher
says it is subscribed); replays of the audit log call `watch_app` through typer's CliRunner.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from typer.testing import CliRunner

from sair.runtime import ensure_core_streams
from sair.stack import ManagedServer, NatsServer, free_port
from sair.watch import FEEDS, format_action, format_result, format_telemetry, watch_app
from schemas import subjects
from schemas.common import SairModel
from schemas.messages import (
    ActionResult,
    PipelineTelemetry,
    ScalingAction,
    StageAction,
    StageMetrics,
)

ROOT = Path(__file__).resolve().parents[2]


def unique(prefix: str = "w") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def action(pipeline: str, i: int = 0, **update: object) -> ScalingAction:
    a = ScalingAction(
        pipeline=pipeline, action_id=f"{pipeline}-a{i}", ts_s=time.time(), source="reflex",
        policy="sair", stages=[StageAction(stage="pre", target_replicas=2),
                               StageAction(stage="infer", target_replicas=3 + i, rho=0.5)],
        rationale="queue of infer grows 12 rps: scale now", bottleneck="infer",
        predicted_p99_ms=180.0,
    )  # fmt: skip
    return a.model_copy(update=update)


def result(pipeline: str, i: int = 0) -> ActionResult:
    return ActionResult(
        pipeline=pipeline, action_id=f"{pipeline}-a{i}", ts_s=time.time(), status="clamped",
        backend="local", applied=[StageAction(stage="infer", target_replicas=3, rho=0.5)],
        reasons=["stage 'infer': change 1 -> 4 exceeds max_step=2, limited to 3"],
    )  # fmt: skip


def telemetry(pipeline: str, tick: int = 0) -> PipelineTelemetry:
    return PipelineTelemetry(
        pipeline=pipeline, tick=tick, ts_s=time.time(), window_s=30.0, slo_p99_ms=300.0,
        e2e_p99_ms=450.0, slo_attainment=0.9, cost_per_h=1.25, whole_gpu_cost_per_h=2.0,
        bottleneck="infer", bottleneck_confidence=0.8,
        stages=[
            StageMetrics(stage="pre", kind="cpu", replicas_ready=2, utilisation=0.45,
                         queue_depth=0),
            StageMetrics(stage="infer", kind="gpu", replicas_ready=2, replicas_starting=1,
                         replicas_desired=3, utilisation=0.97, queue_depth=40, rho=0.5),
        ],
    )  # fmt: skip


SAMPLES: dict[str, Callable[[str, int], ScalingAction | ActionResult | PipelineTelemetry]] = {
    "actions": action,
    "results": result,
    "telemetry": telemetry,
}


@dataclass
class Ran:
    code: int
    out: list[str]
    err: str


class Watcher:
    """`python -m sair.watch ...` as a subprocess, started once it has subscribed."""

    def __init__(self, proc: asyncio.subprocess.Process, first_err: str) -> None:
        self.proc = proc
        self.first_err = first_err

    @classmethod
    async def start(cls, *args: str) -> Watcher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sair.watch", *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        if "watching" not in line:
            rest = await proc.communicate()
            raise AssertionError(f"watch did not start: {line}{rest[1].decode()}")
        return cls(proc, line)

    async def finish(self, timeout_s: float = 60) -> Ran:
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout_s)
        code = self.proc.returncode
        assert code is not None
        return Ran(code, out.decode().splitlines(), self.first_err + err.decode())


async def invoke(*args: str) -> Ran:
    """watch_app through typer's CliRunner (in a thread: the command runs its own loop)."""
    res = await asyncio.to_thread(CliRunner().invoke, watch_app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Ran(res.exit_code, res.stdout.splitlines(), res.stderr)


def parse(model: type[SairModel], lines: list[str]) -> list[SairModel]:
    return [model.model_validate_json(line) for line in lines]


# ------------------------------------------------------------------------------- live


async def test_each_feed_json_and_human(nats_server: ManagedServer, nc: NatsClient) -> None:
    """One watcher per feed with --json (lines parse back to the published models, other
    pipelines filtered out) and one without (a readable line); started side by side."""
    url = nats_server.url
    pipes = {feed: unique() for feed in FEEDS}
    human_p = unique()
    watchers = await asyncio.gather(
        *[Watcher.start(feed, "--pipeline", p, "--json", "--count", "2", "--timeout-s", "90",
                        "--nats-url", url) for feed, p in pipes.items()],
        Watcher.start("actions", "-p", human_p, "-n", "1", "--timeout-s", "90", "--nats-url", url),
    )  # fmt: skip
    sent: dict[str, list[SairModel]] = {}
    for feed, p in pipes.items():
        sent[feed] = [SAMPLES[feed](p, 1), SAMPLES[feed](p, 2)]
        other = SAMPLES[feed](unique(), 3)  # another pipeline: filtered out by --pipeline
        await nc.publish(FEEDS[feed].subject(other.pipeline), other.model_dump_json().encode())
        for m in sent[feed]:
            await nc.publish(FEEDS[feed].subject(p), m.model_dump_json().encode())
    await nc.publish(subjects.actions(human_p), action(human_p).model_dump_json().encode())
    ran = await asyncio.gather(*[w.finish() for w in watchers])
    for (feed, _), r in zip(pipes.items(), ran, strict=False):
        assert r.code == 0, (feed, r.err)
        assert parse(FEEDS[feed].model, r.out) == sent[feed], feed
    human = ran[-1]
    assert human.code == 0, human.err
    [line] = human.out
    for part in (human_p, "reflex/sair", "pre=2", "infer=3@0.50", "bottleneck=infer",
                 f"id={human_p}-a0", "queue of infer grows"):  # fmt: skip
        assert part in line, (part, line)


async def test_all_pipelines_without_pipeline_and_no_results_among_actions(
    nats_server: ManagedServer, nc: NatsClient
) -> None:
    p1, p2 = unique(), unique()
    w = await Watcher.start("actions", "--json", "--count", "2", "--timeout-s", "60",
                            "--nats-url", nats_server.url)  # fmt: skip
    await nc.publish(subjects.actions(p1), action(p1).model_dump_json().encode())
    # A result lives under sair.actions.<p>.result: the actions feed must not show it.
    await nc.publish(subjects.action_results(p1), result(p1).model_dump_json().encode())
    await nc.publish(subjects.actions(p2), action(p2).model_dump_json().encode())
    ran = await w.finish()
    assert ran.code == 0, ran.err
    got = parse(ScalingAction, ran.out)
    assert [m.pipeline for m in got] == [p1, p2]  # type: ignore[attr-defined]


def test_human_line_formats() -> None:
    t = format_telemetry(telemetry("tp", 7))
    for part in ("tp", "tick 7", "P99 450 ms / SLO 300 ms OVER", "bottleneck=infer (0.80)",
                 "$1.25/h", "pre 2r u45% q0", "infer 2r+1s->3 u97% q40 rho0.50"):  # fmt: skip
        assert part in t, (part, t)
    quiet = telemetry("tp").model_copy(update={"e2e_p99_ms": None, "bottleneck": None})
    assert "P99 - (no completions)" in format_telemetry(quiet)
    r = format_result(result("rp"))
    for part in ("rp", "clamped", "local", "id=rp-a0", "infer=3@0.50", "max_step=2"):
        assert part in r, (part, r)
    a = format_action(action("ap", advisory=True, source="llm", fallback_reason="llm timeout"))
    for part in ("llm/sair", "ADVISORY", "fallback: llm timeout"):
        assert part in a, (part, a)
    long = format_action(action("ap", rationale="x" * 3000))
    assert len(long) < 600 and long.endswith("...")


async def test_malformed_message_is_an_error_line_and_watching_goes_on(
    nats_server: ManagedServer, nc: NatsClient
) -> None:
    p = unique()
    w = await Watcher.start("actions", "-p", p, "--json", "-n", "1", "--timeout-s", "60",
                            "--nats-url", nats_server.url)  # fmt: skip
    bad = action(p).model_dump(mode="json")
    bad["stages"][0]["target_replicas"] = -1
    await nc.publish(subjects.actions(p), json.dumps(bad).encode())
    await nc.publish(subjects.actions(p), b"not json at all")
    good = action(p, 5)
    await nc.publish(subjects.actions(p), good.model_dump_json().encode())
    ran = await w.finish()
    assert ran.code == 0, ran.err
    assert parse(ScalingAction, ran.out) == [good]
    assert (f"error: {subjects.actions(p)}: ScalingAction: stages.0.target_replicas=-1"
            in ran.err), ran.err  # fmt: skip
    assert "<message>=b'not json at all': Invalid JSON" in ran.err, ran.err


# ------------------------------------------------------------------------------- replay


async def test_from_start_sees_what_was_published_before(
    nats_server: ManagedServer, nc: NatsClient
) -> None:
    p = unique()
    js = nc.jetstream()
    await ensure_core_streams(js)
    sent = [action(p, i) for i in range(3)]
    for m in sent:
        await js.publish(subjects.actions(p), m.model_dump_json().encode())
    res = result(p, 1)
    await js.publish(subjects.action_results(p), res.model_dump_json().encode())

    ran = await invoke("actions", "-p", p, "--from-start", "--json", "-n", "3",
                       "--timeout-s", "30", "--nats-url", nats_server.url)  # fmt: skip
    assert ran.code == 0, ran.err
    assert parse(ScalingAction, ran.out) == sent
    assert "replaying stream SAIR_ACTIONS" in ran.err

    ran = await invoke("results", "-p", p, "--from-start", "--json", "-n", "1",
                       "--timeout-s", "30", "--nats-url", nats_server.url)  # fmt: skip
    assert ran.code == 0, ran.err
    assert parse(ActionResult, ran.out) == [res]

    # Live only sees what comes next: nothing here, so the count is not met (status 1).
    ran = await invoke("actions", "-p", p, "--json", "-n", "1", "--timeout-s", "1",
                       "--nats-url", nats_server.url)  # fmt: skip
    assert ran.code == 1 and ran.out == [], ran
    assert "timed out after 1 s: 0 of 1 messages" in ran.err


async def test_from_start_on_telemetry_says_it_is_not_kept(nats_server: ManagedServer) -> None:
    ran = await invoke("telemetry", "--from-start", "-n", "1", "--timeout-s", "10",
                       "--nats-url", nats_server.url)  # fmt: skip
    assert ran.code == 2, ran
    assert "no JetStream stream" in ran.err and "telemetry is published on core NATS" in ran.err


async def test_bad_arguments_exit_2(nats_server: ManagedServer) -> None:
    ran = await invoke("actions", "-p", "Not_Valid", "--nats-url", nats_server.url)
    assert ran.code == 2 and "pipeline='Not_Valid'" in ran.err, ran
    ran = await invoke("actions", "--nats-url", "http://127.0.0.1:1")
    assert ran.code == 2 and "must start with one of nats, tls, ws, wss" in ran.err, ran


# ------------------------------------------------------------------------------- credentials


class AuthNats(NatsServer):
    def command(self) -> list[str]:
        return [*super().command(), "--user", "sair", "--pass", "s3cret-pw"]


async def test_credentials_in_the_url_work_and_are_never_printed(tmp_path: Path) -> None:
    server = AuthNats("nats-auth", "127.0.0.1", free_port(), tmp_path / "nats")
    server.start()
    try:
        good = f"nats://sair:s3cret-pw@127.0.0.1:{server.port}"
        ran = await invoke("results", "--timeout-s", "0.5", "--nats-url", good)
        assert ran.code == 0, ran
        assert f"nats://***@127.0.0.1:{server.port}" in ran.err
        wrong = f"nats://sair:wrong-pw@127.0.0.1:{server.port}"
        refused = await invoke("results", "--timeout-s", "0.5", "--nats-url", wrong)
        assert refused.code == 1 and "cannot connect" in refused.err, refused
        for text in (ran.err, *ran.out, refused.err):
            assert "pw" not in text, text
    finally:
        server.stop()


class TlsNats(NatsServer):
    cert: Path
    key: Path

    def command(self) -> list[str]:
        return [*super().command(), "--tls", "--tlscert", str(self.cert),
                "--tlskey", str(self.key)]  # fmt: skip


async def test_tls_url_with_a_private_ca_from_ssl_cert_file(tmp_path: Path) -> None:
    """What docs/operations.md says about NATS TLS: a tls:// URL, the CA via SSL_CERT_FILE
    (Python's default trust store otherwise); a certificate nobody vouches for is refused."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = TlsNats("nats-tls", "127.0.0.1", free_port(), tmp_path / "nats")
    server.cert, server.key = cert, key
    server.start()
    url = f"tls://127.0.0.1:{server.port}"
    args = [sys.executable, "-m", "sair.watch", "actions", "--timeout-s", "0.5", "--nats-url", url]
    try:
        trusted = await asyncio.to_thread(
            subprocess.run, args, capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**os.environ, "SSL_CERT_FILE": str(cert)},
        )  # fmt: skip
        assert trusted.returncode == 0, trusted.stderr
        assert f"watching sair.actions.* on {url}" in trusted.stderr
        unknown = await asyncio.to_thread(
            subprocess.run, args, capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")},
        )  # fmt: skip
        assert unknown.returncode == 1, unknown.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in unknown.stderr
    finally:
        server.stop()

"""Worker reports per second the monitor absorbs on one core, vs a raw nats-py subscriber.

A nats-server (from the venv) runs on a free port; a publisher process blasts N pre-encoded
WorkerReports (150 workers x 3 stages, ~20 histogram buckets each, like real ones) at the
report subject. The receiver, in this process (one asyncio loop, one core), is in turn:

- raw: a plain nats-py subscription that only counts messages (the baseline);
- monitor: the real monitor app (`start_monitor`): parse + validate every WorkerReport, fold
  it into the window, and publish telemetry every 0.5 s tick meanwhile (its lateness is
  reported: "on time" means the worst tick was late by less than one tick).

Rate = N / (time from the publisher's start to the last message counted). Each receiver runs
`--rounds` times; the best round counts. Last line:
{"reports_per_s": ..., "raw_per_s": ..., "ratio": ..., ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
from nats.aio.msg import Msg

from sair.settings import Settings
from sair.stack import NatsServer, free_port
from schemas import subjects
from schemas.histogram import LatencyHistogram
from schemas.messages import WorkerReport
from schemas.pipeline import PipelineSpec, StageSpec
from services.monitor.app import start_monitor

PIPELINE = "ingest"
STAGES = ("pre", "infer", "post")
WORKERS_PER_STAGE = 150
TICK_S = 0.5


def spec() -> PipelineSpec:
    return PipelineSpec(
        name=PIPELINE,
        slo_p99_ms=200.0,
        tick_s=TICK_S,
        stages=[
            StageSpec(name="pre", kind="cpu", max_replicas=1000),
            StageSpec(name="infer", kind="gpu", rho_grid=[0.5, 1.0], max_replicas=1000),
            StageSpec(name="post", kind="cpu", max_replicas=1000),
        ],
    )


def payloads(n: int, seed: int = 3) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    templates: list[tuple[str, WorkerReport]] = []
    for stage in STAGES:
        for w in range(WORKERS_PER_STAGE):
            service = [rng.lognormvariate(3.0, 0.5) for _ in range(40)]
            wait = [rng.expovariate(1 / 5.0) for _ in range(40)]
            templates.append(
                (
                    stage,
                    WorkerReport(
                        pipeline=PIPELINE, stage=stage, worker_id=f"{stage}-{w}", seq=0,
                        state="ready", ts_s=time.time(), interval_s=1.0, processed=40,
                        busy_s=0.7, service_ms=LatencyHistogram.from_values(service),
                        queue_wait_ms=LatencyHistogram.from_values(wait),
                        rho=0.5 if stage == "infer" else None,
                    ),
                )
            )
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        stage, t = templates[i % len(templates)]
        r = t.model_copy(update={"seq": i // len(templates) + 1})
        out.append((subjects.reports(PIPELINE, stage), r.model_dump_json().encode()))
    return out


async def publisher(url: str, n: int) -> None:
    nc = await nats.connect(url)
    msgs = payloads(n)
    print("ready", flush=True)
    sys.stdin.readline()
    for i, (subject, data) in enumerate(msgs):
        await nc.publish(subject, data)
        if i % 2000 == 1999:
            await nc.flush()
    await nc.flush()
    await nc.close()


class Publisher:
    """The publisher process: prepared before the clock starts, then released."""

    def __init__(self, url: str, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--publisher", url, "--n", str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"publisher did not start: {line!r}")

    def go(self) -> float:
        assert self.proc.stdin is not None
        started = time.perf_counter()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return started

    def close(self) -> None:
        self.proc.wait(timeout=60)


async def wait_count(count: object, n: int, timeout_s: float) -> float:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if count() >= n:  # type: ignore[operator]
            return time.perf_counter()
        await asyncio.sleep(0.005)
    raise TimeoutError(f"only {count()} of {n} arrived")  # type: ignore[operator]


async def run_raw(url: str, n: int) -> float:
    nc = await nats.connect(url)
    seen = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal seen
        seen += 1

    await nc.subscribe(subjects.reports_all(PIPELINE), cb=on_msg)
    await nc.flush()
    pub = Publisher(url, n)
    started = pub.go()
    done = await wait_count(lambda: seen, n, 120)
    pub.close()
    await nc.drain()
    return n / (done - started)


async def run_monitor(url: str, n: int) -> tuple[float, float, int]:
    app = await start_monitor(
        Settings(nats_url=url, metrics_port=-1), spec(), window_s=30, tick_s=TICK_S
    )
    agg = app.aggregator
    base = agg.reports_total + agg.duplicates_total
    pub = Publisher(url, n)
    app.max_lateness_s = 0.0
    ticks0 = app.ticks
    started = pub.go()
    done = await wait_count(lambda: agg.reports_total + agg.duplicates_total - base, n, 120)
    pub.close()
    await asyncio.sleep(TICK_S * 2)  # let one more tick show whether it keeps time
    lateness, ticks = app.max_lateness_s, app.ticks - ticks0
    await app.close()
    return n / (done - started), lateness, ticks


async def bench(n: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer("nats-server", "127.0.0.1", free_port(), Path(tmp))
        server.start()
        try:
            raw: list[float] = []
            mon: list[tuple[float, float, int]] = []
            for _ in range(rounds):
                raw.append(await run_raw(server.url, n))
                mon.append(await run_monitor(server.url, n))
        finally:
            server.stop()
    best_raw = max(raw)
    best = max(mon, key=lambda m: m[0])
    return {
        "reports_per_s": round(best[0]),
        "raw_per_s": round(best_raw),
        "ratio": round(best[0] / best_raw, 3),
        "messages": n,
        "max_tick_lateness_s": round(max(m[1] for m in mon), 3),
        "tick_s": TICK_S,
        "rounds_monitor_per_s": [round(m[0]) for m in mon],
        "rounds_raw_per_s": [round(r) for r in raw],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60_000, help="reports per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="15,000 reports, 2 rounds")
    ap.add_argument("--publisher", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publisher:
        asyncio.run(publisher(args.publisher, args.n))
        return
    n, rounds = (15_000, 2) if args.quick else (args.n, args.rounds)
    out = asyncio.run(bench(n, rounds))
    print(
        f"monitor {out['reports_per_s']} reports/s vs raw subscriber {out['raw_per_s']}/s "
        f"(ratio {out['ratio']}); worst tick lateness {out['max_tick_lateness_s']} s"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()

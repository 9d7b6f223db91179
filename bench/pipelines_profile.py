"""Run each reference pipeline under Poisson load with fixed replicas and measure its stages.

For every pipeline: its own nats-server and Redis, the real supervisor with the spec's
initial replicas, the GPU stage's token rate set to initial_rho x full_speed_launch_rate
(what the actuator would do), then Poisson load at a low and a high rate for `--duration`
seconds each. Per stage it reports the handler (service) time from the completions and the
queue wait from the workers' merged report histograms: the stage whose queue wait grows is
the bottleneck at that load.

Last line: {"<pipeline>": {"low": {...}, "high": {...}}, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sair import gpu_emulation  # noqa: E402
from sair.loadgen import LoadGenerator  # noqa: E402
from sair.loadgen.arrivals import arrivals  # noqa: E402
from sair.pipelines import REFERENCE_PIPELINES, load_spec, make_payload  # noqa: E402
from sair.settings import Settings  # noqa: E402
from sair.stack import NatsServer, RedisServer, free_port  # noqa: E402
from sair.supervisor import Supervisor  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.histogram import LatencyHistogram, merge  # noqa: E402
from schemas.messages import WorkerReport  # noqa: E402

# Low: well below every stage's capacity. High: near the GPU stage's token-rate capacity at
# its initial rho (see docs/pipelines.md), while the CPU stages stay below theirs.
RATES_RPS = {
    "imgcls": (4.0, 17.0),
    "nlp": (4.0, 17.0),
    "textgen": (2.0, 11.0),
    "video": (2.0, 12.0),
}


async def profile(name: str, duration_s: float, workdir: Path, seed: int) -> dict[str, Any]:
    spec = load_spec(name)
    nats_srv = NatsServer("nats-server", "127.0.0.1", free_port(), workdir / name / "nats")
    redis_srv = RedisServer("redis-server", "127.0.0.1", free_port(), workdir / name / "redis")
    nats_srv.start()
    redis_srv.start()
    settings = Settings(nats_url=nats_srv.url, redis_url=redis_srv.url, metrics_port=-1)
    for st in spec.stages:
        if st.kind == "gpu" and st.full_speed_launch_rate and st.start_rho:
            rate = st.start_rho * st.full_speed_launch_rate
            gpu_emulation.set_rate(redis_srv.url, name, st.name, rate, burst=max(64, rate * 0.05),
                                   rho=st.start_rho)  # fmt: skip
    sup = Supervisor({name: spec}, settings, supervisor_id="prof", log_dir=workdir / "logs")
    nc = await nats.connect(nats_srv.url)
    reports: list[WorkerReport] = []

    async def on_report(msg: Msg) -> None:
        reports.append(WorkerReport.model_validate_json(msg.data))

    await nc.subscribe(subjects.reports_all(name), cb=on_report)
    out: dict[str, Any] = {}
    try:
        await sup.start()
        runner = asyncio.create_task(sup.run())
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = sup.status(name).stages
            if all(s.ready >= s.desired for s in states):
                break
            await asyncio.sleep(0.2)
        for level, rate in zip(("low", "high"), RATES_RPS[name], strict=True):
            reports.clear()
            gen = LoadGenerator(
                nc, spec, f"{name}-{level}",
                payload_fn=lambda rng, i: make_payload(name, rng, i), seed=seed,
            )  # fmt: skip
            offsets = arrivals("poisson", {"rate_rps": rate}, duration_s, seed).tolist()
            result = await gen.run(offsets, drain_timeout_s=60.0)
            await asyncio.sleep(1.5)  # the last reports
            summ = result.summary()
            waits: dict[str, Any] = {}
            for sname in spec.stage_names:
                h: LatencyHistogram = merge(r.queue_wait_ms for r in reports if r.stage == sname)
                busy = sum(r.busy_s for r in reports if r.stage == sname)
                span = sum(r.interval_s for r in reports if r.stage == sname) or 1.0
                waits[sname] = {
                    "queue_wait_p50_ms": round(h.quantile_ms(0.5) or 0.0, 2),
                    "queue_wait_p99_ms": round(h.quantile_ms(0.99) or 0.0, 2),
                    "utilisation": round(busy / span, 3),
                    "gpu_token_wait_s": round(
                        sum(r.gpu_token_wait_s for r in reports if r.stage == sname), 2
                    ),
                }
            out[level] = {"rate_rps": rate, **summ, "queues": waits}
            print(json.dumps({name: {level: out[level]}}), flush=True)
        sup.stop()
        await runner
    finally:
        await nc.close()
        nats_srv.stop()
        redis_srv.stop()
    return out


async def main_async(names: list[str], duration_s: float, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            results[name] = await profile(name, duration_s, Path(d), seed)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description="Profile the reference pipelines under load.")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per load level")
    ap.add_argument("--pipelines", default=",".join(REFERENCE_PIPELINES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="10 s per level")
    args = ap.parse_args()
    duration = 10.0 if args.quick else args.duration
    res = asyncio.run(main_async(args.pipelines.split(","), duration, args.seed))
    print(json.dumps(res))


if __name__ == "__main__":
    main()

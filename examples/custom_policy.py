"""A complete replacement for services.policy: +1 replica on the bottleneck stage while the
end-to-end P99 is over the SLO, -1 on a stage that is mostly idle. See examples/README.md.

    python examples/custom_policy.py --pipeline imgcls [--nats-url URL] [--cooldown-s 10]
"""

import argparse
import asyncio
import contextlib
import os
import time
import uuid

import nats
from pydantic import ValidationError

from schemas import subjects
from schemas.common import describe_error
from schemas.messages import PipelineTelemetry, ScalingAction, StageAction, StageMetrics


def replicas(s: StageMetrics) -> int:
    return s.replicas_desired if s.replicas_desired is not None else s.replicas_ready


def decide(t: PipelineTelemetry) -> tuple[str, int, str] | None:
    """(stage, target replicas, why), or None to hold."""
    if t.e2e_p99_ms is not None and t.e2e_p99_ms > t.slo_p99_ms:
        hot = t.bottleneck or max(t.stages, key=lambda s: s.utilisation or 0.0).stage
        why = f"P99 {t.e2e_p99_ms:.0f} ms > SLO {t.slo_p99_ms:.0f} ms: +1 on bottleneck {hot}"
        return hot, replicas(t.stage(hot)) + 1, why
    for s in t.stages:
        if s.utilisation is not None and s.utilisation < 0.3 and replicas(s) > 1:
            return s.stage, replicas(s) - 1, f"{s.stage} utilisation {s.utilisation:.0%}: -1"
    return None


async def main(pipeline: str, nats_url: str, cooldown_s: float) -> None:
    nc = await nats.connect(nats_url, name="example-policy", max_reconnect_attempts=-1)
    js = nc.jetstream()
    sub = await nc.subscribe(subjects.telemetry(pipeline))
    quiet_until = 0.0  # no action before this time (a cooldown after each one)
    async for msg in sub.messages:
        try:
            t = PipelineTelemetry.model_validate_json(msg.data)
        except ValidationError as exc:  # a bad message must not stop the policy
            print(f"skipped malformed telemetry: {describe_error(exc)}", flush=True)
            continue
        choice = decide(t) if time.time() >= quiet_until else None
        if choice is None:
            continue
        stage, target, why = choice
        action = ScalingAction(
            pipeline=pipeline, action_id=f"{pipeline}-example-{uuid.uuid4().hex[:12]}",
            ts_s=time.time(), stages=[StageAction(stage=stage, target_replicas=target)],
            source="baseline", policy="example-threshold", rationale=why,
            bottleneck=t.bottleneck, based_on_tick=t.tick,
        )  # fmt: skip
        try:  # into the SAIR_ACTIONS audit log; the id header makes a re-send a no-op
            await js.publish(subjects.actions(pipeline), action.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": action.action_id})  # fmt: skip
        except Exception as exc:  # NATS restarting, stream missing: try again next tick
            print(f"could not publish {action.action_id}: {exc!r}", flush=True)
            continue
        print(f"{action.action_id}: {stage} -> {target} ({why})", flush=True)
        quiet_until = time.time() + cooldown_s  # let the new replicas start and show up


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--nats-url", default=os.environ.get("SAIR_NATS_URL", "nats://127.0.0.1:4222"))
    ap.add_argument("--cooldown-s", type=float, default=10.0)
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.pipeline, args.nats_url, args.cooldown_s))

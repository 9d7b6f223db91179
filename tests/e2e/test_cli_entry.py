"""`sair watch` and `sair bench` through the installed `sair` command (the wiring in
sair/cli.py), not only through their own modules."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from nats.aio.client import Client as NatsClient

from sair.runtime import ensure_core_streams
from sair.stack import ManagedServer
from schemas import subjects
from schemas.messages import ScalingAction, StageAction

SAIR = str(Path(sys.executable).with_name("sair"))


async def run(*args: str, timeout_s: float = 90.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SAIR, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_sair_watch_replays_the_action_audit_log(
    nats_server: ManagedServer, nc: NatsClient
) -> None:
    pipeline = f"cli-{uuid.uuid4().hex[:8]}"
    js = nc.jetstream()
    await ensure_core_streams(js)
    sent = ScalingAction(
        pipeline=pipeline, action_id=f"{pipeline}-a1", ts_s=time.time(), source="embedded",
        policy="sair", stages=[StageAction(stage="infer", target_replicas=3, rho=0.5)],
        rationale="bottleneck infer",
    )  # fmt: skip
    await js.publish(subjects.actions(pipeline), sent.model_dump_json().encode())
    code, out, err = await run(
        "watch", "actions", "--pipeline", pipeline, "--from-start", "--json", "--count", "1",
        "--timeout-s", "30", "--nats-url", nats_server.url,
    )  # fmt: skip
    assert code == 0, err
    got = [ScalingAction.model_validate_json(line) for line in out.splitlines() if line]
    assert got == [sent]


async def test_sair_bench_writes_results_for_every_run(tmp_path: Path) -> None:
    out_dir = tmp_path / "bench"
    code, _out, err = await run(
        "bench", "--policies", "static,hpa", "--pipelines", "imgcls", "--workloads", "poisson",
        "--seeds", "1", "--duration-s", "60", "--warmup-s", "0", "--jobs", "1", "--no-plots",
        "--no-progress", "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    runs = json.loads((out_dir / "results.json").read_text())
    assert sorted(r["policy"] for r in runs) == ["hpa", "static"]
    for r in runs:
        assert (r["pipeline"], r["workload"], r["seed"]) == ("imgcls", "poisson", 0)
        assert r["completed"] > 0 and r["p99_ms"] > 0 and r["effective_cost"] > 0
    # The Markdown table parses: under each metric heading, a header naming the policies and
    # one row for the cell, with as many columns.
    table = (out_dir / "results.md").read_text()
    p99 = table[table.index("## End-to-end P99") :].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in p99.splitlines()
            if line.startswith("|") and not line.startswith("|---")]  # fmt: skip
    header, cell = rows[0], rows[1:]
    assert header[:2] == ["pipeline", "workload"] and sorted(header[2:]) == ["hpa", "static"]
    assert [r[:2] for r in cell] == [["imgcls", "poisson"]] and len(cell[0]) == len(header)

"""Cap a pipeline's CPU stages to what this host can run, for the embedded local run (pure).

On the local backend every replica of a CPU stage is a worker process on this machine. A
stage whose replicas each need `cpu_cores` cannot serve more with more replicas than
`host_cores / cpu_cores` of them: the extra processes only share the same cores, each
request gets slower, and a policy that reads "queue still growing" keeps adding more (seen
live: imgcls preprocessing scaled to 8 replicas on 2 cores, its service time 20 -> 250 ms).
Kubernetes has the same limit as node capacity (pods stay Pending); here the spec's
`max_replicas` of each CPU stage is lowered to it, so the policy plans within what exists.

GPU stages are left alone: their capacity is the GPU's (rho), not this host's cores.
"""

from __future__ import annotations

import math
import re

from schemas.pipeline import PipelineSpec, StageSpec

_MAX_LINE = re.compile(r"^(\s*max_replicas\s*=\s*)(\d+)(.*)$", re.MULTILINE)


def host_max_replicas(stage: StageSpec, host_cores: int) -> int:
    """The most replicas of `stage` this host can run side by side (spec bounds kept)."""
    if stage.kind != "cpu" or host_cores <= 0:
        return stage.max_replicas
    fit = max(1, math.floor(host_cores / max(stage.cpu_cores, 1e-9) + 1e-9))
    floor = max(stage.min_replicas, stage.initial_replicas)
    return min(stage.max_replicas, max(fit, floor))


def capped_spec_text(text: str, spec: PipelineSpec, host_cores: int) -> tuple[str, list[str]]:
    """`text` (the spec's TOML) with each CPU stage's `max_replicas` lowered to what fits on
    `host_cores`; and one line per change. The stages' blocks are found by `[[stages]]`, in
    the spec's order."""
    head, *blocks = re.split(r"(?m)^(?=\[\[stages\]\])", text)
    if len(blocks) != len(spec.stages):
        raise ValueError(
            f"spec {spec.name!r}: {len(blocks)} [[stages]] blocks in the file, "
            f"{len(spec.stages)} stages parsed"
        )
    changes: list[str] = []
    out = [head]
    for stage, block in zip(spec.stages, blocks, strict=True):
        cap = host_max_replicas(stage, host_cores)
        if cap < stage.max_replicas:
            if len(_MAX_LINE.findall(block)) != 1:
                raise ValueError(f"stage {stage.name!r}: no single max_replicas line to lower")
            block = _MAX_LINE.sub(lambda m, c=cap: f"{m.group(1)}{c}{m.group(3)}", block)
            changes.append(
                f"{stage.name}: max_replicas {stage.max_replicas} -> {cap} "
                f"({host_cores} cores / {stage.cpu_cores:g} per replica)"
            )
        out.append(block)
    return "".join(out), changes

"""Capping CPU stages to the host's cores for the local run (sair/hostcap.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sair.closedloop import ClosedLoop, ClosedLoopConfig, spec_path
from sair.hostcap import capped_spec_text, host_max_replicas
from schemas.pipeline import load_pipeline_spec

IMGCLS = spec_path("imgcls")


def test_cpu_stages_fit_the_cores_gpu_stages_are_left_alone() -> None:
    spec = load_pipeline_spec(IMGCLS)  # pre: 1 core, max 8; infer: gpu, max 4; post: 0.5, max 4
    assert host_max_replicas(spec.stage("pre"), 2) == 2
    assert host_max_replicas(spec.stage("post"), 2) == 4  # 2 / 0.5 = 4, the spec's own max
    assert host_max_replicas(spec.stage("post"), 1) == 2
    assert host_max_replicas(spec.stage("infer"), 1) == 4  # the GPU's capacity, not the host's
    assert host_max_replicas(spec.stage("pre"), 64) == 8  # never above the spec's max
    # Never below what the spec starts with or requires.
    one = spec.stage("pre").model_copy(update={"initial_replicas": 3, "min_replicas": 2})
    assert host_max_replicas(one, 2) == 3


def test_capped_text_is_the_same_spec_but_the_lowered_maxima(tmp_path: Path) -> None:
    spec = load_pipeline_spec(IMGCLS)
    text, changes = capped_spec_text(IMGCLS.read_text(), spec, 2)
    assert changes == ["pre: max_replicas 8 -> 2 (2 cores / 1 per replica)"]
    out = tmp_path / "capped.toml"
    out.write_text(text)
    capped = load_pipeline_spec(out)
    assert capped.stage("pre").max_replicas == 2
    # Everything else is unchanged.
    as_before = capped.model_copy(
        update={"stages": [s.model_copy(update={"max_replicas": spec.stage(s.name).max_replicas})
                           for s in capped.stages]})  # fmt: skip
    assert as_before == spec
    # Enough cores: nothing to change, the text comes back as it was.
    assert capped_spec_text(IMGCLS.read_text(), spec, 16) == (IMGCLS.read_text(), [])


def test_a_file_whose_blocks_do_not_match_the_spec_is_refused() -> None:
    spec = load_pipeline_spec(IMGCLS)
    with pytest.raises(ValueError, match="2 \\[\\[stages\\]\\] blocks"):
        capped_spec_text(IMGCLS.read_text().replace("[[stages]]", "", 1), spec, 2)


def test_sair_up_runs_the_capped_spec_and_says_so(tmp_path: Path) -> None:
    loop = ClosedLoop(ClosedLoopConfig(workdir=tmp_path / "w", host_cores=2))
    assert loop.spec.stage("pre").max_replicas == 2
    assert loop.spec_file.parent == (tmp_path / "w").resolve()
    assert load_pipeline_spec(loop.spec_file) == loop.spec
    assert loop.summary()["host_cap"] == ["pre: max_replicas 8 -> 2 (2 cores / 1 per replica)"]
    kept = ClosedLoop(ClosedLoopConfig(workdir=tmp_path / "k", host_cores=2, host_cap=False))
    assert kept.spec_file == IMGCLS and kept.spec.stage("pre").max_replicas == 8

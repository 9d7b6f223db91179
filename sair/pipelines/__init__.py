"""The four reference pipelines after the paper (imgcls, nlp, textgen, video).

Each has a spec in `specs/<name>.toml` (loaded with `load_spec`) and a handler module
`sair.pipelines.<name>` whose stage handlers are plain functions
`handler(payload: dict, options: dict) -> dict` (see docs/pipelines.md) and whose
`make_payload(rng, index)` makes the load generator's synthetic request payloads.
"""

from __future__ import annotations

import importlib
from importlib import resources
from typing import Any

import numpy as np

from schemas.pipeline import PipelineSpec, load_pipeline_spec

REFERENCE_PIPELINES = ("imgcls", "nlp", "textgen", "video")


def spec_names() -> tuple[str, ...]:
    """Names of the built-in specs."""
    files = resources.files(__name__).joinpath("specs").iterdir()
    return tuple(sorted(f.name[:-5] for f in files if f.name.endswith(".toml")))


def load_spec(name: str) -> PipelineSpec:
    """The built-in spec `name` (ValueError naming the known ones if there is none)."""
    known = spec_names()
    if name not in known:
        raise ValueError(f"pipeline={name!r}: no built-in spec (known: {', '.join(known)})")
    with resources.as_file(resources.files(__name__).joinpath("specs", f"{name}.toml")) as path:
        return load_pipeline_spec(path)


def resolve_spec(name_or_path: str) -> PipelineSpec:
    """A built-in spec by name, or a TOML file by path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_pipeline_spec(name_or_path)
    return load_spec(name_or_path)


def make_payload(pipeline: str, rng: np.random.Generator, index: int) -> dict[str, Any]:
    """A request payload for a reference pipeline; `{"seq": index}` for any other."""
    if pipeline in REFERENCE_PIPELINES:
        module = importlib.import_module(f"{__name__}.{pipeline}")
        payload: dict[str, Any] = module.make_payload(rng, index)
        return payload
    return {"seq": index}

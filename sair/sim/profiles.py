"""Per-pipeline service-time profiles: how long one request occupies one replica of a stage.

A stage's service time at full speed is `S = fixed_ms + gpu_ms` on average, drawn from a
lognormal (or gamma) distribution with coefficient of variation `cv`. On a GPU stage only the
`gpu_ms` part runs on the GPU; a replica at share `rho` gets `rho` of the GPU's launch rate, so
that part stretches by `1 / rho`:

    S(rho) = S_full x (fixed_ms + gpu_ms / rho) / (fixed_ms + gpu_ms)

(one draw, scaled, so the cv is the same at every rho). The time blocked on GPU tokens,
reported as `gpu_token_wait_s` like the interceptor does, is `S(rho) - S_full`.

GPU parts come from the pipeline specs (launches per request / `full_speed_launch_rate`, the
calibration the interceptor enforces). `REFERENCE_PROFILES` hold the CPU handler times of the
reference pipelines as built (docs/pipelines.md); `TYPICAL_PROFILES` the costs of the real
workloads they stand for. Values and reasons in docs/simulator.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from schemas.pipeline import PipelineSpec

Distribution = Literal["lognormal", "gamma", "exponential", "deterministic"]


@dataclass(frozen=True)
class StageProfile:
    """Service time of one request on one replica of one stage."""

    mean_ms: float
    """Mean at full speed (rho = 1 for GPU stages): fixed_ms + gpu_ms."""
    cv: float = 0.3
    """Coefficient of variation (std / mean); ignored by exponential (1) and deterministic (0)."""
    dist: Distribution = "lognormal"
    gpu_ms: float = 0.0
    """Part of mean_ms that runs on the GPU and is stretched by 1 / rho."""
    launches: int = 0
    """Kernel launches per request (reported as gpu_tokens_used)."""

    def __post_init__(self) -> None:
        if not (self.mean_ms > 0 and math.isfinite(self.mean_ms)):
            raise ValueError(f"mean_ms={self.mean_ms!r} must be finite and > 0")
        if not (self.cv >= 0 and math.isfinite(self.cv)):
            raise ValueError(f"cv={self.cv!r} must be finite and >= 0")
        if not 0 <= self.gpu_ms <= self.mean_ms:
            raise ValueError(f"gpu_ms={self.gpu_ms!r} must lie in [0, mean_ms={self.mean_ms}]")
        if self.launches < 0:
            raise ValueError(f"launches={self.launches!r} must be >= 0")

    @property
    def fixed_ms(self) -> float:
        return self.mean_ms - self.gpu_ms

    def scale(self, rho: float | None) -> float:
        """Factor by which a replica at share `rho` stretches the full-speed service time."""
        if rho is None or self.gpu_ms <= 0:
            return 1.0
        if not 0 < rho <= 1:
            raise ValueError(f"rho={rho!r} must lie in (0, 1]")
        return (self.fixed_ms + self.gpu_ms / rho) / self.mean_ms

    def mean_s(self, rho: float | None = None) -> float:
        """True mean service time in seconds at share `rho`."""
        return self.mean_ms * self.scale(rho) / 1000.0

    @property
    def scv(self) -> float:
        """Squared coefficient of variation of the distribution actually drawn."""
        if self.dist == "exponential":
            return 1.0
        if self.dist == "deterministic":
            return 0.0
        return self.cv * self.cv

    def draw_s(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` full-speed service times in seconds."""
        m = self.mean_ms / 1000.0
        if self.dist == "deterministic" or (self.cv == 0 and self.dist != "exponential"):
            return np.full(n, m)
        if self.dist == "exponential":
            return rng.exponential(m, n)
        if self.dist == "gamma":
            k = 1.0 / (self.cv * self.cv)
            return rng.gamma(k, m / k, n)
        sigma2 = math.log1p(self.cv * self.cv)
        mu = math.log(m) - sigma2 / 2.0
        return rng.lognormal(mu, math.sqrt(sigma2), n)


@dataclass(frozen=True)
class PipelineProfile:
    """Service-time profiles of every stage of one pipeline."""

    pipeline: str
    stages: Mapping[str, StageProfile] = field(default_factory=dict)
    source: str = ""
    """Where the numbers come from."""

    def stage(self, name: str) -> StageProfile:
        try:
            return self.stages[name]
        except KeyError:
            raise KeyError(
                f"profile {self.pipeline!r} has no stage {name!r} (has {', '.join(self.stages)})"
            ) from None

    def check(self, spec: PipelineSpec) -> None:
        """Raise ValueError unless the profile covers exactly the spec's stages, kinds agreeing."""
        missing = [s for s in spec.stage_names if s not in self.stages]
        extra = [s for s in self.stages if s not in spec.stage_names]
        if missing or extra:
            raise ValueError(
                f"profile {self.pipeline!r} does not match pipeline {spec.name!r}: "
                f"missing stages {missing}, unknown stages {extra}"
            )
        for st in spec.stages:
            prof = self.stages[st.name]
            if st.kind == "cpu" and prof.gpu_ms > 0:
                raise ValueError(f"stage {st.name!r} is a cpu stage but gpu_ms={prof.gpu_ms}")


def gpu_ms_from_spec(launches: int, full_speed_launch_rate: float) -> float:
    """GPU time per request at rho = 1 as the interceptor's calibration defines it."""
    return 1000.0 * launches / full_speed_launch_rate


# The reference pipelines as built (sair/pipelines): CPU parts are the handler times measured
# on an idle core (docs/pipelines.md, "Service time per stage at one replica"); GPU parts are
# launches / full_speed_launch_rate of sair/pipelines/specs/*.toml (what the interceptor
# enforces) plus a small host-side part. Used to mirror, and later validate against, live runs.
REFERENCE_PROFILES: dict[str, PipelineProfile] = {
    "imgcls": PipelineProfile(
        "imgcls",
        {
            "pre": StageProfile(mean_ms=20.0, cv=0.15),
            "infer": StageProfile(mean_ms=10.5, cv=0.05, gpu_ms=10.0, launches=60),
            "post": StageProfile(mean_ms=0.3, cv=0.30),
        },
        source="docs/pipelines.md (handlers measured on an idle core) + specs/imgcls.toml",
    ),
    "nlp": PipelineProfile(
        "nlp",
        {
            # 200-400-word documents: tokenisation cost varies with length.
            "tokenise": StageProfile(mean_ms=17.0, cv=0.25),
            "encode": StageProfile(mean_ms=5.3, cv=0.05, gpu_ms=5.0, launches=120),
            "aggregate": StageProfile(mean_ms=0.2, cv=0.30),
        },
        source="docs/pipelines.md (handlers measured on an idle core) + specs/nlp.toml",
    ),
    "textgen": PipelineProfile(
        "textgen",
        {
            "prep": StageProfile(mean_ms=2.0, cv=0.40),
            # 8-63 generated tokens (+ prefill) at 1 ms per forward: 9-65 ms, mean ~38 ms;
            # a uniform spread has cv ~0.45. ~37 forwards x 24 launches.
            "decode": StageProfile(mean_ms=38.0, cv=0.45, gpu_ms=37.5, launches=900),
            "detok": StageProfile(mean_ms=0.1, cv=0.40),
        },
        source="docs/pipelines.md (handlers measured on an idle core) + specs/textgen.toml",
    ),
    "video": PipelineProfile(
        "video",
        {
            "extract": StageProfile(mean_ms=40.0, cv=0.15),
            "frames": StageProfile(mean_ms=21.0, cv=0.05, gpu_ms=20.0, launches=640),
            "temporal": StageProfile(mean_ms=0.5, cv=0.30),
        },
        source="docs/pipelines.md (handlers measured on an idle core) + specs/video.toml",
    ),
}

# Typical production costs of the real workloads the reference pipelines stand for (optimised
# native libraries on one core, a data-centre GPU at rho = 1); see docs/simulator.md.
TYPICAL_PROFILES: dict[str, PipelineProfile] = {
    "imgcls": PipelineProfile(
        "imgcls",
        {
            # libjpeg-turbo decode of a small JPEG + resize to 224 + normalise.
            "pre": StageProfile(mean_ms=6.0, cv=0.25),
            # MobileNetV2, batch 1, with host-side copies.
            "infer": StageProfile(mean_ms=10.8, cv=0.10, gpu_ms=10.0, launches=60),
            # softmax + top-5 over 1000 logits + serialisation.
            "post": StageProfile(mean_ms=1.0, cv=0.30),
        },
        source="typical costs (docs/simulator.md)",
    ),
    "nlp": PipelineProfile(
        "nlp",
        {
            "tokenise": StageProfile(mean_ms=3.0, cv=0.40),  # fast word-piece, ~256 tokens
            "encode": StageProfile(mean_ms=5.5, cv=0.15, gpu_ms=5.0, launches=120),  # BERT-base
            "aggregate": StageProfile(mean_ms=0.6, cv=0.30),
        },
        source="typical costs (docs/simulator.md)",
    ),
    "textgen": PipelineProfile(
        "textgen",
        {
            "prep": StageProfile(mean_ms=2.0, cv=0.40),
            "decode": StageProfile(mean_ms=38.0, cv=0.45, gpu_ms=37.0, launches=888),
            "detok": StageProfile(mean_ms=1.0, cv=0.40),
        },
        source="typical costs (docs/simulator.md)",
    ),
    "video": PipelineProfile(
        "video",
        {
            "extract": StageProfile(mean_ms=15.0, cv=0.25),  # hardware-assisted decode
            "frames": StageProfile(mean_ms=21.5, cv=0.10, gpu_ms=20.0, launches=640),
            "temporal": StageProfile(mean_ms=1.0, cv=0.30),
        },
        source="typical costs (docs/simulator.md)",
    ),
}


def reference_profile(pipeline: str, kind: str = "reference") -> PipelineProfile:
    """The profile of a reference pipeline (imgcls, nlp, textgen, video): `kind` "reference"
    (the handlers as built, measured) or "typical" (production costs)."""
    table = {"reference": REFERENCE_PROFILES, "typical": TYPICAL_PROFILES}.get(kind)
    if table is None:
        raise ValueError(f"profile kind={kind!r}: must be 'reference' or 'typical'")
    try:
        return table[pipeline]
    except KeyError:
        raise KeyError(
            f"no reference profile for pipeline {pipeline!r} (have {', '.join(REFERENCE_PROFILES)})"
        ) from None

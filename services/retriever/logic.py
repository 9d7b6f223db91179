"""The retriever's decisions on plain values: what to store, whether a query is usable,
and how a store's candidates become a reply. No I/O beyond the store passed in."""

from __future__ import annotations

import numpy as np

from schemas.messages import Episode, RetrievedEpisode, RetrieveReply, RetrieveRequest

from .scoring import DEFAULT_DIVERSITY, select
from .store import CandidateSource


def episode_problem(episode: Episode, dim: int, encoding_version: int) -> str | None:
    """Why an episode cannot go into this pipeline's collection (None: it can)."""
    if episode.encoding_version != encoding_version:
        return (
            f"encoding_version={episode.encoding_version}: the retriever stores encoding "
            f"version {encoding_version} for pipeline {episode.pipeline!r}"
        )
    if len(episode.context) != dim:
        return (
            f"context: {len(episode.context)} values, pipeline {episode.pipeline!r} uses "
            f"dimension {dim} (encoding version {encoding_version})"
        )
    return None


def should_store(episode: Episode) -> bool:
    """The paper's rule: only positive-reward episodes enter the memory."""
    return episode.reward > 0


def request_problem(req: RetrieveRequest, dim: int, encoding_version: int) -> str | None:
    if req.encoding_version != encoding_version:
        return (
            f"encoding_version={req.encoding_version}: pipeline {req.pipeline!r} is served "
            f"with encoding version {encoding_version}"
        )
    if len(req.context) != dim:
        return (
            f"context: {len(req.context)} values, pipeline {req.pipeline!r} uses dimension "
            f"{dim} (encoding version {encoding_version})"
        )
    return None


def retrieve(
    store: CandidateSource,
    req: RetrieveRequest,
    bandwidth: float | None = None,
    diversity: float = DEFAULT_DIVERSITY,
) -> RetrieveReply:
    """Nearest candidates from the store, scored and greedily selected."""
    stored = store.count()
    query = np.asarray(req.context, dtype=np.float64)
    nb = store.nearest(query, min(req.candidates, stored))
    sel = select(query, nb.vectors, nb.rewards, req.m, bandwidth=bandwidth, diversity=diversity)
    episodes = store.get([nb.ids[i] for i in sel.indices])
    out = [
        RetrievedEpisode(
            episode=ep,
            similarity=float(min(1.0, max(0.0, sim))),
            surprisal=float(sur),
            score=float(sc),
        )
        for ep, sim, sur, sc in zip(
            episodes, sel.similarity, sel.surprisal, sel.score, strict=True
        )
    ]
    return RetrieveReply(
        pipeline=req.pipeline, episodes=out, stored=stored, cold_start=stored < req.m
    )

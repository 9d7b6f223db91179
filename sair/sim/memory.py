"""SAIR's episode memory inside the simulator, through the live code paths.

Live, the policy service runs `services.policy.loop.step` every tick: it learns from a
settled action (shaped reward, Pareto front) and emits an `Episode` only when the reward is
positive; the retriever stores what `services.retriever.logic.should_store` accepts (after
`episode_problem`) with its store's `ingest` (add, then evict to the capacity), and answers
a `RetrieveRequest` with `services.retriever.logic.retrieve` (nearest candidates,
surprisal scoring and greedy diverse selection in `services/retriever/scoring.py`). Here
the same functions run in-process:

- `InMemoryEpisodeStore`: the retriever's `EpisodeStore` protocol on its own
  `RedundancyIndex` (the embedded engine's index and eviction, without the files);
- `SimMemory`: storing and retrieving exactly as the retriever service does;
- `LoopPolicy`: a policy driven through `loop.step` (what the policy service does), its
  episodes going into a `SimMemory`, its LLM calls and fallbacks counted. It satisfies the
  simulator's `PolicyLike`; `SimMemory.retriever` is the matching `Retriever`.

The memory is the only mutable piece: one per run, so runs stay independent and seeded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.context import ENCODING_VERSION, context_dim, encode_context
from schemas.messages import Episode, PipelineTelemetry, RetrievedEpisode, RetrieveRequest
from schemas.pipeline import PipelineSpec
from services.policy import loop
from services.policy.interface import Decision, Policy
from services.retriever.logic import episode_problem, retrieve, should_store
from services.retriever.redundancy import FloatArray, RedundancyIndex
from services.retriever.scoring import DEFAULT_DIVERSITY
from services.retriever.store import Neighbours

DEFAULT_CAPACITY = 10_000
"""The retriever service's default bound per pipeline (services/retriever/app.py)."""


class InMemoryEpisodeStore:
    """`services.retriever.store.EpisodeStore` in memory (no snapshot, no log)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = RedundancyIndex(dim)
        self._episodes: dict[str, Episode] = {}

    def add(self, episodes: Sequence[Episode]) -> int:
        return self.ingest(episodes, None)[0]

    def ingest(self, episodes: Sequence[Episode], capacity: int | None) -> tuple[int, list[str]]:
        """Store one after the other, evicting to `capacity` after each: (new, evicted ids)."""
        for e in episodes:
            if len(e.context) != self.dim:
                raise ValueError(
                    f"episode {e.episode_id}: context has {len(e.context)} values, "
                    f"the store holds dimension {self.dim}"
                )
        res = self.index.insert(
            [e.episode_id for e in episodes],
            np.array([e.context for e in episodes], dtype=np.float64).reshape(-1, self.dim),
            np.array([e.ts_s for e in episodes], dtype=np.float64),
            capacity=capacity,
        )
        for i in res.kept:
            self._episodes[episodes[i].episode_id] = episodes[i]
        for eid in res.evicted:
            self._episodes.pop(eid, None)
        return len(res.kept), list(res.evicted)

    def count(self) -> int:
        return len(self.index)

    def nearest(self, vector: Sequence[float] | FloatArray, k: int) -> Neighbours:
        q = np.asarray(vector, dtype=np.float64)
        slots, sq = self.index.nearest(q, k)
        ids = [self.index.ids[s] for s in slots]
        return Neighbours(
            ids=ids,
            vectors=self.index.vectors[slots],
            rewards=np.array([self._episodes[i].reward for i in ids], dtype=np.float64),
            sq_dist=sq,
        )

    def get(self, ids: Sequence[str]) -> list[Episode]:
        return [self._episodes[i] for i in ids]

    def ids(self) -> Iterator[str]:
        return iter(list(self.index.ids))

    def evict(self, capacity: int) -> list[str]:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        gone: list[str] = []
        while len(self.index) > capacity:
            victim = self.index.most_redundant()
            assert victim is not None
            self.index.remove(victim)
            del self._episodes[victim]
            gone.append(victim)
        return gone

    def close(self) -> None:
        """Nothing to release."""


class SimMemory:
    """One pipeline's episode memory: the retriever service's storing and retrieval rules."""

    def __init__(
        self,
        spec: PipelineSpec,
        *,
        capacity: int = DEFAULT_CAPACITY,
        m: int = 15,
        candidates: int = 128,
        bandwidth: float | None = None,
        diversity: float = DEFAULT_DIVERSITY,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        self.spec = spec
        self.dim = context_dim(spec)
        self.store = InMemoryEpisodeStore(self.dim)
        self.capacity = capacity
        self.m = m
        self.candidates = candidates
        self.bandwidth = bandwidth
        self.diversity = diversity
        self.offered = 0
        self.skipped = 0
        self.retrievals = 0

    def offer(self, episode: Episode) -> bool:
        """The retriever's `on_episode`: check, keep positive rewards, evict to capacity."""
        problem = episode_problem(episode, self.dim, ENCODING_VERSION)
        if problem is not None:
            # live this is dead-lettered; in-process it can only be a bug, so say so loudly
            raise ValueError(f"Episode: {problem}")
        self.offered += 1
        if not should_store(episode):
            self.skipped += 1
            return False
        self.store.ingest([episode], self.capacity)
        return True

    def retrieve(self, telemetry: PipelineTelemetry) -> list[RetrievedEpisode]:
        """The retriever's reply to the policy's query for this telemetry."""
        req = RetrieveRequest(
            pipeline=self.spec.name,
            encoding_version=ENCODING_VERSION,
            context=encode_context(telemetry, self.spec),
            m=self.m,
            candidates=self.candidates,
        )
        self.retrievals += 1
        reply = retrieve(self.store, req, bandwidth=self.bandwidth, diversity=self.diversity)
        return list(reply.episodes)

    def retriever(
        self, spec: PipelineSpec, telemetry: PipelineTelemetry, state: Any, now: float
    ) -> Sequence[RetrievedEpisode]:
        """`sair.sim.run.Retriever`."""
        return self.retrieve(telemetry)

    def __len__(self) -> int:
        return self.store.count()


@dataclass
class LLMStats:
    calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallbacks: int = 0


class LoopPolicy:
    """A policy run through the policy service's `loop.step`, episodes into `memory`."""

    def __init__(self, policy: Policy[Any], memory: SimMemory | None = None) -> None:
        self.policy = policy
        self.name = policy.name
        self.memory = memory
        self.learns = loop.learns(policy)
        self.llm = LLMStats()
        self.episodes = 0
        self._actions = 0
        self._seed = 0

    def initial_state(self, spec: PipelineSpec, seed: int = 0) -> loop.LoopState:
        self._seed = seed
        return loop.initial_state(self.policy, spec, seed)

    def wants_retrieval(self, spec: PipelineSpec, state: loop.LoopState, now: float) -> bool:
        return self.memory is not None and loop.needs_retrieval(self.policy, spec, state, now)

    def decide(
        self,
        spec: PipelineSpec,
        telemetry: PipelineTelemetry,
        state: loop.LoopState,
        now: float,
        retrieved: Sequence[RetrievedEpisode] = (),
    ) -> tuple[Decision, loop.LoopState]:
        # deterministic ids: the episode id of a stored action derives from it
        self._actions += 1
        action_id = f"{spec.name}-sim-{self._seed}-{self._actions}"
        result, state = loop.step(self.policy, spec, telemetry, state, now, action_id, retrieved)
        if result.episode is not None:
            self.episodes += 1
            if self.memory is not None:
                self.memory.offer(result.episode)
        d = result.decision
        if d.llm is not None:
            self.llm.calls += 1
            self.llm.failed_calls += not d.llm.ok
            self.llm.prompt_tokens += d.llm.prompt_tokens or 0
            self.llm.completion_tokens += d.llm.completion_tokens or 0
        if d.fallback_reason:
            self.llm.fallbacks += 1
        return d, state


__all__ = ["DEFAULT_CAPACITY", "InMemoryEpisodeStore", "LLMStats", "LoopPolicy", "SimMemory"]

"""Seeded epsilon-greedy exploration, pure: the RNG position travels in the state.

epsilon starts at `EPSILON_START` (0.2; the paper does not publish it) and after every
strategic decision becomes max(EPSILON_FLOOR, 0.95 x epsilon), as in the paper. The draw for
decision k of seed s comes from `random.Random(f"{s}:{k}")`: reproducible, independent of
how often the policy was called otherwise, and free of hidden global state.

An exploratory action is a uniformly chosen *other* candidate (already clamped by the
validator, so within bounds and step) among the eligible ones: the SAIR policy offers only
those predicted within its top headroom of the SLO. We never explore while the SLO is
breaking, a queue is growing or the telemetry is degraded: exploration is for learning, not
for gambling in an incident.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

EPSILON_START = 0.2
EPSILON_FLOOR = 0.05
EPSILON_DECAY = 0.95

T = TypeVar("T")


@dataclass(frozen=True)
class ExploreState:
    epsilon: float = EPSILON_START
    seed: int = 0
    counter: int = 0


def decay(epsilon: float) -> float:
    return max(EPSILON_FLOOR, EPSILON_DECAY * epsilon)


def maybe_explore(
    state: ExploreState,
    candidates: Sequence[T],
    best: int,
    *,
    allowed: bool = True,
    eligible: Sequence[int] | None = None,
) -> tuple[int, bool, ExploreState]:
    """(chosen index, explored?, new state). Advances the counter and decays epsilon.
    `eligible`: the candidates exploration may pick (None: all)."""
    rng = random.Random(f"{state.seed}:{state.counter}")
    u = rng.random()
    pool = range(len(candidates)) if eligible is None else eligible
    others = [i for i in pool if i != best]
    new = replace(state, epsilon=decay(state.epsilon), counter=state.counter + 1)
    if allowed and others and u < state.epsilon:
        return rng.choice(others), True, new
    return best, False, new

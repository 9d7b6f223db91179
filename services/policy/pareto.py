"""The Pareto front over (P99, effective cost), both minimised, and the Pareto reward term.

Points are normalised before they get here (`reward.normalise`): p99 / SLO and
cost / max cost, so both axes are dimensionless and comparable. The hypervolume reference
point is `REF` = (3.0, 1.0): three times the SLO, the most expensive configuration. The
hypervolume is divided by the reference box's area, so it lies in [0, 1].

Pareto term (the paper's Proposition 5.2):
- a point no front point dominates gets 1 + HV contribution (>= 1);
- a dominated point gets 0.8 / (1 + d), d = distance to the front (<= 0.8),
so a non-dominated outcome out-scores a dominated one by at least 0.2, whatever the front.

Distance d is the IGD+ distance: min over front points f of || max(0, p - f) ||, the shortest
move that makes p weakly dominate some front point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]

REF: Point = (3.0, 1.0)
NON_DOMINATED_BASE = 1.0
DOMINATED_SCALE = 0.8
MAX_FRONT = 64
"""A front longer than this drops the point of smallest hypervolume contribution."""


def dominates(a: Point, b: Point) -> bool:
    """a is no worse than b on both axes and better on one."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def is_dominated(p: Point, front: Sequence[Point]) -> bool:
    return any(dominates(f, p) for f in front)


def _clip(p: Point, ref: Point) -> Point:
    return (min(p[0], ref[0]), min(p[1], ref[1]))


def hypervolume(front: Sequence[Point], ref: Point = REF) -> float:
    """Area dominated by `front` inside the box below `ref`, divided by the box's area."""
    pts = sorted({_clip(p, ref) for p in front})
    # Keep the staircase (ascending x, strictly falling y), then sum its columns.
    staircase: list[Point] = []
    for x, y in pts:
        if not staircase or y < staircase[-1][1]:
            staircase.append((x, y))
    area = 0.0
    for i, (x, y) in enumerate(staircase):
        x_next = staircase[i + 1][0] if i + 1 < len(staircase) else ref[0]
        area += (x_next - x) * (ref[1] - y)
    box = ref[0] * ref[1]
    return area / box if box > 0 else 0.0


def hv_contribution(p: Point, front: Sequence[Point], ref: Point = REF) -> float:
    """Hypervolume gained by adding p to the front (0 for a dominated or duplicate point)."""
    return max(0.0, hypervolume([*front, p], ref) - hypervolume(front, ref))


def distance_to_front(p: Point, front: Sequence[Point]) -> float:
    """IGD+ distance: how far p must move (down/left) to weakly dominate a front point."""
    if not front:
        return 0.0
    return min(math.hypot(max(0.0, p[0] - f[0]), max(0.0, p[1] - f[1])) for f in front)


def pareto_term(p: Point, front: Sequence[Point], ref: Point = REF) -> float:
    """1 + HV contribution if no front point dominates p, else 0.8 / (1 + distance)."""
    if is_dominated(p, front):
        return DOMINATED_SCALE / (1.0 + distance_to_front(p, front))
    return NON_DOMINATED_BASE + hv_contribution(p, front, ref)


def update_front(
    front: Sequence[Point], p: Point, ref: Point = REF, max_points: int = MAX_FRONT
) -> tuple[Point, ...]:
    """The front after observing p: p joins unless dominated; points p dominates leave."""
    if is_dominated(p, front) or p in front:
        return tuple(front)
    kept = [f for f in front if not dominates(p, f)]
    kept.append(p)
    while len(kept) > max_points:
        # Drop the point whose removal loses the least hypervolume.
        losses = [hv_contribution(q, [f for f in kept if f != q], ref) for q in kept]
        kept.pop(losses.index(min(losses)))
    return tuple(sorted(kept))

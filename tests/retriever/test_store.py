"""Episode stores (embedded numpy engine and real Qdrant) and coverage-keeping eviction."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from schemas.context import context_dim
from services.retriever.redundancy import TIE_SQ, RedundancyIndex
from services.retriever.store import EpisodeStore, StoreError, StoreFactory

from .helpers import make_episode, make_spec

SERVER_URL = os.environ.get("SAIR_TEST_QDRANT_URL")  # read at import: the env is cleared per test
ENGINES = ["numpy", "qdrant-local"] + (["qdrant-server"] if SERVER_URL else [])

SPEC = make_spec("storetest")
DIM = context_dim(SPEC)


def _factory(engine: str, path: Path) -> StoreFactory:
    return StoreFactory(engine, SERVER_URL if engine == "qdrant-server" else None, str(path))


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(engine: str, qdrant_path: Path) -> Iterator[EpisodeStore]:
    f = _factory(engine, qdrant_path)
    # a server keeps collections between runs: a fresh encoding version per test run
    version = int.from_bytes(os.urandom(2), "big") if engine == "qdrant-server" else 1
    yield f.open(SPEC.name, version, DIM)
    f.close()


def _vec(*head: float) -> list[float]:
    return [*head, *([0.0] * (DIM - len(head)))]


def test_add_nearest_get(store: EpisodeStore) -> None:
    eps = [make_episode(SPEC, i, reward=0.1 * (i + 1), context=_vec(i / 10)) for i in range(8)]
    assert store.add(eps) == 8
    assert store.add(eps[:3]) == 0  # redelivered: not stored twice
    assert store.count() == 8
    nb = store.nearest(_vec(0.31), 3)
    assert nb.ids == ["ep-3", "ep-4", "ep-2"]
    assert nb.rewards == pytest.approx([0.4, 0.5, 0.3])
    assert nb.sq_dist == pytest.approx([0.01**2, 0.09**2, 0.11**2], abs=1e-6)
    assert [e.episode_id for e in store.get(["ep-4", "ep-0"])] == ["ep-4", "ep-0"]
    assert store.get(["ep-4"])[0] == eps[4]
    assert sorted(store.ids()) == sorted(e.episode_id for e in eps)


def test_eviction_keeps_coverage_not_recency(store: EpisodeStore) -> None:
    # four spread-out contexts, then three near-copies of the first: eviction to 4 must drop
    # the copies (oldest of each closest pair first), not the oldest spread-out ones
    spread = [make_episode(SPEC, i, context=_vec(i / 4, 1 - i / 4), ts_s=i) for i in range(4)]
    copies = [make_episode(SPEC, 10 + j, context=_vec(0.001 * (j + 1), 1.0), ts_s=10 + j)
              for j in range(3)]
    store.add(spread)
    store.add(copies)
    gone = store.evict(4)
    assert len(gone) == 3
    assert store.count() == 4
    kept = set(store.ids())
    assert {"ep-1", "ep-2", "ep-3"} <= kept
    # of the cluster {ep-0, ep-10, ep-11, ep-12} exactly one survives
    assert len(kept & {"ep-0", "ep-10", "ep-11", "ep-12"}) == 1


def test_exact_duplicates_evict_the_older(store: EpisodeStore) -> None:
    store.add([make_episode(SPEC, 1, context=_vec(0.5), ts_s=100.0),
               make_episode(SPEC, 2, context=_vec(0.5), ts_s=200.0),
               make_episode(SPEC, 3, context=_vec(0.9), ts_s=50.0)])
    assert store.evict(2) == ["ep-1"]


def test_wrong_dimension_is_refused(store: EpisodeStore) -> None:
    with pytest.raises(ValueError, match="dimension"):
        store.nearest([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="context has 3 values"):
        store.add([make_episode(SPEC, 1, context=[0.1, 0.2, 0.3])])


def test_store_survives_reopen(engine: str, qdrant_path: Path) -> None:
    if engine == "qdrant-server":
        pytest.skip("covered by the server's own persistence")
    f = _factory(engine, qdrant_path)
    s = f.open(SPEC.name, 1, DIM)
    s.add([make_episode(SPEC, i, context=_vec(i / 20)) for i in range(20)])
    s.evict(15)
    kept = sorted(s.ids())
    near = s.nearest(_vec(0.26), 3).ids
    f.close()
    f2 = _factory(engine, qdrant_path)
    s2 = f2.open(SPEC.name, 1, DIM)
    assert sorted(s2.ids()) == kept
    assert s2.nearest(_vec(0.26), 3).ids == near
    # the eviction bookkeeping came back too: a further eviction behaves the same
    s2.add([make_episode(SPEC, 99, context=_vec(0.5))])
    assert len(s2.evict(15)) == 1
    f2.close()


def test_numpy_engine_replays_its_log_after_a_crash(qdrant_path: Path) -> None:
    # no close(): the snapshot is never written, only the flushed log is on disk
    f = _factory("numpy", qdrant_path)
    s = f.open(SPEC.name, 1, DIM)
    s.add([make_episode(SPEC, i, context=_vec(i / 10)) for i in range(5)])
    s.evict(4)
    f2 = _factory("numpy", qdrant_path)
    s2 = f2.open(SPEC.name, 1, DIM)
    assert sorted(s2.ids()) == sorted(s.ids())
    f2.close()


def test_factory_needs_a_place() -> None:
    with pytest.raises(StoreError, match="SAIR_QDRANT_PATH"):
        StoreFactory("auto", None, None)
    with pytest.raises(StoreError, match="engine='nope'"):
        StoreFactory("nope", None, "/tmp")


def test_redundancy_index_matches_brute_force_under_churn() -> None:
    rng = np.random.default_rng(3)
    idx = RedundancyIndex(3, initial_capacity=2, neighbours=3)
    alive: dict[str, np.ndarray] = {}
    for step in range(40):
        b = int(rng.integers(1, 6))
        v: np.ndarray = rng.random((b, 3)).round(1)  # rounding makes exact duplicates common
        ids = [f"e{step}-{i}" for i in range(b)]
        idx.add_many(ids, v, np.arange(b, dtype=np.float64) + 10.0 * step)
        alive.update(zip(ids, v, strict=True))
        while len(idx) > 15:
            victim = idx.most_redundant()
            assert victim is not None
            idx.remove(victim)
            del alive[victim]
        x = np.array([alive[i] for i in idx.ids])
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        assert np.allclose(d.min(axis=1), idx.nn_distances(), atol=1e-12)
        # the search index agrees with a plain scan too
        q = rng.random(3)
        slots, sq = idx.nearest(q, 4)
        dq = ((x - q) ** 2).sum(-1)
        assert sq == pytest.approx(np.sort(dq)[:4], abs=1e-12)
        assert dq[slots] == pytest.approx(sq, abs=1e-12)


def _evictions_from_scratch(
    batches: list[tuple[list[str], np.ndarray, np.ndarray]], capacity: int
) -> tuple[list[str], list[str]]:
    """The eviction rule recomputed from nothing after every insert: all pairwise distances,
    the smallest nearest-neighbour distance (ties within TIE_SQ), the oldest (ts, then
    insertion order) of the tied."""
    alive: list[tuple[str, np.ndarray, float, int]] = []
    order = 0
    out: list[str] = []
    for ids, vectors, ts in batches:
        for eid, v, t in zip(ids, vectors, ts, strict=True):
            if any(a[0] == eid for a in alive):
                continue
            alive.append((eid, v, float(t), order))
            order += 1
            while len(alive) > capacity:
                x = np.array([a[1] for a in alive])
                d = ((x[:, None] - x[None]) ** 2).sum(-1)
                np.fill_diagonal(d, np.inf)
                nn = d.min(axis=1)
                tied = [i for i in range(len(alive)) if nn[i] <= nn.min() + TIE_SQ]
                pick = min(tied, key=lambda i: (alive[i][2], alive[i][3]))
                out.append(alive.pop(pick)[0])
    return out, sorted(a[0] for a in alive)


@pytest.mark.parametrize("seed", range(24))
def test_incremental_eviction_matches_recomputation_from_scratch(seed: int) -> None:
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(1, 6))
    capacity = int(rng.integers(1, 30))
    # short lists force the rescan path; a coarse grid makes exact duplicates and ties
    neighbours = int(rng.integers(1, 9))
    grid = [0.1, 0.25, 0.5, None][seed % 4]
    batches: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    made = 0
    for _ in range(int(rng.integers(5, 25))):
        b = int(rng.integers(1, 10))
        v = rng.random((b, dim))
        if grid is not None:
            v = np.round(v / grid) * grid
        ids = [f"e{made + i}" for i in range(b)]
        if made and rng.random() < 0.2:
            ids[0] = f"e{int(rng.integers(0, made))}"  # a redelivery (stored, or evicted)
        made += b
        batches.append((ids, v, rng.integers(0, 5, b).astype(np.float64)))
    expected, survivors = _evictions_from_scratch(batches, capacity)
    idx = RedundancyIndex(dim, initial_capacity=2, neighbours=neighbours)
    got: list[str] = []
    for ids, v, ts in batches:
        got += idx.insert(ids, v, ts, capacity=capacity).evicted
        assert len(idx) <= capacity
    assert got == expected
    assert sorted(idx.ids) == survivors


def test_batched_insert_equals_one_at_a_time() -> None:
    rng = np.random.default_rng(11)
    v = np.round(rng.random((300, 4)) * 8) / 8
    ids = [f"e{i}" for i in range(300)]
    ts = rng.integers(0, 50, 300).astype(np.float64)
    one = RedundancyIndex(4)
    one_gone = [g for i in range(300) for g in one.insert(ids[i:i + 1], v[i:i + 1], ts[i:i + 1],
                                                           capacity=60).evicted]
    batched = RedundancyIndex(4)
    batched_gone = [g for i in range(0, 300, 64)
                    for g in batched.insert(ids[i:i + 64], v[i:i + 64], ts[i:i + 64],
                                            capacity=60).evicted]
    assert batched_gone == one_gone
    assert sorted(batched.ids) == sorted(one.ids)
    assert len(batched) == 60


def test_ingest_evicts_after_each_episode_and_survives_reopen(engine: str,
                                                               qdrant_path: Path) -> None:
    if engine == "qdrant-server":
        pytest.skip("covered by the server's own persistence")
    f = _factory(engine, qdrant_path)
    s = f.open(SPEC.name, 1, DIM)
    # three distinct contexts, then a batch of near-copies of the first: the bound holds
    # after the call and the copies go, not the distinct ones
    new, gone = s.ingest([make_episode(SPEC, i, context=_vec(i / 3, 1 - i / 3), ts_s=i)
                          for i in range(3)], capacity=3)
    assert (new, gone) == (3, [])
    copies = [make_episode(SPEC, 10 + j, context=_vec(0.001 * (j + 1), 1.0), ts_s=10 + j)
              for j in range(4)]
    new, gone = s.ingest(copies, capacity=3)
    assert new == 4 and len(gone) == 4 and s.count() == 3
    kept = set(s.ids())
    assert {"ep-1", "ep-2"} <= kept
    f.close()
    f2 = _factory(engine, qdrant_path)
    s2 = f2.open(SPEC.name, 1, DIM)
    assert set(s2.ids()) == kept
    f2.close()


def test_get_after_evict_and_re_add_returns_the_new_episode(store: EpisodeStore) -> None:
    first = make_episode(SPEC, 1, reward=0.5, context=_vec(0.5), ts_s=1.0)
    store.add([first, make_episode(SPEC, 2, context=_vec(0.9), ts_s=2.0),
               make_episode(SPEC, 3, context=_vec(0.9), ts_s=3.0)])
    assert store.get(["ep-1"]) == [first]  # now parsed (and cached, for the numpy engine)
    assert store.evict(1) == ["ep-2", "ep-1"]
    again = make_episode(SPEC, 1, reward=2.5, context=_vec(0.1), ts_s=9.0)
    assert store.add([again]) == 1
    assert store.get(["ep-1"]) == [again]


def test_index_arrays_round_trip_and_old_layout_is_rebuilt() -> None:
    rng = np.random.default_rng(1)
    v = np.round(rng.random((60, 3)) * 4) / 4
    ids = [f"e{i}" for i in range(60)]
    idx = RedundancyIndex(3)
    idx.insert(ids, v, np.arange(60, dtype=np.float64), capacity=40)
    again = RedundancyIndex.from_arrays(3, list(idx.ids), idx.arrays())
    assert np.array_equal(again.nn_distances(), idx.nn_distances())
    # the layout before neighbour lists (vectors, ts, nn_sq, nn_idx): rebuilt from the vectors
    old = {"vectors": idx.vectors[: idx.n], "ts": idx.ts[: idx.n],
           "nn_sq": idx.nn_sq[: idx.n], "nn_idx": np.zeros(idx.n, dtype=np.int64)}
    rebuilt = RedundancyIndex.from_arrays(3, list(idx.ids), old)
    assert np.array_equal(rebuilt.nn_distances(), idx.nn_distances())
    more = np.round(rng.random((20, 3)) * 4) / 4
    new_ids = [f"n{i}" for i in range(20)]
    ts = np.arange(100, 120, dtype=np.float64)
    # later evictions agree too (insertion order of the rebuilt index is the slot order)
    assert (again.insert(new_ids, more, ts, capacity=40).evicted
            == idx.insert(new_ids, more, ts, capacity=40).evicted)

"""Episode stores: one collection per (pipeline, context encoding version), bounded.

Two backends behind the `EpisodeStore` protocol, both passing the same tests:

- `QdrantEpisodeStore`: a Qdrant collection (server at `SAIR_QDRANT_URL`, or qdrant-client's
  local mode at a path). Vector = the encoded context (already normalised to [0, 1]^d by
  `schemas.context.encode_context`), Euclidean distance; payload = the whole Episode JSON plus
  `episode_id`, `ts_s`, `reward` for cheap candidate fetches.
- `NumpyEpisodeStore`: the embedded engine (the default for `SAIR_QDRANT_PATH`): an in-memory
  numpy index, persisted as a snapshot (`snapshot.npz`) plus an append-only log (`log.txt`)
  replayed on open. Chosen because qdrant-client 1.20 local mode commits SQLite once per point
  (~2 ms: ~480 episodes/s) and searches by a Python-side scan (~7 ms at 10k, linear), which
  misses both targets (>= 1,000 episodes/s, p99 <= 10 ms at 100k); see docs/retriever.md.
  Durability: `ingest` writes and flushes a batch's adds to the log before it changes memory,
  then its evictions, so once it returns (and the app acks) the episodes survive a process
  crash or restart; `fsync` happens on snapshots, so a power loss may lose the log tail (as
  JetStream itself, which fsyncs every 2 minutes by default).

Both keep the coverage-keeping eviction of `redundancy.RedundancyIndex`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from schemas.messages import Episode

from .redundancy import FloatArray, RedundancyIndex

COMPACT_MIN_LINES = 2000
COMPACT_FRACTION = 0.25
"""The numpy engine writes a fresh snapshot once the log holds more than
max(COMPACT_MIN_LINES, COMPACT_FRACTION x stored) lines: snapshot cost stays O(1) per
episode, and a replay after a crash is bounded by a quarter of the store."""
_ID_NAMESPACE = uuid.UUID("5a1e0000-0000-4000-8000-000000000001")
_SNAPSHOT_META = ("dim", "ids", "episodes", "rewards")
PARSED_CACHE = 4096
"""Parsed episodes the numpy engine keeps for `get` (least recently returned dropped)."""


class StoreError(RuntimeError):
    """The store cannot be opened or used as configured."""


def collection_name(pipeline: str, encoding_version: int) -> str:
    return f"sair_episodes_{pipeline}_v{encoding_version}"


@dataclass(frozen=True)
class Neighbours:
    """Nearest stored episodes of a query, nearest first."""

    ids: list[str]
    vectors: FloatArray
    rewards: FloatArray
    sq_dist: FloatArray


class CandidateSource(Protocol):
    """What a retrieval reads (`logic.retrieve`)."""

    def count(self) -> int: ...

    def nearest(self, vector: Sequence[float] | FloatArray, k: int) -> Neighbours: ...

    def get(self, ids: Sequence[str]) -> list[Episode]: ...


class EpisodeStore(CandidateSource, Protocol):
    dim: int

    def add(self, episodes: Sequence[Episode]) -> int:
        """Store episodes (ids already stored are skipped); returns how many were new."""
        ...

    def ids(self) -> Iterator[str]: ...

    def evict(self, capacity: int) -> list[str]:
        """Drop the most redundant episodes until at most `capacity` remain; their ids."""
        ...

    def ingest(self, episodes: Sequence[Episode], capacity: int) -> tuple[int, list[str]]:
        """Store episodes one after the other, evicting to `capacity` after each (the
        outcome of add-then-evict per episode), durably before returning: (new, evicted ids)."""
        ...

    def close(self) -> None: ...


def _check_dim(episode: Episode, dim: int) -> None:
    if len(episode.context) != dim:
        raise ValueError(
            f"episode {episode.episode_id}: context has {len(episode.context)} values, "
            f"the collection holds dimension {dim}"
        )


def _query(vector: Sequence[float] | FloatArray, dim: int) -> FloatArray:
    q = np.asarray(vector, dtype=np.float64)
    if q.shape != (dim,):
        raise ValueError(f"query has shape {q.shape}, the collection holds dimension {dim}")
    return q


def _evict(index: RedundancyIndex, capacity: int) -> list[str]:
    if capacity < 1:
        raise ValueError(f"capacity={capacity}: must be >= 1")
    gone: list[str] = []
    while len(index) > capacity:
        victim = index.most_redundant()
        assert victim is not None
        index.remove(victim)
        gone.append(victim)
    return gone


# --------------------------------------------------------------------------- numpy engine


class NumpyEpisodeStore:
    """The embedded engine: numpy arrays in memory, snapshot + append-only log on disk."""

    def __init__(self, directory: Path | str, dim: int) -> None:
        self.dim = dim
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._snapshot = self.dir / "snapshot.npz"
        self._log_path = self.dir / "log.txt"
        self._json: dict[str, str] = {}
        self._reward: dict[str, float] = {}
        self._parsed: OrderedDict[str, Episode] = OrderedDict()
        self.index = RedundancyIndex(dim)
        self._load()
        self._log = open(self._log_path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)

    # ------------------------------------------------------------------ persistence

    def _load(self) -> None:
        if self._snapshot.exists():
            with np.load(self._snapshot, allow_pickle=False) as z:
                dim = int(z["dim"])
                if dim != self.dim:
                    raise StoreError(
                        f"{self._snapshot}: holds dimension {dim}, expected {self.dim}"
                    )
                ids = _unjoin(z["ids"])
                jsons = _unjoin(z["episodes"])
                rewards = z["rewards"]
                arrays = {k: z[k] for k in z.files if k not in _SNAPSHOT_META}
            if not len(ids) == len(jsons) == rewards.shape[0]:
                raise StoreError(f"{self._snapshot}: inconsistent snapshot")
            self.index = RedundancyIndex.from_arrays(self.dim, ids, arrays)
            self._json = dict(zip(ids, jsons, strict=True))
            self._reward = {eid: float(r) for eid, r in zip(ids, rewards, strict=True)}
        self._log_lines = 0
        if self._log_path.exists():
            pending: list[Episode] = []
            with open(self._log_path, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # torn last write: ignore it (never acked upstream)
                    op, _, rest = line.rstrip("\n").partition(" ")
                    self._log_lines += 1
                    if op == "A":
                        pending.append(Episode.model_validate_json(rest))
                    elif op == "D":
                        self._apply_add(pending)
                        pending = []
                        if rest in self.index:
                            self._apply_remove(rest)
            self._apply_add(pending)

    def _apply_add(self, episodes: Sequence[Episode]) -> list[Episode]:
        if not episodes:
            return []
        for e in episodes:
            _check_dim(e, self.dim)
        ids = [e.episode_id for e in episodes]
        vecs = np.array([e.context for e in episodes], dtype=np.float64)
        ts = np.array([e.ts_s for e in episodes])
        kept = self.index.add_many(ids, vecs, ts)
        new = [episodes[i] for i in kept]
        for e in new:
            self._json[e.episode_id] = e.model_dump_json()
            self._reward[e.episode_id] = e.reward
        return new

    def _apply_remove(self, episode_id: str) -> None:
        self.index.remove(episode_id)
        self._forget(episode_id)

    def _forget(self, episode_id: str) -> None:
        del self._json[episode_id]
        del self._reward[episode_id]
        self._parsed.pop(episode_id, None)

    def _write_log(self, lines: list[str]) -> None:
        if not lines:
            return
        self._log.write("".join(lines))
        self._log.flush()
        self._log_lines += len(lines)

    def _maybe_compact(self) -> None:
        """Snapshot once the log is long (only when memory matches log + snapshot)."""
        if self._log_lines >= max(COMPACT_MIN_LINES, COMPACT_FRACTION * len(self.index)):
            self.snapshot()

    def snapshot(self) -> None:
        """Write the whole state atomically, then start an empty log."""
        ids = list(self.index.ids)
        arrays = self.index.arrays()
        tmp = self.dir / "snapshot.tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                dim=np.array(self.dim),
                ids=_join(ids),
                episodes=_join([self._json[i] for i in ids]),
                rewards=np.array([self._reward[i] for i in ids], dtype=np.float64),
                **arrays,  # type: ignore[arg-type]
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._snapshot)
        # a crash between the replace and the truncation replays the old log on top of the
        # new snapshot: harmless, adds of stored ids and removals of absent ids are skipped
        self._log.close()
        self._log = open(self._log_path, "w", encoding="utf-8")  # noqa: SIM115
        self._log_lines = 0

    # ------------------------------------------------------------------ EpisodeStore

    def _fresh(self, episodes: Sequence[Episode]) -> list[tuple[Episode, str]]:
        """The episodes not stored yet (first of each id), with their JSON."""
        fresh: list[tuple[Episode, str]] = []
        seen: set[str] = set()
        for e in episodes:
            _check_dim(e, self.dim)
            if e.episode_id not in self.index and e.episode_id not in seen:
                seen.add(e.episode_id)
                fresh.append((e, e.model_dump_json()))
        return fresh

    def add(self, episodes: Sequence[Episode]) -> int:
        return self.ingest(episodes, None)[0]

    def ingest(self, episodes: Sequence[Episode], capacity: int | None) -> tuple[int, list[str]]:
        fresh = self._fresh(episodes)
        # the adds reach the log (one write, flushed) before memory changes: if the write
        # fails nothing changed, and the caller, which acks only after this returns, naks
        self._write_log([f"A {text}\n" for _, text in fresh])
        res = self.index.insert(
            [e.episode_id for e, _ in fresh],
            np.array([e.context for e, _ in fresh], dtype=np.float64).reshape(-1, self.dim),
            np.array([e.ts_s for e, _ in fresh], dtype=np.float64),
            capacity=capacity,
        )
        for e, text in fresh:
            self._json[e.episode_id] = text
            self._reward[e.episode_id] = e.reward
        for eid in res.evicted:
            self._forget(eid)
        # a replay adds the batch, then removes these: the same set survives
        self._write_log([f"D {eid}\n" for eid in res.evicted])
        self._maybe_compact()
        return len(res.kept), res.evicted

    def count(self) -> int:
        return len(self.index)

    def nearest(self, vector: Sequence[float] | FloatArray, k: int) -> Neighbours:
        slots, sq = self.index.nearest(_query(vector, self.dim), k)
        all_ids = self.index.ids
        ids = [all_ids[s] for s in slots.tolist()]
        return Neighbours(
            ids=ids,
            vectors=self.index.vectors[slots],
            rewards=np.array([self._reward[i] for i in ids], dtype=np.float64),
            sq_dist=sq,
        )

    def get(self, ids: Sequence[str]) -> list[Episode]:
        # parsing is most of a retrieval's cost (~50 us an episode); the policy keeps asking
        # about nearby contexts, so recently returned episodes are kept parsed (frozen models)
        out: list[Episode] = []
        cache = self._parsed
        for i in ids:
            e = cache.get(i)
            if e is None:
                e = Episode.model_validate_json(self._json[i])
                cache[i] = e
                if len(cache) > PARSED_CACHE:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(i)
            out.append(e)
        return out

    def ids(self) -> Iterator[str]:
        return iter(list(self.index.ids))

    def evict(self, capacity: int) -> list[str]:
        gone = _evict(self.index, capacity)
        for eid in gone:
            self._forget(eid)
        self._write_log([f"D {eid}\n" for eid in gone])
        self._maybe_compact()
        return gone

    def close(self) -> None:
        if self._log.closed:
            return
        if self._log_lines:
            self.snapshot()
        self._log.close()


def _join(items: list[str]) -> NDArray[np.uint8]:
    # strings as one UTF-8 blob: npz without pickles (ids and JSON never contain newlines)
    return np.frombuffer("\n".join(items).encode("utf-8"), dtype=np.uint8)


def _unjoin(blob: NDArray[np.generic]) -> list[str]:
    text = blob.tobytes().decode("utf-8")
    return text.split("\n") if text else []


# --------------------------------------------------------------------------- Qdrant


def point_id(episode_id: str) -> str:
    """Qdrant point ids are UUIDs or integers; episode ids are free strings."""
    return str(uuid.uuid5(_ID_NAMESPACE, episode_id))


class QdrantEpisodeStore:
    """One Qdrant collection; a redundancy index mirrored in memory decides evictions."""

    def __init__(self, client: Any, collection: str, dim: int) -> None:
        from qdrant_client import models

        self._m = models
        self.client = client
        self.collection = collection
        self.dim = dim
        if not client.collection_exists(collection):
            client.create_collection(
                collection,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.EUCLID),
            )
        else:
            info = client.get_collection(collection)
            size = getattr(info.config.params.vectors, "size", None)
            if size != dim:
                raise StoreError(
                    f"collection {collection!r} holds dimension {size}, expected {dim}"
                )
        self.index = RedundancyIndex(dim)
        self._rebuild()

    def _rebuild(self) -> None:
        offset: Any = None
        while True:
            points, offset = self.client.scroll(
                self.collection,
                limit=1000,
                offset=offset,
                with_payload=["episode_id", "ts_s"],
                with_vectors=True,
            )
            if points:
                self.index.add_many(
                    [p.payload["episode_id"] for p in points],
                    np.array([p.vector for p in points], dtype=np.float64),
                    np.array([p.payload["ts_s"] for p in points], dtype=np.float64),
                )
            if offset is None:
                break

    def _fresh(self, episodes: Sequence[Episode]) -> list[Episode]:
        for e in episodes:
            _check_dim(e, self.dim)
        fresh: list[Episode] = []
        seen: set[str] = set()
        for e in episodes:
            if e.episode_id not in self.index and e.episode_id not in seen:
                fresh.append(e)
                seen.add(e.episode_id)
        return fresh

    def ingest(self, episodes: Sequence[Episode], capacity: int) -> tuple[int, list[str]]:
        fresh = self._fresh(episodes)
        # upsert first: if it fails, nothing changed and the episodes are redelivered
        self._upsert(fresh)
        res = self.index.insert(
            [e.episode_id for e in fresh],
            np.array([e.context for e in fresh], dtype=np.float64).reshape(-1, self.dim),
            np.array([e.ts_s for e in fresh], dtype=np.float64),
            capacity=capacity,
        )
        self._delete(res.evicted)
        return len(res.kept), res.evicted

    def add(self, episodes: Sequence[Episode]) -> int:
        fresh = self._fresh(episodes)
        if not fresh:
            return 0
        self._upsert(fresh)
        self.index.add_many(
            [e.episode_id for e in fresh],
            np.array([e.context for e in fresh], dtype=np.float64),
            np.array([e.ts_s for e in fresh]),
        )
        return len(fresh)

    def _upsert(self, fresh: Sequence[Episode]) -> None:
        if not fresh:
            return
        m = self._m
        self.client.upsert(
            self.collection,
            points=[
                m.PointStruct(
                    id=point_id(e.episode_id),
                    vector=list(e.context),
                    payload={
                        "episode_id": e.episode_id,
                        "ts_s": e.ts_s,
                        "reward": e.reward,
                        "episode": e.model_dump(mode="json"),
                    },
                )
                for e in fresh
            ],
            wait=True,
        )

    def _delete(self, gone: Sequence[str]) -> None:
        # after the index dropped them: if this fails, the points stay in the collection
        # until the next start, whose rebuild evicts them again
        if gone:
            self.client.delete(
                self.collection,
                points_selector=self._m.PointIdsList(points=[point_id(i) for i in gone]),
                wait=True,
            )

    def count(self) -> int:
        return len(self.index)

    def nearest(self, vector: Sequence[float] | FloatArray, k: int) -> Neighbours:
        q = _query(vector, self.dim)
        if k <= 0 or len(self.index) == 0:
            return Neighbours([], np.zeros((0, self.dim)), np.zeros(0), np.zeros(0))
        res = self.client.query_points(
            self.collection,
            query=q.tolist(),
            limit=k,
            with_payload=["episode_id", "reward"],
            with_vectors=True,
        )
        pts = res.points
        vectors = np.array([p.vector for p in pts], dtype=np.float64).reshape(len(pts), self.dim)
        return Neighbours(
            ids=[p.payload["episode_id"] for p in pts],
            vectors=vectors,
            rewards=np.array([p.payload["reward"] for p in pts], dtype=np.float64),
            sq_dist=((vectors - q) ** 2).sum(axis=1),
        )

    def get(self, ids: Sequence[str]) -> list[Episode]:
        if not ids:
            return []
        pts = self.client.retrieve(
            self.collection, ids=[point_id(i) for i in ids], with_payload=["episode"]
        )
        by_id = {str(p.id): Episode.model_validate(p.payload["episode"]) for p in pts}
        return [by_id[point_id(i)] for i in ids]

    def ids(self) -> Iterator[str]:
        return iter(list(self.index.ids))

    def evict(self, capacity: int) -> list[str]:
        gone = _evict(self.index, capacity)
        self._delete(gone)
        return gone

    def close(self) -> None:
        """The client is shared between a process's collections; its owner closes it."""


# --------------------------------------------------------------------------- opening

ENGINES = ("auto", "numpy", "qdrant-local", "qdrant-server")


class StoreFactory:
    """Opens every pipeline's store from one configuration; owns the shared Qdrant client."""

    def __init__(self, engine: str, qdrant_url: str | None, qdrant_path: str | None) -> None:
        if engine not in ENGINES:
            raise StoreError(f"engine={engine!r}: must be one of {', '.join(ENGINES)}")
        if engine == "auto":
            engine = "qdrant-server" if qdrant_url else "numpy"
        if engine == "qdrant-server" and not qdrant_url:
            raise StoreError("engine=qdrant-server needs SAIR_QDRANT_URL")
        if engine in ("numpy", "qdrant-local") and not qdrant_path:
            raise StoreError(f"engine={engine} needs SAIR_QDRANT_PATH (a data directory)")
        self.engine = engine
        self._client: Any = None
        if engine == "qdrant-server":
            from qdrant_client import QdrantClient

            self._client = QdrantClient(url=qdrant_url)
        elif engine == "qdrant-local":
            from qdrant_client import QdrantClient

            self._client = QdrantClient(path=qdrant_path)
        self._path = Path(qdrant_path) if qdrant_path else None
        self._stores: list[EpisodeStore] = []

    def open(self, pipeline: str, encoding_version: int, dim: int) -> EpisodeStore:
        name = collection_name(pipeline, encoding_version)
        store: EpisodeStore
        if self.engine == "numpy":
            assert self._path is not None
            store = NumpyEpisodeStore(self._path / "sair-episodes" / name, dim)
        else:
            store = QdrantEpisodeStore(self._client, name, dim)
        self._stores.append(store)
        return store

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self._stores.clear()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

"""Training snapshots as arrays: the trainer fits on them and the gate evaluates on them.

This module must stay torch-free: the daemon's gate imports it, and the daemon never loads torch.

A snapshot is a Parquet file of joined decisions (one row per decision with its final reward):
``id, agent, received_at, context (JSON object), actions (JSON list of ids or {"id", "features"}),
chosen, prob, reward, model_version, outcomes, slot, slate`` (the last two null unless the
decision is a slot of a slate). Every row is hashed with ``reflexd.features``,
the same code the client uses when deciding, so train-time and decide-time features agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import msgspec
import numpy as np
import pyarrow as pa

from reflexd.errors import SnapshotError
from reflexd.features import FeatureSpec, Hasher, action_ids, with_agent
from reflexd.split import holdout_rows

COLUMNS = ("id", "agent", "received_at", "context", "actions", "chosen", "prob", "reward")
# read when the snapshot has them: a decision's episode (snapshots before episodes had none)
OPTIONAL_COLUMNS = ("episode",)

_json = msgspec.json.Decoder()
# Distinct action lists remembered across a snapshot's chunks; the cap bounds memory when every
# row has its own list.
_ACTIONS_CACHE_LIMIT = 10_000
_CHUNK_ROWS = 8192



@dataclass(frozen=True)
class Batch:
    """Hashed decisions, one row each; actions are padded to the widest decision (``mask`` marks real ones).

    Each distinct action list is held once (``action_sets``) and each row points at its own
    (``action_set``): a log offers the same few lists again and again, and padded per row they
    would outweigh everything else in the batch. ``actions`` gives them per row when wanted.

    ``dropped`` counts the rows left out when the batch was loaded: the chosen action is not among
    the actions, or a field is missing (null), or reward, prob or received_at is not finite, or
    prob is not positive (off-policy evaluation divides by it). It describes the load, so subsets
    made with ``take`` carry it unchanged.
    """

    ids: list[str]
    agents: list[str]
    context: np.ndarray  # float32 [N, context_dim]
    action_sets: np.ndarray  # float32 [S, A_max, action_dim], zero-padded
    action_set: np.ndarray  # int64 [N], the row's index into action_sets
    mask: np.ndarray  # bool [N, A_max]
    action_ids: list[list[str]]
    chosen: np.ndarray  # int64 [N], index into the row's actions
    prob: np.ndarray  # float64 [N]
    reward: np.ndarray  # float64 [N]
    received_at: np.ndarray  # float64 [N]
    dropped: int = 0
    # each row's episode (None: none), or None when no row names one
    episodes: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def actions(self) -> np.ndarray:
        """float32 [N, A_max, action_dim], zero where mask is False; a new array at each call."""
        return self.action_sets[self.action_set]

    @property
    def chosen_actions(self) -> np.ndarray:
        """float32 [N, action_dim]: each row's chosen action, the only one whose reward is known."""
        return self.action_sets[self.action_set, self.chosen]

    def take(self, index: np.ndarray | list[int] | range | slice) -> Batch:
        """The rows at ``index``; a slice gives views instead of copies."""
        episodes = self.episodes
        if isinstance(index, slice):
            ids, agents, action_ids = self.ids[index], self.agents[index], self.action_ids[index]
            episodes = episodes[index] if episodes is not None else None
        else:
            index = np.asarray(index, dtype=np.int64)
            ids = [self.ids[i] for i in index]
            agents = [self.agents[i] for i in index]
            action_ids = [self.action_ids[i] for i in index]
            episodes = [episodes[i] for i in index] if episodes is not None else None
        return replace(
            self,
            ids=ids,
            agents=agents,
            context=self.context[index],
            action_set=self.action_set[index],
            mask=self.mask[index],
            action_ids=action_ids,
            chosen=self.chosen[index],
            prob=self.prob[index],
            reward=self.reward[index],
            received_at=self.received_at[index],
            episodes=episodes,
        )


def load_snapshot(path: str, spec: FeatureSpec) -> Batch:
    """Read and hash a snapshot Parquet file; unusable rows are dropped and counted."""
    return _load(str(path), spec, None)


def load_holdout(path: str, spec: FeatureSpec, fraction: float) -> Batch:
    """``split_holdout(load_snapshot(path, spec), fraction)[1]``, hashing only the held-out rows.

    Hashing contexts is most of a load, and the gate needs only the held-out part: this costs
    about ``fraction`` of a full load. A context is decoded only if its row is kept, so a
    malformed one in a training row goes unremarked here (the trainer's load reports it).
    """
    return _load(str(path), spec, fraction)


def from_records(records: Iterable[Mapping[str, Any]], spec: FeatureSpec) -> Batch:
    """A Batch from already-decoded rows with the snapshot's keys (context and actions as objects)."""
    records = list(records)
    hasher = Hasher(spec)
    ids = [r["id"] for r in records]
    received_at = np.array([r["received_at"] for r in records], dtype=np.float64)
    prob = np.array([r["prob"] for r in records], dtype=np.float64)
    reward = np.array([r["reward"] for r in records], dtype=np.float64)
    present = np.array([r["context"] is not None and r["chosen"] is not None for r in records], dtype=bool)
    rows, actions, chosen = _select(
        _usable(present, received_at, prob, reward),
        (_hash_actions(hasher, r["actions"], "<records>", r["id"]) for r in records),
        [r["chosen"] for r in records],
    )
    return _build(
        ids=ids,
        agents=[r["agent"] for r in records],
        received_at=received_at,
        prob=prob,
        reward=reward,
        rows=rows,
        actions=actions,
        chosen=chosen,
        contexts=(records[i]["context"] for i in rows),
        hasher=hasher,
        where="<records>",
        dropped=len(records) - len(rows),
        episodes=[r.get("episode") for r in records],
    )


def split_holdout(batch: Batch, fraction: float) -> tuple[Batch, Batch]:
    """(train, holdout): the newest ``fraction`` of rows by received_at is held out (rows that
    share a received_at keep the snapshot's order, the order they were made in).

    Holding out the newest rows rather than a random sample makes the gate judge a model on the
    data it will face next. With two rows or more, at least one is held out and one is trained on.
    """
    train, holdout = _split(batch.received_at, fraction)
    return batch.take(train), batch.take(holdout)


def _split(received_at: np.ndarray, fraction: float) -> tuple[slice | np.ndarray, slice | np.ndarray]:
    n = len(received_at)
    cut = n - holdout_rows(n, fraction)
    if np.all(received_at[1:] >= received_at[:-1]):
        # snapshots are normally written in time order; slices then share the arrays, not copy them
        return slice(0, cut), slice(cut, n)
    order = np.argsort(received_at, kind="stable")
    return order[:cut], order[cut:]


def _load(path: str, spec: FeatureSpec, holdout: float | None) -> Batch:
    # imported here: the daemon holds this module from start-up but reads Parquet only to gate a
    # candidate, and pyarrow.parquet (with the filesystems it loads) would stay resident (~4 MiB)
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        missing = [name for name in COLUMNS if name not in names]
        if missing:
            raise SnapshotError(path, f"missing column(s) {', '.join(missing)}")
        # action lists repeat from row to row: read as a dictionary, each distinct list is held,
        # decoded and hashed once, and each row is an index into them
        extra = [name for name in OPTIONAL_COLUMNS if name in names]
        table = pq.read_table(path, columns=[*COLUMNS, *extra], read_dictionary=["actions"])
    except FileNotFoundError:
        raise SnapshotError(path, "no such file") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise SnapshotError(path, f"cannot read ({exc})") from None
    batch = _from_table(table, spec, holdout, path)
    del table
    # the long-lived daemon loads snapshots too (the gate), and Arrow's allocator would otherwise
    # keep the file's buffers as its own reserve (~80 MB after a 200k-row snapshot)
    pa.default_memory_pool().release_unused()
    return batch


def from_table(table: pa.Table, spec: FeatureSpec, where: str = "<table>") -> Batch:
    """A Batch from rows with a snapshot's columns already in memory (``COLUMNS``; context and
    actions as JSON text), as ``load_snapshot`` makes one from its file: ``reflexd fleet train``
    hashes each worker's shard of the hosts' joined experience this way. ``where`` names the rows
    in errors."""
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise SnapshotError(where, f"missing column(s) {', '.join(missing)}")
    extra = [name for name in OPTIONAL_COLUMNS if name in table.column_names]
    return _from_table(table.select([*COLUMNS, *extra]), spec, None, where)


def _from_table(table: pa.Table, spec: FeatureSpec, holdout: float | None, path: str) -> Batch:
    hasher = Hasher(spec)
    ids = table.column("id").to_pylist()
    received_at = _floats(table.column("received_at"))
    prob = _floats(table.column("prob"))
    reward = _floats(table.column("reward"))
    present = _valid(table.column("context")) & _valid(table.column("chosen"))
    rows, actions, chosen = _select(
        _usable(present, received_at, prob, reward),
        _hashed_actions(table.column("actions"), ids, hasher, path),
        table.column("chosen").to_pylist(),
    )
    dropped = len(ids) - len(rows)
    if holdout is not None:
        _, held = _split(received_at[rows], holdout)
        rows = rows[held]
        actions = actions[held] if isinstance(held, slice) else [actions[i] for i in held]
        chosen = chosen[held]
    return _build(
        ids=ids,
        agents=table.column("agent").to_pylist(),
        received_at=received_at,
        prob=prob,
        reward=reward,
        rows=rows,
        actions=actions,
        chosen=chosen,
        contexts=_decoded_contexts(table.column("context"), rows, ids, path),
        hasher=hasher,
        where=path,
        dropped=dropped,
        episodes=table.column("episode").to_pylist() if "episode" in table.column_names else None,
    )


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    # nulls come out as NaN, which the row filter treats as unusable
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _valid(column: pa.ChunkedArray) -> np.ndarray:
    return column.is_valid().to_numpy(zero_copy_only=False)


def _usable(present: np.ndarray, received_at: np.ndarray, prob: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """Rows with every field, finite numbers and a positive prob (off-policy evaluation divides by it)."""
    with np.errstate(invalid="ignore"):
        return present & np.isfinite(received_at) & np.isfinite(reward) & np.isfinite(prob) & (prob > 0.0)


def _hashed_actions(column: pa.ChunkedArray, ids: list[Any], hasher: Hasher, path: str) -> Iterator[_HashedActions | None]:
    """Each row's actions hashed (None where null), from the dictionary-encoded column."""
    cache: dict[str, _HashedActions] = {}  # across chunks, whose dictionaries may repeat values
    offset = 0
    for chunk in column.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        indices = chunk.indices.fill_null(-1).to_numpy()
        hashed = []
        for k, raw in enumerate(chunk.dictionary.to_pylist()):
            found = cache.get(raw)
            if found is None:
                row_id = ids[offset + int(np.argmax(indices == k))]  # the first row to use it, for errors
                found = _hash_actions(hasher, _decode(path, row_id, "actions", raw), path, row_id)
                if len(cache) < _ACTIONS_CACHE_LIMIT:
                    cache[raw] = found
            hashed.append(found)
        for k in indices.tolist():
            yield hashed[k] if k >= 0 else None
        offset += len(chunk)


def _decoded_contexts(column: pa.ChunkedArray, rows: np.ndarray, ids: list[Any], path: str) -> Iterator[Any]:
    """The contexts of ``rows``, decoded a chunk at a time as they are hashed."""
    for start in range(0, len(rows), _CHUNK_ROWS):
        part = rows[start : start + _CHUNK_ROWS]
        for i, raw in zip(part, column.take(part).to_pylist()):
            yield _decode(path, ids[i], "context", raw)


def _decode(path: str, row_id: Any, column: str, raw: str) -> Any:
    try:
        return _json.decode(raw)
    except msgspec.DecodeError as exc:
        raise SnapshotError(path, f"row {row_id!r}: {column} is not valid JSON ({exc})") from None


class _HashedActions(NamedTuple):
    ids: list[str]
    vectors: np.ndarray  # float32 [n_actions, action_dim]


def _hash_actions(hasher: Hasher, actions: Any, where: str, row_id: Any) -> _HashedActions:
    if not isinstance(actions, list) or not all(
        isinstance(a, str) or (isinstance(a, dict) and "id" in a) for a in actions
    ):
        raise SnapshotError(where, f"row {row_id!r}: actions must be a list of ids or objects with an id")
    return _HashedActions(action_ids(actions), hasher.actions(actions))


def _select(
    usable: np.ndarray, actions: Iterable[_HashedActions | None], chosen: list[Any]
) -> tuple[np.ndarray, list[_HashedActions], np.ndarray]:
    """(rows kept, their hashed actions, the chosen action's index in each): the usable rows
    whose chosen action is among their actions. Every row's actions are hashed, so a malformed
    list is reported wherever it is."""
    rows: list[int] = []
    kept: list[_HashedActions] = []
    index: list[int] = []
    for i, acts in enumerate(actions):
        if acts is None or not usable[i]:
            continue
        try:
            index.append(acts.ids.index(chosen[i]))
        except ValueError:
            continue
        rows.append(i)
        kept.append(acts)
    return np.asarray(rows, dtype=np.int64), kept, np.asarray(index, dtype=np.int64)


def _build(
    *,
    ids: list[Any],
    agents: list[Any],
    received_at: np.ndarray,
    prob: np.ndarray,
    reward: np.ndarray,
    rows: np.ndarray,
    actions: list[_HashedActions],
    chosen: np.ndarray,
    contexts: Iterable[Any],
    hasher: Hasher,
    where: str,
    dropped: int,
    episodes: list[Any] | None = None,
) -> Batch:
    """The Batch of ``rows`` (indices into the per-row inputs); ``contexts`` yields theirs in order."""
    m = len(rows)
    spec = hasher.spec
    # contexts are hashed as they stream past rather than kept as dicts, which would weigh far
    # more than the float32 rows they become
    context_arr = np.zeros((m, spec.context_dim), dtype=np.float32)
    for k, context in enumerate(contexts):
        if not isinstance(context, dict):
            raise SnapshotError(where, f"row {ids[rows[k]]!r}: context must be a JSON object")
        if spec.agent:  # a shared line's model reads the agent as it decides (features.with_agent)
            context = with_agent(spec, str(agents[rows[k]]), context)
        hasher.context(context, out=context_arr[k])

    # one entry per distinct list (the same cached object), in order of first use
    first_use: dict[int, int] = {}
    distinct: list[_HashedActions] = []
    action_set = np.empty(m, dtype=np.int64)
    for k, acts in enumerate(actions):
        index = first_use.setdefault(id(acts), len(distinct))
        if index == len(distinct):
            distinct.append(acts)
        action_set[k] = index
    a_max = max((len(a.ids) for a in distinct), default=0)
    action_sets = np.zeros((len(distinct), a_max, spec.action_dim), dtype=np.float32)
    set_mask = np.zeros((len(distinct), a_max), dtype=bool)
    for index, acts in enumerate(distinct):
        action_sets[index, : len(acts.ids)] = acts.vectors
        set_mask[index, : len(acts.ids)] = True

    return Batch(
        ids=[str(ids[i]) for i in rows],
        agents=[str(agents[i]) for i in rows],
        context=context_arr,
        action_sets=action_sets,
        action_set=action_set,
        mask=set_mask[action_set],
        action_ids=[a.ids for a in actions],
        chosen=chosen,
        prob=prob[rows],
        reward=reward[rows],
        received_at=received_at[rows],
        dropped=dropped,
        episodes=[episodes[i] for i in rows] if episodes is not None and any(e is not None for e in episodes) else None,
    )

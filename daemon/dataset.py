"""Training snapshots as arrays: the trainer fits on them and the gate evaluates on them.

This module must stay torch-free: the daemon's gate imports it, and the daemon never loads torch.

A snapshot is a Parquet file of joined decisions (one row per decision with its final reward):
``id, agent, received_at, context (JSON object), actions (JSON list of ids or {"id", "features"}),
chosen, prob, reward, model_version, outcomes``. Every row is hashed with ``reflexd.features``,
the same code the client uses when deciding, so train-time and decide-time features agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import TrainingError
from .features import FeatureSpec, Hasher, action_ids

COLUMNS = ("id", "agent", "received_at", "context", "actions", "chosen", "prob", "reward")

_json = msgspec.json.Decoder()
# A snapshot repeats the same few action lists many times; decoding and hashing each distinct
# one once saves most of the loading time. The cap bounds memory when every row has its own list.
_ACTIONS_CACHE_LIMIT = 10_000
_CHUNK_ROWS = 8192


class SnapshotError(TrainingError):
    """A snapshot file cannot be read as training data."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"snapshot {path}: {reason}")


@dataclass(frozen=True)
class Batch:
    """Hashed decisions, one row each; actions are padded to the widest decision (``mask`` marks real ones).

    ``dropped`` counts the rows left out when the batch was loaded: the chosen action is not among
    the actions, or a field is missing (null), or reward, prob or received_at is not finite, or
    prob is not positive (off-policy evaluation divides by it). It describes the load, so subsets
    made with ``take`` carry it unchanged.
    """

    ids: list[str]
    agents: list[str]
    context: np.ndarray  # float32 [N, context_dim]
    actions: np.ndarray  # float32 [N, A_max, action_dim], zero where mask is False
    mask: np.ndarray  # bool [N, A_max]
    action_ids: list[list[str]]
    chosen: np.ndarray  # int64 [N], index into the row's actions
    prob: np.ndarray  # float64 [N]
    reward: np.ndarray  # float64 [N]
    received_at: np.ndarray  # float64 [N]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray | list[int] | range | slice) -> Batch:
        """The rows at ``index``; a slice gives views instead of copies."""
        if isinstance(index, slice):
            ids, agents, action_ids = self.ids[index], self.agents[index], self.action_ids[index]
        else:
            index = np.asarray(index, dtype=np.int64)
            ids = [self.ids[i] for i in index]
            agents = [self.agents[i] for i in index]
            action_ids = [self.action_ids[i] for i in index]
        return replace(
            self,
            ids=ids,
            agents=agents,
            context=self.context[index],
            actions=self.actions[index],
            mask=self.mask[index],
            action_ids=action_ids,
            chosen=self.chosen[index],
            prob=self.prob[index],
            reward=self.reward[index],
            received_at=self.received_at[index],
        )


def load_snapshot(path: str, spec: FeatureSpec) -> Batch:
    """Read and hash a snapshot Parquet file; unusable rows are dropped and counted."""
    path = str(path)
    try:
        file = pq.ParquetFile(path)
        missing = [name for name in COLUMNS if name not in file.schema_arrow.names]
        if missing:
            raise SnapshotError(path, f"missing column(s) {', '.join(missing)}")
        table = file.read(columns=list(COLUMNS))
    except FileNotFoundError:
        raise SnapshotError(path, "no such file") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise SnapshotError(path, f"cannot read ({exc})") from None
    hasher = Hasher(spec)
    cache: dict[str, _HashedActions] = {}

    def decoded() -> Iterator[tuple[Any, _HashedActions | None]]:
        # a chunk of JSON strings at a time: the whole columns as Python objects would cost
        # several times the arrays they become
        for chunk in table.select(["id", "context", "actions"]).to_batches(max_chunksize=_CHUNK_ROWS):
            ids, contexts, actions = (chunk.column(i).to_pylist() for i in range(3))
            for row_id, context, acts in zip(ids, contexts, actions):
                if context is not None:
                    context = _decode(path, row_id, "context", context)
                if acts is not None:
                    found = cache.get(acts)
                    if found is None:
                        found = _hash_actions(hasher, _decode(path, row_id, "actions", acts), path, row_id)
                        if len(cache) < _ACTIONS_CACHE_LIMIT:
                            cache[acts] = found
                    acts = found
                yield context, acts

    batch = _build(
        ids=table.column("id").to_pylist(),
        agents=table.column("agent").to_pylist(),
        received_at=_floats(table.column("received_at")),
        rows=decoded(),
        chosen=table.column("chosen").to_pylist(),
        prob=_floats(table.column("prob")),
        reward=_floats(table.column("reward")),
        hasher=hasher,
        where=path,
    )
    del table
    # the long-lived daemon loads snapshots too (the gate), and Arrow's allocator would otherwise
    # keep the file's buffers as its own reserve (~80 MB after a 200k-row snapshot)
    pa.default_memory_pool().release_unused()
    return batch


def from_records(records: Iterable[Mapping[str, Any]], spec: FeatureSpec) -> Batch:
    """A Batch from already-decoded rows with the snapshot's keys (context and actions as objects)."""
    records = list(records)
    hasher = Hasher(spec)
    return _build(
        ids=[r["id"] for r in records],
        agents=[r["agent"] for r in records],
        received_at=np.array([r["received_at"] for r in records], dtype=np.float64),
        rows=((r["context"], _hash_actions(hasher, r["actions"], "<records>", r["id"])) for r in records),
        chosen=[r["chosen"] for r in records],
        prob=np.array([r["prob"] for r in records], dtype=np.float64),
        reward=np.array([r["reward"] for r in records], dtype=np.float64),
        hasher=hasher,
        where="<records>",
    )


def split_holdout(batch: Batch, fraction: float) -> tuple[Batch, Batch]:
    """(train, holdout): the newest ``fraction`` of rows by received_at is held out.

    Holding out the newest rows rather than a random sample makes the gate judge a model on the
    data it will face next. With two rows or more, at least one is held out and one is trained on.
    """
    n = len(batch)
    n_hold = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
    cut = n - n_hold
    if np.all(batch.received_at[1:] >= batch.received_at[:-1]):
        # snapshots are normally written in time order; slices then share the arrays, not copy them
        return batch.take(slice(0, cut)), batch.take(slice(cut, n))
    order = np.argsort(batch.received_at, kind="stable")
    return batch.take(order[:cut]), batch.take(order[cut:])


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    # nulls come out as NaN, which the row filter treats as unusable
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


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


def _build(
    *,
    ids: list[Any],
    agents: list[Any],
    received_at: np.ndarray,
    rows: Iterable[tuple[Any, _HashedActions | None]],
    chosen: list[Any],
    prob: np.ndarray,
    reward: np.ndarray,
    hasher: Hasher,
    where: str,
) -> Batch:
    n = len(ids)
    spec = hasher.spec
    # contexts are hashed as they stream past rather than kept as dicts, which would weigh far
    # more than the float32 rows they become
    context_arr = np.zeros((n, spec.context_dim), dtype=np.float32)
    keep: list[int] = []
    kept_actions: list[_HashedActions] = []
    kept_chosen: list[int] = []
    for i, (context, acts) in enumerate(rows):
        if context is None or acts is None or chosen[i] is None:
            continue
        if not isinstance(context, dict):
            raise SnapshotError(where, f"row {ids[i]!r}: context must be a JSON object")
        finite = math.isfinite(reward[i]) and math.isfinite(received_at[i]) and math.isfinite(prob[i])
        if not (finite and prob[i] > 0.0):
            continue
        try:
            index = acts.ids.index(chosen[i])
        except ValueError:
            continue
        hasher.context(context, out=context_arr[len(keep)])
        keep.append(i)
        kept_actions.append(acts)
        kept_chosen.append(index)

    m = len(keep)
    if m < n:
        context_arr = context_arr[:m].copy()
    a_max = max((len(a.ids) for a in kept_actions), default=0)
    actions_arr = np.zeros((m, a_max, spec.action_dim), dtype=np.float32)
    mask = np.zeros((m, a_max), dtype=bool)
    for row, acts in enumerate(kept_actions):
        width = len(acts.ids)
        actions_arr[row, :width] = acts.vectors
        mask[row, :width] = True

    rows_kept = np.asarray(keep, dtype=np.int64)
    return Batch(
        ids=[str(ids[i]) for i in keep],
        agents=[str(agents[i]) for i in keep],
        context=context_arr,
        actions=actions_arr,
        mask=mask,
        action_ids=[a.ids for a in kept_actions],
        chosen=np.asarray(kept_chosen, dtype=np.int64),
        prob=prob[rows_kept],
        reward=reward[rows_kept],
        received_at=received_at[rows_kept],
        dropped=n - m,
    )

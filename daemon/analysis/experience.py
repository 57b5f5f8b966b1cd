"""Snapshot rows as arrays for the finders, with each context flattened into readable features.

The trainer hashes contexts (``reflexd.features``); the finders must not, because a rule has to
name what a person reads in a log: ``task = code``, ``difficulty > 0.6``. So each context is
flattened here into raw features, one per dotted key path:

- numbers: a numeric feature (NaN where a context lacks it), held as float32: segments need
  three significant digits, and a million decisions' features take half the memory;
- strings and booleans (``"true"``/``"false"``): a categorical feature, coded as integers;
- lists and nulls are left out (a rule cannot name one element of a list).

A categorical feature whose ``MAX_CATEGORIES`` most frequent values cover less than half of the
decisions that have it is an identifier or free text, not a segment anyone could act on: it is
left out. Beyond that many values, the rarer ones share one code (``Feature.other``).

Contexts are parsed a batch at a time by Arrow's JSON reader (C++, about 1 s per million
contexts here); a batch it refuses (a key that is a number in one context and a string in
another) is flattened in Python instead, with such a key read as categorical. The context text
is dropped once parsed, so a million decisions never sit in memory as JSON.

A row is left out (and counted in ``dropped``) when a field is missing, its reward, propensity or
time is not finite, its propensity is not positive, its chosen action is not among its actions,
its context is not a JSON object, or it is a slate's slot after the first (those choose among
what earlier slots left, so their rewards are not comparable with a decision's).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from reflexd.errors import AnalysisError
from reflexd.features import action_ids, with_agent

if TYPE_CHECKING:
    from reflexd.deciding.scoring import Scorer

REQUIRED = ("agent", "received_at", "context", "actions", "chosen", "prob", "reward")
OPTIONAL = ("model_version", "slot", "ts")
BATCH_ROWS = 16_384  # per batch; larger ones cost peak memory in the Parquet reader and gain little
MAX_CATEGORIES = 64  # values kept apart per categorical feature; the rest share Feature.other
_SET_CACHE_LIMIT = 100_000
_json = msgspec.json.Decoder()


@dataclass(frozen=True)
class Feature:
    """One flattened context key. Numeric: float32 values, NaN where absent. Categorical: int16
    codes into ``categories``, -1 where absent, ``other`` (== len(categories)) for rarer values."""

    name: str
    values: np.ndarray
    categories: tuple[str, ...] | None = None
    complete: bool = True  # categorical: no value falls beyond ``categories``

    @property
    def numeric(self) -> bool:
        return self.categories is None

    @property
    def other(self) -> int:
        return len(self.categories or ())

    def present(self) -> np.ndarray:
        return ~np.isnan(self.values) if self.numeric else self.values >= 0

    def take(self, rows: np.ndarray | slice) -> Feature:
        return replace(self, values=self.values[rows])


@dataclass(frozen=True)
class Experience:
    """Decisions grouped by agent, each agent's in time order; indices into ``agents``,
    ``actions`` and ``versions`` per row.

    ``offered[action_set[i]]`` marks the actions row i could have taken. ``live_scores`` holds the
    live model's score of every offered action, [N, A] over ``actions`` (NaN elsewhere), when the
    load was given a Scorer.
    """

    agents: list[str]
    agent: np.ndarray  # int32 [N]
    actions: list[str]
    chosen: np.ndarray  # int32 [N]
    offered: np.ndarray  # bool [S, A]
    action_set: np.ndarray  # int32 [N]
    versions: list[str]
    version: np.ndarray  # int32 [N], -1 without a model
    received_at: np.ndarray  # float64 [N]
    prob: np.ndarray  # float64 [N]
    reward: np.ndarray  # float64 [N]
    features: dict[str, Feature] = field(default_factory=dict)
    live_scores: np.ndarray | None = None  # float32 [N, A]
    dropped: int = 0
    notes: tuple[str, ...] = ()
    # the 1st and 99th percentiles of the decisions' own timestamps (``ts``, the agent's clock; of
    # a sample), None if the snapshot has none: an imported log's span, where ``received_at`` spans
    # the import alone. Percentiles, so that one decision with a stray clock does not make the span
    made: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.received_at)

    def take(self, rows: np.ndarray | slice) -> Experience:
        return replace(
            self,
            agent=self.agent[rows],
            chosen=self.chosen[rows],
            action_set=self.action_set[rows],
            version=self.version[rows],
            received_at=self.received_at[rows],
            prob=self.prob[rows],
            reward=self.reward[rows],
            features={name: f.take(rows) for name, f in self.features.items()},
            live_scores=None if self.live_scores is None else self.live_scores[rows],
        )

    def available(self, action: int) -> np.ndarray:
        return self.offered[self.action_set, action]

    def rows_of(self, agent: int) -> slice:
        """The agent's rows: a slice, so taking them copies nothing."""
        lo, hi = np.searchsorted(self.agent, [agent, agent + 1])
        return slice(int(lo), int(hi))


def from_table(table: pa.Table, scorer: Scorer | None = None) -> Experience:
    """An Experience from a snapshot's rows already in memory (``rewards.snapshot``'s columns)."""
    _check_columns(table.schema.names, "<table>")
    return _load(table.to_batches(max_chunksize=BATCH_ROWS), table.num_rows, scorer, "<table>")


def from_parquet(path: str, scorer: Scorer | None = None) -> Experience:
    """An Experience from a snapshot file, read a batch at a time (the context text never whole)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _check_columns(names, path)
        # the repetitive text columns come as dictionaries: each distinct value is held once;
        # streamed through a small buffer rather than a column chunk pre-read whole: each chunk of
        # context text (a row group's) would otherwise sit in memory at once
        pf = pq.ParquetFile(
            path,
            read_dictionary=[c for c in ("agent", "actions", "chosen", "model_version") if c in names],
            pre_buffer=False,
            buffer_size=1 << 20,
        )
        columns = [c for c in (*REQUIRED, *OPTIONAL) if c in names]
        batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return _load(batches, pf.metadata.num_rows, scorer, path)
    except MemoryError:
        raise  # Arrow's allocation failures are MemoryErrors too: the run's cap, not the file
    except FileNotFoundError:
        raise AnalysisError(f"snapshot {path}: no such file") from None
    except (OSError, pa.ArrowException) as exc:  # unreadable, or a column of another type
        raise AnalysisError(f"snapshot {path}: cannot read ({exc})") from None


def _check_columns(names: list[str], where: str) -> None:
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise AnalysisError(f"snapshot {where}: missing column(s) {', '.join(missing)}")


class _Codes:
    """Strings → stable small integers, in order of first sight."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str] = []

    def code(self, name: str) -> int:
        found = self.index.get(name)
        if found is None:
            found = self.index[name] = len(self.names)
            self.names.append(name)
        return found

    def encode(self, column: pa.Array) -> np.ndarray:
        """int32 codes of a string column (nulls: -1), through its dictionary."""
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column)
        lookup = np.array([self.code(str(v)) for v in column.dictionary.to_pylist()] + [-1], dtype=np.int32)
        indices = column.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return lookup[indices]  # -1 indexes the appended null code


class _Loader:
    """Fills arrays sized for every row of the snapshot (``capacity``) batch by batch, so no column
    is ever held twice: once as parts and again joined."""

    def __init__(self, capacity: int, scorer: Scorer | None, where: str) -> None:
        self.scorer = scorer
        self.where = where
        self.agents = _Codes()
        self.actions = _Codes()
        self.versions = _Codes()
        self.sets: dict[tuple[int, ...], int] = {}  # action ids of a list → its set index
        self.set_of_text: dict[str, int] = {}  # raw list → its set index (-1: unusable)
        self.capacity = capacity
        self.rows = 0
        self.dropped = 0
        self.made: list[np.ndarray] = []  # a sample of the kept rows' ts, at most ~1,000 a batch
        self.python_batches = 0
        self.columns = {
            "agent": np.empty(capacity, dtype=np.int32),
            "chosen": np.empty(capacity, dtype=np.int32),
            "set": np.empty(capacity, dtype=np.int32),
            "version": np.empty(capacity, dtype=np.int32),
            "t": np.empty(capacity, dtype=np.float64),
            "p": np.empty(capacity, dtype=np.float64),
            "r": np.empty(capacity, dtype=np.float64),
        }
        self.numbers: dict[str, np.ndarray] = {}  # float32, NaN where absent
        self.texts: dict[str, np.ndarray] = {}  # int32 codes into self.text_codes[name], -1 where absent
        self.text_codes: dict[str, _Codes] = {}
        self.live: list[np.ndarray] = []

    # ---- per batch ---------------------------------------------------------------------------

    def add(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        if n == 0:
            return
        col = {name: batch.column(name) for name in batch.schema.names}
        t, p, r = (_floats(col[k]) for k in ("received_at", "prob", "reward"))
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(t) & np.isfinite(p) & np.isfinite(r) & (p > 0.0)
        usable &= _valid(col["context"]) & _valid(col["chosen"]) & _valid(col["actions"]) & _valid(col["agent"])
        if "slot" in col:
            slot = col["slot"].cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
            usable &= slot == 0
        set_index = self._action_sets(col["actions"])
        chosen = self.actions.encode(col["chosen"])
        usable &= (set_index >= 0) & (chosen >= 0)
        usable &= self._in_set(set_index, chosen, usable)
        keep = np.flatnonzero(usable)
        if len(keep) == 0:
            self.dropped += n
            return
        contexts = col["context"].take(pa.array(keep))
        parsed, objects = self._parse(contexts)
        if not objects.all():
            mask = pa.array(objects)
            keep, contexts = keep[objects], contexts.filter(mask)
            parsed = {
                name: (kind, values[objects] if kind == "num" else values.filter(mask))
                for name, (kind, values) in parsed.items()
            }
        self.dropped += n - len(keep)
        if len(keep) == 0:
            return
        at = slice(self.rows, self.rows + len(keep))
        cols = self.columns
        cols["agent"][at] = self.agents.encode(col["agent"])[keep]
        cols["chosen"][at] = chosen[keep]
        cols["set"][at] = set_index[keep]
        cols["version"][at] = self.versions.encode(col["model_version"])[keep] if "model_version" in col else -1
        cols["t"][at], cols["p"][at], cols["r"][at] = t[keep], p[keep], r[keep]
        if "ts" in col:
            made = _floats(col["ts"])[keep]
            made = made[np.isfinite(made)]
            self.made.append(made[:: max(1, len(made) // 1000)])
        for name, (kind, values) in parsed.items():
            if kind == "num":
                if name not in self.numbers:
                    self.numbers[name] = np.full(self.capacity, np.nan, dtype=np.float32)
                self.numbers[name][at] = values
            else:
                if name not in self.texts:
                    self.texts[name] = np.full(self.capacity, -1, dtype=np.int32)
                    self.text_codes[name] = _Codes()
                self.texts[name][at] = self.text_codes[name].encode(values)
        if self.scorer is not None:
            try:
                taken = pa.array(keep)
                self.live.append(self._score(contexts, col["actions"].take(taken), col["agent"].take(taken)))
            except MemoryError:
                raise  # the run's memory cap, not the model: exit 3 says so
            except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own untyped errors
                raise AnalysisError(
                    f"snapshot {self.where}: the live model {self.scorer.version} cannot score its decisions ({exc})"
                ) from None
        self.rows += len(keep)

    def _action_sets(self, column: pa.Array) -> np.ndarray:
        """Each row's action set index (-1: not a usable list of actions)."""
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column)
        found = []
        for raw in column.dictionary.to_pylist():
            if raw not in self.set_of_text:
                if len(self.set_of_text) >= _SET_CACHE_LIMIT:  # every row its own list: bound the cache
                    self.set_of_text.clear()
                self.set_of_text[raw] = self._read_set(raw)
            found.append(self.set_of_text[raw])
        indices = column.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.array(found + [-1], dtype=np.int32)[indices]

    def _read_set(self, raw: str) -> int:
        try:
            actions = _json.decode(raw)
        except msgspec.DecodeError:
            return -1
        if not isinstance(actions, list) or not actions or not all(
            isinstance(a, str) or (isinstance(a, dict) and isinstance(a.get("id"), str)) for a in actions
        ):
            return -1
        key = tuple(sorted({self.actions.code(a) for a in action_ids(actions)}))
        return self.sets.setdefault(key, len(self.sets))

    def _in_set(self, set_index: np.ndarray, chosen: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """Whether each usable row's chosen action is among its own actions."""
        here = np.unique(set_index[usable])
        if len(here) == 0:
            return usable
        by_index = {index: ids for ids, index in self.sets.items()}
        local = np.full(len(self.sets), -1, dtype=np.int64)
        local[here] = np.arange(len(here))
        table = np.zeros((len(here), len(self.actions.names)), dtype=bool)
        for k, index in enumerate(here):
            table[k, list(by_index[int(index)])] = True
        out = np.zeros(len(usable), dtype=bool)
        rows = np.flatnonzero(usable)
        out[rows] = table[local[set_index[rows]], chosen[rows]]
        return out

    def _parse(self, contexts: pa.Array) -> tuple[dict[str, tuple[str, Any]], np.ndarray]:
        """Flattened features of a batch's contexts (one entry per row), and which were JSON objects."""
        n = len(contexts)
        texts = contexts.to_pylist()
        try:
            # one thread: a batch is small, and each of Arrow's threads would keep its own heap
            table = pajson.read_json(
                io.BytesIO("\n".join(texts).encode()), read_options=pajson.ReadOptions(use_threads=False)
            )
            if table.num_columns and table.num_rows != n:
                raise pa.ArrowInvalid("a context spans lines")
            return _arrow_features(table), np.ones(n, dtype=bool)
        except pa.ArrowInvalid:
            # mixed types under one key, or a context that is not an object
            self.python_batches += 1
            return _python_features(texts)

    def _score(self, contexts: pa.Array, actions: pa.Array, agents: pa.Array) -> np.ndarray:
        """The live model's scores [n, actions seen so far] of each row's offered actions (NaN elsewhere)."""
        assert self.scorer is not None
        scorer = self.scorer
        hasher = scorer.hasher
        texts = contexts.to_pylist()
        out = np.full((len(texts), len(self.actions.names)), np.nan, dtype=np.float32)
        ctx = np.empty((len(texts), scorer.manifest.features.context_dim), dtype=np.float32)
        spec, agent_of = scorer.manifest.features, agents.to_pylist()
        for i, text in enumerate(texts):  # as the model reads it: with the agent's id in a shared line
            hasher.context(with_agent(spec, str(agent_of[i]), _json.decode(text)), out=ctx[i])
        # rows offering the same list (action features included) are scored together
        groups: dict[str, list[int]] = {}
        for i, raw in enumerate(actions.to_pylist()):
            groups.setdefault(raw, []).append(i)
        for raw, members in groups.items():
            offered = _json.decode(raw)
            codes = [self.actions.code(a) for a in action_ids(offered)]
            vectors = hasher.actions(offered)
            rows = np.asarray(members)
            for start in range(0, len(rows), 4096):
                part = rows[start : start + 4096]
                acts = np.ascontiguousarray(np.broadcast_to(vectors, (len(part), *vectors.shape)))
                scores, _ = scorer.score_batch(ctx[part], acts)
                out[np.ix_(part, codes)] = scores
        return out

    # ---- the whole ----------------------------------------------------------------------------

    def finish(self) -> Experience:
        n = self.rows
        cols = {k: v[:n] for k, v in self.columns.items()}
        self.columns.clear()  # the views above are the only references left
        offered = np.zeros((max(len(self.sets), 1), len(self.actions.names)), dtype=bool)
        for ids, index in self.sets.items():
            offered[index, list(ids)] = True
        features, notes = self._features(n)
        live = None
        if self.scorer is not None:
            live = np.full((n, len(self.actions.names)), np.nan, dtype=np.float32)
            start = 0
            self.live.reverse()
            while self.live:  # each part freed once copied
                part = self.live.pop()
                live[start : start + len(part), : part.shape[1]] = part
                start += len(part)
        if self.python_batches:
            notes.append(
                f"{self.python_batches} batch(es) of contexts were flattened one by one (a key holding numbers"
                " and text, or a context that is not an object); such keys were read as categorical"
            )
        # each agent's decisions together, in time order (ties as the snapshot ordered them), so an
        # agent's rows are a slice of every array and are analysed without being copied; columns
        # are put in that order one at a time, so at most one is held twice
        order = np.lexsort((cols["t"], cols["agent"])) if n else np.zeros(0, dtype=np.int64)
        if np.any(np.diff(order) < 0):
            for k in cols:
                cols[k] = cols[k][order]
            for f in list(features.values()):
                features[f.name] = f.take(order)
            if live is not None:
                live = live[order]
        return Experience(
            agents=self.agents.names,
            agent=cols["agent"],
            actions=self.actions.names,
            chosen=cols["chosen"],
            offered=offered,
            action_set=cols["set"],
            versions=self.versions.names,
            version=cols["version"],
            received_at=cols["t"],
            prob=cols["p"],
            reward=cols["r"],
            features=features,
            live_scores=live,
            dropped=self.dropped,
            notes=tuple(notes),
            made=_span(np.concatenate(self.made)) if self.made else None,
        )

    def _features(self, n: int) -> tuple[dict[str, Feature], list[str]]:
        features: dict[str, Feature] = {}
        left_out: list[str] = []
        for name in sorted(set(self.numbers) | set(self.texts)):
            numbers = self.numbers.pop(name, None)
            if name not in self.texts:
                assert numbers is not None
                features[name] = Feature(name, numbers[:n])
                continue
            codes, values = self.text_codes.pop(name), self.texts.pop(name)[:n]
            if numbers is not None:  # a key that is a number elsewhere: its numbers become categories too
                present = ~np.isnan(numbers[:n])
                unique, inverse = np.unique(numbers[:n][present], return_inverse=True)
                # str() of a float32 is its shortest form: 0.1, not 0.10000000149
                lookup = np.array([codes.code(number_text(float(str(x)))) for x in unique], dtype=np.int32)
                values[present] = lookup[inverse]
            feature = _categorical(name, values, codes)
            if feature is None:
                left_out.append(name)
            else:
                features[name] = feature
        notes = []
        if left_out:
            notes.append(
                f"left out as identifiers or free text (too many distinct values to form segments): {', '.join(left_out)}"
            )
        return features, notes


def _categorical(name: str, values: np.ndarray, codes: _Codes) -> Feature | None:
    """The feature with its ``MAX_CATEGORIES`` most frequent values kept apart, or None if they
    cover less than half of the decisions that have it (an identifier, free text)."""
    present = values >= 0
    if not present.any():
        return None
    counts = np.bincount(values[present], minlength=len(codes.names))
    order = np.argsort(-counts, kind="stable")
    top = order[:MAX_CATEGORIES]
    if counts[top].sum() < 0.5 * present.sum():
        return None
    # most frequent first; the rest share the code after them
    remap = np.full(len(codes.names) + 1, len(top), dtype=np.int16)  # at most MAX_CATEGORIES + 1 codes
    remap[top] = np.arange(len(top), dtype=np.int16)
    remap[-1] = -1
    values = remap[values]  # -1 indexes the last entry, which keeps "absent" absent
    return Feature(name, values, tuple(codes.names[k] for k in top), complete=len(top) == len(codes.names))


def _span(values: np.ndarray) -> tuple[float, float] | None:
    """The 1st and 99th percentiles of ``values`` (None for none)."""
    if len(values) == 0:
        return None
    lo, hi = np.percentile(values, [1.0, 99.0])
    return float(lo), float(hi)


def _floats(column: pa.Array) -> np.ndarray:
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _valid(column: pa.Array) -> np.ndarray:
    return column.is_valid().to_numpy(zero_copy_only=False)


def _arrow_features(table: pa.Table) -> dict[str, tuple[str, Any]]:
    """Flattened columns of a parsed batch: ("num", float64 ndarray) or ("cat", string Array)."""
    out: dict[str, tuple[str, Any]] = {}

    def visit(name: str, column: pa.Array) -> None:
        kind = column.type
        if pa.types.is_struct(kind):
            for i in range(kind.num_fields):
                visit(f"{name}.{kind.field(i).name}", pc.struct_field(column, [i]))
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
            values = column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
            values[~np.isfinite(values)] = np.nan
            out[name] = ("num", values)
        elif pa.types.is_boolean(kind):
            out[name] = ("cat", pc.if_else(column, "true", "false"))
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            out[name] = ("cat", column)
        # lists and all-null columns name nothing a rule can test

    for name, column in zip(table.column_names, table.columns):
        visit(name, column.combine_chunks())
    return out


def _python_features(texts: list[str]) -> tuple[dict[str, tuple[str, Any]], np.ndarray]:
    """The slow path: each context decoded and flattened; a key seen as text anywhere is categorical."""
    n = len(texts)
    objects = np.zeros(n, dtype=bool)
    rows: list[dict[str, Any]] = [{}] * n
    for i, text in enumerate(texts):
        try:
            context = _json.decode(text)
        except msgspec.DecodeError:
            continue
        if isinstance(context, dict):
            objects[i] = True
            rows[i] = dict(_flatten("", context, 0))
    out: dict[str, tuple[str, Any]] = {}
    for name in sorted(set().union(*rows)):
        values = [row.get(name) for row in rows]
        if all(v is None or isinstance(v, float) for v in values):
            out[name] = ("num", np.array([np.nan if v is None else v for v in values], dtype=np.float64))
        else:
            out[name] = ("cat", pa.array([v if v is None or isinstance(v, str) else number_text(v) for v in values], pa.string()))
    return out, objects


def number_text(x: float) -> str:
    """A number as a category: 3.0 reads "3"."""
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _flatten(prefix: str, value: Any, depth: int) -> Iterator[tuple[str, Any]]:
    """(dotted path, number or string) of every scalar in a decoded context; lists are skipped."""
    if depth > 32:
        return
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, bool):
            yield path, "true" if item else "false"
        elif isinstance(item, (int, float)):
            try:
                x = float(item)
            except OverflowError:
                continue
            if math.isfinite(x):
                yield path, x
        elif isinstance(item, str):
            yield path, item
        elif isinstance(item, dict):
            yield from _flatten(path + ".", item, depth + 1)


def _load(batches: Iterable[pa.RecordBatch], capacity: int, scorer: Scorer | None, where: str) -> Experience:
    loader = _Loader(capacity, scorer, where)
    for batch in batches:
        loader.add(batch)
    return loader.finish()

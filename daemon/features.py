"""Feature hashing: the one function that turns contexts and actions into model inputs.

The client (at decision time) and the trainer (at training time) both call this module, so a
model never sees features computed differently from how it was trained. The spec (widths and
seed) travels in each model's manifest.

Flattening rules, applied recursively with dotted key paths:
- numbers: feature ``path`` with value sign(x)·min(log1p(|x|), 50) (robust to scale); NaN and
  ±inf are skipped, as None is, since the store keeps them as JSON's null;
- booleans: feature ``path`` with value 1 or 0;
- short strings: categorical feature ``path=value`` with value 1;
- strings with whitespace: one feature ``path~token`` per token, each 1/sqrt(n_tokens);
- lists: strings as a bag of categoricals, numbers as ``path[i]``, mappings recursed;
- mappings: recursed under ``path.``; None is skipped;
- nesting is followed MAX_DEPTH (32) mappings or lists deep; anything deeper is skipped, so no
  input (the decoder admits nesting near the recursion limit) can exhaust the stack;
- any other value (a set, a datetime, numpy's numbers, msgpack's bytes) is read as its JSON, the
  form the store keeps it in, and one that has none is refused (TypeError naming its key).
An action is hashed from its id plus its own features, in its own space. The id takes two slots:
``__action=id`` as above, and a second from blake2b (4 bytes, keyed by the seed) of the id, moved
to the next slot should it land on the first (one slot only when action_dim is 1). With one slot,
two of ten actions would share a slot and sign, and so be indistinguishable, about half the time
at action_dim 32; with two, about 2% of the time. The second hash cannot be crc32 of another
name: crc32 is affine, so two ids of equal length that collide under one prefix collide under
every prefix (and every seed).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import Any, Iterable

import msgspec
import numpy as np

_ACTION_KEY = "__action="
SCHEME = "crc32-signed-log1p-v2"  # v2: action ids take two slots
_CACHE_LIMIT = 200_000
_SETS_CACHE_LIMIT = 4096
_encode = msgspec.msgpack.Encoder().encode


def as_stored(value: Any) -> Any:
    """msgspec's ``enc_hook`` for what JSON and msgpack lack, as the store keeps it: numpy's scalars
    as the Python values they hold, msgpack's Ext values as their code and bytes; anything else is
    refused (TypeError)."""
    if isinstance(value, msgspec.msgpack.Ext):
        return {"msgpack_ext": value.code, "data": value.data}
    if isinstance(value, np.generic):
        item = value.item()
        if isinstance(item, np.floating):  # a longdouble's item() is a longdouble again
            item = float(item)
        if not isinstance(item, np.generic):
            return item
    raise TypeError(f"a {type(value).__name__} is not a value the store can keep")


_stored = msgspec.json.Encoder(enc_hook=as_stored).encode
_stored_value = msgspec.json.Decoder().decode


AGENT_KEY = "@agent"  # the context key a shared model line's models read the agent from


class FeatureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    context_dim: int = 128
    action_dim: int = 32
    seed: int = 0
    scheme: str = SCHEME
    # the agent id is one more context key (AGENT_KEY): a model one line shares among agents
    # (learning.scope: shared) tells them apart
    agent: bool = False


def with_agent(spec: FeatureSpec, agent: str, context: dict[str, Any]) -> dict[str, Any]:
    """``context`` as a model hashed with ``spec`` reads it: with the agent's id when it reads that."""
    return {**context, AGENT_KEY: agent} if spec.agent else context


def scheme_refusal(spec: FeatureSpec) -> str | None:
    """Why a model hashed with ``spec`` cannot be served by this version, or None if it can."""
    if spec.scheme == SCHEME:
        return None
    return (
        f"its features were hashed with scheme {spec.scheme!r} and this reflexd hashes with "
        f"{SCHEME!r}: train a new model"
    )


class Hasher:
    """Hashes contexts and actions for one FeatureSpec, caching name → (index, sign)."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._ctx_cache: dict[str, tuple[int, float]] = {}
        self._act_cache: dict[str, tuple[int, float]] = {}
        self._sets_cache: dict[bytes, np.ndarray] = {}
        self._second_cache: dict[str, tuple[int, float]] = {}
        self._key = spec.seed.to_bytes(4, "little")

    def _slot(self, name: str, dim: int, cache: dict[str, tuple[int, float]]) -> tuple[int, float]:
        slot = cache.get(name)
        if slot is None:
            h = zlib.crc32(name.encode("utf-8", "surrogatepass"), self.spec.seed)
            slot = (h % dim, 1.0 if h & 0x80000000 else -1.0)
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[name] = slot
        return slot

    def _second_slot(self, aid: str, first: int, dim: int) -> tuple[int, float]:
        # a cache of its own, keyed by the bare id: any string can be a feature name
        cache = self._second_cache
        slot = cache.get(aid)
        if slot is None:
            digest = hashlib.blake2b(aid.encode("utf-8", "surrogatepass"), digest_size=4, key=self._key).digest()
            h = int.from_bytes(digest, "little")
            idx = h % dim
            slot = ((first + 1) % dim if idx == first else idx, 1.0 if h & 0x80000000 else -1.0)
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[aid] = slot
        return slot

    def _fill(self, vec: memoryview, items: Iterable[tuple[str, float]], dim: int, cache: dict) -> None:
        for name, value in items:
            idx, sign = self._slot(name, dim, cache)
            vec[idx] += sign * value

    def context(self, context: dict[str, Any], out: np.ndarray | None = None) -> np.ndarray:
        dim = self.spec.context_dim
        if out is None:
            out = np.zeros(dim, dtype=np.float32)
        else:
            out.fill(0.0)
        # element writes through a memoryview cost a third of numpy's scalar indexing
        vec = memoryview(out)
        cache = self._ctx_cache
        slot = self._slot
        # The common case, a flat mapping of numbers, booleans and short strings, is hashed inline:
        # it is most of a decision's cost. Everything else goes through the general rules.
        for key, value in context.items():
            kind = type(value)
            if kind is float or kind is int:
                try:
                    x = float(value)
                except OverflowError:
                    self._fill(vec, _flatten_value(str(key), value), dim, cache)
                    continue
                if x - x != 0.0:  # NaN or ±inf: missing, as the store's null (``_flatten_value``)
                    continue
                name = key if type(key) is str else str(key)
                v = _squash(x)
            elif kind is str and " " not in value and "\t" not in value and "\n" not in value:
                name = f"{key}={value}"
                v = 1.0
            elif kind is bool:
                name = key if type(key) is str else str(key)
                v = 1.0 if value else 0.0
            else:
                self._fill(vec, _flatten_value(str(key), value), dim, cache)
                continue
            found = cache.get(name)
            idx, sign = found if found is not None else slot(name, dim, cache)
            vec[idx] += sign * v
        return out

    def actions(self, actions: list[Any], out: np.ndarray | None = None) -> np.ndarray:
        """One row per action; ``actions`` holds ids (str) or objects with ``id`` and ``features``.

        Without ``out`` the result is read-only and may be shared: an agent usually offers the
        same action set decision after decision, so whole sets are cached by their encoding.
        """
        key = None
        if out is None:
            key = _set_key(actions)
            if key is not None:
                cached = self._sets_cache.get(key)
                if cached is not None:
                    return cached
        rows = self._hash_actions(actions, out)
        if key is not None:
            rows.flags.writeable = False
            if len(self._sets_cache) >= _SETS_CACHE_LIMIT:
                self._sets_cache.clear()
            self._sets_cache[key] = rows
        return rows

    def _hash_actions(self, actions: list[Any], out: np.ndarray | None) -> np.ndarray:
        dim = self.spec.action_dim
        if out is None:
            out = np.zeros((len(actions), dim), dtype=np.float32)
        else:
            out[:] = 0.0
        cache = self._act_cache
        for row, action in zip(out, actions):
            vec = memoryview(row)
            aid, feats = action_parts(action)
            idx, sign = self._slot(_ACTION_KEY + aid, dim, cache)
            vec[idx] += sign
            if dim > 1:  # in one slot, opposite signs could cancel the id to nothing
                idx2, sign2 = self._second_slot(aid, idx, dim)
                vec[idx2] += sign2
            if feats:
                self._fill(vec, flatten(feats), dim, cache)
        return out


def _set_key(actions: list[Any]) -> bytes | None:
    """The action-set cache's key: the actions as msgpack, or None (the set is hashed uncached).

    msgpack keeps apart what a vector depends on (None, NaN and ±inf; str and bytes; bool and
    int), as JSON does not, and costs half JSON's float formatting. It cannot encode some
    things (ints past 64 bits, say).
    """
    try:
        return _encode(actions)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError, RecursionError):
        return None


def action_parts(action: Any) -> tuple[str, dict[str, Any] | None]:
    """(id, features) of an action given as a string, a dict or an Action struct."""
    if isinstance(action, str):
        return action, None
    if isinstance(action, dict):
        return str(action["id"]), action.get("features")
    return action.id, action.features


def action_ids(actions: list[Any]) -> list[str]:
    # inline for the decision path: a function call per action costs more than the rest
    return [a if type(a) is str else str(a["id"]) if type(a) is dict else action_parts(a)[0] for a in actions]


def first_repeat(ids: list[str]) -> str:
    """The first id ``ids`` holds twice (which the caller knows it does), found in one pass."""
    seen: set[str] = set()
    return next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]


_SQUASH_LIMIT = 50.0  # log1p(5e21): beyond it every magnitude looks alike, infinity included


def _squash(x: float) -> float:
    if x >= 0.0:
        v = math.log1p(x)
        return v if v < _SQUASH_LIMIT else _SQUASH_LIMIT
    if x < 0.0:
        v = -math.log1p(-x)
        return v if v > -_SQUASH_LIMIT else -_SQUASH_LIMIT
    return 0.0  # NaN carries no information


MAX_DEPTH = 32  # mappings and lists nested deeper than this are skipped (see the module docstring)


def flatten(obj: dict[str, Any], prefix: str = "", depth: int = 0) -> Iterable[tuple[str, float]]:
    for key, value in obj.items():
        path = f"{prefix}{key}"
        yield from _flatten_value(path, value, depth)


def _flatten_value(path: str, value: Any, depth: int = 0) -> Iterable[tuple[str, float]]:
    if value is None:
        return
    if isinstance(value, bool):
        yield path, 1.0 if value else 0.0
    elif isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return  # stored as null (JSON has no such number): missing, as training reads it
        try:
            x = float(value)
        except OverflowError:  # JSON admits integers past float range
            x = math.inf if value > 0 else -math.inf
        yield path, _squash(x)
    elif isinstance(value, str):
        if type(value) is not str:  # a (str, Enum) member formats as Tier.GOLD; the store keeps "gold"
            value = str.__str__(value)
        if " " in value or "\t" in value or "\n" in value:
            tokens = value.split()
            if tokens:
                w = 1.0 / math.sqrt(len(tokens))
                for tok in tokens:
                    yield f"{path}~{tok}", w
        else:
            yield f"{path}={value}", 1.0
    elif isinstance(value, dict):
        if depth < MAX_DEPTH:
            yield from flatten(value, path + ".", depth + 1)
    elif isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            return
        for i, item in enumerate(value):
            if isinstance(item, str):  # a (str, Enum) member as the store keeps it, as above
                yield f"{path}={item if type(item) is str else str.__str__(item)}", 1.0
            else:  # a mapping recurses under ``path[i].``, like any other item under ``path[i]``
                yield from _flatten_value(f"{path}[{i}]", item, depth + 1)
    else:
        # anything else (a set, a datetime, numpy's scalars, msgpack's bytes) is read as the store
        # keeps it, its JSON, so that a decision is scored on the features its model trained on
        try:
            stored = _stored_value(_stored(value))
        except (TypeError, msgspec.EncodeError) as exc:
            raise TypeError(f"context {path!r}: {exc}; send a str, number, bool, list or dict") from None
        yield from _flatten_value(path, stored, depth)

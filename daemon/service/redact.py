"""Redaction at ingest: configured fields are dropped or replaced by a keyed hash before storage.

A field path is a dotted list of mapping keys (``user.email``) looked up in the free-form parts
of a message:

- ``decision``, ``decide`` and ``explain``: ``context``, and the ``features`` of each action given as a mapping
- ``step``: ``observation``
- ``event``: ``data``

Each path is matched from the top of each of those parts. A list met on the way is searched
item by item, so ``messages.content`` also reaches ``{"messages": [{"content": ...}, ...]}``.
If a key listed in ``drop`` is present, it is removed. If a key listed in ``hash`` is present,
its value (whatever it is, a whole mapping included) becomes
``"h:" + HMAC-SHA256(key, canonical JSON of the value)[:32 hex]``. Equal values get equal
hashes, so a model can still learn from them, but the raw value is never stored. When a path
and one of its prefixes are both listed, the shorter one wins, since it covers everything below it.

Ids, agent ids, action ids, ``chosen``, ``kind``, ``episode``, ``action`` of a step and rewards
are never redacted. Outcomes carry nothing free-form and pass through unchanged.

Messages nested more than ``MAX_DEPTH`` levels deep where a path leads (or inside a value to
hash) cannot be searched safely. They raise ``RedactionError``, so the daemon refuses them rather
than storing them unredacted.

Inputs are never modified. A message with nothing to redact comes back as the same object, and
so do mappings and lists with no matches (copy on write). A Redactor with nothing configured is
inactive (``active`` is False) and returns every message as it came.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Iterable, Sequence

import msgspec

from reflexd.config import read_key
from reflexd.errors import RedactionError
from reflexd.wire.protocol import Action, Decide, Decision, Event, Explain, Step

HASH_PREFIX = "h:"
HASH_HEX_CHARS = 32
MAX_DEPTH = 100

_DROP = 1
_HASH = 2

# One node per path segment: segment -> (what to do there, the nodes below it)
_Tree = dict[str, tuple[int, "_Tree"]]

_canonical_encode = msgspec.json.Encoder(order="sorted").encode



def canonical_json(value: Any) -> bytes:
    """Canonical JSON of a value: keys sorted, no whitespace (the same for JSON and msgpack input)."""
    try:
        return _canonical_encode(value)
    except (TypeError, msgspec.EncodeError):
        # msgpack can carry what JSON cannot (Ext values, non-string map keys)
        return _canonical_encode(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    return repr(value)


def _compile(drop: Iterable[str], hash: Iterable[str]) -> _Tree:
    tree: _Tree = {}
    # drop first: the same path in both (parse_config refuses that) is dropped
    for action, paths in ((_DROP, drop), (_HASH, hash)):
        for path in paths:
            node = tree
            parts = path.split(".")
            for i, part in enumerate(parts):
                here, below = node.get(part, (0, {}))
                if here:  # a prefix is already redacted whole
                    break
                if i == len(parts) - 1:
                    node[part] = (action, {})  # whatever was below is covered now
                    break
                node[part] = (0, below)
                node = below
    return tree


class Redactor:
    """Drops and hashes configured field paths in experience messages; build once per config."""

    __slots__ = ("active", "drop", "hash", "_mac", "_tree")

    def __init__(self, drop: Sequence[str] = (), hash: Sequence[str] = (), key: bytes | None = None) -> None:
        if hash and not key:
            raise ValueError("hashing fields needs a key")
        self.drop = tuple(drop)
        self.hash = tuple(hash)
        # keyed once; each hash copies this prepared state (about twice as fast as hmac.new)
        self._mac = hmac.new(key, digestmod=hashlib.sha256) if key else None
        self._tree = _compile(self.drop, self.hash)
        self.active = bool(self._tree)

    @classmethod
    def from_config(cls, cfg: Any) -> Redactor:
        """From a ``RedactionConfig``, reading its key (ConfigError if it cannot be used)."""
        if not cfg.drop and not cfg.hash:
            return _INACTIVE
        return cls(cfg.drop, cfg.hash, read_key(cfg) if cfg.hash else None)

    def hash_value(self, value: Any) -> str:
        """``h:`` and the first 32 hex digits of HMAC-SHA256 over the value's canonical JSON."""
        assert self._mac is not None
        try:
            text = canonical_json(value)
        except RecursionError:
            raise RedactionError("a value to hash is nested too deeply") from None
        mac = self._mac.copy()
        mac.update(text)
        return HASH_PREFIX + mac.hexdigest()[:HASH_HEX_CHARS]

    # ---- messages ----------------------------------------------------------------------

    def apply(self, msg: Any) -> Any:
        """The message with its configured fields dropped or hashed (the same object if none)."""
        if not self.active:
            return msg
        kind = type(msg)
        if kind is Decision or kind is Decide or kind is Explain:
            context = self.mapping(msg.context)
            actions = self.actions(msg.actions)
            if context is msg.context and actions is msg.actions:
                return msg
            return msgspec.structs.replace(msg, context=context, actions=actions)
        if kind is Step:
            observation = self.mapping(msg.observation)
            return msg if observation is msg.observation else msgspec.structs.replace(msg, observation=observation)
        if kind is Event:
            data = self.mapping(msg.data)
            return msg if data is msg.data else msgspec.structs.replace(msg, data=data)
        return msg

    def apply_all(self, msgs: list[Any]) -> list[Any]:
        if not self.active:
            return msgs
        return [self.apply(m) for m in msgs]

    def actions(self, actions: list[Any]) -> list[Any]:
        out = None
        for i, action in enumerate(actions):
            if type(action) is Action and action.features:
                features = self.mapping(action.features)
                if features is not action.features:
                    if out is None:
                        out = list(actions)
                    out[i] = Action(id=action.id, features=features)
        return actions if out is None else out

    def mapping(self, value: Any) -> Any:
        """A context, observation, feature mapping or event payload, redacted (copy on write)."""
        if not self.active:
            return value
        return self._walk(value, self._tree, 0)

    def _walk(self, value: Any, tree: _Tree, depth: int) -> Any:
        if depth > MAX_DEPTH and isinstance(value, (dict, list)):
            raise RedactionError(f"nested more than {MAX_DEPTH} levels deep where fields are redacted")
        if isinstance(value, dict):
            out = None
            for part, (action, below) in tree.items():
                if part not in value:
                    continue
                if action == _DROP:
                    if out is None:
                        out = dict(value)
                    del out[part]
                    continue
                old = value[part]
                new = self.hash_value(old) if action == _HASH else self._walk(old, below, depth + 1)
                if new is not old:
                    if out is None:
                        out = dict(value)
                    out[part] = new
            return value if out is None else out
        if isinstance(value, list):
            out_list = None
            for i, item in enumerate(value):
                new = self._walk(item, tree, depth + 1)
                if new is not item:
                    if out_list is None:
                        out_list = list(value)
                    out_list[i] = new
            return value if out_list is None else out_list
        return value


_INACTIVE = Redactor()

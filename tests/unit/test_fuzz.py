"""Property-based fuzzing of everything that reads untrusted input.

Peers on the socket and operators editing YAML can send anything: random bytes, truncated frames,
wrong types, NaN and infinities, numbers past 64 bits, nesting deeper than the recursion limit,
megabyte strings, invalid UTF-8. Whatever arrives, the decoders answer with their one error type
(FrameError, ConfigError), the framer never raises, feature hashing never raises, and anything the
decoder accepts can be stored. Runs are derandomized (no example database), so CI sees the same
examples every time.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import msgspec
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflexd import features as F
from reflexd.config import Config, parse_config
from reflexd.errors import ConfigError, FrameError, FrameTooLarge
from reflexd.features import FeatureSpec, Hasher
from reflexd.service.store import DeadLetter, Store
from reflexd.wire import framing as fr
from reflexd.wire import protocol as p

FRAMINGS = [fr.JSON, fr.MSGPACK]
INBOUND_TYPES = tuple(p.Inbound.__args__)  # type: ignore[attr-defined]


def fuzz(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# ---- values: every shape a JSON or msgpack peer can send --------------------------------------

HUGE_INTS = [2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**300)]
ODD_TEXT = ["", "\x00", "a\x00b", "\u202e", "\ufeff", "e\u0301", "\uffff", "\U0010ffff", "𝔘𝔫𝔦", "a b\tc\nd", "   ", "=.[]~", "k.k", "💥" * 70]
ENORMOUS = st.builds(operator.mul, st.sampled_from(["x", "é", "𝔘", " y"]), st.integers(4_096, 300_000))


@functools.cache
def texts(surrogates: bool = False, max_size: int = 24) -> st.SearchStrategy[str]:
    chars = st.characters(exclude_categories=() if surrogates else ("Cs",))
    return st.one_of(st.text(chars, max_size=max_size), st.sampled_from(ODD_TEXT))


NUMBERS = st.one_of(st.integers(), st.sampled_from(HUGE_INTS), st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308]))


@functools.cache
def leaves(surrogates: bool = False, exotic: bool = False) -> st.SearchStrategy[Any]:
    base = [st.none(), st.booleans(), NUMBERS, texts(surrogates), ENORMOUS]
    if exotic:  # what msgpack decodes into an `Any` field besides JSON's types
        base += [st.binary(max_size=16), st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8))]
    return st.one_of(*base)


def nest(leaf: Any, depth: int, shape: str) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if shape == "list" or (shape == "mixed" and i % 2) else {"k": value}
    return value


@functools.cache
def json_like(surrogates: bool = False, exotic: bool = False, max_depth: int = 5_000) -> st.SearchStrategy[Any]:
    leaf = leaves(surrogates, exotic)
    keys = texts(surrogates, 8)
    tree = st.recursive(leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4), max_leaves=16)
    deep = st.builds(nest, leaf, st.integers(1, max_depth), st.sampled_from(["dict", "list", "mixed"]))
    return st.one_of(tree, tree, deep)


@functools.cache
def contexts(surrogates: bool = False, exotic: bool = False, max_depth: int = 5_000) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(texts(surrogates, 8), json_like(surrogates, exotic, max_depth), max_size=5)


# ---- wire payloads ------------------------------------------------------------------------------

SPLICE = "@@SPLICE@@"  # a value in a message, replaced by raw bytes once encoded


def _deep_bytes(framing: str, depth: int, shape: str, leaf: bytes) -> bytes:
    opens, closes = [], []
    for i in range(depth):
        as_list = shape == "list" or (shape == "mixed" and i % 2)
        if framing == fr.JSON:
            opens.append(b"[" if as_list else b'{"k":')
            closes.append(b"]" if as_list else b"}")
        else:
            opens.append(b"\x91" if as_list else b"\x81\xa1k")
    return b"".join(reversed(opens)) + leaf + b"".join(closes)


JSON_RAW = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1E400", b"-0", b"9" * 5_000, b"-" + b"9" * 400,
    b"0.1e-400", b"01", b"1.", b".5", b"+1", b"0x10", b"true1", b"nul", b"[1,]", b'{"a":1,}', b'{"a"}', b"[",
    b'"\xff\xfe"', b'"\xed\xa0\x80"', b'"\xc0\x80"', b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\u00"', b'"\\x41"',
    b'"a\x00b"', b'"tab\there"', b'"\\u0000"', b'{"k":1,"k":2}', b"[" * 50, b"}" * 3, b"\xef\xbb\xbf1",
]
MSGPACK_RAW = [
    b"\xcb" + struct.pack(">d", math.nan), b"\xcb" + struct.pack(">d", -math.inf), b"\xca" + struct.pack(">f", math.inf),
    b"\xcf" + b"\xff" * 8, b"\xd3\x80" + b"\x00" * 7, b"\xa3\xed\xa0\x80", b"\xa1\xff", b"\xa2\xc0\x80",
    b"\xc4\x03abc", b"\xd4\x01\x00", b"\xc7\x00\x05", b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x0c\xff" + b"\xff" * 4 + b"\x00" * 8,
    b"\xd7\xff" + b"\xff" * 8, b"\xdb\xff\xff\xff\xffabc", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc1",
    b"\xc6\x7f\xff\xff\xff", b"\x81\x91\x01\x02", b"\x81\x81\x01\x02\x03", b"\x81\xc0\x01", b"\x81\xcb" + struct.pack(">d", 1.5) + b"\x01",
    b"\x81\xc4\x01x\x02", b"\x82\xa1a\x01\xa1a\x02", b"\x91", b"\x81\xa1a", b"\xd9\x05ab",
]


@st.composite
def raw_values(draw: st.DrawFn, framing: str) -> bytes:
    """A value as wire bytes, including what no well-behaved encoder would write."""
    kind = draw(st.sampled_from(["fixed", "deep", "huge_string", "huge_digits"]))
    if kind == "fixed":
        return draw(st.sampled_from(JSON_RAW if framing == fr.JSON else MSGPACK_RAW))
    if kind == "deep":
        leaf = b"1" if framing == fr.JSON else b"\x01"
        if draw(st.booleans()):
            leaf = draw(st.sampled_from(JSON_RAW if framing == fr.JSON else MSGPACK_RAW))
        return _deep_bytes(framing, draw(st.integers(1, 3_000)), draw(st.sampled_from(["dict", "list", "mixed"])), leaf)
    if kind == "huge_string":
        n = draw(st.integers(10_000, 400_000))
        body = draw(st.sampled_from([b"x", b"\xc3\xa9", b"\xff", b"\\u12"])) * (n // 4)
        if framing == fr.JSON:
            return b'"' + body + b'"'
        return b"\xdb" + struct.pack(">I", len(body)) + body
    digits = b"7" * draw(st.integers(20, 20_000))
    return digits if framing == fr.JSON else b"\xda" + struct.pack(">H", min(len(digits), 65535)) + digits[:65535]


def _encode_any(obj: Any, framing: str) -> bytes:
    try:
        return msgspec.json.encode(obj) if framing == fr.JSON else msgspec.msgpack.encode(obj)
    except (OverflowError, TypeError, msgspec.EncodeError, RecursionError, UnicodeEncodeError):
        return msgspec.json.encode(SPLICE) if framing == fr.JSON else msgspec.msgpack.encode(SPLICE)


def _splice(encoded: bytes, framing: str, raws: list[bytes]) -> bytes:
    marker = msgspec.json.encode(SPLICE) if framing == fr.JSON else msgspec.msgpack.encode(SPLICE)
    for raw in raws:
        encoded = encoded.replace(marker, raw, 1)
    return encoded


VALID_TYPES = ["decision", "outcome", "step", "event", "episode_end", "flush", "decide", "status", "models", "promote", "rollback", "train", "forget"]


@functools.cache
def _ids() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12),
        st.sampled_from(["x" * 256, "é" * 256, "\x00", "💥", "a b", "x" * 257, ""]),
    )


@functools.cache
def _free(framing: str) -> st.SearchStrategy[Any]:
    """A free-form field's value: JSON-like (with msgpack extras), or a marker to splice raw bytes into."""
    return st.one_of(json_like(exotic=framing == fr.MSGPACK, max_depth=300), st.just(SPLICE), st.just({"deep": SPLICE}))


@functools.cache
def _fields(framing: str) -> dict[str, st.SearchStrategy[Any]]:
    free = _free(framing)
    num = st.one_of(NUMBERS, st.just(SPLICE))
    return {
        "decision": st.fixed_dictionaries(
            {"id": _ids(), "agent": _ids(), "context": contexts(exotic=framing == fr.MSGPACK, max_depth=300) | st.just(SPLICE),
             "actions": st.lists(_ids() | st.fixed_dictionaries({"id": _ids(), "features": free}), min_size=1, max_size=3),
             "chosen": _ids(), "prob": st.floats(0, 1, exclude_min=True) | num},
            optional={"probs": st.lists(num, max_size=4), "model_version": _ids() | st.none(), "strategy": _ids(), "ts": num,
                      "episode": _ids() | st.none()},
        ),
        "outcome": st.fixed_dictionaries(
            {"decision_id": _ids(), "reward": num}, optional={"id": _ids(), "agent": _ids(), "ts": num}
        ),
        "step": st.fixed_dictionaries(
            {"agent": _ids(), "episode": _ids(), "index": st.integers(0, 2**31 - 1) | st.sampled_from(HUGE_INTS + [-1]),
             "observation": contexts(exotic=framing == fr.MSGPACK, max_depth=300) | st.just(SPLICE), "action": _ids()},
            optional={"reward": num, "done": st.booleans(), "id": _ids(), "ts": num},
        ),
        "event": st.fixed_dictionaries({"agent": _ids(), "kind": _ids()}, optional={"data": free, "id": _ids(), "ts": num}),
        "episode_end": st.fixed_dictionaries(
            {"agent": _ids(), "episode": _ids()}, optional={"reward": num | st.none(), "id": _ids(), "ts": num}
        ),
    }


@st.composite
def message_payloads(draw: st.DrawFn, framing: str, experience_only: bool = False) -> bytes:
    """A message-shaped payload: right or wrong type tag, valid or wrong-typed fields, raw splices."""
    fields = _fields(framing)
    if experience_only:
        tag = draw(st.sampled_from(sorted(fields)))
    else:
        tag = draw(st.sampled_from(VALID_TYPES) | texts(max_size=10) | st.sampled_from([None, 1, [], {}]))
    known = isinstance(tag, str) and tag in fields
    body: dict[Any, Any] = draw(fields[tag]) if known else {}
    if not experience_only:
        if not known:
            body.update(draw(st.dictionaries(st.sampled_from(["req", "agent", "context", "actions", "version", "id"]), json_like(max_depth=50), max_size=3)))
        if draw(st.booleans()):  # a wrong type, an unknown field, or a missing one
            action = draw(st.sampled_from(["retype", "unknown", "drop"]))
            if action == "retype" and body:
                body[draw(st.sampled_from(sorted(map(str, body))))] = draw(json_like(max_depth=20))
            elif action == "unknown":
                body[draw(texts(max_size=8))] = draw(json_like(max_depth=20))
            elif body:
                body.pop(draw(st.sampled_from(sorted(map(str, body)))))
    msg = {"type": tag, **body} if draw(st.integers(0, 9)) else {**body, "type": tag}  # tag last is legal too
    encoded = _encode_any(msg, framing)
    n_splices = encoded.count(msgspec.json.encode(SPLICE) if framing == fr.JSON else msgspec.msgpack.encode(SPLICE))
    return _splice(encoded, framing, [draw(raw_values(framing)) for _ in range(n_splices)])


@st.composite
def payloads(draw: st.DrawFn, framing: str) -> bytes:
    """One frame's payload: random bytes, a message (maybe hostile), or a damaged one."""
    kind = draw(st.sampled_from(["random", "message", "message", "truncated", "flipped", "value"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "value":  # not a map at all, or a bare raw value
        return draw(raw_values(framing)) if draw(st.booleans()) else _encode_any(draw(json_like(max_depth=100)), framing)
    payload = draw(message_payloads(framing))
    if kind == "truncated" and payload:
        return payload[: draw(st.integers(0, len(payload) - 1))]
    if kind == "flipped" and payload:
        i = draw(st.integers(0, len(payload) - 1))
        return payload[:i] + bytes([draw(st.integers(0, 255))]) + payload[i + 1 :]
    return payload


def _check_decoded(payload: bytes, framing: str) -> p.Inbound | FrameError:
    """The property every decoder must keep: a valid message or FrameError, nothing else."""
    try:
        msg = fr.decode_inbound(payload, framing)
    except FrameError as exc:
        assert exc.code in ("invalid", "malformed") and isinstance(exc.reason, str)
        # the daemon answers every bad frame, so the answer itself must be encodable
        fr.encode_frame(p.Error(code=exc.code, message=exc.reason, seq=0), framing)
        return exc
    assert isinstance(msg, INBOUND_TYPES)
    req = getattr(msg, "req", None)
    fr.encode_frame(p.Ack(count=0, req=req), framing)  # a request's req is echoed in its answer
    return msg


# ---- decoders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
@fuzz(400)
@given(data=st.data())
def test_decode_inbound_returns_a_message_or_raises_frame_error(framing: str, data: st.DataObject) -> None:
    _check_decoded(data.draw(payloads(framing)), framing)


DEEP_CASES = [
    (fr.JSON, b'{"type":"event","agent":"a","kind":"k","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    (fr.JSON, b'{"type":"decision","context":' + b'{"k":' * 5_000),
    (fr.MSGPACK, msgspec.msgpack.encode({"type": "event", "agent": "a", "kind": "k", "data": None})[:-1] + b"\x91" * 100_000 + b"\x90"),
    (fr.MSGPACK, b"\x84\xa4type\xa5event\xa5agent\xa1a\xa4kind\xa1k\xa4data" + b"\x81\xa1k" * 5_000 + b"\x01"),
]


@pytest.mark.parametrize(("framing", "payload"), DEEP_CASES, ids=["json-list", "json-dict-truncated", "msgpack-list", "msgpack-map"])
def test_nesting_past_the_recursion_limit_is_a_frame_error(framing: str, payload: bytes) -> None:
    # msgspec raises RecursionError here; it used to escape and take the daemon down
    with pytest.raises(FrameError) as err:
        fr.decode_inbound(payload, framing)
    assert err.value.code == "malformed" and "deep" in err.value.reason


@pytest.mark.parametrize("raw", [b"\xa3\xed\xa0\x80", b"\xa1\xff", b"\xa2\xc0\x80", b"\xa2\xe2\x82"])
def test_invalid_utf8_in_msgpack_strings_is_a_frame_error(raw: bytes) -> None:
    # msgspec raises UnicodeDecodeError for these; it used to escape and take the daemon down
    head = msgspec.msgpack.encode({"type": "event", "agent": "a", "kind": "k", "data": None})[:-1]
    for payload in (head + raw, b"\x84\xa4type\xa5event\xa5agent\xa1a\xa4kind\xa1k" + raw + b"\x01"):
        with pytest.raises(FrameError) as err:
            fr.decode_inbound(payload, fr.MSGPACK)
        assert err.value.code == "malformed"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_step_index_past_the_stored_column_is_rejected_at_decode(framing: str) -> None:
    # steps.idx is a 32-bit INTEGER: a larger index used to be accepted, then fail every
    # retry of its batch in the store, so nothing anyone sent was acknowledged again
    def step(index: int) -> bytes:
        return _encode_any({"type": "step", "agent": "a", "episode": "e", "index": index, "observation": {}, "action": "x"}, framing)

    assert fr.decode_inbound(step(2**31 - 1), framing).index == 2**31 - 1
    for index in (2**31, 2**40, 2**63 - 1):
        with pytest.raises(FrameError, match="index"):
            fr.decode_inbound(step(index), framing)


# ---- framing ------------------------------------------------------------------------------------

ERR = "<too large>"


def _normal(items: Iterator[bytes | FrameError], cap: int) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, FrameError):
            assert isinstance(item, FrameTooLarge) and item.size > cap and item.limit == cap
            out.append(ERR)
        else:
            assert isinstance(item, bytes) and len(item) <= cap
            out.append(item)
    return out


def _oracle(framing: str, data: bytes, cap: int) -> list[Any]:
    """What the framer must produce for ``data`` as a whole, written the obvious way."""
    out: list[Any] = []
    if framing == fr.JSON:
        *lines, rest = data.split(b"\n")
        for line in lines:
            if len(line) > cap:
                out.append(ERR)
            elif line.strip():
                out.append(line)
        if len(rest) > cap:
            out.append(ERR)
        return out
    i = 0
    while len(data) - i >= 4:
        (n,) = struct.unpack_from(">I", data, i)
        if n > cap:
            return out + [ERR]
        if len(data) - i - 4 < n:
            break
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return out


@st.composite
def streams(draw: st.DrawFn, framing: str, cap: int) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=3 * cap + 8))
    parts = draw(st.lists(st.binary(max_size=2 * cap) | st.sampled_from([b"", b" ", b"\r", b"\t \x0b"]), max_size=12))
    if framing == fr.JSON:
        data = b"\n".join(parts)
        return data + (b"\n" if draw(st.booleans()) else b"")
    out = b""
    for part in parts:
        n = len(part) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**32 - 1))
        out += struct.pack(">I", n) + part
    return out


@pytest.mark.parametrize("framing", FRAMINGS)
@fuzz(300)
@given(data=st.data(), cap=st.integers(1, 48))
def test_frame_reader_never_raises_caps_frames_and_ignores_chunking(framing: str, data: st.DataObject, cap: int) -> None:
    stream = data.draw(streams(framing, cap))
    whole = _normal(_frames(fr.FrameReader(framing, cap), [stream]), cap)
    assert whole == _oracle(framing, stream, cap)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert _normal(_frames(fr.FrameReader(framing, cap), chunks), cap) == whole
    bytewise = [stream[i : i + 1] for i in range(len(stream))]
    assert _normal(_frames(fr.FrameReader(framing, cap), bytewise), cap) == whole


def _frames(reader: fr.FrameReader, chunks: list[bytes]) -> list[bytes | FrameError]:
    """What a connection reads from ``chunks`` before its peer stops sending."""
    out = [frame for chunk in chunks for frame in reader.feed(chunk)]
    short = reader.cut_short()
    return out + ([short] if short is not None else [])


def test_an_oversize_line_is_reported_with_its_whole_length() -> None:
    reader = fr.FrameReader(fr.JSON, 100)
    line = b"x" * 8000
    found = [f for i in range(0, len(line), 1000) for f in reader.feed(line[i : i + 1000])]
    assert found == []  # nothing to report until the line ends: its length is not known yet
    (err,) = reader.feed(b"\n")
    assert isinstance(err, FrameTooLarge) and err.size == 8000 and "8000 bytes" in str(err)
    assert list(reader.feed(b'{"a":1}\n')) == [b'{"a":1}']
    assert list(reader.feed(b"y" * 300)) == []
    short = reader.cut_short()
    assert isinstance(short, FrameTooLarge) and short.size == 300


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


FINITE = st.floats(allow_nan=False, allow_infinity=False)
SAFE_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), FINITE, texts())
SAFE_VALUE = st.recursive(SAFE_LEAF, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts(max_size=6), kids, max_size=3), max_leaves=10)
SAFE_CTX = st.dictionaries(texts(max_size=6), SAFE_VALUE, max_size=4)
IDS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=256)
REQ = st.none() | st.integers(-(2**63), 2**63 - 1) | texts()
ACTIONS = st.lists(IDS | st.builds(p.Action, id=IDS, features=SAFE_CTX), min_size=1, max_size=3,
                   unique_by=lambda a: a if isinstance(a, str) else a.id)  # a decide offers each id once
OPT_FLOAT = st.none() | FINITE
REWARD = st.floats(-p.MAX_REWARD, p.MAX_REWARD)
TS = st.none() | st.floats(0.0, p.MAX_TS, exclude_max=True)

MESSAGES = {
    p.Decision: ACTIONS.flatmap(
        lambda acts: st.builds(
            lambda d, prob: msgspec.structs.replace(d, prob=prob) if d.probs is None else d,
            st.builds(
                p.Decision, id=IDS, agent=IDS, context=SAFE_CTX, actions=st.just(acts),
                chosen=st.sampled_from([a if isinstance(a, str) else a.id for a in acts]), prob=st.just(1.0 / len(acts)),
                probs=st.none() | st.just([1.0 / len(acts)] * len(acts)), model_version=st.none() | texts(),
                strategy=st.none() | texts(), ts=TS, episode=st.none() | IDS,
            ),
            st.floats(0, 1, exclude_min=True),  # any prob without probs; with them, the chosen's
        ).flatmap(  # a plain decision, or a slot of a slate
            lambda d: st.just(d) | st.builds(
                lambda slot, slate: msgspec.structs.replace(d, slot=slot, slate=slate), st.integers(0, 2**31 - 1), IDS
            )
        )
    ),
    p.Outcome: st.builds(p.Outcome, decision_id=IDS, reward=REWARD, id=st.none() | IDS, agent=st.none() | IDS, ts=TS),
    p.Step: st.builds(
        p.Step, agent=IDS, episode=IDS, index=st.integers(0, 2**31 - 1), observation=SAFE_CTX, action=texts(),
        reward=REWARD, done=st.booleans(), id=st.none() | IDS, ts=TS,
    ),
    p.Event: st.builds(p.Event, agent=IDS, kind=IDS, data=SAFE_VALUE, id=st.none() | IDS, ts=TS),
    p.EpisodeEnd: st.builds(p.EpisodeEnd, agent=IDS, episode=IDS, reward=st.none() | REWARD, id=st.none() | IDS, ts=TS),
    p.Flush: st.builds(p.Flush, req=REQ, **({"dropped": st.integers(0, 2**63 - 1)} if "dropped" in p.Flush.__struct_fields__ else {})),
    p.Decide: st.builds(p.Decide, agent=IDS, context=SAFE_CTX, actions=ACTIONS, id=st.none() | IDS, req=REQ),
    p.StatusRequest: st.builds(p.StatusRequest, req=REQ),
    p.ModelsRequest: st.builds(p.ModelsRequest, req=REQ),
    p.Promote: st.builds(p.Promote, version=IDS, req=REQ),
    p.Rollback: st.builds(p.Rollback, req=REQ),
    p.Train: st.builds(p.Train, req=REQ),
}
if hasattr(p, "Forget"):
    MESSAGES[p.Forget] = st.builds(p.Forget, agent=IDS, req=REQ)
MESSAGES[p.Decide] = MESSAGES[p.Decide].flatmap(lambda d: st.sampled_from([d, msgspec.structs.replace(d, log=False)]))
MESSAGES[p.Explain] = st.builds(
    p.Explain, agent=IDS, context=SAFE_CTX, actions=ACTIONS, top=st.none() | st.integers(1, 2**63 - 1), req=REQ
)
MESSAGES[p.Evaluate] = st.builds(
    p.Evaluate, policies=st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40), min_size=1, max_size=4),
    agent=st.none() | IDS, since=TS, until=TS, reward_model=st.none() | IDS, discover=st.booleans(), req=REQ,
)

MESSAGES[p.InsightsRequest] = st.builds(p.InsightsRequest, agent=st.none() | IDS, since=OPT_FLOAT, now=st.booleans(), req=REQ)
MESSAGES[p.Snapshot] = st.builds(p.Snapshot, archive=st.booleans(), req=REQ)
MESSAGES[p.Learned] = st.lists(
    st.tuples(st.integers(0, 2**31), st.floats(allow_nan=False, allow_infinity=False)), max_size=8
).flatmap(
    lambda inputs: st.builds(
        p.Learned, agent=IDS, decision=IDS, action=IDS, base=st.none() | IDS, beside=st.booleans(),
        index=st.just([i for i, _ in inputs]), value=st.just([v for _, v in inputs]),
        target=st.floats(allow_nan=False, allow_infinity=False),
    )
)
MESSAGES[p.LearningsRequest] = st.builds(p.LearningsRequest, agent=IDS, after=st.integers(0, 2**63 - 1), req=REQ)
MESSAGES[p.Release] = st.builds(
    p.Release, id=st.text("0123456789abcdef", min_size=32, max_size=32), renew=st.booleans(), req=REQ
)
MESSAGES[p.Adopt] = st.builds(
    p.Adopt, manifest=st.binary(max_size=200), model=st.binary(max_size=2000),
    source=st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=60), req=REQ,
)


def test_every_inbound_type_is_fuzzed() -> None:
    missing = set(INBOUND_TYPES) - set(MESSAGES)
    assert not missing, f"add a strategy to MESSAGES for {sorted(t.__name__ for t in missing)}"


@pytest.mark.parametrize("framing", FRAMINGS)
@fuzz(150)
@given(msgs=st.lists(st.one_of(*MESSAGES.values()), min_size=1, max_size=6), data=st.data())
def test_valid_messages_survive_encode_frame_decode(framing: str, msgs: list[Any], data: st.DataObject) -> None:
    stream = fr.encode_frames(msgs, framing)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = fr.FrameReader(framing, 1 << 20)
    frames = [f for a, b in zip([0, *cuts], [*cuts, len(stream)]) for f in reader.feed(stream[a:b])]
    assert reader.pending == 0
    assert [fr.decode_inbound(f, framing) for f in frames] == msgs


# ---- configuration ------------------------------------------------------------------------------

DEFAULT_YAML = (Path(__file__).resolve().parents[2] / "configs" / "reflexd.yaml").read_text()
SECTIONS = {
    name: list(type(getattr(Config(), name)).__struct_fields__)
    for name in Config.__struct_fields__
    if isinstance(getattr(Config(), name), msgspec.Struct)
}
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS), st.floats(), texts(max_size=12),
    st.sampled_from(["0660", "0o777", "07777", "99999", "-1", "1e400", ".nan", "sum", "dr", "zstd", "mlp", "2020-01-01"]),
)
YAML_VALUES = st.recursive(YAML_SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts(max_size=6), kids, max_size=3), max_leaves=8)


@st.composite
def config_docs(draw: st.DrawFn) -> dict[Any, Any]:
    """A mapping shaped like a config: real section and key names, any values, some strays."""
    doc: dict[Any, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS) + ["state_dir", "agents", "bogus"]), max_size=5, unique=True)):
        if section in SECTIONS:
            keys = draw(st.lists(st.sampled_from(SECTIONS[section] + ["nope"]), max_size=4, unique=True))
            doc[section] = {k: draw(YAML_VALUES) for k in keys} if draw(st.integers(0, 5)) else draw(YAML_VALUES)
        elif section == "agents":
            agent = st.one_of(texts(max_size=6), st.integers(), st.none(), st.booleans(), st.floats())
            override = st.dictionaries(st.sampled_from(["rewards", "exploration", "trainer", 3]), st.dictionaries(
                st.sampled_from(SECTIONS["rewards"] + SECTIONS["exploration"] + ["x"]), YAML_VALUES, max_size=3) | YAML_VALUES, max_size=2)
            doc[section] = draw(st.dictionaries(agent, override | YAML_VALUES, max_size=3)) if draw(st.integers(0, 5)) else draw(YAML_VALUES)
        else:
            doc[section] = draw(YAML_VALUES)
    return doc


YAML_SNIPPETS = [
    "!!python/object/apply:os.system ['true']", "a: !!binary aGVsbG8=", "socket: &s {path: /x}\nlog: *s", "---\n---\n",
    "? [1, 2]\n: 3", "<<: {state_dir: /x}", "socket: {<<: {max_connections: 3}}", "agents: {a: {rewards: {default: .inf}}}",
    "%YAML 1.1\n---\nstate_dir: /x", "state_dir: !!str", "state_dir: *unknown", "\t", "\x00", "\ufeffstate_dir: /x",
    "agents: {a: &a {rewards: *a}}", "socket:\n  max_frame_bytes: 0x10", "{", "- a\n- b", "'unterminated",
]


@st.composite
def config_inputs(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.sampled_from(["text", "bytes", "doc", "doc", "mutated", "snippet"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "doc":
        return yaml.safe_dump(draw(config_docs()), sort_keys=False, allow_unicode=draw(st.booleans()))
    if kind == "snippet":
        return draw(st.sampled_from(YAML_SNIPPETS))
    text = DEFAULT_YAML
    i = draw(st.integers(0, len(text)))
    op = draw(st.sampled_from(["cut", "insert", "delete"]))
    if op == "cut":
        return text[:i]
    if op == "insert":
        return text[:i] + draw(st.sampled_from(["\n", ":", " ", "  x: 1\n", "[", "'", "\t", "- ", "&a ", "*a"])) + text[i:]
    return text[:i] + text[i + draw(st.integers(1, 40)) :]


@fuzz(300)
@given(source=config_inputs())
def test_parse_config_raises_only_config_error(source: str | bytes) -> None:
    try:
        config = parse_config(source)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(problem, str) and problem for problem in exc.problems)
    else:
        assert isinstance(config, Config)


@pytest.mark.parametrize("source", ["[" * 5_000, "{a: " * 3_000, "- " * 3_000 + "x"], ids=["flow-list", "flow-map", "block-list"])
def test_parse_config_reports_deep_nesting_as_config_error(source: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(source)


# ---- feature hashing ----------------------------------------------------------------------------

SPEC = FeatureSpec(context_dim=16, action_dim=8, seed=7)


@fuzz(200)
@given(context=contexts(surrogates=True, exotic=True))
def test_hashing_any_context_gives_a_finite_vector(context: dict[str, Any]) -> None:
    vec = Hasher(SPEC).context(context)
    assert vec.shape == (SPEC.context_dim,) and vec.dtype == np.float32 and np.isfinite(vec).all()


ACTION_SPECS = st.one_of(
    texts(surrogates=True),
    st.builds(p.Action, id=texts(surrogates=True), features=contexts(surrogates=True, exotic=True)),
    st.fixed_dictionaries({"id": texts(surrogates=True), "features": contexts(surrogates=True, exotic=True) | st.none()}),
)


@fuzz(150)
@given(actions=st.lists(ACTION_SPECS, max_size=5))
def test_hashing_any_actions_gives_finite_rows(actions: list[Any]) -> None:
    rows = Hasher(SPEC).actions(actions)
    assert rows.shape == (len(actions), SPEC.action_dim) and np.isfinite(rows).all()


@pytest.mark.parametrize("shape", ["dict", "list", "mixed"])
def test_hashing_survives_nesting_past_the_recursion_limit(shape: str) -> None:
    # flatten recursed once per level and hit the recursion limit at about 500 levels,
    # well inside what the decoder accepts; it now stops at features.MAX_DEPTH
    deep = nest(1.0, 100_000, shape)
    hasher = Hasher(SPEC)
    vec = hasher.context({"top": 2.0, "deep": deep})
    assert np.isfinite(vec).all()
    assert np.array_equal(vec, hasher.context({"top": 2.0}))  # what lies past the bound is skipped
    rows = hasher.actions([p.Action(id="a", features={"deep": deep}), {"id": "b", "features": {"deep": deep}}])
    assert np.isfinite(rows).all()


def test_hashing_keeps_features_up_to_the_depth_bound() -> None:
    within = dict(F.flatten({"a": nest(3.0, F.MAX_DEPTH, "dict")}))
    assert within == {"a" + ".k" * F.MAX_DEPTH: pytest.approx(math.log1p(3.0))}
    assert dict(F.flatten({"a": nest(3.0, F.MAX_DEPTH + 1, "dict")})) == {}
    assert dict(F.flatten({"a": nest(3.0, F.MAX_DEPTH, "list")})) == {"a" + "[0]" * F.MAX_DEPTH: pytest.approx(math.log1p(3.0))}


# ---- the store ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with Store(tmp_path_factory.mktemp("fuzz-store") / "fuzz.duckdb") as s:
        yield s


def _stored(store: Store, table: str, event_id: str) -> int:
    with store._lock:  # the store's one connection; reading through it sees every commit
        (n,) = store._con.execute(f"SELECT count(*) FROM {table} WHERE id = ?", [event_id]).fetchone()
    return n


TABLE = {p.Decision: "decisions", p.Outcome: "outcomes", p.Step: "steps", p.Event: "events", p.EpisodeEnd: "events"}


@fuzz(150)
@given(data=st.data())
def test_store_accepts_every_event_the_decoder_accepts(store: Store, data: st.DataObject) -> None:
    frames = data.draw(st.lists(st.sampled_from(FRAMINGS).flatmap(lambda f: st.tuples(st.just(f), message_payloads(f, experience_only=True))), min_size=1, max_size=5))
    events, dead = [], []
    for framing, payload in frames:
        got = _check_decoded(payload, framing)
        if isinstance(got, FrameError):
            dead.append(DeadLetter(received_at=time.time(), peer_uid=2**32 - 1, peer_pid=None, code=got.code,
                                   reason=got.reason, raw=payload[:4096], raw_size=len(payload)))
        else:
            assert isinstance(got, p.EXPERIENCE_TYPES)
            events.append(got)
    if dead:
        store.dead_letter(dead)
    result = store.write(events, time.time())
    assert result.inserted + result.duplicates == len(events)
    for ev in events:
        if ev.id is not None:
            assert _stored(store, TABLE[type(ev)], ev.id) == 1


def test_store_keeps_odd_values_a_peer_can_send(store: Store) -> None:
    ext = msgspec.msgpack.Ext(1, b"\x00")
    deep = nest(ext, 950, "mixed")  # about as deep as the decoder goes, with what JSON cannot hold at the bottom
    events = [
        p.Event(agent="a", kind="k", id="odd-deep-ext", data=deep),
        p.Event(agent="a", kind="k", id="odd-keys", data={(1, 2): ext, b"k": [math.nan, -math.inf], 1.5: 2**64 - 1}),
        p.Decision(id="odd-decision", agent="\x00", context={"deep": nest(ext, 950, "dict"), "big": 10**300, "nan": math.nan},
                   actions=["a", p.Action(id="b", features={"f": deep})], chosen="a", prob=1.0),
        p.Step(agent="a", episode="e", index=2**31 - 1, observation={"o": deep, "inf": -math.inf}, action="\U0010ffff", id="odd-step"),
    ]
    result = store.write(events, time.time())
    assert result.inserted == 4
    with store._lock:
        (text,) = store._con.execute("SELECT CAST(data AS VARCHAR) FROM events WHERE id = 'odd-keys'").fetchone()
    ext_json = {"msgpack_ext": 1, "data": "AA=="}  # code and base64 data
    assert msgspec.json.decode(text) == {"(1, 2)": ext_json, "b'k'": [None, None], "1.5": 2**64 - 1}
    with store._lock:
        (actions,) = store._con.execute("SELECT CAST(actions AS VARCHAR) FROM decisions WHERE id = 'odd-decision'").fetchone()
    assert msgspec.json.decode(actions)[1]["id"] == "b"  # an Action stays a mapping, not its repr

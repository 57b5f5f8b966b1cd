"""Wire messages and framing: round trips, validation errors, and the sans-IO FrameReader."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import msgspec
import pytest

from reflexd.errors import FrameError, FrameTooLarge
from reflexd.wire import framing as fr
from reflexd.wire import protocol as p

FRAMINGS = [fr.JSON, fr.MSGPACK]

CTX: dict[str, Any] = {"task": "code review", "tokens": 1234, "flags": [True, False], "nested": {"a": 1.5, "b": None}}

INBOUND: list[msgspec.Struct] = [
    p.Decision(
        id="d1",
        agent="router",
        context=CTX,
        actions=["small", p.Action(id="large", features={"cost": 3.5, "tags": ["slow"]})],
        chosen="large",
        prob=0.25,
        probs=[0.75, 0.25],
        model_version="v0003",
        strategy="softmax",
        ts=1700000000.5,
    ),
    p.Decision(id="d2", agent="a", context={}, actions=["x"], chosen="x", prob=1.0),
    p.Decision(id="d3", agent="a", context={}, actions=["x"], chosen="x", prob=1.0, episode="e1"),
    p.Outcome(decision_id="d1", reward=-0.5, id="o1", agent="router", ts=1.0),
    p.Outcome(decision_id="d1", reward=2.0),
    p.Step(agent="bot", episode="e1", index=3, observation={"pos": [1, 2]}, action="left", reward=1.0, done=True),
    p.Event(agent="bot", kind="error", data={"msg": "boom", "n": [1, 2, 3]}),
    p.Event(agent="bot", kind="metric"),
    p.EpisodeEnd(agent="bot", episode="e1", reward=1.5, id="end-e1", ts=2.0),
    p.EpisodeEnd(agent="bot", episode="e2"),
    p.Flush(req=7),
    p.Decide(agent="router", context=CTX, actions=[p.Action(id="a"), "b"], id="x", req="r1"),
    p.Decide(agent="feed", context=CTX, actions=["a", "b", "c"], slots=2),
    p.Decide(agent="coder", context=CTX, actions=["plan", "edit"], episode="t9", req=3),
    p.StatusRequest(),
    p.ModelsRequest(req=1),
    p.Promote(version="v0002", req=2),
    p.Rollback(),
    p.Train(req="t"),
    p.Forget(agent="router", req="f"),
    p.Adopt(manifest=b'{"version": "fleet-1"}', model=bytes(range(256)) * 3, source="/srv/fleet/m1", req="a"),
    p.Decide(agent="router", context=CTX, actions=["a", "b"], log=False, req=2),
    p.Explain(agent="router", context=CTX, actions=["a", p.Action(id="b", features={"cost": 1})], top=3, req="e"),
    p.Evaluate(policies=["v0003", "action:a", "file:/tmp/p.ndjson", "v0003@epsilon=0.05"], agent="router", since=1.0, req="v"),
    p.Snapshot(archive=False, req="s"),
    p.Release(id="0123456789abcdef0123456789abcdef", req=2),
    p.Release(id="0123456789abcdef0123456789abcdef", renew=True),
    p.InsightsRequest(agent="router", since=1.0, now=True, req="i"),
    p.Learned(agent="router", decision="d1", action="large", base="v0003", beside=True, index=[3, 129], value=[1.0, 0.42], target=1.0),
    p.Learned(agent="router", decision="d2", action="small", base=None, beside=False, index=[3], value=[1.0], target=0.0, prior_mean=0.6),
    p.LearningsRequest(agent="router", after=120, req="l"),
]

REPLIES: list[msgspec.Struct] = [
    p.Ack(count=12, req=7),
    p.Error(code="invalid", message="bad frame", seq=4, req=None),
    p.Decided(id="d", action="a", prob=0.5, model_version=None, strategy="default", req=3),
    p.DecidedSlate(
        slate="s",
        slots=[p.SlotDecided(id="d0", slot=0, action="b", prob=0.5, model_version=None, strategy="default")],
        req=4,
    ),
    p.StatusReply(
        version="0.1.0",
        pid=42,
        uptime=1.5,
        state_dir="/var/lib/reflexd",
        socket="/run/reflexd/reflexd.sock",
        ingest={"received": 1},
        backlog=0,
        experience={"decisions": 3},
        model={"version": "v0001"},
        trainer={"state": "idle"},
        storage={},
        req=9,
    ),
    p.ModelsReply(current="v0001", models=[{"version": "v0001"}]),
    p.Done(message="promoted v0002"),
    p.Scored(id=None, actions=["a", "b"], scores=None, spread=None, probs=[0.5, 0.5], model_version=None, strategy="default"),
    p.Scored(id="x", actions=["a"], scores=[0.25], spread=[0.0], probs=[1.0], model_version="v0001", strategy="softmax", req=1),
    p.Explanation(
        agent="router",
        actions=[p.ActionExplained(id="a", score=1.5, spread=0.1, prob=0.9), p.ActionExplained(id="b", score=0.5, spread=0.2, prob=0.1)],
        chosen="a",
        runner_up="b",
        keys=[p.KeyEffect(key="user.tier", score=0.75, margin=0.5, best_without="b")],
        model_version="v0002",
        strategy="squarecb",
        req="e",
    ),
    p.Evaluation(
        decisions=2, dropped=0, agent=None, since=None, until=2.5, estimator="dr", reward_model="v0003", confidence=0.95,
        reward_min=0.0, reward_max=1.0, req="v",
        rows=[
            p.PolicyValue(
                policy="action:a", kind="action", ess=1.5, agreement=0.5,
                value=p.Interval(value=0.5, stderr=0.1, lower=-0.1, upper=0.7, bounded_lower=0.0, bounded_upper=0.7, clipped=True),
                ips=p.Interval(value=0.5, stderr=0.1, lower=0.3, upper=0.7, bounded_lower=0.3, bounded_upper=0.7, clipped=False),
            )
        ],
        discovery=p.Recommendation(model="v0003", estimator="dr", policy=None, value=None, reason="none", candidates=[]),
    ),
    p.SnapshotTaken(
        id="0123456789abcdef0123456789abcdef", directory="/var/lib/reflexd/snapshots/0123456789abcdef0123456789abcdef",
        taken_at=10.5, expires=910.5, tables={"decisions": "/s/decisions.parquet"}, rows={"decisions": 3},
        archive={"decisions": "/s/archive/decisions"}, linked=True,
        rewards={"": p.RewardRule(wait_window=30.0, default=0.0, aggregation="sum")}, req="s",
    ),
    p.Learnings(
        updates=[p.Learned(agent="router", decision="d1", action="a", base=None, beside=False, index=[0], value=[1.0], target=0.5)],
        next=121, missed=3, req="l",
    ),
    p.Insights(run=None, req="i"),
    p.Insights(
        run={"id": "r1", "at": 10.0, "experiences": 3},
        rules=[{"agent": "router", "action": "a", "baseline": "b", "when": [{"feature": "task", "op": "==", "value": "code"}],
                "lift": 0.2, "ci": [0.1, 0.3], "support": 300, "status": "published"}],
        summary={"rules_published": 1},
    ),
]


def _frames(framing: fr.Framing, data: bytes, max_bytes: int = 1 << 20) -> list[bytes | FrameError]:
    reader = fr.FrameReader(framing, max_bytes)
    return list(reader.feed(data))


# ---- round trips ----------------------------------------------------------------------------


def test_every_message_type_is_covered() -> None:
    inbound_types = set(p.Inbound.__args__)  # type: ignore[attr-defined]
    reply_types = set(p.Reply.__args__)  # type: ignore[attr-defined]
    assert {type(m) for m in INBOUND} == inbound_types
    assert {type(m) for m in REPLIES} == reply_types


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("msg", INBOUND, ids=lambda m: type(m).__name__)
def test_inbound_round_trip(framing: fr.Framing, msg: msgspec.Struct) -> None:
    frames = _frames(framing, fr.encode_frame(msg, framing))
    assert len(frames) == 1 and isinstance(frames[0], bytes)
    decoded = fr.decode_inbound(frames[0], framing)
    assert type(decoded) is type(msg)
    assert decoded == msg


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("msg", REPLIES, ids=lambda m: type(m).__name__)
def test_reply_round_trip(framing: fr.Framing, msg: msgspec.Struct) -> None:
    frames = _frames(framing, fr.encode_frame(msg, framing))
    assert len(frames) == 1 and isinstance(frames[0], bytes)
    decoded = fr.decode_reply(frames[0], framing)
    assert type(decoded) is type(msg)
    assert decoded == msg


@pytest.mark.parametrize("framing", FRAMINGS)
def test_many_frames_in_one_buffer(framing: fr.Framing) -> None:
    data = fr.encode_frames(INBOUND, framing)
    frames = _frames(framing, data)
    assert [fr.decode_inbound(f, framing) for f in frames] == INBOUND  # type: ignore[arg-type]


def test_json_frame_is_one_line_with_type_tag() -> None:
    frame = fr.encode_frame(p.Outcome(decision_id="d", reward=1.0), fr.JSON)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert json.loads(frame)["type"] == "outcome"


def test_msgpack_frame_has_length_prefix() -> None:
    frame = fr.encode_frame(p.Flush(), fr.MSGPACK)
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    assert frame[0] == 0


def test_actions_as_strings_and_structs() -> None:
    raw = b'{"type":"decide","agent":"a","context":{},"actions":["x",{"id":"y","features":{"cost":2}},{"id":"z"}]}'
    msg = fr.decode_inbound(raw, fr.JSON)
    assert isinstance(msg, p.Decide)
    assert msg.actions[0] == "x"
    assert msg.actions[1] == p.Action(id="y", features={"cost": 2})
    assert msg.actions[2] == p.Action(id="z", features={})


def test_action_with_unknown_field_rejected() -> None:
    raw = b'{"type":"decide","agent":"a","context":{},"actions":[{"id":"y","cost":2}]}'
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(raw, fr.JSON)
    assert "cost" in str(info.value)


def test_empty_actions_rejected() -> None:
    raw = b'{"type":"decide","agent":"a","context":{},"actions":[]}'
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(raw, fr.JSON)
    assert "actions" in str(info.value)


# ---- validation errors ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
def test_unknown_type_rejected(framing: fr.Framing) -> None:
    obj = {"type": "teleport", "agent": "a"}
    payload = json.dumps(obj).encode() if framing == fr.JSON else msgspec.msgpack.encode(obj)
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(payload, framing)
    assert info.value.code == "invalid"
    assert "teleport" in str(info.value) or "type" in str(info.value)


def test_missing_type_rejected() -> None:
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(b'{"decision_id":"d","reward":1}', fr.JSON)
    assert "type" in str(info.value)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"type": "outcome", "reward": 1.0}, "decision_id"),
        ({"type": "outcome", "decision_id": "d"}, "reward"),
        ({"type": "decision", "id": "d", "agent": "a", "context": {}, "actions": ["x"], "chosen": "x"}, "prob"),
        ({"type": "step", "agent": "a", "episode": "e", "observation": {}, "action": "l"}, "index"),
        ({"type": "promote"}, "version"),
    ],
)
@pytest.mark.parametrize("framing", FRAMINGS)
def test_missing_required_field_named(framing: fr.Framing, obj: dict[str, Any], field: str) -> None:
    payload = json.dumps(obj).encode() if framing == fr.JSON else msgspec.msgpack.encode(obj)
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(payload, framing)
    assert f"`{field}`" in str(info.value)
    assert info.value.code == "invalid"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_unknown_field_named(framing: fr.Framing) -> None:
    obj = {"type": "outcome", "decision_id": "d", "reward": 1.0, "surprise": 1}
    payload = json.dumps(obj).encode() if framing == fr.JSON else msgspec.msgpack.encode(obj)
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(payload, framing)
    assert "surprise" in str(info.value)


@pytest.mark.parametrize("prob", [0.0, -0.1, 1.0000001, 2.0])
def test_prob_outside_unit_interval_rejected(prob: float) -> None:
    obj = {"type": "decision", "id": "d", "agent": "a", "context": {}, "actions": ["x"], "chosen": "x", "prob": prob}
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(json.dumps(obj).encode(), fr.JSON)
    assert "prob" in str(info.value)


@pytest.mark.parametrize("prob", [1e-9, 0.5, 1.0])
def test_prob_inside_unit_interval_accepted(prob: float) -> None:
    obj = {"type": "decision", "id": "d", "agent": "a", "context": {}, "actions": ["x"], "chosen": "x", "prob": prob}
    msg = fr.decode_inbound(json.dumps(obj).encode(), fr.JSON)
    assert isinstance(msg, p.Decision) and msg.prob == prob


def test_empty_id_rejected() -> None:
    with pytest.raises(FrameError):
        fr.decode_inbound(b'{"type":"outcome","decision_id":"","reward":1}', fr.JSON)


def test_malformed_json_is_malformed_not_invalid() -> None:
    with pytest.raises(FrameError) as info:
        fr.decode_inbound(b'{"type": "outcome", ', fr.JSON)
    assert info.value.code == "malformed"


def test_decode_reply_rejects_garbage() -> None:
    with pytest.raises(FrameError):
        fr.decode_reply(b'{"type":"nope"}', fr.JSON)


# ---- FrameReader ------------------------------------------------------------------------------


def _feed_chunks(reader: fr.FrameReader, data: bytes, sizes: list[int]) -> list[bytes | FrameError]:
    out: list[bytes | FrameError] = []
    pos = 0
    for size in sizes:
        out.extend(reader.feed(data[pos : pos + size]))
        pos += size
    out.extend(reader.feed(data[pos:]))
    return out


def _random_sizes(rng: random.Random, total: int, biggest: int) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.randint(0, biggest))
    return sizes


@pytest.mark.parametrize("framing", FRAMINGS)
def test_byte_by_byte_gives_same_frames(framing: fr.Framing) -> None:
    data = fr.encode_frames(INBOUND, framing)
    whole = _frames(framing, data)
    reader = fr.FrameReader(framing, 1 << 20)
    pieces = _feed_chunks(reader, data, [1] * len(data))
    assert pieces == whole
    assert len(whole) == len(INBOUND)
    assert reader.pending == 0


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_chunks_give_same_frames(framing: fr.Framing, seed: int) -> None:
    data = fr.encode_frames(INBOUND * 3, framing)
    whole = _frames(framing, data)
    rng = random.Random(seed)
    reader = fr.FrameReader(framing, 1 << 20)
    pieces = _feed_chunks(reader, data, _random_sizes(rng, len(data), 97))
    assert pieces == whole
    assert len(pieces) == 3 * len(INBOUND)


@pytest.mark.parametrize("framing", FRAMINGS)
def test_incomplete_frame_is_held_back(framing: fr.Framing) -> None:
    frame = fr.encode_frame(p.Outcome(decision_id="d", reward=1.0), framing)
    reader = fr.FrameReader(framing, 1 << 20)
    assert list(reader.feed(frame[:-1])) == []
    assert reader.pending == len(frame) - 1
    got = list(reader.feed(frame[-1:]))
    assert len(got) == 1 and fr.decode_inbound(got[0], framing) == p.Outcome(decision_id="d", reward=1.0)  # type: ignore[arg-type]


def _json_with_long_line(limit: int) -> tuple[bytes, bytes, bytes]:
    good1 = fr.encode_frame(p.Outcome(decision_id="before", reward=1.0), fr.JSON)
    long = fr.encode_frame(p.Event(agent="a", kind="k", data="x" * (3 * limit)), fr.JSON)
    good2 = fr.encode_frame(p.Outcome(decision_id="after", reward=2.0), fr.JSON)
    assert len(good1) < limit and len(good2) < limit and len(long) > 3 * limit
    return good1, long, good2


def _summarise(items: list[bytes | FrameError]) -> list[Any]:
    return [("too_large" if isinstance(x, FrameTooLarge) else type(x).__name__) if isinstance(x, FrameError) else x for x in items]


def test_json_overlong_line_reported_once_and_skipped() -> None:
    limit = 200
    good1, long, good2 = _json_with_long_line(limit)
    data = good1 + long + good2
    expected = [good1[:-1], "too_large", good2[:-1]]
    # in one piece
    assert _summarise(_frames(fr.JSON, data, limit)) == expected
    # byte by byte (the line is detected before its newline arrives)
    reader = fr.FrameReader(fr.JSON, limit)
    assert _summarise(_feed_chunks(reader, data, [1] * len(data))) == expected
    assert not reader.fatal
    # random chunk sizes
    for seed in range(5):
        reader = fr.FrameReader(fr.JSON, limit)
        got = _feed_chunks(reader, data, _random_sizes(random.Random(seed), len(data), 3 * limit))
        assert _summarise(got) == expected, seed
        assert reader.pending == 0


def test_json_overlong_line_error_carries_sizes() -> None:
    limit = 200
    _, long, _ = _json_with_long_line(limit)
    (err,) = _frames(fr.JSON, long, limit)
    assert isinstance(err, FrameTooLarge)
    assert err.limit == limit and err.size > limit and err.code == "too_large"


def test_a_json_line_on_a_msgpack_connection_is_told_why_it_reads_as_too_large() -> None:
    reader = fr.FrameReader(fr.MSGPACK, 1 << 20)
    first = fr.encode_frame(p.Flush(req=1), fr.MSGPACK)  # its first byte, 0, made the connection msgpack
    assert list(reader.feed(first)) == [first[4:]]
    (err,) = reader.feed(b'{"type":"flush"}\n')
    assert isinstance(err, FrameTooLarge) and reader.fatal
    assert str(err).startswith("frame of 2065855609 bytes exceeds the limit") and "msgpack-framed" in str(err)
    assert err.reason == str(err)
    (plain,) = fr.FrameReader(fr.MSGPACK, 10).feed(b"\x00\x00\x01\x00")
    assert "msgpack-framed" not in str(plain)  # an oversize prefix that is no JSON line is only too large


def test_json_line_of_exactly_the_limit_accepted() -> None:
    line = b'{"type":"flush","req":"' + b"a" * 50 + b'"}'
    assert _frames(fr.JSON, line + b"\n", len(line)) == [line]
    err = _frames(fr.JSON, line + b"\n", len(line) - 1)
    assert len(err) == 1 and isinstance(err[0], FrameTooLarge)


def test_json_blank_lines_ignored() -> None:
    frame = fr.encode_frame(p.Flush(req=1), fr.JSON)
    data = b"\n\n   \n" + frame + b"\r\n\t\n" + frame + b"\n"
    assert _frames(fr.JSON, data) == [frame[:-1], frame[:-1]]


def test_msgpack_oversize_prefix_is_fatal() -> None:
    limit = 1000
    good = fr.encode_frame(p.Flush(req=1), fr.MSGPACK)
    oversize = struct.pack(">I", limit + 1) + b"\x00" * 10
    reader = fr.FrameReader(fr.MSGPACK, limit)
    got = list(reader.feed(good + oversize + good))
    assert got[0] == good[4:]
    assert len(got) == 2 and isinstance(got[1], FrameTooLarge)
    assert got[1].size == limit + 1 and got[1].limit == limit
    assert reader.fatal
    # nothing more comes out, however valid
    assert list(reader.feed(good * 3)) == []
    assert reader.pending == 0


def test_msgpack_prefix_at_limit_accepted() -> None:
    body = msgspec.msgpack.encode(p.Flush(req="x" * 20))
    frame = struct.pack(">I", len(body)) + body
    reader = fr.FrameReader(fr.MSGPACK, len(body))
    assert list(reader.feed(frame)) == [body]
    assert not reader.fatal


def test_framing_of_first_byte() -> None:
    assert fr.framing_of(0) == fr.MSGPACK
    assert fr.framing_of(ord("{")) == fr.JSON
    assert fr.framing_of(fr.encode_frame(p.Flush(), fr.MSGPACK)[0]) == fr.MSGPACK
    assert fr.framing_of(fr.encode_frame(p.Flush(), fr.JSON)[0]) == fr.JSON


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"chosen": "z"}, "not among the actions"),
        ({"probs": [0.5]}, "1 entries for 2 actions"),
        ({"probs": [0.7, 0.7]}, "summing to 1"),
        ({"probs": [0.0, 1.0]}, r"prob 0.5 is not the chosen action's probability in probs \(0.0\)"),
        ({"probs": [0.9, 0.1]}, r"prob 0.5 is not the chosen action's probability in probs \(0.9\)"),
        ({"actions": ["x", "x"], "probs": [0.5, 0.5]}, "the actions must have distinct ids; 'x' is given twice"),
        ({"actions": ["x", {"id": "x", "features": {}}]}, "'x' is given twice"),
        ({"ts": float("nan")}, "ts must be"),
    ],
)
def test_inconsistent_decisions_are_refused_with_the_reason(fields: dict, reason: str) -> None:
    base = {"type": "decision", "id": "d", "agent": "a", "context": {}, "actions": ["x", "y"], "chosen": "x", "prob": 0.5}
    frame = msgspec.msgpack.encode({**base, **fields})  # msgpack carries NaN, which JSON cannot
    with pytest.raises(FrameError, match=reason):
        fr.decode_inbound(frame, "msgpack")


def test_a_logged_probability_may_differ_from_probs_by_a_loggers_rounding() -> None:
    base = {"type": "decision", "id": "d", "agent": "a", "context": {}, "actions": ["x", "y", "z"], "chosen": "x"}
    frame = msgspec.json.encode({**base, "prob": 1 / 3, "probs": [0.333, 0.333, 0.334]})
    assert fr.decode_inbound(frame, "json").prob == 1 / 3


@pytest.mark.parametrize("kind", ["outcome", "step"])
def test_non_finite_rewards_are_refused(kind: str) -> None:
    msg = {"type": "outcome", "decision_id": "d", "reward": float("inf")} if kind == "outcome" else {
        "type": "step", "agent": "a", "episode": "e", "index": 0, "observation": {}, "action": "x", "reward": float("nan")
    }
    with pytest.raises(FrameError, match="reward must be a finite number"):
        fr.decode_inbound(msgspec.msgpack.encode(msg), "msgpack")


def test_a_reward_too_large_to_add_up_is_refused() -> None:
    frame = b'{"type":"outcome","decision_id":"d","reward":1e308}'
    with pytest.raises(FrameError, match=r"reward must be within ±1e\+15, not 1e\+308"):
        fr.decode_inbound(frame, fr.JSON)
    assert fr.decode_inbound(b'{"type":"outcome","decision_id":"d","reward":-1e15}', fr.JSON).reward == -1e15


@pytest.mark.parametrize(
    ("ts", "said"),
    [(-1e300, "not -1e\\+300$"), (-1.0, "not -1$"), (1.7e12, "not 1.7e\\+12: it looks like milliseconds"), (1e20, "not 1e\\+20$")],
)
def test_a_timestamp_that_is_not_seconds_since_the_epoch_is_refused(ts: float, said: str) -> None:
    for kind in ('"type":"outcome","decision_id":"d","reward":1', '"type":"event","agent":"a","kind":"k"'):
        frame = ("{" + kind + f',"ts":{ts!r}' + "}").encode()
        with pytest.raises(FrameError, match="ts must be seconds since the epoch \\(0 to 1e\\+11\\), " + said):
            fr.decode_inbound(frame, fr.JSON)
    assert fr.decode_inbound(b'{"type":"event","agent":"a","kind":"k","ts":1796000000.5}', fr.JSON).ts == 1796000000.5


def test_a_slate_cannot_ask_for_more_slots_than_actions() -> None:
    with pytest.raises(FrameError, match=r"slots \(3\) must not exceed the 2 actions offered"):
        fr.decode_inbound(b'{"type":"decide","agent":"a","context":{},"actions":["x","y"],"slots":3}', fr.JSON)
    with pytest.raises(FrameError, match="slots"):
        fr.decode_inbound(b'{"type":"decide","agent":"a","context":{},"actions":["x"],"slots":0}', fr.JSON)


def test_a_decide_request_offering_an_id_twice_is_refused() -> None:
    with pytest.raises(FrameError, match="the actions must have distinct ids"):
        fr.decode_inbound(b'{"type":"decide","agent":"a","context":{},"actions":["x",{"id":"x"}]}', fr.JSON)
    with pytest.raises(FrameError, match="actions"):
        fr.decode_inbound(b'{"type":"decide","agent":"a","context":{},"actions":[]}', fr.JSON)
    with pytest.raises(FrameError, match="the actions must have distinct ids"):
        fr.decode_inbound(b'{"type":"explain","agent":"a","context":{},"actions":["x","x"]}', fr.JSON)


def test_an_online_update_with_a_prior_mean_that_is_not_a_finite_number_is_refused() -> None:
    msg = {
        "type": "learned", "agent": "a", "decision": "d", "action": "x", "base": None, "beside": False,
        "index": [0], "value": [1.0], "target": 1.0, "prior_mean": float("nan"),
    }
    with pytest.raises(FrameError, match="prior_mean must be a finite number"):
        fr.decode_inbound(msgspec.msgpack.encode(msg), "msgpack")


def test_an_online_update_without_a_prior_mean_is_sent_as_before_the_field() -> None:
    """Left out when None, so that a reflexd older than the field takes such an update."""
    fields = dict(agent="a", decision="d", action="x", base="v0001", beside=True, index=[0], value=[1.0], target=1.0)
    assert b"prior_mean" not in msgspec.json.encode(p.Learned(**fields))
    assert b'"prior_mean":0.5' in msgspec.json.encode(p.Learned(**fields, prior_mean=0.5))


def test_an_explain_without_a_default_is_sent_as_before_the_field() -> None:
    """Left out when None, so that a reflexd older than the field answers it."""
    fields = dict(agent="a", context={"k": 1}, actions=["x", "y"])
    assert b"default" not in msgspec.json.encode(p.Explain(**fields))
    assert b'"default":"y"' in msgspec.json.encode(p.Explain(**fields, default="y"))
    with pytest.raises(ValueError, match="default 'z' is not among the actions"):
        p.Explain(**fields, default="z")

"""Decide requests answered in batches: the same answers as one at a time, in order, per connection.

In-process, ``Chooser.choose_many`` is checked against one ``choose`` after another with the same
seed. Over the real socket, decide requests pipelined on one connection (and on several at once)
are checked against the live model's own distribution, request by request, with bad frames and
other messages between them answered in place.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest

from conftest import DaemonProcess, line_registry
from reflexd.deciding import exploring as exploration
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.scoring import ModelSource, Scorer
from reflexd.errors import RedactionError
from reflexd.registry import Registry
from reflexd.wire.connection import Connection
from reflexd.wire.framing import MSGPACK, FrameReader, decode_reply, encode_frame
from reflexd.wire.protocol import Ack, Decide, Decided, Decision, Error, Flush, Promote
from test_serving import ACTIONS, CTX, SOFTMAX, add_version, manifest_exploration

TIMEOUT = 30.0


def contexts(n: int) -> list[dict[str, Any]]:
    return [{**CTX, "tokens": 100 * i, "lang": ("en", "de", "ja")[i % 3], "retry": i % 2 == 0} for i in range(n)]


# ---- in-process: choose_many is choose, one after another ------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> ModelSource:
    registry = Registry(tmp_path / "models")
    add_version(registry, tmp_path, seed=1)  # softmax; the agent "router" explores by SquareCB
    registry.promote("v0001")
    source = ModelSource(registry)
    assert source.refresh() is True
    return source


def requests(n: int) -> list[tuple[str, dict[str, Any], list[Any], str | None]]:
    """Two agents exploring differently, three action-set sizes, with and without decision ids."""
    sets = [ACTIONS, ACTIONS[:2], ["solo"], ["a", "b", "c", "d"]]
    return [
        ("router" if i % 3 == 0 else "agent", ctx, sets[i % len(sets)], None if i % 4 == 1 else f"d{i}", None)
        for i, ctx in enumerate(contexts(n))
    ]


def same_choices(together: list[Any], one_by_one: list[Any], reqs: list[Any]) -> None:
    assert len(together) == len(one_by_one) == len(reqs)
    for got, want, (_, _, _, decision_id, _) in zip(together, one_by_one, reqs):
        if decision_id is None:  # a fresh id each: unique, and the rest equal
            assert got.id != want.id and len(got.id) == 32
            got = msgspec.structs.replace(got, id=want.id)
        assert got == want


def test_choose_many_makes_the_choices_choose_makes_with_the_same_seed(live: ModelSource) -> None:
    reqs = requests(40)
    one = Chooser(live, manifest_exploration, seed=5)
    many = Chooser(live, manifest_exploration, seed=5)
    want = [one.choose(*r) for r in reqs]
    same_choices(many.choose_many(reqs), want, reqs)
    assert {c.strategy for c in want} == {"softmax", "squarecb"} and len({c.action for c in want}) > 3
    # t (which drives SquareCB's gamma) and the random draws carry on alike in the next batch
    same_choices(many.choose_many(reqs[:7]), [one.choose(*r) for r in reqs[:7]], reqs[:7])
    assert many.choose_many([]) == []


def test_choose_many_without_a_model_uses_the_default_policy() -> None:
    reqs = requests(12)
    one = Chooser(None, manifest_exploration, seed=3)
    want = [one.choose(*r) for r in reqs]
    got = Chooser(None, manifest_exploration, seed=3).choose_many(reqs)
    same_choices(got, want, reqs)
    assert {(c.model_version, c.strategy) for c in got} == {(None, "default")}


class Flaky:
    """The live model, except that it cannot score a context holding "boom", nor a batch with one."""

    def __init__(self, real: Scorer) -> None:
        self.real = real
        self.version = real.version
        self.manifest = real.manifest

    def score(self, context: dict[str, Any], actions: list[Any]) -> Any:
        if "boom" in context:
            raise RuntimeError("onnxruntime: invalid dimensions")
        return self.real.score(context, actions)

    def score_many(self, contexts: list[dict[str, Any]], actions: list[list[Any]]) -> Any:
        if any("boom" in c for c in contexts):
            raise RuntimeError("onnxruntime: invalid dimensions")
        return self.real.score_many(contexts, actions)


def test_a_decision_the_model_fails_on_falls_back_alone(live: ModelSource) -> None:
    live.scorer = Flaky(live.scorer)  # type: ignore[arg-type,assignment]
    reqs = requests(9)
    reqs[4] = (reqs[4][0], {**reqs[4][1], "boom": 1}, ACTIONS, "d4", None)
    one = Chooser(live, manifest_exploration, seed=1)
    want = [one.choose(*r) for r in reqs]
    live.error = None
    got = Chooser(live, manifest_exploration, seed=1).choose_many(reqs)
    same_choices(got, want, reqs)
    assert [c.strategy == "default" for c in got] == [i == 4 for i in range(9)]
    assert "failed while deciding" in (live.error or "")


# ---- over the socket ----------------------------------------------------------------------------


def serve_model(d: DaemonProcess, tmp_path: Path) -> Scorer:
    """A softmax model made live in the daemon; the same model loaded here, to check its answers."""
    registry = line_registry(d, "agent")
    manifest = add_version(registry, tmp_path, seed=2, exploration_cfg=SOFTMAX)
    d.request(Promote(version=manifest.version, agent="agent"))
    _, model = registry.load(manifest.version)
    return Scorer(manifest, model)


def expected_prob(scorer: Scorer, decide: Decide, action: str) -> float:
    """The probability a single decide gives ``action``: softmax does not depend on t."""
    scores, spread = scorer.score(decide.context, decide.actions)
    p = exploration.distribution(SOFTMAX, scores.tolist(), spread.tolist(), 0)
    return p[[a if isinstance(a, str) else a["id"] for a in decide.actions].index(action)]


def replies_to(sock: socket.socket, n: int) -> list[Any]:
    reader = FrameReader(MSGPACK, 1 << 20)
    out: list[Any] = []
    while len(out) < n:
        data = sock.recv(1 << 16)
        assert data, f"connection closed after {len(out)} of {n} replies"
        out += [decode_reply(frame, MSGPACK) for frame in reader.feed(data)]
    return out


def nested(depth: int, leaf: object) -> object:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.e2e
def test_pipelined_decides_are_answered_in_order_with_bad_frames_answered_in_place(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory({"redaction": {"drop": ["deep.secret"]}})
    scorer = serve_model(d, tmp_path)
    actions = [{"id": "small"}, {"id": "medium"}, {"id": "large", "features": {"cost": 3.0}}]
    decides = [Decide(agent="agent", context=c, actions=actions, id=f"p{i}", req=i) for i, c in enumerate(contexts(60))]
    frames: list[bytes] = []
    expect: list[Any] = []  # per frame: the Decide it answers, an error code, "ack", or None (no reply)
    for i, decide in enumerate(decides):
        frames.append(encode_frame(decide, MSGPACK))
        expect.append(decide)
        if i == 10:
            frames.append(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # not msgpack
            expect.append("malformed")
        elif i == 20:
            frames.append(encode_frame(Decide(agent="agent", context={}, actions=[], req="empty"), MSGPACK))
            expect.append("invalid")  # decodes as a frame, fails validation: no actions
        elif i == 30:  # fine on the wire, but too deep to redact: refused without spoiling its batch
            deep = Decide(agent="agent", context={"deep": nested(150, {"secret": 1})}, actions=["p", "q"], req="deep")
            frames.append(encode_frame(deep, MSGPACK))
            deep_seq = len(expect)
            expect.append(RedactionError.code)  # the wire sends the stable code, not the class name
        elif i == 40:
            event = Decision(id="logged", agent="agent", context={}, actions=["p"], chosen="p", prob=1.0)
            frames.append(encode_frame(event, MSGPACK))
            expect.append(None)
        elif i == 50:
            frames.append(encode_frame(Flush(req="f"), MSGPACK))
            expect.append("ack")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(d.socket)
        sock.sendall(b"".join(frames))  # all at once: the daemon reads them in few, large chunks
        replies = replies_to(sock, sum(e is not None for e in expect))
    seqs = [seq for seq, e in enumerate(expect) if e is not None]
    for seq, want, reply in zip(seqs, [e for e in expect if e is not None], replies):
        if isinstance(want, Decide):
            assert isinstance(reply, Decided), (seq, reply)
            assert (reply.req, reply.id, reply.model_version, reply.strategy) == (want.req, want.id, "v0001", "softmax")
            assert reply.prob == expected_prob(scorer, want, reply.action)
        elif want == "ack":
            assert reply == Ack(count=1, req="f")
        else:
            assert isinstance(reply, Error) and reply.code == want and reply.seq == seq, (seq, reply)
    assert replies[seqs.index(deep_seq)].req == "deep"
    # a lone decide, request and reply, gives what the pipelined ones gave
    with Connection(d.socket, timeout=TIMEOUT) as conn:
        for decide in decides[:5]:
            reply = conn.request(msgspec.structs.replace(decide, id=decide.id + "-alone"))
            assert reply.model_version == "v0001" and reply.prob == expected_prob(scorer, decide, reply.action)
    # handed to ingest: the decisions made, the one logged, and the 2 unreadable frames as dead letters
    ingest = d.status().ingest
    assert ingest["received"] == len(decides) + 5 + 1 + 2 and ingest["unlogged_decisions"] == 0


@pytest.mark.e2e
def test_connections_deciding_at_once_each_get_their_own_replies_in_order(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory()
    scorer = serve_model(d, tmp_path)
    n_conns, per_conn, window = 8, 120, 6
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n_conns)

    def agent(k: int) -> None:
        try:
            decides = [
                Decide(agent="agent", context=c, actions=ACTIONS, id=f"c{k}-{i}", req=i)
                for i, c in enumerate(contexts(per_conn))
            ]
            got: list[Any] = []
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(d.socket)
                start.wait(TIMEOUT)
                for lo in range(0, per_conn, window):  # a window in flight, then its replies
                    sock.sendall(b"".join(encode_frame(m, MSGPACK) for m in decides[lo : lo + window]))
                    got += replies_to(sock, len(decides[lo : lo + window]))
            results[k] = list(zip(decides, got))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(k,)) for k in range(n_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 4)
    assert not errors, errors
    assert sorted(results) == list(range(n_conns))
    replies = {}
    for k, pairs in results.items():
        for decide, reply in pairs:
            assert isinstance(reply, Decided) and (reply.req, reply.id) == (decide.req, decide.id), (k, reply)
            assert reply.prob == expected_prob(scorer, decide, reply.action)
            replies[reply.id] = (reply.action, reply.prob, reply.model_version, reply.strategy)
    # every decision made is logged with what its reply said
    with Connection(d.socket, timeout=TIMEOUT) as conn:
        assert isinstance(conn.request(Flush(loaded=True)), Ack)
    d.stop()
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        rows = con.execute("select id, chosen, prob, model_version, strategy from decisions").fetchall()
    assert {row[0]: row[1:] for row in rows} == replies

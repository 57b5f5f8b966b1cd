"""Live fuzzing of the running daemon over its real socket: nothing lost, nobody let in.

More than 100,000 frames, valid events (each with a unique id) interleaved with malformed ones
(random bytes, truncated frames, wrong and unknown types, invalid UTF-8, nesting past the
recursion limit, lines over socket.max_frame_bytes), over several connections in both framings.
Afterwards the daemon still answers, every valid event is in DuckDB, and its counters reconcile
with what was sent. Then peers that misbehave at the connection level: far more connections than
allowed, an oversize length prefix, a peer that sends and leaves without reading its replies.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import duckdb
import msgspec
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.errors import FrameError
from reflexd.wire.connection import Connection
from reflexd.wire.framing import JSON, MSGPACK, FrameReader, decode_reply, encode_frame
from reflexd.wire.protocol import Ack, Error, Event, Flush, StatusRequest

pytestmark = pytest.mark.e2e

CAP = 4096  # socket.max_frame_bytes for these tests
FRAMES_PER_CONNECTION = 12_800
CONNECTIONS = [JSON, MSGPACK] * 4  # 8 connections, 102,400 frames, flushes not counted
TABLES = {"decision": "decisions", "outcome": "outcomes", "step": "steps", "event": "events"}


def _mp(obj: Any) -> bytes:
    body = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(body)) + body


def _mp_raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _frame(obj: Any, framing: str) -> bytes:
    return msgspec.json.encode(obj) + b"\n" if framing == JSON else _mp(obj)


@dataclass
class Plan:
    """One connection's bytes and what the daemon must make of them."""

    framing: str
    data: bytearray = field(default_factory=bytearray)
    frames: int = 0  # frames the daemon will count (blank NDJSON lines are not frames)
    bad: set[int] = field(default_factory=set)  # seq of every frame that must be answered with an error
    oversize: int = 0
    valid: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES.values(), 0))

    def add(self, frame: bytes, ok: bool, oversize: bool = False) -> None:
        if not ok:
            self.bad.add(self.frames)
        self.oversize += oversize
        self.frames += 1
        self.data += frame


def _valid(conn: int, i: int, framing: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    eid = f"lf{conn}-{i}"
    kind = ("decision", "outcome", "step", "event")[i % 4]
    if kind == "decision":
        msg = {"type": "decision", "id": eid, "agent": f"agent{conn % 3}", "context": {"x": i, "task": "fuzz the socket", "on": True},
               "actions": ["p", {"id": "q", "features": {"cost": 1.5}}], "chosen": rng.choice("pq"), "prob": 0.5}
    elif kind == "outcome":
        msg = {"type": "outcome", "id": eid, "decision_id": f"lf{conn}-{i - 1}", "reward": rng.random()}
    elif kind == "step":
        msg = {"type": "step", "id": eid, "agent": "bot", "episode": f"e{i // 100}", "index": i, "observation": {"pos": [i, -i]}, "action": "left"}
    else:
        # odd but valid: what each framing can carry that a store might choke on
        if framing == JSON:
            data = {"huge": 10**30, "neg": -(10**40), "text": "💥 \u202e\x00 é", "deep": _nest(rng.randint(1, 300))}
        else:
            data = {"nan": float("nan"), "inf": float("-inf"), "u64": 2**64 - 1, "bin": b"\x00\xff", 7: "int key",
                    "ext": msgspec.msgpack.Ext(5, b"x"), "deep": _nest(rng.randint(1, 300))}
        msg = {"type": "event", "id": eid, "agent": "bot", "kind": "odd", "data": data, "ts": 0.0 if framing == MSGPACK else 1.5}
    return TABLES[kind], msg


def _nest(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _bad_json(rng: random.Random, i: int) -> tuple[bytes, bool]:
    """One malformed NDJSON line (without its newline) and whether it is over the cap."""
    kind = rng.randrange(10)
    if kind == 0:
        line = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).replace(b"\n", b"?")
        return (line if line.strip() else b"?" + line), False
    if kind == 1:
        whole = msgspec.json.encode({"type": "decision", "id": f"t{i}", "agent": "a", "context": {"k": i}, "actions": ["p"], "chosen": "p", "prob": 1.0})
        return whole[: rng.randint(1, len(whole) - 1)], False
    if kind == 2:
        return msgspec.json.encode(rng.choice([
            {"type": "decision", "id": 5, "agent": "a", "context": {}, "actions": ["p"], "chosen": "p", "prob": 0.5},
            {"type": "outcome", "decision_id": "d", "reward": "high"},
            {"type": "decision", "id": "d", "agent": "a", "context": {}, "actions": [], "chosen": "p", "prob": 2.0},
            {"type": "event", "agent": "", "kind": "k"},
            {"type": "step", "agent": "a", "episode": "e", "index": 2**40, "observation": {}, "action": "x"},
            [1, 2, 3],
        ])), False
    if kind == 3:
        return msgspec.json.encode({"type": rng.choice(["launch", "DECISION", "", "ack", "error"]), "id": f"u{i}"}), False
    if kind == 4:
        return b'{"type":"event","agent":"\xff\xfe","kind":"k"}', False
    if kind == 5:
        depth = rng.randint(1_100, 1_900)  # past the recursion limit, under the cap
        return b'{"type":"event","agent":"a","kind":"k","data":' + b"[" * depth + b"]" * depth + b"}", False
    if kind == 6:
        return b'{"type":"outcome","decision_id":"d","reward":NaN}', False
    if kind == 7 and rng.random() < 0.25:
        return b'{"type":"event","agent":"a","kind":"k","data":"' + b"x" * rng.randint(CAP, 5 * CAP) + b'"}', True
    return b"{" * rng.randint(1, 5) + b'"type":', False


def _bad_msgpack(rng: random.Random, i: int) -> bytes:
    """One malformed length-prefixed msgpack frame (prefix included, never over the cap)."""
    kind = rng.randrange(8)
    if kind == 0:
        return _mp_raw(bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))))
    if kind == 1:
        whole = msgspec.msgpack.encode({"type": "decision", "id": f"t{i}", "agent": "a", "context": {"k": i}, "actions": ["p"], "chosen": "p", "prob": 1.0})
        return _mp_raw(whole[: rng.randint(1, len(whole) - 1)])
    if kind == 2:
        return _mp(rng.choice([
            {"type": "decision", "id": 5, "agent": "a", "context": {}, "actions": ["p"], "chosen": "p", "prob": 0.5},
            {"type": "outcome", "decision_id": "d", "reward": b"\x01"},
            {"type": "step", "agent": "a", "episode": "e", "index": 2**40, "observation": {}, "action": "x"},
            {"type": "event", "agent": "a", "kind": "k", "ts": "now"},
            {"type": "event", "agent": "a", "kind": "k", "ts": float("inf")},  # no time at all
            {"type": "outcome", "decision_id": "d", "reward": 1e300},  # two would add up to infinity
            "just a string",
        ]))
    if kind == 3:
        return _mp({"type": rng.choice(["launch", "flushh", 7]), "id": f"u{i}"})
    if kind == 4:  # strings that are not UTF-8
        return _mp_raw(b"\x84\xa4type\xa5event\xa5agent\xa3\xed\xa0\x80\xa4kind\xa1k\xa4data\xc0")
    if kind == 5:  # nesting past the recursion limit
        head = msgspec.msgpack.encode({"type": "event", "agent": "a", "kind": "k", "data": None})[:-1]
        return _mp_raw(head + b"\x91" * rng.randint(1_100, 3_000) + b"\x90")
    if kind == 6:  # a map key that is an array: legal msgpack, not a message
        return _mp_raw(b"\x81\x91\x01\x02")
    return _mp_raw(b"\xc1")  # a reserved byte


def build(conn: int, framing: str, n: int, seed: int) -> Plan:
    rng = random.Random(seed)
    plan = Plan(framing)
    i = 0
    while plan.frames < n:
        if plan.frames == 0 or rng.random() < 0.6:  # the first frame sets the framing: a valid one
            table, msg = _valid(conn, i, framing, rng)
            plan.add(_frame(msg, framing), ok=True)
            plan.valid[table] += 1
        elif framing == JSON:
            line, oversize = _bad_json(rng, i)
            plan.add(line + b"\n", ok=False, oversize=oversize)
            if rng.random() < 0.05:
                plan.data += rng.choice([b"\n", b"   \n", b"\r\n", b"\t\n"])  # blank: ignored, not a frame
        else:
            plan.add(_bad_msgpack(rng, i), ok=False)
        i += 1
    plan.data += encode_frame(Flush(req=f"end{conn}"), framing)
    return plan


@dataclass
class Result:
    errors: list[dict[str, Any]] = field(default_factory=list)
    ack: Any = None
    failure: str | None = None


def _run(path: str, plan: Plan, req: str, out: Result) -> None:
    """Send the plan in large writes while reading every reply, up to the flush's ack."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(path)

        def read() -> None:
            reader = FrameReader(plan.framing, 64 << 20)
            try:
                while out.ack is None:
                    data = s.recv(1 << 16)
                    if not data:
                        out.failure = "connection closed before the ack"
                        return
                    for frame in reader.feed(data):
                        assert not isinstance(frame, FrameError)
                        reply = decode_reply(frame, plan.framing)
                        if isinstance(reply, Error):
                            out.errors.append({"seq": reply.seq, "code": reply.code})
                        elif isinstance(reply, Ack) and reply.req == req:
                            out.ack = reply
            except OSError as exc:
                out.failure = f"reading replies: {exc}"

        reader_thread = threading.Thread(target=read, daemon=True)
        reader_thread.start()
        view = memoryview(plan.data)
        for start in range(0, len(view), 1 << 20):
            s.sendall(view[start : start + (1 << 20)])
        reader_thread.join(60)
        if reader_thread.is_alive():
            out.failure = "no ack within 60 s"


def test_live_fuzz_loses_nothing_and_counters_reconcile(daemon_factory) -> None:
    d = daemon_factory({"socket": {"max_frame_bytes": CAP}})
    plans = [build(c, framing, FRAMES_PER_CONNECTION, seed=1000 + c) for c, framing in enumerate(CONNECTIONS)]
    sent = sum(p.frames for p in plans)
    bad = sum(len(p.bad) for p in plans)
    valid = {t: sum(p.valid[t] for p in plans) for t in TABLES.values()}
    assert sent >= 100_000 and bad > 30_000 and sum(p.oversize for p in plans) > 100

    started = time.monotonic()
    results = [Result() for _ in plans]
    threads = [threading.Thread(target=_run, args=(d.socket, p, f"end{c}", o)) for c, (p, o) in enumerate(zip(plans, results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - started

    for c, (plan, out) in enumerate(zip(plans, results)):
        assert out.failure is None, f"connection {c} ({plan.framing}): {out.failure}\n{d.log()}"
        assert out.ack is not None, f"connection {c} ({plan.framing}): still waiting for its ack\n{d.log()}"
        assert out.ack.count == plan.frames - len(plan.bad), f"connection {c}: ack counts its accepted events"
        assert {e["seq"] for e in out.errors} == plan.bad and len(out.errors) == len(plan.bad), f"connection {c}: one error per bad frame, by seq"
        assert sum(e["code"] == "too_large" for e in out.errors) == plan.oversize

    # acknowledged means spooled; the store catches up behind
    wait_for(lambda: d.status().backlog == 0, 120, "the spool to be loaded into the store")
    status = d.status()  # still up, still answering
    ingest = status.ingest
    assert ingest["stored"] == sum(valid.values()), ingest
    assert ingest["duplicates"] == 0, ingest
    assert ingest["dead_letters"] == bad, ingest
    assert ingest["stored"] + ingest["duplicates"] + ingest["dead_letters"] == sent, ingest
    assert ingest["received"] == sent, ingest

    d.stop()
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        for table, n in valid.items():
            assert con.execute(f"SELECT count(*), count(DISTINCT id) FROM {table} WHERE id LIKE 'lf%'").fetchone() == (n, n), table
        assert con.execute("SELECT count(*) FROM dead_letters").fetchone() == (bad,)
        too_large = con.execute("SELECT count(*), min(raw_size) FROM dead_letters WHERE code = 'too_large'").fetchone()
        assert too_large[0] == sum(p.oversize for p in plans)
        assert too_large[1] > CAP, "an oversize frame's dead letter records its size"
        (odd,) = con.execute("SELECT CAST(data AS VARCHAR) FROM events WHERE kind = 'odd' AND CAST(data AS VARCHAR) LIKE '%u64%' LIMIT 1").fetchone()
    assert '"u64":18446744073709551615' in odd and '"nan":null' in odd
    print(f"\n{sent} frames ({bad} bad) over {len(plans)} connections in {elapsed:.1f} s")


def test_a_peer_that_leaves_without_reading_its_replies_loses_nothing(daemon: DaemonProcess) -> None:
    # A fire-and-forget sender: events with the odd bad line among them, then close without
    # reading. The daemon's error replies cannot be delivered; the events must still be taken in.
    n = 20_000
    lines = []
    for i in range(n):
        if i % 500 == 0:
            lines.append(b"not json\n")
        lines.append(msgspec.json.encode(Event(agent="ff", kind="k", id=f"ff{i}", data={"i": i})) + b"\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.connect(daemon.socket)
        s.sendall(b"".join(lines))
    total = n + n // 500

    def taken_in() -> bool:
        c = daemon.status().ingest
        return c["stored"] + c["dead_letters"] == total

    wait_for(taken_in, 30, f"all {total} frames stored or dead-lettered (now {daemon.status().ingest})")
    assert daemon.status().ingest["stored"] == n


def _drain_busy(socks: list[socket.socket], expect_closed: int, timeout: float) -> tuple[list[bytes], list[socket.socket]]:
    """Read every socket until ``expect_closed`` of them have closed, then a second more.

    Returns what each closed socket said, and the sockets still open.
    """
    sel = selectors.DefaultSelector()
    said: dict[socket.socket, bytes] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        said[s] = b""
    closed: list[bytes] = []
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if data:
                said[s] += data
            else:
                sel.unregister(s)
                closed.append(said.pop(s))
        if len(closed) >= expect_closed:
            deadline = min(deadline, time.monotonic() + 1.0)  # long enough to see any further closes
    sel.close()
    for s in said:
        s.setblocking(True)
    return closed, list(said)


def _request_on(s: socket.socket, msg: Any, framing: str) -> Any:
    s.sendall(encode_frame(msg, framing))
    reader = FrameReader(framing, 1 << 20)
    while True:
        frames = list(reader.feed(s.recv(1 << 16)))
        if frames:
            return decode_reply(frames[0], framing)


def test_connections_past_the_limit_are_turned_away_and_service_continues(daemon_factory) -> None:
    limit, extra = 20, 300
    d = daemon_factory({"socket": {"max_connections": limit, "reserved_connections": 0}})  # root: no extra slots
    socks = []
    try:
        for _ in range(limit + extra):
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.socket)
            socks.append(s)
        closed, held = _drain_busy(socks, expect_closed=extra, timeout=30)
        assert len(closed) == extra and len(held) == limit
        for said in closed:
            reply = msgspec.json.decode(said)
            assert reply["type"] == "error" and reply["code"] == "busy", said
        # the connections that got a slot are served normally, in either framing
        for i, s in enumerate(held):
            s.settimeout(30)
            framing = JSON if i % 2 else MSGPACK
            s.sendall(encode_frame(Event(agent="held", kind="k", id=f"held{i}"), framing))
            assert _request_on(s, Flush(req=i), framing) == Ack(count=1, req=i)
        status = _request_on(held[1], StatusRequest(req="st"), JSON)
        assert status.ingest["refused"] == extra and status.ingest["connections"] == limit
    finally:
        for s in socks:
            s.close()
    # once the held connections are gone, newcomers are served again
    wait_for(lambda: _status_or_none(d) is not None, 30, "a slot for a new client")
    with Connection(d.socket) as conn:
        conn.send([Event(agent="after", kind="k", id="after1"), Flush(req="after", loaded=True)])
        assert conn.receive() == Ack(count=1, req="after")
    assert d.status().ingest["stored"] == limit + 1


def _status_or_none(d: DaemonProcess) -> Any:
    try:
        return d.status()
    except Exception:  # a busy refusal while held connections are still closing
        return None


def test_an_oversize_length_prefix_closes_only_its_own_connection(daemon_factory) -> None:
    d = daemon_factory({"socket": {"max_frame_bytes": CAP}})
    with Connection(d.socket) as survivor:
        survivor.send([Event(agent="a", kind="k", id="before"), Flush(req=1)])
        assert survivor.receive() == Ack(count=1, req=1)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(d.socket)
            s.sendall(struct.pack(">I", CAP + 1) + b"\x00" * 64 + _mp({"type": "event", "agent": "a", "kind": "k", "id": "never"}))
            said = b""
            while chunk := s.recv(4096):
                said += chunk
        err = decode_reply(said[4:], MSGPACK)
        assert isinstance(err, Error) and err.code == "too_large" and err.seq == 0
        # the connection opened before it carries on
        survivor.send([Event(agent="a", kind="k", id="after"), Flush(req=2, loaded=True)])
        assert survivor.receive() == Ack(count=2, req=2)
    status = d.status()
    assert status.ingest["stored"] == 2 and status.ingest["dead_letters"] == 1
    d.stop()
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        assert con.execute("SELECT id FROM events ORDER BY id").fetchall() == [("after",), ("before",)]
        assert con.execute("SELECT code, raw_size FROM dead_letters").fetchall() == [("too_large", CAP + 1)]

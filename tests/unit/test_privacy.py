"""Privacy: redaction at ingest (drop and keyed hash), raw-free dead letters, and ``forget``."""

from __future__ import annotations

import hashlib
import hmac
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import msgspec
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.config import Config, RedactionConfig, load_config, parse_config, read_key
from reflexd.errors import ConfigError, RedactionError
from reflexd.service.redact import MAX_DEPTH, Redactor, canonical_json
from reflexd.service.spool import encode_line
from reflexd.service.store import Store
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Action, Decide, Decision, Done, Event, Flush, Forget, Outcome, Step

KEY = b"k" * 32
EMAIL = "alice.privacy@example.com"
PROMPT = "my bank password is hunter2"


def hashed(value: object, key: bytes = KEY) -> str:
    return "h:" + hmac.new(key, canonical_json(value), hashlib.sha256).hexdigest()[:32]


def decision(context: dict, actions: list | None = None, id: str = "d1", agent: str = "a", chosen: str = "p") -> Decision:
    return Decision(id=id, agent=agent, context=context, actions=actions or ["p", "q"], chosen=chosen, prob=0.5)


@pytest.fixture
def redactor() -> Redactor:
    return Redactor(drop=["prompt", "user.ssn"], hash=["user.email", "email"], key=KEY)


# ---- the Redactor ------------------------------------------------------------------------


def test_drop_and_hash_nested_paths_in_a_context(redactor: Redactor) -> None:
    context = {"user": {"email": EMAIL, "ssn": "123", "plan": "pro"}, "prompt": PROMPT, "task": "code"}
    before = msgspec.json.encode(context)
    out = redactor.apply(decision(context))
    assert out.context == {"user": {"email": hashed(EMAIL), "plan": "pro"}, "task": "code"}
    assert msgspec.json.encode(context) == before, "the input must not be modified"
    assert out.id == "d1" and out.actions == ["p", "q"] and out.chosen == "p"


def test_hash_format_is_h_and_32_hex_of_hmac_sha256_over_canonical_json(redactor: Redactor) -> None:
    value = redactor.hash_value(EMAIL)
    assert value == "h:" + hmac.new(KEY, b'"' + EMAIL.encode() + b'"', hashlib.sha256).hexdigest()[:32]
    assert len(value) == 34 and int(value[2:], 16) >= 0
    # canonical: key order does not matter, whitespace does not exist
    assert redactor.hash_value({"b": 1, "a": [1, 2]}) == redactor.hash_value({"a": [1, 2], "b": 1})
    assert canonical_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


def test_equal_values_hash_equally_and_different_values_differently(redactor: Redactor) -> None:
    a = redactor.apply(decision({"user": {"email": EMAIL}}, id="1")).context["user"]["email"]
    b = redactor.apply(decision({"user": {"email": EMAIL}}, id="2")).context["user"]["email"]
    c = redactor.apply(decision({"user": {"email": "bob@example.com"}}, id="3")).context["user"]["email"]
    assert a == b != c
    # the same value under another hashed path hashes the same too (one key, one function)
    assert redactor.apply(decision({"email": EMAIL})).context["email"] == a


def test_a_different_key_gives_a_different_hash() -> None:
    one = Redactor(hash=["email"], key=KEY).apply(decision({"email": EMAIL}))
    two = Redactor(hash=["email"], key=b"another key, 16+ bytes").apply(decision({"email": EMAIL}))
    assert one.context["email"] != two.context["email"]


def test_observation_of_a_step(redactor: Redactor) -> None:
    step = Step(agent="bot", episode="e", index=0, observation={"user": {"email": EMAIL, "x": 1}, "prompt": "p"}, action="l")
    out = redactor.apply(step)
    assert out.observation == {"user": {"email": hashed(EMAIL), "x": 1}}
    assert (out.agent, out.episode, out.action) == ("bot", "e", "l")


def test_event_data(redactor: Redactor) -> None:
    out = redactor.apply(Event(agent="a", kind="error", data={"prompt": PROMPT, "email": EMAIL, "code": 7}))
    assert out.data == {"email": hashed(EMAIL), "code": 7}
    # data that is not a mapping has no keys to match
    for data in ("plain text", 3, None, [1, 2]):
        ev = Event(agent="a", kind="k", data=data)
        assert redactor.apply(ev) is ev


def test_action_features_of_decisions_and_decides(redactor: Redactor) -> None:
    actions = ["plain", Action(id="mail", features={"email": EMAIL, "cost": 2}), Action(id="other", features={"cost": 1})]
    out = redactor.apply(decision({}, actions=actions, chosen="plain"))
    assert out.actions[0] == "plain"
    assert out.actions[1] == Action(id="mail", features={"email": hashed(EMAIL), "cost": 2})
    assert out.actions[2] is actions[2]  # untouched actions are not copied
    decide = Decide(agent="a", context={"prompt": PROMPT, "t": 1}, actions=actions, req=3)
    out = redactor.apply(decide)
    assert out.context == {"t": 1} and out.actions[1].features["email"] == hashed(EMAIL) and out.req == 3


def test_lists_on_the_way_are_searched_item_by_item() -> None:
    r = Redactor(drop=["messages.content"], hash=["people.email"], key=KEY)
    ctx = {"messages": [{"role": "user", "content": PROMPT}, {"role": "tool"}], "people": [[{"email": EMAIL}]]}
    out = r.apply(decision(ctx)).context
    assert out == {"messages": [{"role": "user"}, {"role": "tool"}], "people": [[{"email": hashed(EMAIL)}]]}


def test_hashing_a_mapping_hashes_it_whole_and_a_shorter_path_wins() -> None:
    r = Redactor(drop=["user.email"], hash=["user"], key=KEY)
    user = {"email": EMAIL, "plan": "pro"}
    assert r.apply(decision({"user": user})).context == {"user": hashed(user)}
    r = Redactor(drop=["user"], hash=["user.email"], key=KEY)
    assert r.apply(decision({"user": user, "x": 1})).context == {"x": 1}


def test_values_json_cannot_carry_are_hashed_too() -> None:
    r = Redactor(hash=["blob", "m"], key=KEY)
    out = r.apply(decision({"blob": b"\x00\x01", "m": {1: "int key"}})).context
    assert out["blob"].startswith("h:") and out["m"].startswith("h:")


def test_nothing_to_redact_returns_the_same_objects(redactor: Redactor) -> None:
    msgs = [
        decision({"user": {"plan": "pro"}, "x": [{"y": 1}]}, actions=["p", Action(id="q", features={"c": 1})]),
        Outcome(decision_id="d1", reward=1.0),
        Step(agent="b", episode="e", index=0, observation={"a": 1}, action="l"),
        Event(agent="a", kind="k", data={"n": 1}),
    ]
    assert all(redactor.apply(m) is m for m in msgs)


def test_no_op_fast_path() -> None:
    msgs = [decision({"prompt": PROMPT, "email": EMAIL}), Event(agent="a", kind="k", data={"prompt": 1})]
    for r in (Redactor(), Redactor.from_config(Config().redaction), Redactor.from_config(RedactionConfig(dead_letter_raw=False))):
        assert r.active is False
        assert all(r.apply(m) is m for m in msgs)
        assert r.apply_all(msgs) is msgs
        assert r.mapping(msgs[0].context) is msgs[0].context


def nested(depth: int, leaf: object = "x") -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_too_deep_to_search_is_refused_not_passed_through() -> None:
    r = Redactor(drop=["x"], hash=["h"], key=KEY)
    assert r.apply(Event(agent="a", kind="k", data=nested(MAX_DEPTH - 1, {"x": 1}))).data == nested(MAX_DEPTH - 1, {})
    for data in (nested(MAX_DEPTH + 5), nested(900)):
        with pytest.raises(RedactionError, match="nested more than") as info:
            r.apply(Event(agent="a", kind="k", data=data))
        assert info.value.code == "invalid"
    with pytest.raises(RedactionError, match="too deeply"):
        r.apply(decision({"h": nested(2000)}))
    # nothing configured: nothing is searched, so nothing is refused
    ev = Event(agent="a", kind="k", data=nested(900))
    assert Redactor().apply(ev) is ev


def test_hashing_needs_a_key() -> None:
    with pytest.raises(ValueError, match="key"):
        Redactor(hash=["email"])


# ---- config -------------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "hash.key"
    path.write_bytes(b"  " + KEY + b"\n\n")
    return path


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="test.yaml")
    return info.value.problems


def test_the_key_is_read_stripped_and_kept_out_of_the_config(key_file: Path) -> None:
    cfg = parse_config(f"redaction: {{drop: [prompt], hash: [user.email], key_file: {key_file}}}")
    assert read_key(cfg.redaction) == KEY
    assert KEY not in msgspec.json.encode(cfg)  # the config holds data only: its copies never carry the key
    r = Redactor.from_config(cfg.redaction)
    assert r.active
    assert r.apply(decision({"user": {"email": EMAIL}, "prompt": 1})).context == {"user": {"email": hashed(EMAIL)}}
    # the key lives outside the fields: not in equality, not in the encoded config the trainer gets
    assert cfg.redaction == RedactionConfig(drop=["prompt"], hash=["user.email"], key_file=str(key_file))
    assert KEY not in msgspec.json.encode(cfg)


def test_hash_without_key_file_is_named(tmp_path: Path) -> None:
    problems = problems_of("redaction: {hash: [user.email]}")
    assert len(problems) == 1 and problems[0].startswith("redaction.key_file:") and "required" in problems[0]


def test_short_key_is_named(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"  0123456789abcde\n")  # 15 once stripped
    problems = problems_of(f"redaction: {{hash: [email], key_file: {short}}}")
    assert len(problems) == 1 and problems[0].startswith("redaction.key_file:")
    assert "15 bytes" in problems[0] and "at least 16" in problems[0]


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    problems = problems_of(f"redaction: {{hash: [email], key_file: {tmp_path / 'absent.key'}}}")
    assert len(problems) == 1 and problems[0].startswith("redaction.key_file:") and "absent.key" in problems[0]
    # a key file that is given is checked even while nothing is hashed yet
    assert problems_of(f"redaction: {{key_file: {tmp_path / 'absent.key'}}}")[0].startswith("redaction.key_file:")


def test_bad_and_repeated_field_paths_are_named(key_file: Path) -> None:
    problems = problems_of(f"redaction: {{drop: [ok, 'a..b', ''], hash: [ok, x.], key_file: {key_file}}}")
    assert [p.split(":")[0] for p in problems] == [
        "redaction.drop.1",
        "redaction.drop.2",
        "redaction.hash.0",
        "redaction.hash.1",
    ]
    assert "already listed in redaction.drop" in problems[2]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("redaction: {drop: prompt}", "redaction.drop"),
        ("redaction: {drop: [1]}", "redaction.drop.0"),
        ("redaction: {dead_letter_raw: maybe}", "redaction.dead_letter_raw"),
        ("redaction: {salt: x}", "redaction"),
    ],
)
def test_type_errors_name_the_path(text: str, path: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1 and problems[0].split(":")[0] == path, problems


def test_relative_key_file_is_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "h.key").write_bytes(KEY)
    config = tmp_path / "reflexd.yaml"
    config.write_text("redaction: {hash: [email], key_file: keys/h.key}\n")
    assert read_key(load_config(config).redaction) == KEY


def test_check_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("redaction:\n  hash: [user.email]\n")
    proc = subprocess.run([sys.executable, "-m", "reflexd", "check-config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 78 and "redaction.key_file" in proc.stderr


# ---- end to end: the real daemon ----------------------------------------------------------


def stored_bytes(d: DaemonProcess) -> bytes:
    """Every byte the daemon wrote under its state directory (database, WAL, archive, runs)."""
    assert d.proc is not None and d.proc.poll() is not None, "stop the daemon first"
    return b"".join(p.read_bytes() for p in sorted(d.state_dir.rglob("*")) if p.is_file())


def query(d: DaemonProcess, sql: str) -> list[tuple]:
    d.stop()  # DuckDB allows one writer process; read the file once the daemon is gone
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.mark.e2e
def test_redacted_values_never_reach_the_disk(daemon_factory, key_file: Path) -> None:
    d = daemon_factory({"redaction": {"drop": ["prompt"], "hash": ["user.email"], "key_file": str(key_file)}})
    context = {"user": {"email": EMAIL, "plan": "plan-marker-7f3a"}, "prompt": PROMPT, "task": "chat"}
    actions = ["p", Action(id="q", features={"user": {"email": EMAIL}, "prompt": PROMPT})]
    with Connection(d.socket) as conn:
        conn.send([decision(context, actions, id=f"d{i}") for i in range(30)])
        conn.send([Step(agent="a", episode="e", index=0, observation=context, action="p")])
        conn.send([Event(agent="a", kind="log", data={"prompt": PROMPT, "user": {"email": EMAIL}})])
        decided = conn.request(Decide(agent="a", context=context, actions=actions))  # logged by the daemon
        conn.send([Flush(req=1)])
        assert conn.receive() == Ack(count=32, req=1)
    d.stop()
    raw = stored_bytes(d)
    assert b"plan-marker-7f3a" in raw, "control: an unredacted value is visible in the file bytes"
    assert EMAIL.encode() not in raw and b"alice.privacy" not in raw
    assert PROMPT.encode() not in raw and b"hunter2" not in raw
    assert hashed(EMAIL).encode() in raw
    assert EMAIL not in d.log() and "hunter2" not in d.log()

    rows = query(d, "select id, context->>'$.user.email', json_keys(context), actions from decisions order by id")
    assert len(rows) == 31 and decided.id in {r[0] for r in rows}
    for _, email, keys, stored_actions in rows:
        assert email == hashed(EMAIL)
        assert sorted(keys) == ["task", "user"]  # prompt dropped
        assert msgspec.json.decode(stored_actions)[1] == {"id": "q", "features": {"user": {"email": hashed(EMAIL)}}}
    (obs,) = query(d, "select observation from steps")[0]
    assert msgspec.json.decode(obs) == {"user": {"email": hashed(EMAIL), "plan": "plan-marker-7f3a"}, "task": "chat"}
    (data,) = query(d, "select data from events")[0]
    assert msgspec.json.decode(data) == {"user": {"email": hashed(EMAIL)}}


@pytest.mark.e2e
def test_redaction_follows_a_sighup_reload(daemon_factory, key_file: Path) -> None:
    d = daemon_factory()
    with Connection(d.socket) as conn:
        conn.send([decision({"email": "before.reload@example.com"}, id="before"), Flush()])
        assert isinstance(conn.receive(), Ack)
    d.write_config({**d.config, "redaction": {"hash": ["email"], "key_file": str(key_file)}})
    d.signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in d.log(), 30, "the reload")
    with Connection(d.socket) as conn:
        conn.send([decision({"email": EMAIL}, id="after"), Flush()])
        assert isinstance(conn.receive(), Ack)
    d.stop()
    raw = stored_bytes(d)
    assert b"before.reload@example.com" in raw  # stored before redaction was configured: not rewritten
    assert EMAIL.encode() not in raw
    assert query(d, "select id, context->>'$.email' from decisions order by id") == [
        ("after", hashed(EMAIL)),
        ("before", "before.reload@example.com"),
    ]


@pytest.mark.e2e
def test_dead_letters_keep_no_raw_bytes_when_told(daemon_factory) -> None:
    d = daemon_factory({"redaction": {"dead_letter_raw": False}})
    bad = msgspec.msgpack.encode({"type": "decision", "id": "x", "context": {"email": EMAIL}})  # no agent
    with Connection(d.socket) as conn:
        conn.send_raw(len(bad).to_bytes(4, "big") + bad)
        assert conn.receive().code == "invalid"
        conn.send([Flush()])
        assert isinstance(conn.receive(), Ack)
    d.stop()
    assert EMAIL.encode() not in stored_bytes(d)
    assert query(d, "select raw, raw_size, code from dead_letters") == [(b"", len(bad), "invalid")]


@pytest.mark.e2e
def test_a_message_too_deep_to_redact_is_refused_and_kept_without_raw_bytes(daemon_factory) -> None:
    d = daemon_factory({"redaction": {"drop": ["prompt"]}})  # dead_letter_raw stays true
    deep = Event(agent="a", kind="k", data=nested(300, {"prompt": PROMPT}))  # lists are searched item by item
    with Connection(d.socket) as conn:
        conn.send([deep, Event(agent="a", kind="ok", data={"prompt": PROMPT, "n": 1}), Flush()])
        reply = conn.receive()
        assert reply.code == "invalid" and reply.seq == 0 and "cannot redact" in reply.message
        assert conn.receive() == Ack(count=1)
    assert d.loaded_status().ingest["dead_letters"] == 1
    d.stop()
    assert b"hunter2" not in stored_bytes(d)
    assert query(d, "select raw, raw_size > 300, code from dead_letters") == [(b"", True, "invalid")]
    assert query(d, "select kind, data from events") == [("ok", '{"n":1}')]


def _seed_store(state_dir: Path) -> None:
    """Agents x and y, each with archived (40 days old) and live rows, a training snapshot and a
    refused spool line."""
    now = time.time()
    with Store(state_dir / "reflexd.duckdb") as store:
        for when, tag in ((now - 40 * 86400, "old"), (now, "new")):
            events: list = []
            for agent in ("x", "y"):
                events += [decision({"n": i}, id=f"{agent}-{tag}-{i}", agent=agent) for i in range(5)]
                events.append(Outcome(decision_id=f"{agent}-{tag}-0", reward=1.0, id=f"o-{agent}-{tag}"))  # no agent
                events.append(Step(agent=agent, episode="e", index=0, observation={}, action="p", id=f"s-{agent}-{tag}"))
                events.append(Event(agent=agent, kind="k", id=f"e-{agent}-{tag}"))
            store.write(events, when)
        moved = store.archive(now - 30 * 86400, state_dir / "archive", "zstd")
        assert moved == {"outcomes": 2, "decisions": 10, "steps": 2, "events": 2}
    run = state_dir / "runs" / "20240101T000000-1-1"
    run.mkdir(parents=True)
    (run / "snapshot.parquet").write_bytes(b"PAR1 every agent's rows PAR1")
    (run / "fresh.parquet").write_bytes(b"PAR1 the rows a first model was confirmed on, left by a crash PAR1")
    for agent in ("x", "y"):  # each agent's own line's run: its rows alone
        own = state_dir / "runs" / f"20240101T000001-1-agent-{agent}-2"
        own.mkdir()
        (own / "snapshot.parquet").write_bytes(f"PAR1 {agent}'s rows PAR1".encode())
    # a spool line the store once refused, kept for an operator: both agents' events in one line
    rejected = state_dir / "spool" / "rejected"
    rejected.mkdir(parents=True)
    line = encode_line([decision({"n": 0}, id=f"{agent}-refused", agent=agent) for agent in ("x", "y")], now, 0)
    (rejected / "000000000001-0123456789ab.ndjson").write_bytes(line)


@pytest.mark.e2e
def test_forget_removes_an_agent_everywhere_and_leaves_the_others(daemon_factory, tmp_path: Path) -> None:
    state = tmp_path / "seeded"
    _seed_store(state)
    d = daemon_factory({"state_dir": str(state)})
    cli = [sys.executable, "-m", "reflexd", "forget", "--socket", d.socket, "--agent", "x"]

    # without --yes and without a terminal, nothing happens
    proc = subprocess.run(cli, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 1 and "--yes" in proc.stderr

    # events of x still queued when the forget arrives (same connection, no flush) go too
    with Connection(d.socket) as conn:
        conn.send([decision({"n": i}, id=f"x-queued-{i}", agent="x") for i in range(50)])
        conn.send([Forget(agent="x", req="f")])
        reply = conn.receive()
    assert isinstance(reply, Done) and reply.req == "f"
    assert "55 decisions" in reply.message and "1 outcomes" in reply.message  # the other outcome is archived
    # the shared run's snapshot and fresh rows, and x's own line's snapshot; not y's own line's
    assert "4 archive partitions" in reply.message and "3 training snapshots" in reply.message
    assert "1 rejected spool events" in reply.message

    proc = subprocess.run(cli + ["--yes"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "forgot agent 'x'" in proc.stdout and "0 decisions" in proc.stdout

    archive = state / "archive"
    assert sorted(p.name for p in archive.glob("*/agent=*")) == ["agent=y"] * 4
    refused = (state / "spool" / "rejected" / "000000000001-0123456789ab.ndjson").read_bytes()
    assert b"y-refused" in refused and b"x-refused" not in refused
    assert not (state / "runs" / "20240101T000000-1-1" / "snapshot.parquet").exists()
    assert not (state / "runs" / "20240101T000000-1-1" / "fresh.parquet").exists()
    assert not (state / "runs" / "20240101T000001-1-agent-x-2" / "snapshot.parquet").exists()
    assert (state / "runs" / "20240101T000001-1-agent-y-2" / "snapshot.parquet").read_bytes() == b"PAR1 y's rows PAR1"
    counts = query(
        d,
        "select (select count(*) from decisions where agent = 'x'), (select count(*) from outcomes where id like 'o-x%'),"
        " (select count(*) from steps where agent = 'x'), (select count(*) from events where agent = 'x'),"
        " (select count(*) from decisions where agent = 'y'), (select count(*) from outcomes where id like 'o-y%'),"
        " (select count(*) from steps where agent = 'y'), (select count(*) from events where agent = 'y')",
    )
    assert counts == [(0, 0, 0, 0, 5, 1, 1, 1)]
    with duckdb.connect() as con:
        archived = con.execute(
            f"select agent, count(*) from read_parquet('{archive}/decisions/*/*/*.parquet', hive_partitioning=true)"
            " group by agent"
        ).fetchall()
    assert archived == [("y", 5)]

"""The daemon as a subprocess, over its real socket, with a real DuckDB file."""

from __future__ import annotations

import grp
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import duckdb
import msgspec
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.errors import RequestFailed
from reflexd.wire.connection import Connection
from reflexd.wire.framing import decode_reply
from reflexd.wire.protocol import Ack, Decide, Decided, Decision, Error, Flush, Outcome, Promote, Rollback, Train

pytestmark = pytest.mark.e2e


def decision(i: int, agent: str = "a") -> Decision:
    return Decision(id=f"d{i}", agent=agent, context={"x": i % 7}, actions=["p", "q"], chosen="p", prob=0.5)


def raw_exchange(path: str, payload: bytes, expect_lines: int) -> list[dict]:
    """Send NDJSON bytes, read back ``expect_lines`` reply lines (the way socat would)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(payload)
        buf = b""
        while buf.count(b"\n") < expect_lines:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [msgspec.json.decode(line) for line in buf.splitlines()]


def query(d: DaemonProcess, sql: str, kill: bool = False) -> list[tuple]:
    # DuckDB allows one writer process; read the file once the daemon is gone. SIGKILL skips
    # the graceful drain, so what is found was durable before the daemon died.
    d.kill() if kill else d.stop()
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_msgpack_events_are_durable_at_ack_and_resends_are_deduplicated(daemon: DaemonProcess) -> None:
    events = [decision(i) for i in range(3000)] + [Outcome(id=f"o{i}", decision_id=f"d{i}", reward=1.0) for i in range(500)]
    with Connection(daemon.socket) as conn:
        conn.send(events + [Flush(req=1)])
        ack = conn.receive()
        assert isinstance(ack, Ack) and ack.req == 1 and ack.count == 3500
        conn.send(events[:1000] + [Flush(req=2, loaded=True)])  # a client resending after a lost ack
        assert conn.receive() == Ack(count=4500, req=2)
    status = daemon.status()
    assert status.ingest["stored"] == 3500
    assert status.ingest["duplicates"] == 1000
    assert query(daemon, "select count(*) from decisions", kill=True) == [(3000,)]


def test_a_decision_id_another_agent_holds_is_a_dead_letter_and_its_outcome_joins_nothing(daemon: DaemonProcess) -> None:
    alpha = Decision(id="42", agent="alpha", context={"x": 1}, actions=["a", "b"], chosen="a", prob=0.5)
    with Connection(daemon.socket) as conn:
        conn.send([alpha, msgspec.structs.replace(alpha, agent="beta", chosen="b"),
                   Outcome(id="o42", decision_id="42", agent="beta", reward=1.0), Flush(req=1, loaded=True)])
        assert conn.receive() == Ack(count=3, req=1)
    status = daemon.status()
    assert (status.ingest["stored"], status.ingest["duplicates"], status.ingest["dead_letters"]) == (2, 0, 1)
    assert status.experience["outcomes_without_decision"] == 1  # beta's outcome is not alpha's decision's
    assert query(daemon, "select agent, chosen from decisions") == [("alpha", "a")]
    assert query(daemon, "select code from dead_letters", kill=True) == [("id_taken",)]


def test_ndjson_bad_lines_are_answered_dead_lettered_and_do_not_stop_the_connection(daemon: DaemonProcess) -> None:
    good = msgspec.json.encode(decision(1)) + b"\n"
    payload = (
        b'{"type":"decision","id":"x"}\n'  # missing fields
        + b"this is not json\n"
        + good
        + b'{"type":"nonsense"}\n'
        + b'{"type":"flush","req":"f"}\n'
    )
    replies = raw_exchange(daemon.socket, payload, expect_lines=4)
    assert [r["type"] for r in replies] == ["error", "error", "error", "ack"]
    assert replies[0]["seq"] == 0 and "agent" in replies[0]["message"]
    assert replies[1]["seq"] == 1 and replies[1]["code"] == "malformed"
    assert replies[2]["seq"] == 3
    assert replies[3] == {"type": "ack", "count": 1, "req": "f"}
    status = daemon.loaded_status()
    assert status.ingest["dead_letters"] == 3 and status.ingest["stored"] == 1
    rows = query(daemon, "select code, raw from dead_letters order by received_at")
    assert sorted(r[0] for r in rows) == ["invalid", "invalid", "malformed"]
    assert b"this is not json" in {bytes(r[1]) for r in rows}


def test_oversize_frames(daemon_factory) -> None:
    d = daemon_factory({"socket": {"max_frame_bytes": 2048}})
    big = b'{"type":"event","agent":"a","kind":"k","data":"' + b"x" * 5000 + b'"}\n'
    replies = raw_exchange(d.socket, big + msgspec.json.encode(decision(1)) + b'\n{"type":"flush"}\n', 2)
    assert replies[0]["code"] == "too_large" and replies[1]["type"] == "ack" and replies[1]["count"] == 1
    # a length prefix past the cap cannot be skipped safely: that connection (only) is closed
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(d.socket)
        s.sendall(struct.pack(">I", 1 << 20))  # first byte 0: msgpack framing
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert decode_reply(data[4:], "msgpack").code == "too_large"
    wait_for(lambda: d.status().ingest["dead_letters"] == 2, 30, "both oversize frames dead-lettered")


def test_socket_decide_is_logged_and_falls_back_to_the_default_action(daemon_factory) -> None:
    d = daemon_factory({"exploration": {"default_action": "q", "epsilon": 0.2, "epsilon_min": 0.0}})
    with Connection(d.socket) as conn:
        replies = [conn.request(Decide(agent="a", context={"n": i}, actions=["p", "q", "r"])) for i in range(200)]
        conn.send([Flush()])
        assert isinstance(conn.receive(), Ack)
    assert all(isinstance(r, Decided) and r.model_version is None and r.strategy == "default" for r in replies)
    probs = {r.action: r.prob for r in replies}
    assert probs["q"] == pytest.approx(0.8 + 0.2 / 3)
    assert sum(r.action == "q" for r in replies) > 130
    rows = query(d, "select count(*), count(distinct id) from decisions where strategy = 'default'")
    assert rows == [(200, 200)]


def test_peers_not_in_the_allow_list_are_refused(daemon_factory, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    nobody = 65534
    python = shutil.which("python3", path="/usr/bin:/bin")  # the venv's may sit where nobody can't read
    if python is None:
        pytest.skip("no system python3 for the second user")
    sock_dir = Path(f"/tmp/rx-peer-{uuid.uuid4().hex[:8]}")
    sock_dir.mkdir(mode=0o755)  # let the kernel pass `nobody` through; SO_PEERCRED must stop it
    try:
        d = daemon_factory({"socket": {"path": str(sock_dir / "r.sock"), "mode": "0666"}})
        # the refusal may arrive (and the socket close) before the request is written
        client = (
            "import socket,sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "try: s.sendall(b'{\"type\":\"status\"}\\n')\n"
            "except BrokenPipeError: pass\n"
            "print(s.recv(4096).decode())\n"
        )

        def as_nobody() -> str:
            out = subprocess.run(
                [python, "-c", client, d.socket],
                user=nobody,
                group=nobody,  # nogroup: the peer's primary gid as SO_PEERCRED reports it
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        assert '"code":"forbidden"' in as_nobody()
        assert d.status().ingest["refused"] == 1
        d.stop()
        d.config["socket"]["allowed_gids"] = [nobody]
        d.start()
        assert '"type":"status"' in as_nobody()  # let in by its group
        d.stop()
        d.config["socket"]["allowed_gids"] = []
        d.config["socket"]["allowed_uids"] = [nobody]
        d.start()
        assert '"type":"status"' in as_nobody()  # let in by its uid
    finally:
        subprocess.run(["rm", "-rf", str(sock_dir)], check=False)


def test_socket_mode_and_group_follow_the_config_and_reload(daemon_factory) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give the socket another group")
    gid = grp.getgrnam("nogroup").gr_gid
    d = daemon_factory({"socket": {"mode": "0640", "group": "nogroup"}})
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == gid
    parent = os.stat(Path(d.socket).parent)
    assert parent.st_gid == gid and stat.S_IMODE(parent.st_mode) == 0o750  # group members can reach it
    d.config["socket"]["mode"] = "0660"
    d.write_config()
    d.signal(signal.SIGHUP)
    wait_for(lambda: stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660, 30, "the reloaded socket mode")


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(daemon: DaemonProcess) -> None:
    def decide() -> Decided:
        return daemon.request(Decide(agent="a", context={}, actions=["p", "q"]))

    assert decide().prob == 0.5
    good = dict(daemon.config, exploration={"default_action": "q", "epsilon": 0.0, "epsilon_min": 0.0})
    daemon.write_config(good)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: decide().prob == 1.0, 30, "the reloaded exploration settings")
    daemon.config_path.write_text("exploration: {strategy: nonsense}\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "config reload failed" in daemon.log(), 30, "the reload failure in the log")
    reply = decide()
    assert (reply.action, reply.prob) == ("q", 1.0)
    # status says so too, until a reload succeeds
    config = daemon.status().config
    assert config["reloads"] == 1 and "'nonsense' is not an exploration strategy" in config["reload_error"], config
    daemon.write_config(dict(good, state_dir="/somewhere/else"))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: daemon.status().config["reloads"] == 2, 30, "the second reload")
    config = daemon.status().config
    assert config["reload_error"] is None and config["restart_pending"] == ["state_dir"], config
    shown = subprocess.run([sys.executable, "-m", "reflexd", "status", "--socket", str(daemon.socket)], capture_output=True,
                           text=True, timeout=300)
    assert "config     changed in the file, in force at restart: state_dir" in shown.stdout, shown.stdout + shown.stderr


def test_model_requests_fail_clearly_without_models(daemon: DaemonProcess) -> None:
    with pytest.raises(RequestFailed, match="no agent has decided yet") as unknown:
        daemon.request(Rollback())  # no agent, no model line yet
    assert unknown.value.code == "line_unknown"
    with pytest.raises(RequestFailed, match="agent 'bot' has logged no decision") as unknown:
        daemon.request(Rollback(agent="bot"))  # a name no agent used makes no line
    assert unknown.value.code == "line_unknown" and "agent:bot" not in daemon.status().lines
    with pytest.raises(RequestFailed, match="train: agent 'bot' has logged no decision") as unknown:
        daemon.request(Train(agent="bot"), timeout=120)  # nor does a request to train it
    assert unknown.value.code == "line_unknown" and "agent:bot" not in daemon.status().lines
    with Connection(daemon.socket) as conn:
        assert isinstance(conn.request(Decide(agent="bot", context={}, actions=["a"])), Decided)
    with pytest.raises(RequestFailed, match="nothing to roll back"):
        daemon.request(Rollback(agent="bot"))
    with Connection(daemon.socket) as conn:
        conn.send([msgspec.convert({"type": "promote", "version": "v0042", "agent": "bot"}, type=Promote)])
        reply = conn.receive()
    assert isinstance(reply, Error) and reply.message == "no model version 'v0042' in model line agent:bot"


def test_systemd_notify_protocol(daemon_factory, tmp_path: Path) -> None:
    notify_path = Path(f"/tmp/rx-notify-{uuid.uuid4().hex[:8]}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(notify_path))
        sd.settimeout(60)
        try:
            d = daemon_factory(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
            seen: list[str] = []

            def until(field: str) -> None:
                while not any(field in m for m in seen):
                    seen.append(sd.recv(4096).decode())

            until("READY=1")
            seen.clear()
            until("WATCHDOG=1")
            d.signal(signal.SIGHUP)
            seen.clear()
            until("RELOADING=1")
            assert any("MONOTONIC_USEC=" in m for m in seen)
            until("READY=1")
            d.signal(signal.SIGTERM)
            seen.clear()
            until("STOPPING=1")
            assert d.proc.wait(30) == 0
        finally:
            notify_path.unlink(missing_ok=True)


def test_existing_non_socket_path_is_refused(daemon_factory) -> None:
    target = Path(tempfile.mkdtemp(prefix="rx-")) / "r.sock"
    target.write_text("not a socket")
    try:
        with pytest.raises(pytest.fail.Exception, match="not a socket"):
            daemon_factory({"socket": {"path": str(target)}})
    finally:
        shutil.rmtree(target.parent)


def test_a_frame_left_half_sent_times_out_and_only_that_connection_closes(daemon_factory) -> None:
    d = daemon_factory({"socket": {"frame_timeout": 0.5}})
    with socket.socket(socket.AF_UNIX) as idle, socket.socket(socket.AF_UNIX) as stuck:
        idle.connect(d.socket)
        idle.sendall(msgspec.json.encode(decision(1)) + b"\n")  # a whole frame, then silence: fine
        stuck.settimeout(30)
        stuck.connect(d.socket)
        stuck.sendall(b'{"type":"decision","id":"half')
        reply = stuck.recv(4096)
        assert msgspec.json.decode(reply.splitlines()[0])["code"] == "timeout"
        assert stuck.recv(4096) == b""  # closed
        idle.sendall(b'{"type":"flush","req":1}\n')
        idle.settimeout(30)
        assert msgspec.json.decode(idle.recv(4096).splitlines()[0]) == {"type": "ack", "count": 1, "req": 1}
    wait_for(lambda: d.status().ingest["dead_letters"] == 1, 30, "the half frame dead-lettered")
    # a frame whose bytes trickle in is timed from its first byte, not from the latest one
    with socket.socket(socket.AF_UNIX) as trickle:
        trickle.settimeout(30)
        trickle.connect(d.socket)
        started = time.monotonic()
        replies = b""
        for byte in b'{"type":"decision","id":"slow","agent":"a"':
            try:
                trickle.sendall(bytes([byte]))
            except BrokenPipeError:
                break
            if select.select([trickle], [], [], 0.1)[0]:
                replies = trickle.recv(4096)
                break
        assert b'"code":"timeout"' in replies, replies
        assert time.monotonic() - started < 5
    wait_for(lambda: d.status().ingest["dead_letters"] == 2, 30, "the trickled frame dead-lettered")
    rows = query(d, "select code, raw from dead_letters order by received_at limit 1")
    assert rows[0][0] == "timeout" and bytes(rows[0][1]).startswith(b'{"type":"decision"')


def _sent_then_closed(d: DaemonProcess, data: bytes) -> bytes:
    """Send ``data``, stop sending (as a pipe into socat does at its input's end), read every reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(d.socket)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := s.recv(4096):
            replies += chunk
    return replies


def test_the_last_line_needs_no_newline_and_a_frame_cut_short_is_dead_lettered(daemon: DaemonProcess) -> None:
    last = msgspec.json.encode(decision(1))  # no newline after it: the stream's end ends it
    replies = _sent_then_closed(daemon, b'{"type":"flush","req":1}\n' + last)
    assert replies == b'{"type":"ack","count":0,"req":1}\n', replies
    wait_for(lambda: daemon.status().experience.get("decisions") == 1, 30, "the last line stored")
    # a length-prefixed frame whose bytes stop short: kept as a dead letter, not dropped unseen
    whole = msgspec.msgpack.encode(decision(2))
    reply = _sent_then_closed(daemon, struct.pack(">I", len(whole)) + whole[:-3])
    assert b"then the peer stopped sending" in reply, reply
    wait_for(lambda: daemon.status().ingest["dead_letters"] == 1, 30, "the frame cut short dead-lettered")
    rows = query(daemon, "select code, raw_size, reason from dead_letters")
    assert rows == [("malformed", len(whole) + 1, f"incomplete frame: {len(whole) + 1} bytes, then the peer stopped sending")]


def test_an_invalid_request_is_answered_with_its_req_and_an_unknown_type_with_the_types(daemon: DaemonProcess) -> None:
    replies = _sent_then_closed(daemon, b'{"type":"evaluate","policies":[],"req":9}\n{"type":"frobnicate","req":"x"}\n'
                                        b'{"type":"decision","req":[1]}\n')
    evaluate, unknown, unreadable = (msgspec.json.decode(line) for line in replies.splitlines())
    assert (evaluate["code"], evaluate["req"], evaluate["seq"]) == ("invalid", 9, 0), evaluate
    assert (unknown["req"], unknown["seq"]) == ("x", 1) and "the message types are decision, outcome, step" in unknown["message"]
    assert unreadable["req"] is None and unreadable["seq"] == 2  # a req that is no id cannot be echoed


def test_symlinked_socket_path_is_refused(daemon_factory) -> None:
    link = Path(tempfile.mkdtemp(prefix="rx-")) / "r.sock"
    link.symlink_to("/tmp/somewhere-else.sock")
    try:
        with pytest.raises(pytest.fail.Exception, match="symbolic link"):
            daemon_factory({"socket": {"path": str(link)}})
    finally:
        shutil.rmtree(link.parent)


def test_a_socket_directory_others_can_write_is_refused(daemon_factory) -> None:
    shared = Path(f"/tmp/rx-shared-{uuid.uuid4().hex[:8]}")
    shared.mkdir()
    shared.chmod(0o777)
    try:
        with pytest.raises(pytest.fail.Exception, match="writable by group or others"):
            daemon_factory({"socket": {"path": str(shared / "r.sock")}})
    finally:
        shared.rmdir()


def _ready(d: DaemonProcess) -> dict:
    def line() -> dict | None:
        found = [ln for ln in d.log_path.read_text().splitlines() if '"reflexd ready"' in ln]
        return msgspec.json.decode(found[0]) if found else None

    return wait_for(line, 30, "the 'reflexd ready' log line")


def test_the_ready_line_says_how_the_online_head_computes(daemon_factory) -> None:
    # an operator can tell from the log whether the install built the head's compiled arithmetic
    assert _ready(daemon_factory())["online_head"] == "compiled"
    assert _ready(daemon_factory({"online": {"enabled": False}}))["online_head"] == "off"

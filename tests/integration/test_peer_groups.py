"""A peer is let in by any of its groups, supplementary ones included: SO_PEERGROUPS, with
/proc/PID/status as the fallback, read once per connection."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import wait_for
from reflexd.service import server
from reflexd.service.server import peer_groups

NOBODY = 65534
AGENTS = 4242  # a supplementary group; setgroups() does not need it to have a name

# A client as another user: asks for status, prints the reply, and asks again for every line on stdin.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sys.argv[1])
def ask():
    try:
        s.sendall(b'{"type":"status"}\\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        return s.recv(1 << 16).decode() or "<closed>"
    except ConnectionResetError:
        return "<reset>"
print(ask().splitlines()[0], flush=True)
for line in sys.stdin:
    print(ask().splitlines()[0], flush=True)
"""


def own_groups() -> frozenset[int]:
    return frozenset((os.getgid(), *os.getgroups()))


# ---- in-process ------------------------------------------------------------------------------


def test_so_peergroups_reads_the_peers_groups() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert server._socket_groups(a) is not None, "SO_PEERGROUPS needs Linux 4.13"
        assert peer_groups(a, os.getpid(), os.getgid()) == own_groups()


def test_without_so_peergroups_proc_status_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "_socket_groups", lambda sock: None)
    a, b = socket.socketpair()
    with a, b:
        assert peer_groups(a, os.getpid(), os.getgid()) == own_groups()


def test_when_no_groups_can_be_read_only_the_primary_one_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "_socket_groups", lambda sock: None)
    monkeypatch.setattr(server, "_proc_groups", lambda pid: None)
    a, b = socket.socketpair()
    with a, b:
        assert peer_groups(a, 0, 1234) == frozenset({1234})


# ---- a daemon and clients of another user ------------------------------------------------------


@pytest.fixture
def open_dir(short_dir: Path) -> Path:
    """A socket directory others may enter, so that the daemon's check decides, not the file's mode."""
    if os.getuid() != 0:
        pytest.skip("needs root to run clients as another user with chosen groups")
    return short_dir


@pytest.fixture
def python() -> str:
    found = shutil.which("python3", path="/usr/bin:/bin")  # the venv's may sit where nobody can't read
    if found is None:
        pytest.skip("no system python3 for the second user")
    return found


def as_nobody(python: str, path: str, groups: list[int]) -> str:
    """The first reply a client gets as nobody (primary group nogroup) with these supplementary groups."""
    out = subprocess.run(
        [python, "-c", CLIENT, path], user=NOBODY, group=NOBODY, extra_groups=groups,
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_supplementary_group_in_allowed_gids_lets_a_peer_in(daemon_factory, open_dir: Path, python: str) -> None:
    d = daemon_factory({"socket": {"path": str(open_dir / "r.sock"), "mode": "0666"}})
    assert '"code":"forbidden"' in as_nobody(python, d.socket, [AGENTS])
    d.stop()
    d.config["socket"]["allowed_gids"] = [AGENTS]
    d.start()
    assert '"type":"status"' in as_nobody(python, d.socket, [AGENTS])  # by its supplementary group
    assert '"code":"forbidden"' in as_nobody(python, d.socket, [])  # not without it
    assert d.status().ingest["refused"] == 1


def test_members_of_socket_group_are_let_in(daemon_factory, open_dir: Path, python: str) -> None:
    group = next((g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY)), None)
    if group is None:
        pytest.skip("no group on this host to give the socket")
    d = daemon_factory({"socket": {"path": str(open_dir / "r.sock"), "mode": "0666", "group": group.gr_name}})
    assert os.stat(d.socket).st_gid == group.gr_gid
    assert '"type":"status"' in as_nobody(python, d.socket, [group.gr_gid])
    assert '"code":"forbidden"' in as_nobody(python, d.socket, [AGENTS])


def test_a_reload_that_drops_the_group_ends_the_peers_connection(daemon_factory, open_dir: Path, python: str) -> None:
    d = daemon_factory({"socket": {"path": str(open_dir / "r.sock"), "mode": "0666", "allowed_gids": [AGENTS]}})
    client = subprocess.Popen(
        [python, "-c", CLIENT, d.socket], user=NOBODY, group=NOBODY, extra_groups=[AGENTS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert '"type":"status"' in client.stdout.readline()
        d.config["socket"]["allowed_gids"] = []
        d.write_config()
        d.signal(signal.SIGHUP)
        wait_for(lambda: d.status().ingest["revoked"] == 1, 30, "the connection to be ended by the reload")
        client.stdin.write("again\n")
        client.stdin.flush()
        assert "no longer allowed" in client.stdout.readline()
    finally:
        client.kill()
        client.wait()


# ---- administrative requests ----------------------------------------------------------------

# A client as another user: sends the frames given as JSON, prints the replies (one line each).
FRAMES_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sys.argv[1])
frames = json.loads(sys.argv[2])
s.sendall(b"".join(json.dumps(f).encode() + b"\\n" for f in frames))
want = sum(1 for f in frames if f["type"] not in ("decision", "outcome", "step", "event"))
buf = b""
while buf.count(b"\\n") < want:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    buf += chunk
print(buf.decode(), end="")
"""


def replies_as_nobody(python: str, path: str, groups: list[int], frames: list[dict]) -> list[dict]:
    import json

    out = subprocess.run(
        [python, "-c", FRAMES_CLIENT, path, json.dumps(frames)], user=NOBODY, group=NOBODY, extra_groups=groups,
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_a_peer_let_in_may_decide_and_log_but_only_an_admin_may_adopt_or_forget(
    daemon_factory, open_dir: Path, python: str
) -> None:
    import base64

    d = daemon_factory({"socket": {"path": str(open_dir / "r.sock"), "mode": "0666", "allowed_gids": [AGENTS]}})
    garbage = base64.b64encode(b"not a manifest").decode()
    decision = {"type": "decision", "id": "n1", "agent": "a", "context": {}, "actions": ["x", "y"], "chosen": "x", "prob": 0.5}
    frames = [
        {"type": "decide", "agent": "a", "context": {"k": 1}, "actions": ["x", "y"], "req": 1},
        decision,
        {"type": "flush", "loaded": True, "req": 2},
        {"type": "adopt", "manifest": garbage, "model": garbage, "source": "/x", "req": 3},
        {"type": "forget", "agent": "a", "req": 4},
        {"type": "promote", "version": "v0001", "req": 5},
        {"type": "rollback", "req": 6},
        {"type": "status", "req": 7},
    ]
    replies = replies_as_nobody(python, d.socket, [AGENTS], frames)
    assert [(r["type"], r.get("req")) for r in replies] == [
        ("decided", 1), ("ack", 2), ("error", 3), ("error", 4), ("error", 5), ("error", 6), ("status", 7),
    ]
    assert replies[1]["count"] == 1
    for reply, name in zip(replies[2:6], ["adopt", "forget", "promote", "rollback"]):
        assert reply["code"] == "forbidden", reply
        assert reply["message"].startswith(f"{name}: uid {NOBODY} may not send it"), reply
    status = d.status()
    assert status.ingest["forbidden"] == 4
    assert status.experience["decisions"] == 2  # the logged one and the daemon's own decide: nothing forgotten

    # named in socket.admin_gids (a reload applies from the next request), the same peer may
    d.config["socket"]["admin_gids"] = [AGENTS]
    d.write_config()
    d.signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in d.log_path.read_text(), 30, "the reload")
    adopt, forget = replies_as_nobody(python, d.socket, [AGENTS], frames[3:5])
    assert adopt["code"] == "model_integrity" and "unreadable manifest" in adopt["message"], adopt  # reached the daemon
    assert (forget["type"], forget["req"]) == ("ok", 4) and "forgot agent 'a'" in forget["message"], forget
    assert d.status().ingest["forbidden"] == 4

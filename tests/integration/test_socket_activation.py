"""Socket activation from systemd's side: the test binds and listens, as reflexd.socket does, and
starts ``reflexd run`` with the socket at fd 3 and LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES set for it
(sd_listen_fds(3)), as systemd starts reflexd.service."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import DaemonProcess, base_config, wait_for
from reflexd.errors import DaemonStartFailed, SocketError
from reflexd.service.activation import Passed, bound_path, listen_fds, listening_socket
from reflexd.testing import deep_merge
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Decide, Decided, Flush, Outcome, StatusReply, StatusRequest

# What systemd does between fork and exec: the passed sockets at fd 3, 4, ... and the variables
# naming them, with LISTEN_PID the pid that exec keeps. argv: N fd... name... command...
SYSTEMD = """
import fcntl, os, sys
n = int(sys.argv[1])
fds, names, command = [int(a) for a in sys.argv[2:2 + n]], sys.argv[2 + n:2 + 2 * n], sys.argv[2 + 2 * n:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ...
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(n), LISTEN_FDNAMES=":".join(names))
os.execv(command[0], command)
"""
NOBODY = 65534


@pytest.fixture
def run_dir(short_dir: Path) -> Path:
    """A short directory for sockets (their paths are limited to 108 bytes), 0755 like /run."""
    return short_dir


def listening(path: Path, mode: int = 0o660) -> socket.socket:
    """What reflexd.socket does: bind, chmod (SocketMode=), listen."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(64)
    return sock


@pytest.fixture
def activated(tmp_path: Path, run_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Daemons started the way systemd starts reflexd.service; each one stopped at teardown."""
    started: list[DaemonProcess] = []

    def make(sockets: list[tuple[Any, str]], config: dict | None = None, cls: type = DaemonProcess) -> Any:
        root = tmp_path / f"d{len(started)}"
        root.mkdir()
        cfg = deep_merge(base_config(root, run_dir / "unused"), config or {})
        d = cls(root=root, config=cfg)
        fds = [s.fileno() for s, _ in sockets]
        d.wrapper = [sys.executable, "-c", SYSTEMD, str(len(fds)), *map(str, fds), *(name for _, name in sockets)]
        d.pass_fds = tuple(fds)
        started.append(d)
        return d

    try:
        yield make
    finally:
        for d in started:
            d.stop()


def ready_event(d: DaemonProcess) -> dict:
    for line in d.log().splitlines():
        if '"reflexd ready"' in line:
            return json.loads(line)
    raise AssertionError(f"no 'reflexd ready' in the log:\n{d.log()}")


def test_the_daemon_serves_the_socket_systemd_passed_and_leaves_it_open(activated, run_dir: Path) -> None:
    path = run_dir / "reflexd.sock"
    systemd_side = listening(path)
    d = activated([(systemd_side, "reflexd.socket")], {"socket": {"path": str(path)}}).start()
    ready = ready_event(d)
    assert ready["socket_activated"] is True and ready["socket"] == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # systemd's mode, not changed by the daemon

    # an agent decides and logs through it
    with Connection(path, timeout=60) as conn:
        decided = conn.request(Decide(agent="bot", context={"task": "code"}, actions=["small", "large"]))
        assert isinstance(decided, Decided)
        conn.send([Outcome(decision_id=decided.id, reward=1.0)])
        assert isinstance(conn.request(Flush(loaded=True)), Ack)
    status = d.loaded_status()
    assert status.experience["decisions"] == 1 and status.experience["outcomes"] == 1

    # stopped, the daemon leaves systemd's socket where it is; a client that connects meanwhile
    # waits in the backlog and is answered by the next daemon
    assert d.stop() == 0
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    waiting = Connection(path, timeout=120)
    try:
        waiting.send([StatusRequest()])
        d.start()
        reply = waiting.receive()
    finally:
        waiting.close()
    assert isinstance(reply, StatusReply) and reply.pid == d.pid
    assert reply.experience["decisions"] == 1
    systemd_side.close()


def test_of_several_sockets_the_one_at_socket_path_is_taken(activated, run_dir: Path) -> None:
    other, agents = listening(run_dir / "other.sock"), listening(run_dir / "agents.sock")
    sockets = [(other, "other.socket"), (agents, "reflexd.socket")]
    d = activated(sockets, {"socket": {"path": str(run_dir / "agents.sock")}})
    d.start()
    assert ready_event(d)["socket"] == str(run_dir / "agents.sock")
    with Connection(run_dir / "agents.sock", timeout=30) as conn:
        assert isinstance(conn.request(StatusRequest()), StatusReply)
    other.close()
    agents.close()


class AnswersElsewhere(DaemonProcess):
    """A daemon whose config names one socket path while systemd passes it another: ``start`` waits
    for an answer on the one passed."""

    passed_path = ""

    @property
    def socket(self) -> str:
        return self.passed_path


def test_a_socket_elsewhere_than_socket_path_is_served_with_a_warning(activated, run_dir: Path) -> None:
    sock = listening(run_dir / "elsewhere.sock")
    d = activated([(sock, "reflexd.socket")], {"socket": {"path": str(run_dir / "configured.sock")}}, AnswersElsewhere)
    d.passed_path = str(run_dir / "elsewhere.sock")
    d.start()
    assert ready_event(d)["socket"] == str(run_dir / "elsewhere.sock")
    assert "the socket systemd passed is not at socket.path" in d.log()
    assert not (run_dir / "configured.sock").exists()
    sock.close()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("datagram", "is AF_UNIX SOCK_DGRAM, not a Unix stream socket"),
        ("not listening", "is AF_UNIX SOCK_STREAM but not listening"),
        ("file", "is not a socket"),
    ],
)
def test_a_descriptor_that_is_not_a_listening_unix_stream_socket_is_refused_clearly(
    activated, run_dir: Path, tmp_path: Path, kind: str, message: str
) -> None:
    path = run_dir / "reflexd.sock"
    if kind == "datagram":
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bad.bind(str(path))
    elif kind == "not listening":
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.bind(str(path))
    else:
        bad = open(tmp_path / "a-file", "w")  # noqa: SIM115 (closed below)
    d = activated([(bad, "reflexd.socket")], {"socket": {"path": str(path)}})
    with pytest.raises(DaemonStartFailed):
        d.start(timeout=60)
    assert d.proc is not None and d.proc.returncode == 78  # EX_CONFIG: a restart would not help
    assert "fd 3 ('reflexd.socket') passed by systemd" in d.log() and message in d.log(), d.log()
    bad.close()


def test_a_socket_in_a_directory_others_may_write_to_is_refused(activated, run_dir: Path) -> None:
    shared = run_dir / "shared"
    shared.mkdir()
    shared.chmod(0o770)  # group-writable: a member could put another socket at the path
    path = shared / "reflexd.sock"
    systemd_side = listening(path)
    d = activated([(systemd_side, "reflexd.socket")], {"socket": {"path": str(path)}})
    with pytest.raises(DaemonStartFailed):
        d.start(timeout=60)
    assert d.proc is not None and d.proc.returncode == 78  # EX_CONFIG: a restart would not help
    assert f"{shared} is writable by group or others (mode 0770)" in d.log(), d.log()
    # check-config says the same of this config before any start
    checked = subprocess.run(
        [sys.executable, "-m", "reflexd", "check-config", str(d.config_path)], capture_output=True, text=True
    )
    assert checked.returncode != 0 and f"{shared} is writable by group or others" in checked.stderr
    systemd_side.close()


def test_peers_are_checked_on_an_activated_socket(activated, run_dir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    python = shutil.which("python3", path="/usr/bin:/bin")  # the venv's may sit where nobody can't read
    if python is None:
        pytest.skip("no system python3 for the second user")
    path = run_dir / "reflexd.sock"
    sock = listening(path, mode=0o666)  # the file lets `nobody` connect; SO_PEERCRED must stop it
    d = activated([(sock, "reflexd.socket")], {"socket": {"path": str(path)}}).start()
    client = (
        "import socket,sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "try: s.sendall(b'{\"type\":\"status\"}\\n')\n"
        "except BrokenPipeError: pass\n"
        "print(s.recv(4096).decode())\n"
    )
    out = subprocess.run(
        [python, "-c", client, str(path)], user=NOBODY, group=NOBODY, extra_groups=[],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"code":"forbidden"' in out.stdout
    wait_for(lambda: d.status().ingest["refused"] == 1, 30, "the refusal to be counted")
    sock.close()


# ---- sd_listen_fds in-process --------------------------------------------------------------


def test_variables_for_another_process_are_ignored_and_all_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "reflexd.socket")
    assert listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert listen_fds() == []  # nothing set: not socket-activated


def test_unreadable_variables_are_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "one")
    with pytest.raises(SocketError, match="must be numbers"):
        listen_fds()
    assert "LISTEN_FDS" not in os.environ


def test_a_listening_unix_stream_socket_passes_the_check(run_dir: Path) -> None:
    sock = listening(run_dir / "ok.sock")
    try:
        checked = listening_socket(Passed(sock.fileno(), "reflexd.socket"))
        try:
            assert bound_path(checked) == str(run_dir / "ok.sock")
            assert checked.getblocking() is False
        finally:
            checked.detach()  # the descriptor is ``sock``'s
    finally:
        sock.close()


def test_an_inet_socket_is_refused_in_process() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        with pytest.raises(SocketError, match="is AF_INET SOCK_STREAM, not a Unix stream socket"):
            listening_socket(Passed(sock.fileno(), None))
        assert sock.fileno() >= 0  # left open: not the check's to close

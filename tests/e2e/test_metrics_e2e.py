"""The metrics and health endpoint of a running daemon, over its Unix socket and a loopback port.

Readiness under a failing disk: the daemon's file-size limit is lowered from outside with
prlimit(2), as tests/e2e/test_storage_faults.py does, so its DuckDB writes fail with EFBIG.
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DaemonProcess, wait_for
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Decide, Decided, Decision, Flush

pytestmark = pytest.mark.e2e


def unix_get(path: str, target: str) -> tuple[int, bytes]:
    """One GET over the Unix socket, the way curl --unix-socket would send it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: reflexd\r\nAccept: */*\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"Connection: close" in head
    return int(head.split(b" ", 2)[1]), body


def tcp_get(port: int, target: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{target}", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def values(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def metrics_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="rxm-"))  # short: socket paths are limited to 108 bytes
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_metrics_health_and_readiness_over_the_unix_socket_and_loopback(daemon_factory, metrics_dir: Path) -> None:
    port = free_port()
    path = str(metrics_dir / "run" / "metrics.sock")
    d: DaemonProcess = daemon_factory({"metrics": {"path": path, "port": port}})
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o660
    assert stat.S_IMODE(Path(path).parent.stat().st_mode) == 0o750

    code, body = unix_get(path, "/metrics")
    assert code == 200
    before = values(body)
    code, body = tcp_get(port, "/metrics")
    assert code == 200
    assert values(body)[("reflexd_ingest_received_total", ())] == before[("reflexd_ingest_received_total", ())]
    assert before[("reflexd_decide_latency_seconds_count", ())] == 0
    assert before[("reflexd_storage_error", ())] == 0

    with Connection(d.socket) as conn:
        for i in range(5):
            assert isinstance(conn.request(Decide(agent="a", context={"x": i}, actions=["p", "q"])), Decided)
        conn.send([Decision(id=f"m{i}", agent="a", context={"x": i}, actions=["p", "q"], chosen="p", prob=0.5) for i in range(20)])
        conn.send([Flush(loaded=True, req=1)])
        assert conn.receive() == Ack(count=20, req=1)

    after = values(unix_get(path, "/metrics")[1])
    assert after[("reflexd_decide_latency_seconds_count", ())] == 5
    assert after[("reflexd_decide_latency_seconds_bucket", (("le", "+Inf"),))] == 5
    assert after[("reflexd_decide_latency_seconds_sum", ())] > 0
    assert after[("reflexd_ingest_received_total", ())] == before[("reflexd_ingest_received_total", ())] + 25
    assert after[("reflexd_ingest_stored_by_table_total", (("table", "decisions"),))] == 25
    assert after[("reflexd_backlog_events", ())] == 0
    assert after[("reflexd_model_version", (("line", "agent:a"),))] == 0  # agent a's model line: no model yet
    assert ("reflexd_build_info", (("version", __import__("reflexd").__version__),)) in after
    assert values(tcp_get(port, "/metrics")[1])[("reflexd_ingest_stored_total", ())] == after[("reflexd_ingest_stored_total", ())]

    assert unix_get(path, "/healthz") == (200, b"ok\n")
    assert tcp_get(port, "/healthz") == (200, b"ok\n")
    assert unix_get(path, "/readyz")[0] == 200
    assert json.loads(tcp_get(port, "/readyz")[1]) == {"ready": True, "reasons": []}
    assert unix_get(path, "/nope")[0] == 404

    # a disk that cannot be written: not ready (503, and why), though still healthy
    db = d.state_dir / "reflexd.duckdb"
    wal = db.with_name(db.name + ".wal")
    pid = d.proc.pid
    limit = max(p.stat().st_size for p in (db, wal) if p.exists())
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        with Connection(d.socket) as conn:
            conn.send(
                [Decision(id=f"f{i}", agent="a", context={"i": i, "s": "x" * 200}, actions=["p", "q"], chosen="p", prob=0.5) for i in range(5000)]
            )
            wait_for(lambda: unix_get(path, "/readyz")[0] == 503, 60, "/readyz to answer 503")
        code, body = tcp_get(port, "/readyz")
        assert code == 503
        reply = json.loads(body)
        assert reply["ready"] is False and "storage is not writable" in reply["reasons"][0]
        assert unix_get(path, "/healthz")[0] == 200
        assert values(unix_get(path, "/metrics")[1])[("reflexd_storage_error", ())] == 1
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    wait_for(lambda: unix_get(path, "/readyz")[0] == 200, 60, "/readyz to answer 200 once writes succeed")
    assert values(unix_get(path, "/metrics")[1])[("reflexd_storage_error", ())] == 0

    d.stop()
    assert not Path(path).exists()  # removed at stop, like the agents' socket


def test_a_method_other_than_get_is_refused(daemon_factory, metrics_dir: Path) -> None:
    path = str(metrics_dir / "metrics.sock")
    daemon_factory({"metrics": {"path": path}})
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in reply
    assert unix_get(path, "/healthz")[0] == 200  # the endpoint lives on

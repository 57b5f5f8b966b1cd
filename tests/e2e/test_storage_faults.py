"""A disk that cannot be written: stop acknowledging, say so, keep deciding, resume, lose nothing.

The daemon's file-size limit is lowered from outside with prlimit(2), so DuckDB's writes, and
the spool's once its file reaches the limit, fail with EFBIG exactly as on a full disk; then it
is raised again.
"""

from __future__ import annotations

import resource
import socket
import threading

import duckdb
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.wire.connection import Connection
from reflexd.wire.framing import encode_frame
from reflexd.wire.protocol import Ack, Decide, Decided, Decision, Flush

pytestmark = pytest.mark.e2e


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def make(i: int) -> Decision:
    return Decision(id=f"ev-{i}", agent="a", context={"i": i, "s": "x" * 200}, actions=["p", "q"], chosen="p", prob=0.5)


def test_failing_writes_stop_acks_keep_decisions_and_resume(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory({"ingest": {"queue_size": 5000, "batch_size": 1000}})
    pid = d.proc.pid
    with Connection(d.socket) as conn:
        conn.send([make(i) for i in range(1000)] + [Flush(req=0)])
        assert conn.receive() == Ack(count=1000, req=0)
    db = d.state_dir / "reflexd.duckdb"
    wal = db.with_name(db.name + ".wal")
    # no file may grow past its current size: the next write fails with EFBIG
    limit = max(p.stat().st_size for p in (db, wal) if p.exists())
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        # a sender that keeps writing: the daemon stops acknowledging and, once its queue is full,
        # stops reading, so the kernel pushes back on the sender
        sender = socket.socket(socket.AF_UNIX)
        sender.connect(d.socket)
        payload = b"".join(encode_frame(make(i), "msgpack") for i in range(1000, 60_000))
        sent = threading.Event()

        def push() -> None:
            try:
                sender.sendall(payload + encode_frame(Flush(req=1), "msgpack"))
                sent.set()
            except OSError:
                pass

        t = threading.Thread(target=push, daemon=True)
        t.start()
        wait_for(lambda: d.status().storage["error"], 60, "the storage error in status")
        status = d.status()
        assert "File too large" in status.storage["error"] or "No space" in status.storage["error"]
        # decisions are still served while the store is failing
        reply = d.request(Decide(agent="a", context={}, actions=["p", "q"]))
        assert isinstance(reply, Decided)
        wait_for(lambda: d.status().backlog > 0, 30, "a backlog")
        assert not sent.wait(2), "a stalled store should make the sender block, not drain it"
        # memory is bounded by ingest.queue_size (plus the one chunk always let through)
        assert d.status().ingest["queued"] <= 5000 + 1000
        assert rss_kb(pid) < 400_000
        assert "not acknowledging" in d.log()
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert sent.wait(120), "the sender never got through after writes resumed"
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        buf += sender.recv(65536)
    sender.close()
    wait_for(lambda: d.status().storage["error"] is None, 60, "writes to succeed again")
    status = d.status()
    ing = status.ingest
    assert ing["received"] == ing["stored"] + ing["duplicates"] + ing["dead_letters"] + status.backlog
    assert d.state_dir.joinpath("spool").is_dir()
    logged_decide = 1 - ing["unlogged_decisions"]  # logged unless the queue was already full
    d.stop()
    with duckdb.connect(str(db), read_only=True) as con:
        sent_rows = con.execute("select count(*), count(distinct id) from decisions where id like 'ev-%'").fetchone()
        total = con.execute("select count(*) from decisions").fetchone()[0]
    assert sent_rows == (60_000, 60_000)
    assert total == 60_000 + logged_decide

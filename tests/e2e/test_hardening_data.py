"""Issue 18, data, against the daemon subprocess: a damaged WAL, a damaged database file, a damaged
spool line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.service.spool import Spool
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Decision, Flush

pytestmark = pytest.mark.e2e
REFLEXD = Path(sys.executable).parent / "reflexd"
EX_DATAERR = 65
EX_TEMPFAIL = 75


def decisions(start: int, n: int) -> list[Decision]:
    return [
        Decision(id=f"d{i}", agent="a", context={"i": i, "s": "x" * 50}, actions=["p", "q"], chosen="p", prob=0.5)
        for i in range(start, start + n)
    ]


def send_loaded(d: DaemonProcess, events: list[Decision], req: int) -> None:
    """Send a batch and wait until it is in DuckDB (``flush {"loaded": true}``)."""
    with Connection(d.socket) as conn:
        conn.send([*events, Flush(req=req, loaded=True)])
        assert conn.receive() == Ack(count=len(events), req=req)


def settled_status(d: DaemonProcess):
    """Status once what an earlier run left (spool/ and spool/loaded/) is in the store: an empty
    ``flush {"loaded": true}`` waits for that too."""
    send_loaded(d, [], req=99)
    return d.status()


def log_records(d: DaemonProcess) -> list[dict]:
    records = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def stored_ids(db: Path) -> list[str]:
    with duckdb.connect(str(db), read_only=True) as con:
        return [r[0] for r in con.execute("SELECT id FROM decisions").fetchall()]


def check_store(d: DaemonProcess) -> tuple[int, dict]:
    proc = subprocess.run(
        [str(REFLEXD), "check-store", "--config", str(d.config_path), "--json"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


# ---- item 1: a damaged or lost WAL -------------------------------------------------------


@pytest.mark.parametrize("wal_damage", ["last-byte-cut", "deleted"])
def test_a_damaged_or_lost_wal_loses_no_acknowledged_event(daemon_factory, wal_damage: str) -> None:
    # no checkpoint comes on its own while the test runs: the WAL is the store's only copy
    d: DaemonProcess = daemon_factory({"store": {"checkpoint_interval": 3600}})
    for k in range(3):
        send_loaded(d, decisions(k * 1000, 1000), req=k)
    db = d.state_dir / "reflexd.duckdb"
    wal = db.with_name(db.name + ".wal")
    assert wal.stat().st_size > 0, "the loads must still be in the WAL alone"
    d.kill()
    if wal_damage == "deleted":
        wal.unlink()
    else:
        os.truncate(wal, wal.stat().st_size - 1)
    d.start()
    status = settled_status(d)
    assert status.experience["decisions"] == 3000
    restored = status.ingest["restored_after_loss"]
    assert restored == (3000 if wal_damage == "deleted" else 1000), status.ingest
    said = [r for r in log_records(d) if "restored them from spool/loaded/" in r.get("event", "")]
    assert said and said[-1]["level"] == "error" and said[-1]["events"] == restored
    assert d.stop() == 0
    assert not list((d.state_dir / "spool" / "loaded").iterdir())  # checkpointed, then deleted
    ids = stored_ids(db)
    assert len(ids) == 3000 and set(ids) == {f"d{i}" for i in range(3000)}


def test_loaded_segments_are_deleted_once_checkpointed(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory({"store": {"checkpoint_interval": 0.5}})
    send_loaded(d, decisions(0, 500), req=0)
    loaded = d.state_dir / "spool" / "loaded"
    wait_for(lambda: not list(loaded.iterdir()), 30, "the checkpoint that makes the loaded segment redundant")
    assert d.status().ingest["restored_after_loss"] == 0


# ---- item 2: a damaged database file -----------------------------------------------------


def data_block_offset(db: Path) -> int:
    with duckdb.connect(str(db), read_only=True) as con:
        (block_size,) = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()
        (block,) = con.execute(
            "SELECT min(block_id) FROM pragma_storage_info('decisions') WHERE column_name = 'context' AND block_id >= 0"
        ).fetchone()
    return 3 * 4096 + block * block_size + 1000  # past the file's three 4 KiB headers


@pytest.mark.parametrize("damage", ["truncated-to-half", "flipped-data-block"])
def test_a_damaged_store_is_refused_at_start_and_by_check_store(daemon_factory, damage: str) -> None:
    d: DaemonProcess = daemon_factory()
    for k in range(4):
        send_loaded(d, decisions(k * 5000, 5000), req=k)
    code, report = check_store(d)
    assert (code, report["state"], report["code"]) == (EX_TEMPFAIL, "in_use", "store_in_use"), report
    assert "stop the daemon" in report["error"]
    assert d.stop() == 0
    code, report = check_store(d)
    assert (code, report["ok"], report["state"]) == (0, True, "sound") and report["rows"]["decisions"] == 20_000
    db = d.state_dir / "reflexd.duckdb"
    if damage == "truncated-to-half":
        os.truncate(db, db.stat().st_size // 2)
    else:
        at = data_block_offset(db)
        with open(db, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))
    digest = hashlib.sha256(db.read_bytes()).hexdigest()

    start = subprocess.run(
        [sys.executable, "-m", "reflexd", "run", "--config", str(d.config_path)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    assert start.returncode == EX_DATAERR, start.stderr
    assert f"the store {db} is damaged" in start.stderr and f"mv {db} {db}.damaged" in start.stderr
    assert not Path(d.socket).exists()
    code, report = check_store(d)
    assert (code, report["ok"], report["state"], report["code"]) == (EX_DATAERR, False, "damaged", "store_damaged")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest, "the damaged file was written to"
    assert not db.with_name(db.name + ".wal").exists()

    # the documented way out: move the file aside, start again on a new store
    db.rename(db.with_name(db.name + ".damaged"))
    d.start()
    assert d.status().experience["decisions"] == 0


# ---- item 4: a damaged spool line --------------------------------------------------------


def test_a_damaged_spool_line_loses_only_its_damaged_event(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory()
    d.stop()
    spool = Spool(d.state_dir / "spool", 1 << 20)
    spool.append(decisions(0, 500), 1.0)
    spool.close()
    (segment,) = spool.take()
    line = segment.read_bytes()
    at = line.index(b'"id":"d250"') + len(b'"id":"d250",')  # the quote opening the next field name
    segment.write_bytes(line[:at] + bytes([line[at] ^ 0x01]) + line[at + 1 :])  # as a crash might leave it
    d.start()
    status = settled_status(d)
    assert status.experience["decisions"] == 499
    assert status.ingest["refused_by_store"] == 1 and status.ingest["recovered_from_spool"] == 499
    rejected = (d.state_dir / "spool" / "rejected" / segment.name).read_bytes()
    assert b'"id":"d250"' in rejected and b'"id":"d251"' not in rejected
    assert d.stop() == 0
    db = d.state_dir / "reflexd.duckdb"
    assert set(stored_ids(db)) == {f"d{i}" for i in range(500)} - {"d250"}
    with duckdb.connect(str(db), read_only=True) as con:
        ((code, reason),) = con.execute("SELECT code, reason FROM dead_letters").fetchall()
    assert code == "refused_by_store" and "1 events set aside in" in reason and "other 499 events were loaded" in reason

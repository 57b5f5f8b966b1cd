"""Kill the daemon with SIGKILL at random moments while an agent streams; lose nothing acknowledged.

CI runs 20 cycles; ``make bench-crash`` runs the same test with 200.
"""

from __future__ import annotations

import random
import threading

import duckdb
import pytest

from conftest import DaemonProcess
from reflexd.client.policy import Policy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_acknowledged_events_survive_repeated_sigkill_exactly_once(daemon_factory, request) -> None:
    cycles = request.config.getoption("--crash-cycles")
    d: DaemonProcess = daemon_factory()
    rng = random.Random(11)
    stop = threading.Event()
    decided: list[str] = []
    policy = Policy("crash", socket=d.socket, state_dir=d.state_dir, buffer_size=1_000_000)

    def agent() -> None:
        i = 0
        while not stop.is_set():
            choice = policy.decide({"i": i, "kind": i % 5}, ["x", "y", "z"])
            decided.append(choice.id)
            policy.reward(choice.id, float(i % 2))
            i += 1
            if i % 50 == 0:
                stop.wait(0.01)  # a busy agent (~3k decisions/s), not a loop that starves the daemon

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        for _ in range(cycles):
            stop.wait(rng.uniform(0.05, 0.5))  # a random moment: mid-batch, mid-commit, idle
            d.kill()
            d.start()
    finally:
        stop.set()
        thread.join()
    assert policy.flush(timeout=180), policy.stats()
    stats = policy.stats()
    assert stats["dropped"] == 0, "the client buffer overflowed; the test must not outrun the daemon"
    policy.close()
    status = d.status()
    ing = status.ingest
    assert ing["received"] == ing["stored"] + ing["duplicates"] + ing["dead_letters"] + status.backlog
    d.stop()
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        rows = con.execute("select id from decisions").fetchall()
        outcomes = con.execute("select count(*), count(distinct id) from outcomes").fetchone()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a decision was stored twice"
    missing = set(decided) - set(ids)
    assert not missing, f"{len(missing)} of {len(decided)} acknowledged decisions lost after {cycles} kills"
    assert outcomes == (len(decided), len(decided))
    assert stats["settled"] == stats["enqueued"]
    assert stats["reconnects"] >= cycles // 4  # the kills really interrupted the stream
    print(f"\n{cycles} SIGKILLs, {len(decided)} decisions + {outcomes[0]} outcomes, all stored exactly once")

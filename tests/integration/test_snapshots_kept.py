"""The read-out snapshots a daemon keeps (``reflexd.service.snapshots``): bounded in number and by
the disk, deleted on release, on expiry, at start and all at once for ``forget``. A real store."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from reflexd.config import parse_config
from reflexd.errors import SnapshotRefused
from reflexd.service import snapshots
from reflexd.service.snapshots import Snapshots
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Release, Snapshot, SnapshotTaken


@pytest.fixture
def kept(tmp_path: Path):
    config = parse_config(f"state_dir: {tmp_path / 'state'}\nagents: {{router: {{rewards: {{wait_window: 5}}}}}}\n")
    old = os.umask(0o027)  # as the daemon runs
    try:
        with Store(config.db_path) as store:
            store.write([Decision(id="d1", agent="a", context={}, actions=["x"], chosen="x", prob=1.0)], received_at=1.0)
            yield Snapshots(lambda: config, store)
    finally:
        os.umask(old)


def test_a_snapshot_is_the_daemons_own_folder_readable_by_its_group(kept: Snapshots) -> None:
    taken = anyio.run(kept.take, Snapshot())
    assert isinstance(taken, SnapshotTaken) and len(taken.id) == 32
    folder = Path(taken.directory)
    assert folder == kept.directory / taken.id and folder.parent.name == "snapshots"
    assert taken.rows["decisions"] == 1 and set(taken.tables) == {"decisions", "outcomes", "steps", "events", "dead_letters", "models"}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert all(stat.S_IMODE(Path(f).stat().st_mode) == 0o640 for f in taken.tables.values())
    assert taken.rewards[""].wait_window == 30 and taken.rewards["router"].wait_window == 5
    assert taken.expires == pytest.approx(taken.taken_at + snapshots.KEEP_SECONDS, abs=60)
    # it travels as the reply it is
    assert msgspec.json.decode(msgspec.json.encode(taken), type=SnapshotTaken) == taken

    done = anyio.run(kept.release, taken.id)
    assert "deleted" in done.message and not folder.exists() and kept.kept == 0
    assert "gone already" in anyio.run(kept.release, taken.id).message


def test_the_number_kept_is_bounded_and_expired_ones_are_deleted(kept: Snapshots, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = [anyio.run(kept.take, Snapshot()) for _ in range(snapshots.MAX_KEPT)]
    with pytest.raises(SnapshotRefused, match=f"{snapshots.MAX_KEPT} snapshots are kept already"):
        anyio.run(kept.take, Snapshot())
    anyio.run(kept.release, taken[0].id)
    anyio.run(kept.release, taken[1].id)
    another = anyio.run(kept.take, Snapshot())

    monkeypatch.setattr(snapshots, "KEEP_SECONDS", 0.0)  # the next one expires as soon as it is taken
    expiring = anyio.run(kept.take, Snapshot(archive=False))
    assert kept.kept == snapshots.MAX_KEPT

    async def sweep() -> None:
        async with kept.lock:
            await kept._sweep()

    anyio.run(sweep)
    assert not Path(expiring.directory).exists() and kept.kept == snapshots.MAX_KEPT - 1
    assert Path(another.directory).is_dir()


def test_leftovers_go_at_start_and_forget_removes_every_snapshot(kept: Snapshots) -> None:
    kept.directory.mkdir(parents=True, exist_ok=True)
    (kept.directory / ("0" * 32)).mkdir()  # a folder a stopped daemon left
    (kept.directory / "stray").write_text("x")
    taken = anyio.run(kept.take, Snapshot())  # a take sweeps first
    assert sorted(p.name for p in kept.directory.iterdir()) == [taken.id]
    anyio.run(kept.take, Snapshot())

    async def remove_all() -> int:
        async with kept.lock:
            return await kept.remove_all()

    assert anyio.run(remove_all) == 2 and list(kept.directory.iterdir()) == [] and kept.kept == 0


def test_a_snapshot_that_could_fill_the_disk_is_refused(kept: Snapshots, monkeypatch: pytest.MonkeyPatch) -> None:
    free = __import__("shutil").disk_usage(kept.store.path.parent).free
    monkeypatch.setattr(snapshots, "RESERVE_BYTES", free + (1 << 30))
    with pytest.raises(SnapshotRefused, match="not enough free disk"):
        anyio.run(kept.take, Snapshot())
    assert kept.kept == 0 and list(kept.directory.iterdir()) == []


def test_release_names_no_path() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"type": "release", "id": "../../etc"}, Release)
    assert msgspec.json.decode(b'{"type":"snapshot"}', type=Snapshot) == Snapshot(archive=True)
    with pytest.raises(msgspec.ValidationError):  # no field names a path
        msgspec.json.decode(b'{"type":"snapshot","directory":"/tmp/x"}', type=Snapshot)


def test_a_snapshot_its_reader_renews_outlives_its_first_expiry(kept: Snapshots, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshots, "KEEP_SECONDS", 0.5)
    taken = anyio.run(kept.take, Snapshot())
    renewed = anyio.run(kept.take, Snapshot())

    async def sweep() -> None:
        async with kept.lock:
            await kept._sweep()

    for _ in range(3):  # a reader that renews every 0.3 s keeps it past its first 0.5 s
        time.sleep(0.3)
        assert "kept until" in anyio.run(kept.renew, renewed.id).message
    anyio.run(sweep)
    assert not Path(taken.directory).exists() and Path(renewed.directory).is_dir()
    assert "gone already" in anyio.run(kept.renew, taken.id).message

    # never past MAX_AGE_SECONDS after it was taken, renewed or not, and never shortened
    monkeypatch.setattr(snapshots, "MAX_AGE_SECONDS", 0.0)
    before = kept._kept[renewed.id]
    assert "no later: one is kept at most 0 hours after it was taken" in anyio.run(kept.renew, renewed.id).message
    assert kept._kept[renewed.id] == before
    time.sleep(0.6)
    anyio.run(sweep)
    assert not Path(renewed.directory).exists() and kept.kept == 0


def test_a_source_renews_its_snapshot_while_open(kept: Snapshots, monkeypatch: pytest.MonkeyPatch) -> None:
    from reflexd.tools import readout

    monkeypatch.setattr(snapshots, "KEEP_SECONDS", 3.0)  # renewed every second
    taken = anyio.run(kept.take, Snapshot())
    renewals: list[str] = []

    def renew() -> None:
        renewals.append(anyio.run(kept.renew, taken.id).message)

    released = []
    with readout.from_snapshot(taken, lambda: released.append(True), renew) as source:
        assert readout.run_query(source, "SELECT count(*) FROM decisions").batches().__next__() == [(1,)]
        deadline = time.monotonic() + 30
        while len(renewals) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(renewals) >= 2 and all("kept until" in m for m in renewals) and released == [True]
    count = len(renewals)
    time.sleep(1.5)
    assert len(renewals) == count  # no renewal once the source is closed


def test_a_release_may_ask_to_renew_instead() -> None:
    msg = msgspec.json.decode(b'{"type":"release","id":"0123456789abcdef0123456789abcdef","renew":true}', type=Release)
    assert msg.renew and not Release(id="0123456789abcdef0123456789abcdef").renew

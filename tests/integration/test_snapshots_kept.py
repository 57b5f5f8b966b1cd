"""The read-out snapshots a daemon keeps (``reflexd.service.snapshots``): bounded in number and by
the disk, deleted on release, on expiry, at start and all at once for ``forget``. A real store."""

from __future__ import annotations

import os
import stat
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

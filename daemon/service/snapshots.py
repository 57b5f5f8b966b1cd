"""Read-out snapshots the daemon writes and keeps for a while: the ``snapshot`` and ``release`` requests.

A snapshot is a folder ``<state_dir>/snapshots/<id>/`` (the id is random: the peer names no path)
holding every table of the store as Parquet as of one moment, and hard links to the Parquet
archive's files as of the same moment (``Store.read_out``). Its files are the daemon's, readable by
its primary group, the state directory's (the state directory is 0750 and the daemon's umask
0027), so ``reflexd query`` and ``reflexd export`` run as a member of that group can read them
while the daemon holds the database.

Bounded, so that a flood of requests cannot fill the disk: one snapshot is written at a time; at
most ``MAX_KEPT`` exist at once (more are refused until one is released or expires); one is
refused when it could leave the disk with less free space than the store itself takes. Each is
deleted on ``release``, ``KEEP_SECONDS`` after it was taken or last renewed (its reader renews it
while it reads, so a long export is not cut off, but never past ``MAX_AGE_SECONDS`` after it was
taken), by ``forget`` (it may hold the agent's rows), and, if the daemon stopped before, at its
next start.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio

from reflexd.config import Config
from reflexd.errors import RequestTimeout, SnapshotRefused
from reflexd.service.store import Store
from reflexd.wire.protocol import Done, RewardRule, Snapshot, SnapshotTaken

SNAPSHOTS_DIR = "snapshots"
KEEP_SECONDS = 900.0  # a snapshot not released is deleted this long after it was taken or last renewed
MAX_AGE_SECONDS = 86400.0  # and this long after it was taken, renewed or not
MAX_KEPT = 4
SWEEP_SECONDS = 15.0
RESERVE_BYTES = 64 << 20  # free space a snapshot must leave beyond the store's own size


def reward_rules(config: Config) -> dict[str, RewardRule]:
    """The reward rules in force by agent, "" for the global ones (as ``rewards.reward_rules``)."""
    rules = {"": config.rewards} | {agent: override.rewards for agent, override in config.agents.items()}
    return {
        agent: RewardRule(
            wait_window=r.wait_window, default=r.default, aggregation=r.aggregation,
            episode_return=r.episode_return, discount=r.discount, episode_timeout=r.episode_timeout,
        )
        for agent, r in rules.items()
    }


class Snapshots:
    def __init__(self, settings: Callable[[], Config], store: Store) -> None:
        self.settings = settings
        self.store = store
        self.directory = settings().state_path / SNAPSHOTS_DIR  # state_dir changes only at a restart
        # one snapshot is written at a time; `forget` holds it while it deletes, so no snapshot
        # taken before the delete outlives it
        self.lock = anyio.Lock()
        self._kept: dict[str, float] = {}  # id -> when it is deleted (inf while it is being written)
        self._taken: dict[str, float] = {}  # id -> when it was taken

    @property
    def kept(self) -> int:
        return len(self._kept)

    async def take(self, msg: Snapshot) -> SnapshotTaken:
        limit = self.settings().socket.request_timeout
        with anyio.move_on_after(limit) as waited:
            await self.lock.acquire()
        if waited.cancelled_caught:
            raise RequestTimeout("snapshot: another snapshot is still being written", limit)
        try:
            await self._sweep()
            if len(self._kept) >= MAX_KEPT:
                raise SnapshotRefused(
                    f"{MAX_KEPT} snapshots are kept already; each is deleted when its reader releases it, or"
                    f" {KEEP_SECONDS / 60:g} minutes after its reader last renewed it: try again later"
                )
            room = await anyio.to_thread.run_sync(self._room)
            if room is not None:
                raise SnapshotRefused(room)
            config = self.settings()
            snapshot_id = uuid.uuid4().hex
            dest = self.directory / snapshot_id
            self._kept[snapshot_id] = math.inf
            taken_at = time.time()
            try:
                written = await anyio.to_thread.run_sync(
                    self._write, dest, config.archive_path if msg.archive else None
                )
            except BaseException:
                self._kept.pop(snapshot_id, None)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(shutil.rmtree, dest, True)
                raise
            expires = time.time() + KEEP_SECONDS
            self._kept[snapshot_id] = expires
            self._taken[snapshot_id] = taken_at
        finally:
            self.lock.release()
        return SnapshotTaken(
            id=snapshot_id,
            directory=str(dest),
            taken_at=taken_at,
            expires=expires,
            tables=written.tables,
            rows=written.rows,
            archive=written.archive,
            linked=written.linked,
            rewards=reward_rules(config),
            req=msg.req,
        )

    def _write(self, dest: Path, archive_root: Path | None) -> object:
        dest.mkdir(parents=True)
        return self.store.read_out(dest, archive_root)

    def _room(self) -> str | None:
        """Why the disk has no room for another snapshot (None: it has). A snapshot's Parquet files
        are smaller than the database file they come from, so that file's size bounds it."""
        self.directory.mkdir(exist_ok=True)
        db = self.store.path
        need = sum(p.stat().st_size for p in (db, db.with_name(db.name + ".wal")) if p.exists())
        free = shutil.disk_usage(self.directory).free
        if free < 2 * need + RESERVE_BYTES:
            return (
                f"not enough free disk for a snapshot: {free >> 20} MiB free under {self.directory}, and a snapshot"
                f" of the {need >> 20} MiB store must leave at least as much again and {RESERVE_BYTES >> 20} MiB"
            )
        return None

    async def release(self, snapshot_id: str, req: object = None) -> Done:
        expires = self._kept.get(snapshot_id)
        if expires is None:
            return Done(message=f"snapshot {snapshot_id} is gone already", req=req)
        if math.isinf(expires):  # still being written: its taker has not been given it yet
            return Done(message=f"snapshot {snapshot_id} is still being written", req=req)
        del self._kept[snapshot_id]
        self._taken.pop(snapshot_id, None)
        await anyio.to_thread.run_sync(shutil.rmtree, self.directory / snapshot_id, True)
        return Done(message=f"snapshot {snapshot_id} deleted", req=req)

    async def renew(self, snapshot_id: str, req: object = None) -> Done:
        """Keep snapshot ``snapshot_id`` ``KEEP_SECONDS`` from now, its reader still reading it, but
        not past ``MAX_AGE_SECONDS`` after it was taken (a release with ``renew``)."""
        expires = self._kept.get(snapshot_id)
        if expires is None:
            return Done(message=f"snapshot {snapshot_id} is gone already", req=req)
        if math.isinf(expires):
            return Done(message=f"snapshot {snapshot_id} is still being written", req=req)
        limit = self._taken.get(snapshot_id, expires) + MAX_AGE_SECONDS
        self._kept[snapshot_id] = expires = max(expires, min(time.time() + KEEP_SECONDS, limit))
        until = dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat(timespec="seconds")
        last = f" (no later: one is kept at most {MAX_AGE_SECONDS / 3600:g} hours after it was taken)" if expires >= limit else ""
        return Done(message=f"snapshot {snapshot_id} kept until {until}{last}", req=req)

    async def run(self) -> None:
        """Delete expired snapshots, and at start what an earlier run left."""
        while True:
            async with self.lock:
                await self._sweep()
            await anyio.sleep(SWEEP_SECONDS)

    async def _sweep(self) -> None:
        """Delete expired snapshots and any folder not kept (called with the lock held)."""
        now = time.time()
        for snapshot_id in [i for i, expires in self._kept.items() if expires <= now]:
            del self._kept[snapshot_id]
            self._taken.pop(snapshot_id, None)
        await anyio.to_thread.run_sync(self._remove_except, set(self._kept))

    async def remove_all(self) -> int:
        """Delete every snapshot (``forget``: they may hold the agent's rows; called with the lock
        held, so none is being written); how many there were."""
        self._kept.clear()
        self._taken.clear()
        return await anyio.to_thread.run_sync(self._remove_except, set())

    def _remove_except(self, keep: set[str]) -> int:
        if not self.directory.is_dir():
            return 0
        removed = 0
        for child in self.directory.iterdir():
            if child.name in keep:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed += 1
        return removed

"""The DuckDB store: persists experience events and answers the queries the daemon needs.

One connection guarded by one lock: DuckDB connections are not safe to share between threads,
and the daemon's writers and readers run in worker threads. Events arrive as spool segments
(``reflexd.service.spool``) that DuckDB's own JSON reader loads, so no row is built in Python. Tables
named in SQL such as ``FROM letters`` are Python locals of the calling function, found by
DuckDB's replacement scan.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from reflexd import log
from reflexd.config import Config, StoreConfig
from reflexd.errors import RejectedData, StorageError
from reflexd.learning import join
from reflexd.service import spool
from reflexd.service.store import export, findings, integrity, retention, rewards
from reflexd.service.store.db import (
    COUNTED_TABLES,
    EXPERIENCE_TABLES,
    MIGRATIONS,
    SCHEMA,
    failing_as,
    outside_select,
    sql_path,
)
from reflexd.service.store.load import WriteResult, load_segment
from reflexd.service.store.rewards import RewardStats, SnapshotInfo
from reflexd.wire.protocol import Decision, Event, Outcome, Step

__all__ = ["DeadLetter", "RewardStats", "SetAside", "SnapshotInfo", "Store", "WriteResult", "EXPERIENCE_TABLES"]

_log = log.get("reflexd.store")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A frame that could not be accepted; ``raw`` is capped, ``raw_size`` is the original length."""

    received_at: float
    peer_uid: int | None
    peer_pid: int | None
    code: str
    reason: str
    raw: bytes
    raw_size: int


_DEAD_LETTERS = pa.schema(
    [
        ("received_at", pa.float64()),
        ("peer_uid", pa.int64()),
        ("peer_pid", pa.int64()),
        ("code", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.binary()),
        ("raw_size", pa.int64()),
    ]
)


class SetAside(msgspec.Struct, frozen=True, kw_only=True):
    """What the store could not load of one spool line, as a spool line of its own."""

    line: bytes
    reason: str
    events: int  # events in it (those too damaged to read counted by where each starts)
    loaded: int  # events of the same line that were loaded


class Store:
    def __init__(self, path: Path | str, settings: StoreConfig = StoreConfig(), read_only: bool = False) -> None:
        """Open (or create) the database; ``read_only`` opens an existing one without writing to it,
        and tells a damaged or locked file (StoreDamaged, StoreInUse) from other failures."""
        self.path = Path(path)
        self.settings = settings
        self.read_only = read_only
        self.checkpoint_interval = settings.checkpoint_interval
        self._lock = threading.Lock()
        # held while the archive's set of files changes (archiving, recovery, pruning, forget) and
        # while a snapshot links it; taken before ``_lock``, never while holding it
        self._archive_lock = threading.Lock()
        self._invalidated: str | None = None  # why DuckDB refuses the connection until it is reopened
        self._con = self._connect()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        settings = self.settings
        try:
            if not self.read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(
                str(self.path),
                read_only=self.read_only,
                config={
                    "threads": settings.threads,
                    "memory_limit": f"{settings.memory_limit_mb}MiB",
                    # what big queries (snapshots, archiving) spill stays beside the database
                    "temp_directory": f"{self.path}.tmp",
                    # lets DuckDB's allocator hand freed memory back to the system within a second or
                    # so of a load or query, instead of keeping it for the next one
                    "allocator_background_threads": True,
                },
            )
            if not self.read_only:
                con.execute(SCHEMA)
                con.execute(MIGRATIONS)
        except duckdb.Error as exc:
            if self.read_only:
                raise integrity.classify(exc, self.path, "opening it") from exc
            raise StorageError(f"cannot open the store at {self.path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open the store at {self.path}: {exc}") from exc
        return con

    @classmethod
    def check_file(cls, path: Path | str, settings: StoreConfig = StoreConfig()) -> dict[str, int] | None:
        """``verify`` the database at ``path`` opened read-only, before anything writes to it: its
        rows per table, None if there is no file yet; StoreDamaged or StoreInUse otherwise."""
        if not Path(path).exists():
            return None
        with cls(path, settings, read_only=True) as store:
            return store.verify()

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _guard(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """Hold the lock and report any database or file failure as StorageError.

        After a fatal error (a checkpoint that failed on a full disk, say) DuckDB refuses the
        connection for good; the next call opens the database again, which replays its
        write-ahead log, so a store that failed once works again once the disk does.
        """
        with self._lock:
            if self._invalidated is not None:
                self._reopen(what)
            try:
                with failing_as(what):
                    yield self._con
            except StorageError as exc:
                if isinstance(exc.__cause__, duckdb.FatalException):
                    self._invalidated = str(exc)
                raise

    def _reopen(self, what: str) -> None:
        try:
            self._con.close()
        except duckdb.Error:
            pass
        try:
            self._con = self._connect()
        except StorageError as exc:
            raise StorageError(f"{what} failed: the store cannot be opened again: {exc}") from exc
        _log.warning("the store was opened again after a fatal error", error=self._invalidated)
        self._invalidated = None

    # ---- integrity -------------------------------------------------------------------------

    def verify(self) -> dict[str, int]:
        """Read every column of every table, so DuckDB checks every data block against its checksum
        (``integrity``): the rows of each table, or StoreDamaged."""
        with self._lock:
            return integrity.verify(self._con, self.path)

    def checkpoint(self) -> None:
        """Write what the write-ahead log holds into the database file (DuckDB's CHECKPOINT)."""
        with self._guard("checkpointing the store") as con:
            con.execute("CHECKPOINT")

    # ---- writing ---------------------------------------------------------------------------

    def load(self, segment: Path) -> WriteResult:
        """Load one spool segment (``reflexd.service.spool``) in one transaction, with DuckDB's JSON reader.

        Events whose id is already stored (or repeats in the segment) are skipped, which makes a
        resend after a lost acknowledgement, and loading a segment again after a crash, exactly-once.
        """
        with self._guard(f"loading spool segment {segment.name}") as con:
            return load_segment(con, segment)

    def load_each_line(self, segment: Path) -> tuple[WriteResult, list[SetAside]]:
        """Load a segment DuckDB refused as a whole one line (one batch) at a time, and of a line
        it refuses, every event that can still be read and is not refused on its own.

        Returns what loaded, and what was left of each refused line, with DuckDB's reason.
        """
        results: list[WriteResult] = []
        refused = []
        with tempfile.TemporaryDirectory(prefix=".lines-", dir=self.path.parent) as tmp:
            single = Path(tmp) / segment.name  # same name, so the ids it derives are the same
            with failing_as(f"reading spool segment {segment.name}"), open(segment, "rb") as lines:
                for line in lines:
                    single.write_bytes(line)
                    try:
                        results.append(self.load(single))
                    except RejectedData as exc:
                        left = self._salvage(single, line, str(exc), results)
                        if left is not None:
                            refused.append(left)
        total = {k: sum(getattr(r, k) for r in results) for k in ("inserted", "duplicates", "taken", *EXPERIENCE_TABLES)}
        return WriteResult(**total), refused

    def _salvage(self, single: Path, line: bytes, reason: str, results: list[WriteResult]) -> SetAside | None:
        """Load the events of a refused line one by one (``spool.split_line``); what is left, set aside."""
        parts = spool.split_line(line, single.stem)
        if parts is None:  # not even its head can be read
            return SetAside(line=line, reason=reason, events=spool.Spool.events_in(line), loaded=0)
        before = len(results)
        refused = self._load_events(single, parts.head, parts.events, results)
        loaded = sum(r.inserted + r.duplicates + r.taken for r in results[before:])
        events = parts.damaged_events + len(refused)
        if not events:
            return None
        if refused and not parts.damaged_events:
            reason = refused[0][2]  # the reason of an event refused on its own
        kept = line if not loaded else spool.build_line(parts.head, parts.damaged + [(g, raw) for g, raw, _ in refused])
        return SetAside(line=kept, reason=reason, events=events, loaded=loaded)

    def _load_events(
        self, single: Path, head: bytes, events: list[tuple[str, bytes]], results: list[WriteResult]
    ) -> list[tuple[str, bytes, str]]:
        """Load ``events`` as one line, or halves of it while one is refused; the events refused alone."""
        if not events:
            return []
        single.write_bytes(spool.build_line(head, events))
        try:
            results.append(self.load(single))
            return []
        except RejectedData as exc:
            if len(events) == 1:
                return [(*events[0], str(exc))]
        half = len(events) // 2
        return self._load_events(single, head, events[:half], results) + self._load_events(
            single, head, events[half:], results
        )

    def write(self, events: Sequence[Decision | Outcome | Step | Event], received_at: float) -> WriteResult:
        """Store one batch now, through a one-line segment: for tools and tests, not the daemon's ingest."""
        what = f"writing a batch of {len(events)} events"
        with failing_as(what), tempfile.TemporaryDirectory(prefix=".write-", dir=self.path.parent) as tmp:
            segment = Path(tmp) / f"{uuid.uuid4().hex}{spool.SUFFIX}"  # its name seeds the ids it assigns
            segment.write_bytes(spool.encode_line(events, received_at, 0))
            return self.load(segment)

    def dead_letter(self, rows: Sequence[DeadLetter]) -> None:
        what = f"storing {len(rows)} dead letters"
        with failing_as(what):
            letters = pa.table({c: [getattr(r, c) for r in rows] for c in _DEAD_LETTERS.names}, schema=_DEAD_LETTERS)  # noqa: F841
        with self._guard(what) as con:
            con.execute("INSERT INTO dead_letters BY NAME SELECT * FROM letters")

    def record_model_event(self, version: str, event: str, detail: dict[str, Any], at: float) -> None:
        with self._guard(f"recording model event {event!r} for {version}") as con:
            con.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?)", [at, version, event, spool.plain_json(detail).decode()]
            )

    # ---- reading ---------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._guard("counting rows") as con:
            return self._counts(con)

    @staticmethod
    def _counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
        selects = ", ".join(f"(SELECT count(*) FROM {t})" for t in COUNTED_TABLES)
        return dict(zip(COUNTED_TABLES, con.execute(f"SELECT {selects}").fetchone()))

    def stats(self) -> dict[str, Any]:
        with self._guard("reading store statistics") as con:
            counts = self._counts(con)
        wal = self.path.with_name(self.path.name + ".wal")
        return {
            "path": str(self.path),
            "db_bytes": self.path.stat().st_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "rows": counts,
        }

    def model_events(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent model events, newest first."""
        with self._guard("reading model events") as con:
            rows = con.execute(
                'SELECT "at", version, event, CAST(detail AS VARCHAR) FROM models ORDER BY "at" DESC LIMIT ?',
                [limit],
            ).fetchall()
        return [{"at": at, "version": v, "event": e, "detail": msgspec.json.decode(d)} for at, v, e, d in rows]

    def matured_count(self, since: float, now: float, config: Config, agents: Sequence[str] | None = None) -> int:
        """Decisions received after ``since`` whose reward wait window has closed by ``now`` (``agents``': a line's)."""
        with self._guard("counting matured decisions") as con:
            return rewards.matured_count(con, since, now, config, agents)

    def matured_counts(self, lines: Sequence[tuple[float, Sequence[str] | None]], now: float, config: Config) -> list[int]:
        """``matured_count`` of each (since, agents) of ``lines``, counted together."""
        with self._guard("counting matured decisions") as con:
            return rewards.matured_counts(con, lines, now, config)

    def outcomes_without_decision(self, since: float) -> int:
        """Outcomes received after ``since`` whose ``decision_id`` names no stored decision: rewards
        that join nothing, as an agent rewarding ids of its own making sends. A hash join over the
        decisions' ids: some 20 ms per million decisions, read by ``status`` alone. An outcome that
        came before its decision counts until the decision is stored."""
        with self._guard("counting outcomes without a decision") as con:
            (n,) = con.execute(
                "SELECT count(*) FROM outcomes o WHERE received_at > ?"
                f" AND NOT EXISTS (SELECT 1 FROM decisions d WHERE {join.owns('o', 'd')})",
                [since],
            ).fetchone()
            return n

    def live_rewards(self, versions: Sequence[str], now: float, config: Config) -> dict[str, RewardStats]:
        """Count, mean and variance of the joined reward of each version's matured decisions."""
        with self._guard("computing live rewards per model") as con:
            return rewards.live_rewards(con, versions, now, config)

    def snapshot(self, dest: Path, now: float, config: Config, max_rows: int, **window: Any) -> SnapshotInfo:
        """Write the newest ``max_rows`` matured decisions with their joined reward to one Parquet file;
        ``window`` narrows them (``agent``, ``since``, ``until``, ``model_version``, ``agents``, ``after``:
        ``rewards.snapshot``)."""
        what = "the window's snapshot" if window else "the training snapshot"
        with self._guard(f"writing {what} {dest}") as con:
            return rewards.snapshot(con, dest, now, config, max_rows, **window)

    def agents(self) -> list[str]:
        """Every agent with a decision stored (each learns in its model line: ``reflexd.lines``)."""
        with self._guard("listing agents") as con:
            return [a for (a,) in con.execute("SELECT DISTINCT agent FROM decisions ORDER BY agent").fetchall()]

    def last_model_event(self, events: Sequence[str], versions: Sequence[str] | None = None) -> dict[str, Any] | None:
        """The newest model event of one of the kinds ``events`` (as ``model_events`` gives them),
        of one of ``versions`` when given (a model line's), or None."""
        with self._guard("reading model events") as con:
            row = con.execute(
                'SELECT "at", version, event, CAST(detail AS VARCHAR) FROM models WHERE list_contains($events, event)'
                " AND ($versions IS NULL OR list_contains($versions, version))"
                ' ORDER BY "at" DESC LIMIT 1',
                {"events": list(events), "versions": None if versions is None else list(versions)},
            ).fetchone()
        if row is None:
            return None
        at, version, event, detail = row
        return {"at": at, "version": version, "event": event, "detail": msgspec.json.decode(detail)}

    # ---- knowledge extraction --------------------------------------------------------------

    def save_insights(self, run: findings.Run, found: dict[str, list[dict[str, Any]]], keep: int) -> None:
        with self._guard(f"storing insights run {run.id}") as con:
            findings.save(con, run, found, keep)

    def trouble_times(self, since: float) -> tuple[list[float], dict[str, list[float]]]:
        """When dead letters arrived since ``since``, and each agent's ``error`` events: what the
        extraction looks for bursts in."""
        with self._guard("reading dead letters and error events") as con:
            dead = [t for (t,) in con.execute(
                "SELECT received_at FROM dead_letters WHERE received_at >= ? ORDER BY received_at", [since]
            ).fetchall()]
            errors: dict[str, list[float]] = {}
            for agent, at in con.execute(
                "SELECT agent, received_at FROM events WHERE kind = 'error' AND received_at >= ? ORDER BY received_at",
                [since],
            ).fetchall():
                errors.setdefault(agent, []).append(at)
        return dead, errors

    def ended_episodes(self) -> int:
        """Episodes with a ``done`` step: what the behaviour model learns success from."""
        with self._guard("counting ended episodes") as con:
            (n,) = con.execute("SELECT count(*) FROM steps WHERE done").fetchone()
        return n

    def steps_snapshot(self, dest: Path) -> int:
        """Every step, as the outside sees them (``db.OUTSIDE``), in one Parquet file that appears
        whole or not at all; how many steps it holds."""
        partial = dest.with_name(dest.name + ".partial")
        with self._guard(f"writing the steps snapshot {dest}") as con:
            try:
                con.execute(f"COPY (SELECT {outside_select('steps')} FROM steps) TO {sql_path(partial)} (FORMAT parquet)")
                os.replace(partial, dest)
            finally:
                partial.unlink(missing_ok=True)
            (n,) = con.execute("SELECT count(*) FROM read_parquet(?)", [str(dest)]).fetchone()
        return n

    def latest_insights(self, agent: str | None = None) -> tuple[findings.Run, dict[str, list[dict[str, Any]]]] | None:
        with self._guard("reading insights") as con:
            return findings.latest(con, agent)

    # ---- retention -------------------------------------------------------------------------

    def archive(self, older_than: float, root: Path, compression: str) -> dict[str, int]:
        """Move rows received before ``older_than`` to Parquet under ``root/<table>/agent=../date=..``,
        a table at a time (``retention.archive_table``), after finishing or undoing any pass a
        failure interrupted (``retention.recover``)."""
        retention.check_compression(compression)
        moved = {}
        for table in retention.ARCHIVE_ORDER:
            with self._archive_lock, self._guard(f"archiving {table} to {root}") as con:
                retention.recover(con, Path(root))
                moved[table] = retention.archive_table(con, table, older_than, Path(root), compression)
        return moved

    def forget(self, agent: str, archive_root: Path | None) -> dict[str, int]:
        """Delete everything stored about ``agent``, in the database and in the archive."""
        with self._archive_lock, self._guard(f"forgetting agent {agent!r}") as con:
            if archive_root is not None:
                retention.recover(con, Path(archive_root))  # an interrupted pass's files are the agent's too
            return retention.forget(con, agent, archive_root)

    def prune_archive(
        self, root: Path, now: float, max_days: float | None, max_bytes: int | None
    ) -> retention.Pruned:
        """Delete the archive's oldest day partitions past ``max_days`` or ``max_bytes``
        (``retention.prune_archive``), under the lock a snapshot links the archive under (not the
        store's: loads go on)."""
        with self._archive_lock, failing_as(f"pruning the archive {root}"):
            return retention.prune_archive(Path(root), now, max_days, max_bytes)

    # ---- read-out snapshots ----------------------------------------------------------------

    def read_out(self, dest: Path, archive_root: Path | None) -> export.Written:
        """Write every table to ``dest/<table>.parquet`` as of one moment, with the archive's files
        linked under ``dest/archive`` as of the same moment (``export``).

        Each row is in exactly one of the two: the read transaction starts under the store's lock
        and the archive's lock, and the archive is linked before the archive's lock is let go.
        Archiving moves rows under both (files published as the rows' deletion commits), pruning
        and ``forget`` delete files under the archive's, so no file comes or goes between the
        transaction's start and the last link: the links are the archive as of that moment. Loads
        are held up only while the transaction starts (the store's lock is let go before the
        archive is walked), whatever the number of archive files; archiving, pruning and
        ``forget`` wait for the walk.
        """
        dest = Path(dest)
        with self._archive_lock:
            with self._guard(f"taking a snapshot into {dest}") as con:
                dest.mkdir(parents=True, exist_ok=True)
                if archive_root is not None:
                    retention.recover(con, Path(archive_root))  # rows a failed pass left in staging
                cur = con.cursor()
                try:
                    export.begin(cur)
                except BaseException:
                    cur.close()
                    raise
            try:
                with failing_as(f"linking the archive into the snapshot {dest}"):
                    archive, linked = export.link_archive(archive_root, dest / "archive")
            except BaseException:
                cur.close()
                raise
        try:
            with failing_as(f"writing the snapshot {dest}"):
                tables, rows = export.copy_tables(cur, dest)
                cur.commit()
        finally:
            cur.close()
        return export.Written(tables=tables, rows=rows, archive=archive, linked=linked)

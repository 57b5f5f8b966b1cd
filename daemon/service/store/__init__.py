"""The DuckDB store: persists experience events and answers the queries the daemon needs.

One connection guarded by one lock: DuckDB connections are not safe to share between threads,
and the daemon's writers and readers run in worker threads. Events arrive as spool segments
(``reflexd.service.spool``) that DuckDB's own JSON reader loads, so no row is built in Python. Tables
named in SQL such as ``FROM letters`` are Python locals of the calling function, found by
DuckDB's replacement scan.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import duckdb
import msgspec
import pyarrow as pa

from reflexd.config import Config, StoreConfig
from reflexd.durable import fsync_path
from reflexd.errors import RejectedData, StorageError
from reflexd.service import spool
from reflexd.wire.protocol import Decision, Event, Outcome, Step

EXPERIENCE_TABLES = ("decisions", "outcomes", "steps", "events")
COUNTED_TABLES = (*EXPERIENCE_TABLES, "dead_letters")
COMPRESSIONS = frozenset({"zstd", "snappy", "gzip", "uncompressed"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id VARCHAR PRIMARY KEY,
    agent VARCHAR NOT NULL,
    ts DOUBLE NOT NULL,
    received_at DOUBLE NOT NULL,
    context JSON NOT NULL,
    actions JSON NOT NULL,
    chosen VARCHAR NOT NULL,
    prob DOUBLE NOT NULL,
    probs JSON,
    model_version VARCHAR,
    strategy VARCHAR
);
CREATE TABLE IF NOT EXISTS outcomes (
    id VARCHAR PRIMARY KEY,
    decision_id VARCHAR NOT NULL,
    agent VARCHAR,
    reward DOUBLE NOT NULL,
    ts DOUBLE NOT NULL,
    received_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    id VARCHAR PRIMARY KEY,
    agent VARCHAR NOT NULL,
    episode VARCHAR NOT NULL,
    idx INTEGER NOT NULL,
    observation JSON NOT NULL,
    action VARCHAR NOT NULL,
    reward DOUBLE NOT NULL,
    done BOOLEAN NOT NULL,
    ts DOUBLE NOT NULL,
    received_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id VARCHAR PRIMARY KEY,
    agent VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    data JSON NOT NULL,
    ts DOUBLE NOT NULL,
    received_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    received_at DOUBLE NOT NULL,
    peer_uid BIGINT,  -- uid_t is unsigned 32-bit
    peer_pid INTEGER,
    code VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    raw BLOB NOT NULL,
    raw_size BIGINT NOT NULL  -- a length prefix may claim up to 4 GiB
);
CREATE TABLE IF NOT EXISTS models (  -- what happened to each model version, newest last
    "at" DOUBLE NOT NULL,  -- quoted: AT is a keyword
    version VARCHAR NOT NULL,
    event VARCHAR NOT NULL,
    detail JSON NOT NULL
);
"""

# A decision has matured once its agent's wait window has passed; `rules` holds one row per
# agent with overrides plus the global settings under the agent id '' (ids are never empty).
_MATURED = """
    SELECT d.*, r.wait_window, r.default_reward, r.aggregation
    FROM decisions d
    LEFT JOIN rules own ON own.agent = d.agent
    JOIN rules r ON r.agent = coalesce(own.agent, '')
    WHERE d.received_at <= $now - r.wait_window
"""

# The reward join, shared by training snapshots and live rewards: given a CTE `recent` of matured
# decisions, `rewards` aggregates each one's outcomes within its wait window, and _JOINED_REWARD
# (over `recent m LEFT JOIN rewards r`) falls back to the default reward when none came.
# Outcomes sharing a received_at (one ingest batch) are ordered by the agent's ts, then id, so
# first/last are deterministic. Rewards are aggregated before joining back, so the wide JSON
# columns are never grouped on.
_REWARDS = """
    rewards AS (
        SELECT m.id,
            CASE m.aggregation
                WHEN 'sum' THEN sum(o.reward)
                WHEN 'mean' THEN avg(o.reward)
                WHEN 'min' THEN min(o.reward)
                WHEN 'max' THEN max(o.reward)
                WHEN 'first' THEN arg_min(o.reward, (o.received_at, o.ts, o.id))
                WHEN 'last' THEN arg_max(o.reward, (o.received_at, o.ts, o.id))
            END AS reward,
            count(*) AS outcomes
        FROM recent m
        JOIN outcomes o ON o.decision_id = m.id AND o.received_at <= m.received_at + m.wait_window
        GROUP BY m.id, m.aggregation
    )
"""
_JOINED_REWARD = "coalesce(r.reward, m.default_reward)"

_EXPERIENCES = f"""
    WITH recent AS (
        SELECT * FROM ({_MATURED}) ORDER BY received_at DESC, ts DESC, id DESC LIMIT $max_rows
    ),
    {_REWARDS}
    SELECT
        m.id, m.agent, m.received_at,
        CAST(m.context AS VARCHAR) AS context,
        CAST(m.actions AS VARCHAR) AS actions,
        m.chosen, m.prob,
        {_JOINED_REWARD} AS reward,
        m.model_version,
        CAST(coalesce(r.outcomes, 0) AS INTEGER) AS outcomes
    FROM recent m LEFT JOIN rewards r ON r.id = m.id
    -- decisions spooled in one ingest batch share received_at; their own ts keeps them in the
    -- order they were made, where their random ids would shuffle them (and the model trained)
    ORDER BY m.received_at, m.ts, m.id
"""

# Live reward per model version: every matured decision a version made, joined as for training.
_LIVE_REWARDS = f"""
    WITH recent AS (
        SELECT * FROM ({_MATURED}) WHERE model_version IN (SELECT version FROM wanted)
    ),
    {_REWARDS}
    SELECT m.model_version, count(*), avg({_JOINED_REWARD}), coalesce(var_samp({_JOINED_REWARD}), 0.0)
    FROM recent m LEFT JOIN rewards r ON r.id = m.id
    GROUP BY m.model_version
"""


def _utc_date(column: str) -> str:
    return f"CAST(make_timestamp(CAST({column} * 1e6 AS BIGINT)) AS DATE) AS date"


# Outcomes sent without an agent are filed under their decision's agent, so `forget` finds them
# in the archive ('_' when the decision is gone too). That needs the decisions still in the
# database, so outcomes are archived first.
_ARCHIVE_SELECT = {
    "outcomes": f"""
        SELECT o.* REPLACE (coalesce(o.agent, d.agent, '_') AS agent),
               {_utc_date('o.received_at')}
        FROM outcomes o LEFT JOIN decisions d ON d.id = o.decision_id
        WHERE o.received_at < $cutoff
    """,
    "decisions": f"SELECT *, {_utc_date('received_at')} FROM decisions WHERE received_at < $cutoff",
    "steps": f"SELECT *, {_utc_date('received_at')} FROM steps WHERE received_at < $cutoff",
    "events": f"SELECT *, {_utc_date('received_at')} FROM events WHERE received_at < $cutoff",
}


class WriteResult(msgspec.Struct, frozen=True, kw_only=True):
    """Rows a batch added; ``duplicates`` are events already stored or repeated in the batch."""

    inserted: int
    duplicates: int
    decisions: int = 0
    outcomes: int = 0
    steps: int = 0
    events: int = 0


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A frame that could not be accepted; ``raw`` is capped, ``raw_size`` is the original length."""

    received_at: float
    peer_uid: int | None
    peer_pid: int | None
    code: str
    reason: str
    raw: bytes
    raw_size: int


class RewardStats(msgspec.Struct, frozen=True, kw_only=True):
    """Joined rewards of the matured decisions one model version made."""

    count: int
    mean: float
    variance: float  # sample variance (ddof=1); 0 with fewer than 2 decisions


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True):
    rows: int
    window_start: float
    window_end: float


# ---- loading spool segments ----------------------------------------------------------------

_SPOOL_COLUMNS = {
    "received_at": "DOUBLE",
    "line": "BIGINT",
    "decisions": "STRUCT(id VARCHAR, agent VARCHAR, context JSON, actions JSON, chosen VARCHAR, prob DOUBLE,"
    " probs JSON, model_version VARCHAR, strategy VARCHAR, ts DOUBLE)[]",
    "outcomes": "STRUCT(id VARCHAR, decision_id VARCHAR, agent VARCHAR, reward DOUBLE, ts DOUBLE)[]",
    "steps": "STRUCT(id VARCHAR, agent VARCHAR, episode VARCHAR, \"index\" INTEGER, observation JSON,"
    " action VARCHAR, reward DOUBLE, done BOOLEAN, ts DOUBLE)[]",
    "events": "STRUCT(id VARCHAR, agent VARCHAR, kind VARCHAR, data JSON, ts DOUBLE)[]",
}
# DuckDB sets aside twice maximum_object_size per read, within store.memory_limit_mb, so it is
# the segment's longest line (the spool keeps lines to spool.LINE_BYTES unless one event is bigger).
_READ_SPOOL = f"""
    CREATE OR REPLACE TEMP TABLE spooled AS
    SELECT * FROM read_json($path, format='newline_delimited', maximum_object_size=$longest,
                            columns={{{", ".join(f"'{k}': '{v}'" for k, v in _SPOOL_COLUMNS.items())}}})
"""
# An event sent without an id is named after its place in the spool, so loading again is a no-op.
_SPOOL_ID = "coalesce(e.id, $segment || '.' || line || '.' || i)"
_FROM_SPOOL = "FROM (SELECT received_at, line, unnest({name}) AS e, unnest(range(len({name}))) AS i FROM spooled)"
_LOAD = {
    "decisions": f"""
        INSERT OR IGNORE INTO decisions BY NAME
        SELECT e.id, e.agent, coalesce(e.ts, received_at) AS ts, received_at, e.context, e.actions, e.chosen,
               e.prob, e.probs, e.model_version, e.strategy
        {_FROM_SPOOL.format(name="decisions")}
    """,
    "outcomes": f"""
        INSERT OR IGNORE INTO outcomes BY NAME
        SELECT {_SPOOL_ID} AS id, e.decision_id, e.agent, e.reward, coalesce(e.ts, received_at) AS ts, received_at
        {_FROM_SPOOL.format(name="outcomes")}
    """,
    "steps": f"""
        INSERT OR IGNORE INTO steps BY NAME
        SELECT {_SPOOL_ID} AS id, e.agent, e.episode, e."index" AS idx, e.observation, e.action, e.reward, e.done,
               coalesce(e.ts, received_at) AS ts, received_at
        {_FROM_SPOOL.format(name="steps")}
    """,
    "events": f"""
        INSERT OR IGNORE INTO events BY NAME
        SELECT {_SPOOL_ID} AS id, e.agent, e.kind, coalesce(e.data, 'null') AS data,
               coalesce(e.ts, received_at) AS ts, received_at
        {_FROM_SPOOL.format(name="events")}
    """,
}
_SPOOLED_COUNTS = "SELECT " + ", ".join(f"coalesce(sum(len({t})), 0)" for t in EXPERIENCE_TABLES) + " FROM spooled"

_DEAD_LETTERS = pa.schema(
    [("received_at", pa.float64()), ("peer_uid", pa.int64()), ("peer_pid", pa.int64()), ("code", pa.string()),
     ("reason", pa.string()), ("raw", pa.binary()), ("raw_size", pa.int64())]
)


def _reward_rules(config: Config) -> pa.Table:
    rules = {"": config.rewards} | {agent: override.rewards for agent, override in config.agents.items()}
    return pa.table(
        {
            "agent": list(rules),
            "wait_window": [r.wait_window for r in rules.values()],
            "default_reward": [r.default for r in rules.values()],
            "aggregation": [r.aggregation for r in rules.values()],
        }
    )


# ---- files ---------------------------------------------------------------------------------


def _longest_line(path: Path) -> int:
    """The length of a file's longest line: what DuckDB's JSON reader must hold at once."""
    longest = pending = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                longest = max(longest, pending + end + 1 - start)
                pending, start = 0, end + 1
            pending += len(chunk) - start
    return max(longest, pending, 1)


def _sql_path(path: Path) -> str:
    """A path as an SQL string literal (COPY ... TO takes no parameters)."""
    return "'" + str(path).replace("'", "''") + "'"


def _publish(staging: Path, dest: Path) -> None:
    """Move a finished COPY's part files into the archive and make them durable.

    The rows are deleted from DuckDB right after this, so the files must survive a power cut.
    """
    dirs = set()
    for part in sorted(staging.rglob("*.parquet")):
        fsync_path(part)
        target = dest / part.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        dirs.update((target.parent, target.parent.parent, dest))
    for directory in dirs:
        fsync_path(directory)


def _agent_partitions(root: Path, agent: str) -> Iterator[Path]:
    """The archive's ``agent=...`` folders for ``agent``; DuckDB percent-encodes their names."""
    for table in EXPERIENCE_TABLES:
        base = root / table
        if not base.is_dir():
            continue
        for child in base.iterdir():
            if child.is_dir() and child.name.startswith("agent=") and unquote(child.name[6:]) == agent:
                yield child


# What DuckDB raises for a batch's content, as opposed to the disk or memory failing.
_DATA_ERRORS = (
    duckdb.ConversionException,
    duckdb.ConstraintException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    duckdb.TypeMismatchException,
)

# ---- the store -----------------------------------------------------------------------------


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    try:
        yield
    except _DATA_ERRORS as exc:
        raise RejectedData(f"{what} failed: {exc}") from exc
    except (duckdb.Error, OSError, pa.ArrowException, OverflowError) as exc:
        raise StorageError(f"{what} failed: {exc}") from exc


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    # A failed commit ends the transaction itself, so there is nothing left to roll back.
    con.commit()


class Store:
    def __init__(self, path: Path | str, settings: StoreConfig = StoreConfig()) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = duckdb.connect(
                str(self.path),
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
            self._con.execute(_SCHEMA)
        except (duckdb.Error, OSError) as exc:
            raise StorageError(f"cannot open the store at {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _guard(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """Hold the lock and report any database or file failure as StorageError."""
        with self._lock, _failing_as(what):
            yield self._con

    # ---- writing ---------------------------------------------------------------------------

    def load(self, segment: Path) -> WriteResult:
        """Load one spool segment (``reflexd.service.spool``) in one transaction, with DuckDB's JSON reader.

        Events whose id is already stored (or repeats in the segment) are skipped, which makes a
        resend after a lost acknowledgement, and loading a segment again after a crash, exactly-once.
        """
        inserted: dict[str, int] = {}
        with self._guard(f"loading spool segment {segment.name}") as con, _transaction(con):
            con.execute(_READ_SPOOL, {"path": str(segment), "longest": _longest_line(segment)})
            (counts,) = con.execute(_SPOOLED_COUNTS).fetchall()
            for name, count in zip(EXPERIENCE_TABLES, counts):
                if count:
                    params = {"segment": segment.stem} if "$segment" in _LOAD[name] else {}
                    (inserted[name],) = con.execute(_LOAD[name], params).fetchone()
            con.execute("DROP TABLE spooled")
        total = sum(inserted.values())
        return WriteResult(inserted=total, duplicates=int(sum(counts)) - total, **inserted)

    def load_each_line(self, segment: Path) -> tuple[WriteResult, list[tuple[bytes, str]]]:
        """Load a segment DuckDB refused as a whole one line (one batch) at a time.

        Returns what loaded, and each refused line with DuckDB's reason.
        """
        results, refused = [], []
        with tempfile.TemporaryDirectory(prefix=".lines-", dir=self.path.parent) as tmp:
            single = Path(tmp) / segment.name  # same name, so the ids it derives are the same
            with _failing_as(f"reading spool segment {segment.name}"), open(segment, "rb") as lines:
                for line in lines:
                    single.write_bytes(line)
                    try:
                        results.append(self.load(single))
                    except RejectedData as exc:
                        refused.append((line, str(exc)))
        total = {k: sum(getattr(r, k) for r in results) for k in ("inserted", "duplicates", *EXPERIENCE_TABLES)}
        return WriteResult(**total), refused

    def write(self, events: Sequence[Decision | Outcome | Step | Event], received_at: float) -> WriteResult:
        """Store one batch now, through a one-line segment: for tools and tests, not the daemon's ingest."""
        what = f"writing a batch of {len(events)} events"
        with _failing_as(what), tempfile.TemporaryDirectory(prefix=".write-", dir=self.path.parent) as tmp:
            segment = Path(tmp) / f"{uuid.uuid4().hex}{spool.SUFFIX}"  # its name seeds the ids it assigns
            segment.write_bytes(spool.encode_line(events, received_at, 0))
            return self.load(segment)

    def dead_letter(self, rows: Sequence[DeadLetter]) -> None:
        what = f"storing {len(rows)} dead letters"
        with _failing_as(what):
            letters = pa.table({c: [getattr(r, c) for r in rows] for c in _DEAD_LETTERS.names}, schema=_DEAD_LETTERS)  # noqa: F841
        with self._guard(what) as con:
            con.execute("INSERT INTO dead_letters BY NAME SELECT * FROM letters")

    def record_model_event(self, version: str, event: str, detail: dict[str, Any], at: float) -> None:
        with self._guard(f"recording model event {event!r} for {version}") as con:
            con.execute("INSERT INTO models VALUES (?, ?, ?, ?)", [at, version, event, spool.plain_json(detail).decode()])

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

    def matured_count(self, since: float, now: float, config: Config) -> int:
        """Decisions received after ``since`` whose reward wait window has closed by ``now``."""
        rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
        with self._guard("counting matured decisions") as con:
            (n,) = con.execute(
                f"SELECT count(*) FROM ({_MATURED}) WHERE received_at > $since", {"now": now, "since": since}
            ).fetchone()
        return n

    def live_rewards(self, versions: Sequence[str], now: float, config: Config) -> dict[str, RewardStats]:
        """Count, mean and variance of the joined reward of each version's matured decisions.

        The same join as ``snapshot`` (wait window, default reward, aggregation, per-agent rules);
        a version that made no matured decision is absent from the result.
        """
        rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
        wanted = pa.table({"version": pa.array(list(versions), pa.string())})  # noqa: F841
        with self._guard("computing live rewards per model") as con:
            rows = con.execute(_LIVE_REWARDS, {"now": now}).fetchall()
        return {v: RewardStats(count=n, mean=float(mean), variance=float(var)) for v, n, mean, var in rows}

    def snapshot(self, dest: Path, now: float, config: Config, max_rows: int) -> SnapshotInfo:
        """Write the newest ``max_rows`` matured decisions with their joined reward to one Parquet file.

        The file appears at ``dest`` complete or not at all, so a trainer never reads half of it.
        """
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
        with self._guard(f"writing the training snapshot {dest}") as con:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                con.execute(
                    f"COPY ({_EXPERIENCES}) TO {_sql_path(partial)} (FORMAT parquet)",
                    {"now": now, "max_rows": max_rows},
                )
                os.replace(partial, dest)
            finally:
                partial.unlink(missing_ok=True)
            rows, start, end = con.execute(
                "SELECT count(*), coalesce(min(received_at), 0), coalesce(max(received_at), 0) FROM read_parquet(?)",
                [str(dest)],
            ).fetchone()
        return SnapshotInfo(rows=rows, window_start=start, window_end=end)

    # ---- retention -------------------------------------------------------------------------

    def archive(self, older_than: float, root: Path, compression: str) -> dict[str, int]:
        """Move rows received before ``older_than`` to Parquet under ``root/<table>/agent=../date=..``.

        Each table's COPY writes into a staging folder first; rows are deleted only after its
        files are in place, so a failed COPY loses nothing and leaves no partial files behind.
        """
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, not {compression!r}")
        root = Path(root)
        return {table: self._archive_table(table, older_than, root, compression) for table in _ARCHIVE_SELECT}

    def _archive_table(self, table: str, older_than: float, root: Path, compression: str) -> int:
        staging = root / f".staging-{uuid.uuid4().hex}"
        copy = (
            f"COPY ({_ARCHIVE_SELECT[table]}) TO {_sql_path(staging / table)} (FORMAT parquet, "
            f"PARTITION_BY (agent, date), COMPRESSION {compression}, FILENAME_PATTERN 'part-{{uuid}}')"
        )
        try:
            with self._guard(f"archiving {table} to {root}") as con, _transaction(con):
                staging.mkdir(parents=True)
                (copied,) = con.execute(copy, {"cutoff": older_than}).fetchone()
                if not copied:
                    return 0
                _publish(staging / table, root / table)
                (deleted,) = con.execute(f"DELETE FROM {table} WHERE received_at < ?", [older_than]).fetchone()
                return deleted
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def forget(self, agent: str, archive_root: Path | None) -> dict[str, int]:
        """Delete everything stored about ``agent``, in the database and in the archive.

        Dead letters go when their raw bytes name the agent (``spool.names_agent``), so a refused
        frame or spool line that held its events does not keep them.
        """
        removed: dict[str, int] = {}
        with self._guard(f"forgetting agent {agent!r}") as con, _transaction(con):
            # Before the decisions go: outcomes sent without an agent belong to their decision's.
            (removed["outcomes"],) = con.execute(
                "DELETE FROM outcomes WHERE agent = $a OR decision_id IN (SELECT id FROM decisions WHERE agent = $a)",
                {"a": agent},
            ).fetchone()
            for table in ("decisions", "steps", "events"):
                (removed[table],) = con.execute(f"DELETE FROM {table} WHERE agent = ?", [agent]).fetchone()
            # a dead letter keeps the first bytes of what was refused; an agent's events in them go too
            doomed: list[int] = []
            letters = con.execute("SELECT rowid, raw FROM dead_letters")
            while batch := letters.fetchmany(1000):
                doomed += [rowid for rowid, raw in batch if spool.names_agent(raw, agent)]
            if doomed:
                con.execute("DELETE FROM dead_letters WHERE rowid IN (SELECT unnest($ids))", {"ids": doomed})
            removed["dead_letters"] = len(doomed)
        if archive_root is not None:
            partitions = list(_agent_partitions(Path(archive_root), agent))
            for partition in partitions:
                shutil.rmtree(partition)
            removed["archive_partitions"] = len(partitions)
        return removed

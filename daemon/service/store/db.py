"""What the store's parts share: the schema, the tables, transactions, and how failures are told.

Tables named in SQL such as ``FROM letters`` are Python locals of the calling function, found by
DuckDB's replacement scan.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from reflexd.errors import RejectedData, StorageError

EXPERIENCE_TABLES = ("decisions", "outcomes", "steps", "events")
COUNTED_TABLES = (*EXPERIENCE_TABLES, "dead_letters")

SCHEMA = """
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
    strategy VARCHAR,
    slot INTEGER,  -- a slate's position, from 0 (NULL: not part of a slate)
    slate VARCHAR,  -- the id the slots of one slate share
    episode VARCHAR  -- the episode the decision is part of (NULL: none)
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
-- archiving passes whose rows were deleted and whose files may not all be in the archive yet
-- (reflexd.service.store.retention: its staging folder .staging-<id> is published, then the row goes)
CREATE TABLE IF NOT EXISTS archive_passes (
    id VARCHAR PRIMARY KEY,
    "at" DOUBLE NOT NULL
);
-- knowledge extractions (reflexd.service.insights): the window each read, and what it found, a
-- finding a row, so that two runs can be compared and an agent's findings forgotten with it
CREATE TABLE IF NOT EXISTS insight_runs (
    id VARCHAR PRIMARY KEY,
    "at" DOUBLE NOT NULL,
    window_start DOUBLE,
    window_end DOUBLE,
    experiences BIGINT NOT NULL,
    summary JSON NOT NULL
);
CREATE TABLE IF NOT EXISTS insights (
    run_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,  -- rule, pattern, anomaly, trend
    agent VARCHAR,  -- NULL: about no one agent (dead letters, the whole host)
    finding JSON NOT NULL
);
"""
# Columns added since a table was first created: a database made by an older version gains them
# when opened (CREATE TABLE IF NOT EXISTS leaves an existing table as it is).
MIGRATIONS = """
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS slot INTEGER;
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS slate VARCHAR;
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS episode VARCHAR;
"""

# How the tables look outside the store: in the Parquet archive, in read-out snapshots (the
# `snapshot` request) and in `reflexd query` / `reflexd export`. Each column is (name, type,
# expression over the store's columns). JSON columns are written as text (a Parquet string, which
# pyarrow, polars and DuckDB read without a cast; DuckDB's JSON type would be a binary column to
# some readers), and steps' `idx` is named `index`, as the step message names it. `reflexd query`
# shows the JSON columns with DuckDB's JSON type again.
OUTSIDE: dict[str, tuple[tuple[str, str, str], ...]] = {
    "decisions": (
        ("id", "VARCHAR", "id"),
        ("agent", "VARCHAR", "agent"),
        ("ts", "DOUBLE", "ts"),
        ("received_at", "DOUBLE", "received_at"),
        ("context", "JSON", "context"),
        ("actions", "JSON", "actions"),
        ("chosen", "VARCHAR", "chosen"),
        ("prob", "DOUBLE", "prob"),
        ("probs", "JSON", "probs"),
        ("model_version", "VARCHAR", "model_version"),
        ("strategy", "VARCHAR", "strategy"),
        ("slot", "INTEGER", "slot"),
        ("slate", "VARCHAR", "slate"),
        ("episode", "VARCHAR", "episode"),
    ),
    "outcomes": (
        ("id", "VARCHAR", "id"),
        ("decision_id", "VARCHAR", "decision_id"),
        ("agent", "VARCHAR", "agent"),
        ("reward", "DOUBLE", "reward"),
        ("ts", "DOUBLE", "ts"),
        ("received_at", "DOUBLE", "received_at"),
    ),
    "steps": (
        ("id", "VARCHAR", "id"),
        ("agent", "VARCHAR", "agent"),
        ("episode", "VARCHAR", "episode"),
        ("index", "INTEGER", "idx"),
        ("observation", "JSON", "observation"),
        ("action", "VARCHAR", "action"),
        ("reward", "DOUBLE", "reward"),
        ("done", "BOOLEAN", "done"),
        ("ts", "DOUBLE", "ts"),
        ("received_at", "DOUBLE", "received_at"),
    ),
    "events": (
        ("id", "VARCHAR", "id"),
        ("agent", "VARCHAR", "agent"),
        ("kind", "VARCHAR", "kind"),
        ("data", "JSON", "data"),
        ("ts", "DOUBLE", "ts"),
        ("received_at", "DOUBLE", "received_at"),
    ),
    "dead_letters": (
        ("received_at", "DOUBLE", "received_at"),
        ("peer_uid", "BIGINT", "peer_uid"),
        ("peer_pid", "INTEGER", "peer_pid"),
        ("code", "VARCHAR", "code"),
        ("reason", "VARCHAR", "reason"),
        ("raw", "BLOB", "raw"),
        ("raw_size", "BIGINT", "raw_size"),
    ),
    "models": (
        ("at", "DOUBLE", '"at"'),
        ("version", "VARCHAR", "version"),
        ("event", "VARCHAR", "event"),
        ("detail", "JSON", "detail"),
    ),
}
# Other names a column had in files written by earlier versions (read by `reflexd query`).
OUTSIDE_ALIASES = {("steps", "index"): ("idx",)}


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def outside_select(table: str, alias: str = "", **override: str) -> str:
    """The SELECT list that turns ``table``'s rows (``alias.`` before each column) into the outside
    form: JSON as text, columns named as outside; ``override`` gives other expressions by name."""
    prefix = f"{alias}." if alias else ""
    columns = []
    for name, kind, source in OUTSIDE[table]:
        expr = override.get(name) or f"{prefix}{source}"
        if kind == "JSON":
            expr = f"CAST({expr} AS VARCHAR)"
        columns.append(f"{expr} AS {quoted(name)}")
    return ", ".join(columns)


# A decision has matured once its agent's wait window has passed; `rules` holds one row per
# agent with overrides plus the global settings under the agent id '' (ids are never empty).
def sql_path(path: Path) -> str:
    """A path as an SQL string literal (COPY ... TO takes no parameters)."""
    return "'" + str(path).replace("'", "''") + "'"


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
def failing_as(what: str) -> Iterator[None]:
    try:
        yield
    except _DATA_ERRORS as exc:
        raise RejectedData(f"{what} failed: {exc}") from exc
    except (duckdb.Error, OSError, pa.ArrowException, OverflowError) as exc:
        raise StorageError(f"{what} failed: {exc}") from exc


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    # A failed commit ends the transaction itself, so there is nothing left to roll back.
    con.commit()

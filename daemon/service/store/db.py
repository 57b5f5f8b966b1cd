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
    slate VARCHAR  -- the id the slots of one slate share
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
# Columns added since a table was first created: a database made by an older version gains them
# when opened (CREATE TABLE IF NOT EXISTS leaves an existing table as it is).
MIGRATIONS = """
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS slot INTEGER;
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS slate VARCHAR;
"""


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

"""Read-out snapshots: every table as Parquet as of one moment, with the archive's files beside them.

The ``snapshot`` request (``reflexd query``, ``reflexd export``) reads the store while the daemon
runs, which holds the only handle DuckDB allows on the file. ``begin`` starts a read transaction
on a second connection to the daemon's own database (a cursor), and the archive's files are linked
while the store's lock is held: archiving moves rows under the same lock (files published, rows
deleted, in one transaction), so each row is in exactly one of the two. The tables are then
copied out of that transaction without the lock; loads go on meanwhile, and DuckDB's MVCC keeps
the transaction's view of the tables as it was.

Columns are written in their outside form (``db.OUTSIDE``: JSON as text, steps' ``index``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import msgspec

from reflexd.service.store.db import EXPERIENCE_TABLES, OUTSIDE, outside_select, sql_path

TABLES = tuple(OUTSIDE)  # every table of the store, written by a snapshot


class Written(msgspec.Struct, frozen=True, kw_only=True):
    tables: dict[str, str]  # table -> its Parquet file
    rows: dict[str, int]
    archive: dict[str, list[str]]  # table -> the archive's Parquet files (paths keep agent=../date=..)
    linked: bool  # the archive's files are hard links inside the snapshot (else the archive's own paths)


def begin(cur: duckdb.DuckDBPyConnection) -> None:
    """Start ``cur``'s read transaction now: DuckDB takes a transaction's view of the database when
    it first reads it, not at BEGIN."""
    cur.begin()
    cur.execute("SELECT count(*) FROM decisions").fetchone()


def link_archive(root: Path | None, dest: Path) -> tuple[dict[str, list[str]], bool]:
    """The archive's Parquet files by table, hard-linked under ``dest`` with the same relative paths.

    Links keep the files a snapshot names readable while it lives, whatever pruning or ``forget``
    does to the archive meanwhile, and take no space. Where the archive cannot be linked (another
    file system), the archive's own paths are given instead.
    """
    files: dict[str, list[str]] = {table: [] for table in EXPERIENCE_TABLES}
    if root is None or not Path(root).is_dir():
        return files, True
    root = Path(root)
    found = {
        table: sorted(p for p in (root / table).rglob("*.parquet") if p.is_file()) if (root / table).is_dir() else []
        for table in EXPERIENCE_TABLES
    }
    try:
        for table, parts in found.items():
            for part in parts:
                target = dest / part.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(part, target)
                files[table].append(str(target))
        return files, True
    except FileNotFoundError:
        raise  # a part gone under us: not a file system that refuses links
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        return {table: [str(p) for p in parts] for table, parts in found.items()}, False


def copy_tables(cur: duckdb.DuckDBPyConnection, dest: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Every table to ``dest/<table>.parquet`` within ``cur``'s transaction; the files and their rows."""
    tables: dict[str, str] = {}
    rows: dict[str, int] = {}
    for table in TABLES:
        path = dest / f"{table}.parquet"
        (rows[table],) = cur.execute(
            f"COPY (SELECT {outside_select(table)} FROM {table}) TO {sql_path(path)} (FORMAT parquet, COMPRESSION zstd)"
        ).fetchone()
        tables[table] = str(path)
    return tables, rows

"""Read-out snapshots: every table as Parquet as of one moment, with the archive's files beside them.

The ``snapshot`` request (``reflexd query``, ``reflexd export``) reads the store while the daemon
runs, which holds the only handle DuckDB allows on the file. ``begin`` starts a read transaction
on a second connection to the daemon's own database (a cursor), and the archive's files are linked
while the archive's lock is held (``Store.read_out``): archiving moves rows under it (rows deleted,
then files published), so each row is in exactly one of the two. The reply names a folder per
table, not its files, so it does not grow with the archive. The tables are then copied out of that
transaction without the locks; loads go on meanwhile, and DuckDB's MVCC keeps the transaction's
view of the tables as it was.

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
    archive: dict[str, str]  # table -> its archive folder, files in agent=../date=.. below (tables with files)
    linked: bool  # the folders hold hard links inside the snapshot (else they are the archive's own)


def begin(cur: duckdb.DuckDBPyConnection) -> None:
    """Start ``cur``'s read transaction now: DuckDB takes a transaction's view of the database when
    it first reads it, not at BEGIN."""
    cur.begin()
    cur.execute("SELECT count(*) FROM decisions").fetchone()


def _entries(path: str, prefix: str = "") -> list[os.DirEntry[str]]:
    """The entries of folder ``path`` named ``prefix...`` (none if it went meanwhile: by hand, as
    the archive's lock is held)."""
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.name.startswith(prefix) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def link_archive(root: Path | None, dest: Path) -> tuple[dict[str, str], bool]:
    """The archive's Parquet files hard-linked under ``dest`` with the same relative paths
    (``<table>/agent=../date=../*.parquet``, walked folder by folder); the folder of each table
    that has files, and whether they are links.

    Links keep the files a snapshot holds readable while it lives, whatever pruning or ``forget``
    does to the archive meanwhile, and take no space. Where the archive cannot be linked (another
    file system), its own table folders are given instead (``linked`` false).
    """
    folders: dict[str, str] = {}
    if root is None or not Path(root).is_dir():
        return folders, True
    root = Path(root)
    try:
        for table in EXPERIENCE_TABLES:
            for agent in _entries(str(root / table), "agent="):
                for day in _entries(agent.path, "date="):
                    for part in _entries(day.path):
                        if not part.name.endswith(".parquet"):
                            continue
                        target = dest / table / agent.name / day.name
                        target.mkdir(parents=True, exist_ok=True)
                        try:
                            os.link(part.path, target / part.name)
                        except FileNotFoundError:
                            continue  # deleted by hand meanwhile
                        folders[table] = str(dest / table)
        return folders, True
    except OSError:  # another file system (EXDEV), or one without hard links
        shutil.rmtree(dest, ignore_errors=True)
        return {table: str(root / table) for table in EXPERIENCE_TABLES if (root / table).is_dir()}, False


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

"""Retention: old experience moved to the Parquet archive, and an agent forgotten everywhere."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import duckdb
import msgspec

from reflexd import log
from reflexd.durable import fsync_path
from reflexd.service import spool
from reflexd.service.store import findings
from reflexd.service.store.db import EXPERIENCE_TABLES, outside_select, sql_path, transaction

COMPRESSIONS = frozenset({"zstd", "snappy", "gzip", "uncompressed"})
STAGING = ".staging-"  # <archive>/.staging-<pass id>/<table>/agent=../date=../part-*.parquet

_log = log.get("reflexd.store")


def _utc_date(column: str) -> str:
    return f"CAST(make_timestamp(CAST({column} * 1e6 AS BIGINT)) AS DATE) AS date"


# Outcomes sent without an agent are filed under their decision's agent, so `forget` finds them
# in the archive ('_' when the decision is gone too). That needs the decisions still in the
# database, so outcomes are archived first.
# Columns are written in their outside form (``db.OUTSIDE``): JSON as text, steps' index named so.
_ARCHIVE_SELECT = {
    "outcomes": f"""
        SELECT {outside_select("outcomes", "o", agent="coalesce(o.agent, d.agent, '_')")},
               {_utc_date("o.received_at")}
        FROM outcomes o LEFT JOIN decisions d ON d.id = o.decision_id
        WHERE o.received_at < $cutoff
    """,
    **{
        table: f"SELECT {outside_select(table)}, {_utc_date('received_at')} FROM {table} WHERE received_at < $cutoff"
        for table in ("decisions", "steps", "events")
    },
}
# outcomes first: an outcome sent without an agent takes its decision's, which must still be there
ARCHIVE_ORDER = tuple(_ARCHIVE_SELECT)


def _sync(staging: Path) -> None:
    """Make a finished COPY's part files in ``staging`` and their folders durable: the rows are
    deleted from DuckDB once they are, so they must survive a power cut."""
    dirs = {staging, staging.parent}
    for part in sorted(staging.rglob("*.parquet")):
        fsync_path(part)
        dirs.update(parent for parent in part.parents if parent.is_relative_to(staging))
    for directory in dirs:
        fsync_path(directory)


def _publish(staging: Path, dest: Path) -> None:
    """Move the part files of ``staging`` (``<table>/agent=../date=..``) into the archive ``dest``,
    durably; staging, emptied, goes."""
    dirs = set()
    for part in sorted(staging.rglob("*.parquet")):
        target = dest / part.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        dirs.update(p for p in target.parents if p.is_relative_to(dest))
    for directory in dirs:
        fsync_path(directory)
    shutil.rmtree(staging, ignore_errors=True)


def recover(con: duckdb.DuckDBPyConnection, root: Path) -> int:
    """Finish or undo the archiving passes a failure interrupted; how many staging folders there were.

    A staging folder left in the archive is published when its pass is recorded in
    ``archive_passes`` (its rows were deleted: the commit went through) and deleted otherwise
    (the rows are still in DuckDB). Called with the archive's lock held, so no pass is under way.
    """
    root = Path(root)
    leftovers = sorted(p for p in root.glob(f"{STAGING}*") if p.is_dir()) if root.is_dir() else []
    committed = {pass_id for (pass_id,) in con.execute("SELECT id FROM archive_passes").fetchall()}
    for staging in leftovers:
        pass_id = staging.name[len(STAGING):]
        if pass_id in committed:
            _publish(staging, root)
            _log.warning("published the files of an interrupted archiving pass", staging=str(staging))
        else:
            shutil.rmtree(staging)
    if committed:
        con.execute("DELETE FROM archive_passes")
    return len(leftovers)


def _agent_partitions(root: Path, agent: str) -> Iterator[Path]:
    """The archive's ``agent=...`` folders for ``agent``; DuckDB percent-encodes their names."""
    for table in EXPERIENCE_TABLES:
        base = root / table
        if not base.is_dir():
            continue
        for child in base.iterdir():
            if child.is_dir() and child.name.startswith("agent=") and unquote(child.name[6:]) == agent:
                yield child


def check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, not {compression!r}")


def archive_table(con: duckdb.DuckDBPyConnection, table: str, older_than: float, root: Path, compression: str) -> int:
    """Move ``table``'s rows received before ``older_than`` to Parquet under ``root/<table>/agent=../date=..``.

    Each row is in exactly one place, DuckDB or the archive, whatever fails. In one transaction
    the COPY writes into a staging folder (``.staging-<pass id>``, made durable), the rows are
    deleted and the pass is recorded in ``archive_passes``; only after the commit are the files
    moved into the archive, then the record dropped. A failure before the commit deletes the
    staging folder (the rows are still in DuckDB); once the commit was tried (an error from it
    may hide one that went through, or one that did not) the folder stays, and ``recover``, run
    before the next pass, a snapshot or ``forget``, publishes it if the record is there and
    deletes it if not. Called with the archive's lock held (``recover`` must not meet a pass).
    """
    pass_id = uuid.uuid4().hex
    staging = root / f"{STAGING}{pass_id}"
    copy = (
        f"COPY ({_ARCHIVE_SELECT[table]}) TO {sql_path(staging / table)} (FORMAT parquet, "
        f"PARTITION_BY (agent, date), COMPRESSION {compression}, FILENAME_PATTERN 'part-{{uuid}}')"
    )
    committing = False
    try:
        con.begin()
        try:
            staging.mkdir(parents=True)
            (copied,) = con.execute(copy, {"cutoff": older_than}).fetchone()
            if not copied:
                con.rollback()
                return 0
            _sync(staging)
            (deleted,) = con.execute(f"DELETE FROM {table} WHERE received_at < ?", [older_than]).fetchone()
            con.execute("INSERT INTO archive_passes VALUES (?, ?)", [pass_id, time.time()])
        except BaseException:
            con.rollback()
            raise
        committing = True
        con.commit()
    finally:
        if not committing:
            shutil.rmtree(staging, ignore_errors=True)
    _publish(staging, root)
    con.execute("DELETE FROM archive_passes WHERE id = ?", [pass_id])
    return deleted


def forget(con: duckdb.DuckDBPyConnection, agent: str, archive_root: Path | None) -> dict[str, int]:
    """Delete everything stored about ``agent``, in the database and in the archive.

    Dead letters go when their raw bytes name the agent (``spool.names_agent``), so a refused
    frame or spool line that held its events does not keep them.
    """
    removed: dict[str, int] = {}
    with transaction(con):
        # Before the decisions go: outcomes sent without an agent belong to their decision's.
        (removed["outcomes"],) = con.execute(
            "DELETE FROM outcomes WHERE agent = $a OR (agent IS NULL AND decision_id IN (SELECT id FROM decisions WHERE agent = $a))",
            {"a": agent},
        ).fetchone()
        for table in ("decisions", "steps", "events"):
            (removed[table],) = con.execute(f"DELETE FROM {table} WHERE agent = ?", [agent]).fetchone()
        # a dead letter keeps the first bytes of what was refused; an agent's events in them go too
        doomed: list[int] = []
        letters = con.execute("SELECT rowid, raw FROM dead_letters")
        while batch := letters.fetchmany(1000):
            doomed += [rowid for rowid, raw in batch if spool.names_agent(raw, agent)]
        # a decision refused for another agent's id keeps no bytes: its reason names both agents
        taken = con.execute(
            "SELECT rowid FROM dead_letters WHERE code = 'id_taken' AND contains(reason, 'agent ' || to_json($a::VARCHAR))",
            {"a": agent},
        ).fetchall()
        doomed = list(dict.fromkeys([*doomed, *(rowid for (rowid,) in taken)]))
        if doomed:
            con.execute("DELETE FROM dead_letters WHERE rowid IN (SELECT unnest($ids))", {"ids": doomed})
        removed["dead_letters"] = len(doomed)
        removed["insights"] = findings.forget(con, agent)  # what extraction found about it
    if archive_root is not None:
        partitions = list(_agent_partitions(Path(archive_root), agent))
        for partition in partitions:
            shutil.rmtree(partition)
        removed["archive_partitions"] = len(partitions)
    return removed


# ---- pruning ---------------------------------------------------------------------------------

_DATE_FOLDER = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
DAY = 86400.0


class Pruned(msgspec.Struct, frozen=True, kw_only=True):
    """What one pruning pass removed from the archive, and what it left."""

    partitions: int  # <table>/agent=../date=.. folders removed
    files: int
    bytes: int
    kept_bytes: int
    oldest_kept: str | None  # the oldest day left (YYYY-MM-DD), None when the archive is empty


class _Partition(msgspec.Struct, frozen=True):
    day: str
    path: Path
    bytes: int
    files: int


def _partitions(root: Path) -> list[_Partition]:
    """Every ``<table>/agent=../date=..`` folder of the archive, with its size; a ``date=`` folder
    whose name is no day (``date=2026-02-30``: not written by reflexd) is logged and left alone."""
    found = []
    for table in EXPERIENCE_TABLES:
        base = root / table
        if not base.is_dir():
            continue
        for agent in base.iterdir():
            if not (agent.is_dir() and agent.name.startswith("agent=")):
                continue
            for day in agent.iterdir():
                match = _DATE_FOLDER.match(day.name)
                if match is None or not day.is_dir():
                    continue
                try:
                    dt.date.fromisoformat(match[1])
                except ValueError:
                    _log.warning("an archive folder names no day; pruning leaves it alone", folder=str(day))
                    continue
                sizes = [f.stat().st_size for f in day.rglob("*") if f.is_file()]
                found.append(_Partition(match[1], day, sum(sizes), len(sizes)))
    return found


def prune_archive(root: Path, now: float, max_days: float | None, max_bytes: int | None) -> Pruned:
    """Delete whole day partitions of the archive, oldest first: every one whose rows are all older
    than ``max_days`` (a day's partition holds the rows received that UTC day), then the oldest
    days, every table's and agent's at once, until what is left fits in ``max_bytes``. None turns
    a limit off. Agent folders left empty go too."""
    root = Path(root)
    partitions = _partitions(root) if root.is_dir() else []
    doomed: set[str] = set()
    if max_days is not None:
        for part in partitions:
            day = dt.datetime.fromisoformat(part.day).replace(tzinfo=dt.timezone.utc).timestamp()
            if day + DAY <= now - max_days * DAY:
                doomed.add(part.day)
    if max_bytes is not None:
        by_day: dict[str, int] = {}
        for part in partitions:
            by_day[part.day] = by_day.get(part.day, 0) + part.bytes
        left = sum(size for day, size in by_day.items() if day not in doomed)
        for day in sorted(by_day):
            if left <= max_bytes:
                break
            if day not in doomed:
                doomed.add(day)
                left -= by_day[day]
    removed = [p for p in partitions if p.day in doomed]
    for part in removed:
        shutil.rmtree(part.path, ignore_errors=True)
    for agent in {part.path.parent for part in removed}:
        try:
            agent.rmdir()  # only if nothing is left in it
        except OSError:
            pass
    kept = [p for p in partitions if p.day not in doomed]
    return Pruned(
        partitions=len(removed),
        files=sum(p.files for p in removed),
        bytes=sum(p.bytes for p in removed),
        kept_bytes=sum(p.bytes for p in kept),
        oldest_kept=min((p.day for p in kept), default=None),
    )

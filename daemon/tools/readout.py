"""Reading the data out: the tables ``reflexd query`` and ``reflexd export`` read.

A ``Source`` is an in-memory DuckDB whose views are named like the store's tables (``decisions``,
``outcomes``, ``steps``, ``events``, ``dead_letters``, ``models``), built over either

- a read-out snapshot the running daemon wrote (the ``snapshot`` request: every table as Parquet
  as of one moment, with the Parquet archive's files as of the same moment), or
- the database file attached read-only, when the daemon is not running (DuckDB lets one process
  hold the file), with the archive's files. The attachment holds DuckDB's lock on the file until
  the Source is closed: a daemon started meanwhile cannot open its store (StoreInUse).

Each experience view unites the table's rows with its archived ones, so a query sees all the
experience there is, each row once. The archive is read by folder (``<table>/agent=*/date=*/``,
hive partitions), never by a list of its files. Columns are the outside form (``db.OUTSIDE``:
steps' ``index``), JSON columns typed JSON. Nothing written through the views reaches the store:
the snapshot's files are the daemon's (read-only to its group) and the database is attached
READ_ONLY; ``run_query`` refuses anything but a query (an ``EXPLAIN`` only of a query: ``EXPLAIN
ANALYZE`` runs what it explains), and before the first one locks the connection down
(``Source.lock_down``: no file but the Source's own, no extension, no setting changed).

This module never imports torch.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import duckdb
import msgspec
import pyarrow as pa

from reflexd.config import Config
from reflexd.errors import QueryError
from reflexd.learning.join import reward_rules
from reflexd.service.store.db import EXPERIENCE_TABLES, OUTSIDE, OUTSIDE_ALIASES, quoted, sql_path
from reflexd.service.store.integrity import classify

TABLES = tuple(OUTSIDE)
_QUERY_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_HIVE = "hive_partitioning = true, union_by_name = true, hive_types = {'agent': 'VARCHAR', 'date': 'DATE'}"
PARTS = "agent=*/date=*/*.parquet"  # an archive table's files, below its folder
_ANALYZE = frozenset({"ANALYZE", "ANALYSE"})


class Source:
    """An in-memory DuckDB with the store's tables as views; ``now`` is the moment they show, and
    ``rules`` the reward rules in force (as ``reflexd.learning.join`` reads them).

    ``readable``: the folders the views read, the only ones left readable by ``lock_down``.
    ``renew``, called every ``renew_every`` seconds in a thread of its own until the Source is
    closed, keeps a snapshot from expiring while it is read.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, now: float, rules: pa.Table, origin: str,
                 release: Callable[[], None] | None = None, readable: Sequence[str | Path] = (),
                 renew: Callable[[], None] | None = None, renew_every: float = 300.0) -> None:
        self.con = con
        self.now = now
        self.rules = rules
        self.origin = origin  # where the data comes from, for messages
        self.readable = [str(p) for p in readable]
        self.locked = False
        self._release = release
        self._closed = threading.Event()
        con.register("rules", rules)
        if renew is not None:
            threading.Thread(
                target=self._keep, args=(renew, max(1.0, renew_every)), name="reflexd-snapshot-renewal", daemon=True
            ).start()

    def _keep(self, renew: Callable[[], None], every: float) -> None:
        while not self._closed.wait(every):
            renew()

    def lock_down(self) -> None:
        """Let the connection read the Source's own folders only, write nothing, load no extension
        and change no setting from now on: what the SQL a user gives ``run_query`` runs under.

        DuckDB's ``enable_external_access = false`` stops every file access but to
        ``allowed_directories`` (the views read their files when queried, so their folders are
        those); ``lock_configuration`` then keeps any statement from turning it back on."""
        if self.locked:
            return
        folders = ", ".join("'" + (p.rstrip("/") + "/").replace("'", "''") + "'" for p in self.readable)
        for setting in (
            f"allowed_directories = [{folders}]",
            "enable_external_access = false",
            "autoinstall_known_extensions = false",
            "autoload_known_extensions = false",
            "lock_configuration = true",
        ):
            self.con.execute(f"SET {setting}")
        self.locked = True

    def close(self) -> None:
        self._closed.set()
        try:
            self.con.close()
        finally:
            if self._release is not None:
                release, self._release = self._release, None
                release()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _column(table: str, name: str, kind: str, source: str, have: set[str]) -> str:
    """One column of a view: ``name`` of ``kind`` from whichever name the rows have it under."""
    names = dict.fromkeys((name, source.strip('"'), *OUTSIDE_ALIASES.get((table, name), ())))
    found = [quoted(n) for n in names if n in have]
    if not found:
        return f"CAST(NULL AS {kind}) AS {quoted(name)}"  # files written before the column existed
    # files of several versions read together have the column under each of its names
    value = found[0] if len(found) == 1 else f"coalesce({', '.join(found)})"
    return f"CAST({value} AS {kind}) AS {quoted(name)}"


def _part(con: duckdb.DuckDBPyConnection, table: str, relation: str) -> str:
    have = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}
    columns = ", ".join(_column(table, name, kind, source, have) for name, kind, source in OUTSIDE[table])
    return f"SELECT {columns} FROM {relation}"


def create_views(
    con: duckdb.DuckDBPyConnection, tables: dict[str, str], archive: dict[str, str], dedupe: bool = False
) -> None:
    """A view per table over ``tables`` (a relation each: a Parquet file or an attached table) and,
    for the experience tables, the archive's files of it: those under its folder in ``archive``
    (``<folder>/agent=*/date=*/*.parquet``). ``dedupe`` leaves out archived rows whose id the
    table's relation holds too (a snapshot that names the archive's own folders: rows archived
    after it was taken are in both)."""
    for table in TABLES:
        parts = [_part(con, table, tables[table])]
        folder = archive.get(table)
        pattern = f"{str(folder).rstrip('/')}/{PARTS}" if folder else None
        if pattern and con.execute("SELECT 1 FROM glob(?) LIMIT 1", [pattern]).fetchone():
            files = f"read_parquet({sql_path(Path(pattern))}, {_HIVE})"
            if dedupe:
                files = f"(SELECT * FROM {files} AS a WHERE a.id NOT IN (SELECT id FROM {tables[table]}))"
            parts.append(_part(con, table, files))
        con.execute(f"CREATE VIEW {quoted(table)} AS " + " UNION ALL ".join(parts))


def archive_folders(root: Path) -> dict[str, str]:
    """The folder of each experience table in the archive at ``root`` (staging folders, hidden,
    are beside them), for the tables that have one."""
    return {table: str(root / table) for table in EXPERIENCE_TABLES if (root / table).is_dir()}


def _rules_table(rules: dict[str, Any]) -> pa.Table:
    return pa.table(
        {
            "agent": list(rules),
            "wait_window": [float(r.wait_window) for r in rules.values()],
            "default_reward": [float(r.default) for r in rules.values()],
            "aggregation": [r.aggregation for r in rules.values()],
            "episode_return": [bool(r.episode_return) for r in rules.values()],
            "discount": [float(r.discount) for r in rules.values()],
            "episode_timeout": [float(r.episode_timeout) for r in rules.values()],
        }
    )


def from_snapshot(
    reply: Any, release: Callable[[], None] | None = None, renew: Callable[[], None] | None = None
) -> Source:
    """A Source over a read-out snapshot (a ``SnapshotTaken`` reply); ``release`` tells the daemon
    it may delete it, when the Source is closed; ``renew`` that it is still being read, called
    three times per lifetime the daemon gave it (``expires``) until then."""
    con = duckdb.connect()
    try:
        tables = {table: f"read_parquet({sql_path(Path(path))})" for table, path in reply.tables.items()}
        try:
            # not linked: the archive's own folders, which rows archived since the snapshot join
            create_views(con, tables, reply.archive, dedupe=not reply.linked)
        except duckdb.Error as exc:
            raise QueryError(_unreadable(exc, reply.directory)) from None
        origin = f"a snapshot of the running daemon ({reply.directory})"
        readable = [reply.directory, *([] if reply.linked else reply.archive.values())]
        every = (reply.expires - time.time()) / 3
        return Source(con, reply.taken_at, _rules_table(reply.rewards), origin, release, readable, renew, every)
    except BaseException:
        con.close()
        if release is not None:
            release()
        raise


def from_store(config: Config, archive: bool = True) -> Source:
    """A Source over the database file of ``config``, attached read-only, and its archive: for when
    the daemon is not running. StoreInUse if a daemon holds the file."""
    path = config.db_path
    if not path.exists():
        raise QueryError(f"no store at {path} yet (the daemon creates it at its first start)")
    con = duckdb.connect()
    try:
        try:
            con.execute(f"ATTACH {sql_path(path)} AS store (READ_ONLY)")
        except duckdb.Error as exc:
            raise classify(exc, path, "opening it read-only") from None
        tables = {table: f"store.{quoted(table)}" for table in TABLES}
        folders = archive_folders(config.archive_path) if archive else {}
        try:
            create_views(con, tables, folders)
        except duckdb.Error as exc:
            raise QueryError(_unreadable(exc, str(config.archive_path))) from None
        origin = f"{path} (read-only; the daemon is not running)"
        return Source(con, time.time(), reward_rules(config), origin, readable=list(folders.values()))
    except BaseException:
        con.close()
        raise


def _unreadable(exc: duckdb.Error, where: str) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = ""
    if "Permission denied" in str(exc):
        hint = (
            " (the files are the daemon's, readable by the group of its state directory, the daemon's"
            " primary group: run this as its user or a member of that group)"
        )
    elif "No files found" in str(exc) or "No such file" in str(exc):
        hint = " (the snapshot expired or was released, or the archive was pruned meanwhile: run it again)"
    return f"cannot read {where}: {first}{hint}"


# ---- queries ---------------------------------------------------------------------------------


class Result:
    """A query's columns and its rows, read in batches."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection, source: str) -> None:
        self.cursor = cursor
        self.source = source
        description = cursor.description or []
        self.columns = [d[0] for d in description]
        self.json_columns = {i for i, d in enumerate(description) if str(d[1]) == "JSON"}

    def batches(self, size: int = 10_000) -> Iterator[list[tuple[Any, ...]]]:
        while True:
            try:
                rows = self.cursor.fetchmany(size)
            except duckdb.Error as exc:
                raise QueryError(failure(exc, self.source)) from None
            if not rows:
                return
            yield rows


def failure(exc: duckdb.Error, source: str, what: str = "the query") -> str:
    """What to say when DuckDB fails ``what`` on ``source``'s data."""
    message = str(exc).strip()
    if isinstance(exc, duckdb.IOException):
        return _unreadable(exc, source)
    if isinstance(exc, (duckdb.CatalogException, duckdb.BinderException)):
        message += f"\n(tables: {', '.join(TABLES)}; `DESCRIBE decisions` lists a table's columns)"
    if isinstance(exc, duckdb.PermissionException):
        message += f"\n(a query reads the tables {', '.join(TABLES)} and no other file)"
    return f"{what} failed: {message}"


def _explained(sql: str) -> str | None:
    """Why an EXPLAIN statement is refused, None if what it explains is one query.

    ``EXPLAIN ANALYZE`` runs the statement it explains (``EXPLAIN ANALYZE COPY ... TO`` writes
    the file), and DuckDB calls every EXPLAIN statement EXPLAIN, so what follows ``EXPLAIN``,
    ``ANALYZE`` and an option list is parsed again on its own and must be a query.
    """
    raw = sql.encode()  # the tokenizer counts bytes
    found = duckdb.tokenize(sql)
    ends = [pos for pos, _ in found[1:]] + [len(raw)]
    words = [
        (pos, raw[pos:end].decode(errors="replace").strip())
        for (pos, kind), end in zip(found, ends)
        if kind != duckdb.token_type.comment
    ]
    i = 1  # words[0] is EXPLAIN
    if i < len(words) and words[i][1].upper() in _ANALYZE:
        i += 1
    if i < len(words) and words[i][1].startswith("("):  # EXPLAIN (FORMAT json, ANALYZE) ...
        depth = 0
        while i < len(words):
            depth += words[i][1].count("(") - words[i][1].count(")")
            i += 1
            if depth <= 0:
                break
    inner = raw[words[i][0]:].decode() if i < len(words) else ""
    try:
        statements = duckdb.extract_statements(inner)
    except duckdb.Error:
        return "EXPLAIN of a statement that cannot be read"
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kind = statements[0].type.name if len(statements) == 1 else f"{len(statements)} statements"
        return f"EXPLAIN of {kind}"
    return None


def run_query(source: Source, sql: str) -> Result:
    """Run one read-only statement; QueryError naming the problem for anything else."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"the SQL cannot be read: {str(exc).strip()}") from None
    if not statements:
        raise QueryError("no SQL statement given")
    if len(statements) > 1:
        raise QueryError(f"one statement at a time, not {len(statements)}")
    kind = statements[0].type
    refused = None if kind in _QUERY_TYPES else kind.name
    if kind == duckdb.StatementType.EXPLAIN:
        refused = _explained(statements[0].query)
    if refused is not None:
        raise QueryError(
            f"reflexd query runs queries only (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN of a query),"
            f" not {refused}: nothing can be written this way; `reflexd export` writes the data out"
        )
    try:
        source.lock_down()
        cursor = source.con.execute(sql)
    except duckdb.Error as exc:
        raise QueryError(failure(exc, source.origin)) from None
    return Result(cursor, source.origin)


# ---- printing results ------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A value as JSON can carry it (msgspec's encoder takes the rest: dates, UUIDs, bytes as base64)."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _encode_hook(value: Any) -> Any:
    return str(value)


_json = msgspec.json.Encoder(enc_hook=_encode_hook, decimal_format="number")


def write_json(result: Result, out: IO[str]) -> int:
    """The rows as one JSON array of objects, a row per line; JSON columns nested as they are."""
    n = 0
    out.write("[")
    for batch in result.batches():
        for row in batch:
            item = {
                name: (msgspec.Raw(value.encode()) if i in result.json_columns and value is not None else _plain(value))
                for i, (name, value) in enumerate(zip(result.columns, row))
            }
            out.write(("\n" if n == 0 else ",\n") + _json.encode(item).decode())
            n += 1
    out.write("\n]\n" if n else "]\n")
    return n


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (dict, list, tuple)):
        return _json.encode(_plain(value)).decode()
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    return str(value)


def write_csv(result: Result, out: IO[str]) -> int:
    """The rows as CSV with a header; NULL is an empty field, bytes are base64, lists and structs JSON."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    n = 0
    for batch in result.batches():
        writer.writerows([_text(v) for v in row] for row in batch)
        n += len(batch)
    return n


def write_table(result: Result, out: IO[str], max_rows: int | None = 1000, width: int = 60) -> int:
    """The rows as an aligned table (at most ``max_rows``, cells cut at ``width`` characters), then
    how many rows there were."""
    cells: list[list[str]] = []
    total = 0
    for batch in result.batches():
        for row in batch:
            total += 1
            if max_rows is None or len(cells) < max_rows:
                cells.append([_cell(v, width) for v in row])
    header = result.columns
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()
    out.write(line + "\n" + "  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    shown = f", the first {len(cells)} shown (--max-rows, or --csv / --json for all)" if len(cells) < total else ""
    out.write(f"({total} row{'' if total == 1 else 's'}{shown})\n")
    return total


def _cell(value: Any, width: int) -> str:
    text = "NULL" if value is None else _text(value).replace("\n", "\\n").replace("\t", "\\t")
    return text if width <= 0 or len(text) <= width else text[: max(1, width - 1)] + "…"

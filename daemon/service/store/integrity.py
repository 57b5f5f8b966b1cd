"""Whether a database file is sound: every data block read back against its checksum.

DuckDB checks a block's checksum when it reads the block, and reads only what a query needs: a
``count(*)`` reads no column at all (the row counts are in the metadata), and a query reads only
the columns it names. ``verify`` hashes every column of every table, so each column block is read
and checked; opening the file has already checked its headers and metadata. The blocks of the
primary-key indexes are read as inserts touch them, so a damaged index block shows when a load
fails (``status`` and the log say why), not here: reading all of an index costs a random fetch
per row (half a minute per million).
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from reflexd.errors import StorageError, StoreDamaged, StoreInUse

# What DuckDB says when the bytes of the file are wrong, as opposed to memory, permissions or a lock
_DAMAGE = re.compile(
    r"Corrupt database file|checksum|Could not read enough bytes|not a valid DuckDB database file"
    r"|Failed to (?:read|deserialize)|Serialization Error",
    re.IGNORECASE,
)
_LOCK = re.compile(r"Could not set lock on file")
_HOLDER = re.compile(r"Conflicting lock is held in (?P<holder>.+?) \(PID (?P<pid>\d+)\)")


def tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND NOT temporary"
        " ORDER BY table_name"
    ).fetchall()
    return [name for (name,) in rows]


def verify(con: duckdb.DuckDBPyConnection, path: Path) -> dict[str, int]:
    """Read every column of every table; the rows of each, or StoreDamaged naming the table."""
    rows = {}
    try:
        names = tables(con)
    except duckdb.Error as exc:
        raise classify(exc, path, "listing its tables") from exc
    for table in names:
        quoted = '"' + table.replace('"', '""') + '"'
        try:
            # hash() reads every value of every column (validity masks and string blocks included);
            # bit_xor keeps the result one row, whatever the table's size
            (count, *_) = con.execute(f"SELECT count(*), bit_xor(hash(COLUMNS(*))) FROM {quoted}").fetchone()  # type: ignore[misc]
        except duckdb.Error as exc:
            raise classify(exc, path, f"reading table {table}") from exc
        rows[table] = int(count)
    return rows


def classify(exc: BaseException, path: Path, what: str) -> StorageError:
    """The error to report for a DuckDB failure while opening or reading ``path``."""
    message = str(exc)
    if _LOCK.search(message):
        held = _HOLDER.search(message)
        return StoreInUse(str(path), f"{held['holder']} (pid {held['pid']})" if held else "another process")
    if _DAMAGE.search(message) or isinstance(exc, (duckdb.SerializationException, duckdb.InternalException)):
        first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
        return StoreDamaged(str(path), f"{what} failed: {first}")
    return StorageError(f"checking the store at {path}: {what} failed: {message}")

"""One host's Parquet archive read and joined into experiences, as the host's own snapshot joins them.

A host's retention moves old experience to ``<state_dir>/archive/<table>/agent=<agent>/date=<day>/
part-*.parquet`` (``reflexd.service.store.retention``, hive-partitioned, DuckDB percent-encoding
the agent). This reads ``decisions`` and ``outcomes`` there with ``pyarrow.dataset`` through a
``pyarrow.fs`` filesystem (a local path, ``file://``, ``s3://``, ``gs://``, ``hdfs://``, ``abfs://``:
whatever ``pyarrow.fs.FileSystem.from_uri`` opens), then runs the reward join of
``reflexd.learning.join`` over them on an in-memory DuckDB: the same SQL a host's training snapshot
runs on its database, so a fleet model learns from experiences made exactly as the host's are.

No Ray here: ``reflexd.fleet.train`` runs ``read_host`` as a Ray task per host.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from reflexd.config import Config
from reflexd.errors import FleetError
from reflexd.learning import join

# The columns as the store types them; files written before a column existed read it as null.
DECISIONS = pa.schema(
    [
        ("id", pa.string()),
        ("ts", pa.float64()),
        ("received_at", pa.float64()),
        ("context", pa.string()),
        ("actions", pa.string()),
        ("chosen", pa.string()),
        ("prob", pa.float64()),
        ("model_version", pa.string()),
        ("slot", pa.int32()),
        ("slate", pa.string()),
    ]
)
OUTCOMES = pa.schema(
    [
        ("id", pa.string()),
        ("decision_id", pa.string()),
        ("reward", pa.float64()),
        ("ts", pa.float64()),
        ("received_at", pa.float64()),
    ]
)
# the folders DuckDB's PARTITION_BY writes (agent percent-encoded: hive partitioning decodes it)
PARTITIONS = pa.schema([("agent", pa.string()), ("date", pa.string())])


class HostRows(NamedTuple):
    """One host's joined experiences: the snapshot's columns (``reflexd.learning.dataset.COLUMNS``
    and more), oldest first, as ``Store.snapshot`` writes them."""

    path: str
    table: pa.Table
    decisions: int  # archived decisions read (before the wait window and max_rows)
    outcomes: int
    seconds: float


def open_archive(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root of a host's archive: ``path`` itself, or ``path/archive`` when
    ``path`` is a host's state directory. FleetError when neither holds a ``decisions`` folder."""
    try:
        if "://" in path:
            fs, root = pafs.FileSystem.from_uri(path)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise FleetError(f"{path}: pyarrow cannot open this filesystem ({exc})") from None
    root = root.rstrip("/") or "/"
    for candidate in (root, f"{root}/archive"):
        try:
            found = fs.get_file_info(f"{candidate}/decisions").type == pafs.FileType.Directory
        except OSError as exc:
            raise FleetError(f"{path}: cannot read it ({exc})") from None
        if found:
            return fs, candidate
    raise FleetError(
        f"{path}: no decisions/ folder here nor under archive/: name a host's archive (<state_dir>/archive) "
        "or its state directory"
    )


def _read(fs: pafs.FileSystem, root: str, table: str, schema: pa.Schema, agent: str | None) -> pa.Table:
    full = pa.schema([*schema, *PARTITIONS])
    folder = f"{root}/{table}"
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return full.empty_table()  # no outcome archived yet: every decision takes the default reward
    dataset = ds.dataset(
        folder,
        schema=full,
        format="parquet",
        filesystem=fs,
        partitioning=ds.partitioning(PARTITIONS, flavor="hive"),
    )
    return dataset.to_table(filter=(ds.field("agent") == agent) if agent is not None else None)


def read_host(
    path: str,
    config: Config,
    *,
    now: float | None = None,
    max_rows: int | None = None,
    agent: str | None = None,
    since: float | None = None,
) -> HostRows:
    """The newest ``max_rows`` (default ``trainer.max_examples``) matured decisions of the archive at
    ``path`` with their joined rewards, by ``config``'s reward rules (``rewards`` and the ``agents``
    overrides). ``agent`` keeps one agent's (its partitions alone are read), ``since`` the decisions
    made at or after it (their own ``ts``)."""
    started = time.perf_counter()
    fs, root = open_archive(path)
    try:
        decisions = _read(fs, root, "decisions", DECISIONS, agent)
        outcomes = _read(fs, root, "outcomes", OUTCOMES, agent)
    except (pa.ArrowException, OSError) as exc:
        raise FleetError(f"{path}: cannot read the archive ({exc})") from None
    rules = join.reward_rules(config)
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        con.register("decisions", decisions)
        con.register("outcomes", outcomes)
        con.register("rules", rules)
        params = {
            "now": time.time() if now is None else now,
            "max_rows": config.trainer.max_examples if max_rows is None else max_rows,
            "agent": agent,
            "since": since,
            "until": None,
            "version": None,
        }
        relation = con.sql(join.EXPERIENCES, params=params)
        # DuckDB 1.x names it arrow(); 2.x to_arrow_table() (its arrow() gives a reader)
        table = (getattr(relation, "to_arrow_table", None) or relation.arrow)()
    except duckdb.Error as exc:
        raise FleetError(f"{path}: the reward join failed ({exc})") from None
    finally:
        con.close()
    return HostRows(path, table, decisions.num_rows, outcomes.num_rows, time.perf_counter() - started)

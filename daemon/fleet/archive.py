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

import datetime as dt
import functools
import operator
import os
import re
import time
from typing import NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
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
        ("episode", pa.string()),
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
# events, for the episode ends among them (kind 'episode_end'; data is JSON text)
EVENTS = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("data", pa.string()),
        ("ts", pa.float64()),
        ("received_at", pa.float64()),
    ]
)
# the folders DuckDB's PARTITION_BY writes (agent percent-encoded: hive partitioning decodes it)
PARTITIONS = pa.schema([("agent", pa.string()), ("date", pa.string())])
DAY = 86400.0


class HostRows(NamedTuple):
    """One host's joined experiences: the snapshot's columns (``reflexd.learning.dataset.COLUMNS``
    and more), oldest first, as ``Store.snapshot`` writes them."""

    path: str  # as named, less any credentials in a URI (``public_path``)
    table: pa.Table
    decisions: int  # archived decisions read (before the wait window and max_rows)
    outcomes: int
    seconds: float


def public_path(path: str) -> str:
    """``path`` as it may be shown and recorded (a manifest's ``fleet.hosts``, messages): a URI's
    credentials left out. Its userinfo goes (``s3://KEY:SECRET@bucket/...``; for ``abfs://`` and
    ``abfss://``, whose user part names the container, only the password), and the values of query
    parameters that hold secrets (``secret_key=``, ``token=``, ``sig=``, ...) become ``***``. A local
    path is returned as it is."""
    if "://" not in path:
        return path
    parts = urlsplit(path)
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{host}" if user and parts.scheme.lower() in ("abfs", "abfss") else host
    query = "&".join(
        f"{piece.partition('=')[0]}=***" if _SECRET_PARAM.search(unquote(piece.partition("=")[0])) else piece
        for piece in parts.query.split("&")
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_SECRET_PARAM = re.compile(r"key|secret|token|passw|pwd|credential|sig", re.IGNORECASE)


def _scrubbed(exc: BaseException, path: str) -> str:
    """``exc``'s message without the credentials ``path`` carries (pyarrow quotes the URI it was given)."""
    text = str(exc).replace(path, public_path(path))
    if "://" not in path:
        return text
    parts = urlsplit(path)
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    secrets = [userinfo, password] + ([user] if parts.scheme.lower() not in ("abfs", "abfss") else [])
    secrets += [
        piece.partition("=")[2] for piece in parts.query.split("&") if _SECRET_PARAM.search(unquote(piece.partition("=")[0]))
    ]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:  # shorter ones would blot out the message, not a secret
            text = text.replace(secret, "***")
    return text


def open_archive(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root of a host's archive: ``path`` itself, or ``path/archive`` when
    ``path`` is a host's state directory. FleetError when neither holds a ``decisions`` folder."""
    shown = public_path(path)
    try:
        if "://" in path:
            fs, root = pafs.FileSystem.from_uri(path)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise FleetError(f"{shown}: pyarrow cannot open this filesystem ({_scrubbed(exc, path)})") from None
    root = root.rstrip("/") or "/"
    for candidate in (root, f"{root}/archive"):
        try:
            found = fs.get_file_info(f"{candidate}/decisions").type == pafs.FileType.Directory
        except OSError as exc:
            raise FleetError(f"{shown}: cannot read it ({_scrubbed(exc, path)})") from None
        if found:
            return fs, candidate
    raise FleetError(
        f"{shown}: no decisions/ folder here nor under archive/: name a host's archive (<state_dir>/archive) "
        "or its state directory"
    )


def _dataset(fs: pafs.FileSystem, root: str, table: str, schema: pa.Schema) -> ds.Dataset | None:
    """``table``'s files under ``root`` as one dataset (None when there are none): listing them reads
    no rows."""
    folder = f"{root}/{table}"
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return None  # no outcome archived yet: every decision takes the default reward
    return ds.dataset(
        folder,
        schema=pa.schema([*schema, *PARTITIONS]),
        format="parquet",
        filesystem=fs,
        partitioning=ds.partitioning(PARTITIONS, flavor="hive"),
    )


def _all(*filters: ds.Expression | None) -> ds.Expression | None:
    found = [f for f in filters if f is not None]
    return functools.reduce(operator.and_, found) if found else None


def _days(dataset: ds.Dataset, where: ds.Expression | None) -> list[tuple[str, ds.Dataset]]:
    """The ``date=`` partitions (UTC days of received_at) holding files ``where`` may match, newest
    first, each as a dataset of its files; ``where`` names partition columns only, so this reads no
    rows, and the files are sorted into days once."""
    days: dict[str, list[ds.Fragment]] = {}
    for fragment in dataset.get_fragments(filter=where):
        day = ds.get_partition_keys(fragment.partition_expression).get("date")
        if day is not None:
            days.setdefault(str(day), []).append(fragment)
    return [
        (day, ds.FileSystemDataset(days[day], schema=dataset.schema, format=dataset.format, filesystem=dataset.filesystem))
        for day in sorted(days, reverse=True)  # YYYY-MM-DD: as strings, in time order
    ]


def _day(t: float) -> str | None:
    """The UTC day of ``t`` as the archive's ``date=`` folders name it (None out of range)."""
    try:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).date().isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def _read(
    decisions: ds.Dataset | None,
    outcomes: ds.Dataset | None,
    agent: str | None,
    since: float | None,
    needed: int,
    matured_before: float,
) -> tuple[pa.Table, pa.Table]:
    """The archived decisions the join can take its newest ``needed`` rows from, and their outcomes.

    Whole days are read, newest first, until they hold ``needed`` decisions surely matured
    (received at or before ``matured_before``, the longest wait window ago) or none are left: the
    days are those of received_at, by which the join takes the newest, so the rows it keeps are
    those of a whole read, and memory holds ``needed`` decisions and a day's more at most. ``since``
    is pushed down too: days before its own (less a day, for clocks ahead of the host's) are not
    read, nor decisions made before it. Outcomes are read from the day before the oldest decision
    read on, those of the decisions read alone.
    """
    full_decisions = pa.schema([*DECISIONS, *PARTITIONS])
    full_outcomes = pa.schema([*OUTCOMES, *PARTITIONS])
    if decisions is None:
        return full_decisions.empty_table(), full_outcomes.empty_table()
    by_agent = (ds.field("agent") == agent) if agent is not None else None
    first_day = _day(since - DAY) if since is not None else None
    where = _all(by_agent, (ds.field("date") >= first_day) if first_day is not None else None)
    made_since = (ds.field("ts") >= since) if since is not None else None
    parts: list[pa.Table] = []
    sure, oldest = 0, None
    for day, files in _days(decisions, where):
        part = files.to_table(filter=made_since)  # the day's partitions carry their agent and date
        parts.append(part)
        oldest = day
        sure += pc.sum(pc.less_equal(part.column("received_at"), matured_before)).as_py() or 0
        if sure >= needed:
            break
    read = pa.concat_tables(parts) if parts else full_decisions.empty_table()
    if outcomes is None or read.num_rows == 0:
        return read, full_outcomes.empty_table()
    try:
        start = _day(dt.datetime.fromisoformat(str(oldest)).replace(tzinfo=dt.timezone.utc).timestamp() - DAY)
    except ValueError:  # a date= folder DuckDB did not name: no day is left out
        start = None
    # an outcome archived after its decision was is filed under '_' (``retention``): its agent unknown then
    outcomes_of = (ds.field("agent").isin([agent, "_"])) if agent is not None else None
    found = outcomes.to_table(
        filter=_all(
            outcomes_of,
            (ds.field("date") >= start) if start is not None else None,
            ds.field("decision_id").isin(read.column("id")),
        )
    )
    return read, found


def _episode_ends(events: ds.Dataset | None, decisions: pa.Table, agent: str | None) -> pa.Table:
    """The archived episode ends (events of kind ``episode_end``), when any decision read names an
    episode: the reward join credits episode returns from them (``reflexd.learning.join.ENDS``)."""
    full = pa.schema([*EVENTS, *PARTITIONS])
    if events is None or decisions.column("episode").null_count == decisions.num_rows:
        return full.empty_table()
    by_agent = (ds.field("agent") == agent) if agent is not None else None
    return events.to_table(filter=_all(by_agent, ds.field("kind") == "episode_end"))


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
    made at or after it (their own ``ts``). The archive is read a day at a time, newest first, until
    the newest ``max_rows`` are in hand (``_read``); ``HostRows.decisions`` counts those read."""
    started = time.perf_counter()
    shown = public_path(path)
    fs, root = open_archive(path)
    now = time.time() if now is None else now
    max_rows = config.trainer.max_examples if max_rows is None else max_rows
    longest_wait = max([config.rewards.wait_window, *(a.rewards.wait_window for a in config.agents.values())])
    try:
        decisions, outcomes = _read(
            _dataset(fs, root, "decisions", DECISIONS),
            _dataset(fs, root, "outcomes", OUTCOMES),
            agent,
            since,
            max_rows,
            now - longest_wait,
        )
    except (pa.ArrowException, OSError) as exc:
        raise FleetError(f"{shown}: cannot read the archive ({_scrubbed(exc, path)})") from None
    rules = join.reward_rules(config)
    try:
        ends = _episode_ends(_dataset(fs, root, "events", EVENTS), decisions, agent)
    except (pa.ArrowException, OSError) as exc:
        raise FleetError(f"{shown}: cannot read the archive ({_scrubbed(exc, path)})") from None
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        con.register("decisions", decisions)
        # the archive files an outcome that names no agent under its decision's, or '_' when its
        # decision was gone (``retention``): '_' is no agent's, and the join must read it as none
        con.register("archived_outcomes", outcomes)
        con.execute(
            "CREATE VIEW outcomes AS SELECT * REPLACE (CASE WHEN agent = '_' THEN NULL ELSE agent END AS agent)"
            " FROM archived_outcomes"
        )
        con.register("events", ends)
        con.register("rules", rules)
        params = {
            "now": now, "max_rows": max_rows, "agent": agent, "since": since, "until": None, "version": None,
            "agents": None, "after": None,
        }
        relation = con.sql(join.EXPERIENCES, params=params)
        # DuckDB 1.x names it arrow(); 2.x to_arrow_table() (its arrow() gives a reader)
        table = (getattr(relation, "to_arrow_table", None) or relation.arrow)()
    except duckdb.Error as exc:
        raise FleetError(f"{shown}: the reward join failed ({exc})") from None
    finally:
        con.close()
    return HostRows(shown, table, decisions.num_rows, outcomes.num_rows, time.perf_counter() - started)

"""``reflexd export``: the store's data as Parquet, reflexd NDJSON or Vowpal Wabbit DSJSON.

Reads a ``reflexd.tools.readout.Source`` (a snapshot of the running daemon, or the stopped
daemon's database read-only, each with the Parquet archive), narrowed by agent and by the
decisions' own time (``ts``: from ``since``, before ``until``).

- ``parquet``: a folder with one file per table (``decisions.parquet``, …), columns as the Parquet
  archive has them (JSON as text, steps' ``index``). ``dead_letters`` and ``models`` have no agent,
  so an export for one agent leaves them out.
- ``ndjson``: reflexd's own ``decision`` and ``outcome`` lines, what ``reflexd import`` reads (an
  export imported into another daemon stores the same decisions and outcomes). Steps and events
  are in the Parquet export only.
- ``dsjson``: Vowpal Wabbit's decision service JSON for ``--cb_explore_adf --dsjson``, one line per
  matured decision (its wait window over by the snapshot's time), its cost the negated reward
  joined as training joins it (``reflexd.learning.join``: wait window, aggregation, default).
  Decisions whose reward may still change are left out and counted.

Outcomes go with their decisions: those of the decisions exported, and those whose decision is
not stored at all when their own agent and time match.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import duckdb
import msgspec

from reflexd.errors import QueryError, UsageError
from reflexd.learning import join
from reflexd.service.store.db import EXPERIENCE_TABLES, OUTSIDE, quoted, sql_path
from reflexd.tools.readout import Source, failure

FORMATS = ("parquet", "ndjson", "dsjson")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Window(msgspec.Struct, frozen=True, kw_only=True):
    agent: str | None = None
    since: float | None = None
    until: float | None = None


def _params(window: Window, sql: str, **more: Any) -> dict[str, Any]:
    """The window's parameters that ``sql`` names (DuckDB refuses any other)."""
    given = {"agent": window.agent, "since": window.since, "until": window.until, **more}
    return {name: value for name, value in given.items() if f"${name}" in sql}


# each filter is off when its parameter is NULL
_DECISIONS = """
    SELECT * FROM decisions
    WHERE ($agent IS NULL OR agent = $agent) AND ($since IS NULL OR ts >= $since) AND ($until IS NULL OR ts < $until)
"""
# outcomes of the decisions exported, and those whose decision is not stored at all (by their own agent and ts)
_OUTCOMES = f"""
    SELECT o.* FROM outcomes o
    WHERE o.decision_id IN (SELECT id FROM ({_DECISIONS}))
       OR (o.decision_id NOT IN (SELECT id FROM decisions)
           AND ($agent IS NULL OR o.agent = $agent) AND ($since IS NULL OR o.ts >= $since)
           AND ($until IS NULL OR o.ts < $until))
"""
_OWN = """
    SELECT * FROM {table}
    WHERE ($agent IS NULL OR agent = $agent) AND ($since IS NULL OR ts >= $since) AND ($until IS NULL OR ts < $until)
"""
_UNAGENTED = """
    SELECT * FROM {table}
    WHERE ($since IS NULL OR {time} >= $since) AND ($until IS NULL OR {time} < $until)
"""


def _rows(window: Window) -> dict[str, str]:
    """The SELECT of each table's rows in ``window`` (dead letters and model events only without an agent)."""
    rows = {"decisions": _DECISIONS, "outcomes": _OUTCOMES}
    rows |= {t: _OWN.format(table=t) for t in EXPERIENCE_TABLES if t not in rows}
    if window.agent is None:
        rows["dead_letters"] = _UNAGENTED.format(table="dead_letters", time="received_at")
        rows["models"] = _UNAGENTED.format(table="models", time='"at"')
    return rows


def _outside(table: str) -> str:
    """The view's columns as the Parquet archive writes them: JSON as text."""
    return ", ".join(
        f"CAST({quoted(name)} AS VARCHAR) AS {quoted(name)}" if kind == "JSON" else quoted(name)
        for name, kind, _ in OUTSIDE[table]
    )


# ---- Parquet ---------------------------------------------------------------------------------


def write_parquet(source: Source, out: Path, window: Window) -> dict[str, int]:
    """One Parquet file per table in the folder ``out`` (a new or empty one); rows per table."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: give a new or empty folder for a Parquet export")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for table, select in _rows(window).items():
        partial = out / f".{table}.parquet.partial"
        copy = (
            f"COPY (SELECT {_outside(table)} FROM ({select}) ORDER BY ALL) TO {sql_path(partial)}"
            " (FORMAT parquet, COMPRESSION zstd)"
        )
        try:
            (counts[table],) = source.con.execute(copy, _params(window, copy)).fetchone()
        except duckdb.Error as exc:
            partial.unlink(missing_ok=True)
            raise _failure(exc, source) from None
        os.replace(partial, out / f"{table}.parquet")
    return counts


def _failure(exc: Exception, source: Source) -> Exception:
    if isinstance(exc, duckdb.Error):
        return QueryError(failure(exc, source.origin, "the export"))
    return exc


# ---- reflexd NDJSON --------------------------------------------------------------------------


def _stream(source: Source, sql: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    try:
        cursor = source.con.execute(sql, params)
        names = [d[0] for d in cursor.description or []]
        while rows := cursor.fetchmany(10_000):
            for row in rows:
                yield dict(zip(names, row))
    except duckdb.Error as exc:
        raise _failure(exc, source) from None


def ndjson_lines(source: Source, window: Window, counts: dict[str, int]) -> Iterator[bytes]:
    """Decision lines, then outcome lines, as ``reflexd import`` reads them."""
    decisions = f"""
        SELECT id, agent, ts, CAST(context AS VARCHAR) AS context, CAST(actions AS VARCHAR) AS actions, chosen, prob,
               CAST(probs AS VARCHAR) AS probs, model_version, strategy, slot, slate, episode
        FROM ({_DECISIONS}) ORDER BY ts, id
    """
    counts["decisions"] = counts["outcomes"] = 0
    for d in _stream(source, decisions, _params(window, decisions)):
        line: dict[str, Any] = {"type": "decision", "id": d["id"], "agent": d["agent"], "ts": d["ts"]}
        line["context"] = msgspec.Raw(d["context"].encode())
        line["actions"] = msgspec.Raw(d["actions"].encode())
        line["chosen"], line["prob"] = d["chosen"], d["prob"]
        if d["probs"] is not None:
            line["probs"] = msgspec.Raw(d["probs"].encode())
        for key in ("model_version", "strategy", "slot", "slate", "episode"):
            if d[key] is not None:
                line[key] = d[key]
        counts["decisions"] += 1
        yield _encode(line) + b"\n"
    outcomes = f"SELECT id, decision_id, agent, reward, ts FROM ({_OUTCOMES}) ORDER BY ts, id"
    for o in _stream(source, outcomes, _params(window, outcomes)):
        line = {"type": "outcome", "id": o["id"], "decision_id": o["decision_id"], "reward": o["reward"], "ts": o["ts"]}
        if o["agent"] is not None:
            line["agent"] = o["agent"]
        counts["outcomes"] += 1
        yield _encode(line) + b"\n"


# ---- Vowpal Wabbit DSJSON --------------------------------------------------------------------

# VW reads keys that start with "_" as its own (labels, _multi, _text, ...) or ignores them, so a
# context key of that form is written with an "x" before it: `_age` becomes `x_age`.
_ESCAPE = "x"


def vw_key(key: str) -> str:
    return _ESCAPE + key if key.startswith("_") else key


def vw_value(value: Any) -> Any:
    """A JSON value as VW's JSON parser reads it: it takes numbers, strings, booleans, null, objects
    (namespaces), and lists of numbers or of objects; other lists become objects (strings in them
    as features of their own, anything else under ``[i]``)."""
    if isinstance(value, dict):
        return {vw_key(str(k)): vw_value(v) for k, v in value.items()}
    if not isinstance(value, list):
        return value
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value
    if all(isinstance(v, dict) for v in value):
        return [vw_value(v) for v in value]
    mapped: dict[str, Any] = {}
    for i, item in enumerate(value):
        if isinstance(item, str):
            mapped[vw_key(item)] = True
        elif item is not None:
            mapped[f"[{i}]"] = vw_value(item)
    return mapped


def _action_id(action: Any) -> str:
    return action if isinstance(action, str) else str(action["id"])


def vw_action(action: Any) -> dict[str, Any]:
    """An action as a ``_multi`` object: its id as the feature ``id`` (what ``reflexd import`` reads
    back as the id), its features beside it."""
    item: dict[str, Any] = {"id": _action_id(action)}
    features = action.get("features") if isinstance(action, dict) else None
    for key, value in (features or {}).items():
        name = vw_key(str(key))
        item["x_id" if name == "id" else name] = vw_value(value)
    return item


def _timestamp(ts: float) -> str | None:
    """DSJSON's time: ISO-8601 UTC with seven decimals (``2021-02-04T16:31:29.2460000Z``)."""
    try:
        when = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def dsjson_line(row: dict[str, Any]) -> bytes:
    """One cb_explore_adf DSJSON line for a decision with its joined ``reward`` and ``outcome_rewards``."""
    actions = _decode(row["actions"])
    ids = [_action_id(a) for a in actions]
    chosen = ids.index(row["chosen"])
    probs = _decode(row["probs"]) if row["probs"] is not None else None
    if probs is not None and len(probs) == len(ids):
        # the chosen action first, then the others likeliest first: as the decision service writes it
        order = [chosen] + sorted((i for i in range(len(ids)) if i != chosen), key=lambda i: (-probs[i], i))
        p = [float(probs[i]) for i in order]
    else:
        order, p = [chosen], [float(row["prob"])]
    context = _decode(row["context"])
    line: dict[str, Any] = {
        "_label_cost": -float(row["reward"]),
        "_label_probability": float(row["prob"]),
        "_label_Action": chosen + 1,
        "_labelIndex": chosen,
        "o": [{"v": float(v), "EventId": row["id"], "ActionTaken": False} for v in row["outcome_rewards"] or ()],
        "Timestamp": _timestamp(row["ts"]),
        "Version": "1",
        "EventId": row["id"],
        "a": [i + 1 for i in order],
        "c": {**(vw_value(context) if isinstance(context, dict) else {}), "_multi": [vw_action(a) for a in actions]},
        "p": p,
    }
    if line["Timestamp"] is None:
        del line["Timestamp"]
    if row["model_version"] is not None:
        line["VWState"] = {"m": row["model_version"]}
    return _encode(line) + b"\n"


_DSJSON = f"""
    WITH recent AS (
        SELECT * FROM ({join.MATURED})
        WHERE ($agent IS NULL OR agent = $agent) AND ($since IS NULL OR ts >= $since)
            AND ($until IS NULL OR ts < $until)
    ),
    {join.REWARDS},
    given AS (
        SELECT o.decision_id, list(o.reward ORDER BY o.received_at, o.ts, o.id) AS outcome_rewards
        FROM outcomes o JOIN recent m ON {join.owns('o', 'm')} GROUP BY o.decision_id
    )
    SELECT m.id, m.ts, CAST(m.context AS VARCHAR) AS context, CAST(m.actions AS VARCHAR) AS actions, m.chosen,
           m.prob, CAST(m.probs AS VARCHAR) AS probs, m.model_version, {join.JOINED_REWARD} AS reward,
           g.outcome_rewards
    FROM recent m LEFT JOIN rewards r ON r.id = m.id LEFT JOIN given g ON g.decision_id = m.id
    ORDER BY m.ts, m.id
"""


def dsjson_lines(source: Source, window: Window, counts: dict[str, int]) -> Iterator[bytes]:
    counts["decisions"] = 0
    waiting = (
        f"SELECT count(*) FROM ({_DECISIONS}) d LEFT JOIN rules own ON own.agent = d.agent"
        " JOIN rules r ON r.agent = coalesce(own.agent, '') WHERE d.received_at > $now - r.wait_window"
    )
    try:
        (counts["not_matured"],) = source.con.execute(waiting, _params(window, waiting, now=source.now)).fetchone()
    except duckdb.Error as exc:
        raise _failure(exc, source) from None
    for row in _stream(source, _DSJSON, _params(window, _DSJSON, now=source.now)):
        counts["decisions"] += 1
        yield dsjson_line(row)


# ---- writing -----------------------------------------------------------------------------------


def write_lines(lines: Iterator[bytes], out: str) -> None:
    """``lines`` to the file ``out`` (whole or not at all: written beside it, then renamed over it),
    or to stdout for ``-``."""
    if out == "-":
        stream: IO[bytes] = sys.stdout.buffer
        for line in lines:
            stream.write(line)
        stream.flush()
        return
    target = Path(out)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") as f:
            for line in lines:
                f.write(line)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def export(source: Source, fmt: str, out: str, window: Window) -> dict[str, int]:
    """Write ``source``'s rows in ``window`` as ``fmt`` to ``out``; the counts written."""
    if fmt == "parquet":
        if out == "-":
            raise UsageError("a Parquet export is a folder of files: name it with --out DIR")
        return write_parquet(source, Path(out), window)
    counts: dict[str, int] = {}
    if fmt == "ndjson":
        write_lines(ndjson_lines(source, window, counts), out)
    elif fmt == "dsjson":
        write_lines(dsjson_lines(source, window, counts), out)
    else:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return counts

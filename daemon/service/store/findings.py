"""Knowledge extractions kept in the store: each run's window and summary, and its findings.

A finding is kept as the JSON its extraction wrote (``reflexd.analysis``), beside the run it came
from and the agent it is about, so the newest run answers ``insights`` requests, older runs stay
to be compared with it (``reflexd query``), and ``forget`` deletes an agent's findings by a column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from reflexd.service.store.db import transaction

KINDS = ("rules", "patterns", "anomalies", "trends")


class Run(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    at: float
    window_start: float | None
    window_end: float | None
    experiences: int
    summary: dict[str, Any]


def save(con: duckdb.DuckDBPyConnection, run: Run, findings: Mapping[str, Sequence[Mapping[str, Any]]], keep: int) -> None:
    """Store ``run`` and its ``findings`` (lists by kind) in one transaction, and drop all but the
    newest ``keep`` runs."""
    rows = [(kind, item.get("agent"), msgspec.json.encode(item).decode()) for kind in KINDS for item in findings.get(kind, ())]
    found = pa.table(  # noqa: F841 -- read by the SQL below
        {
            "run_id": pa.array([run.id] * len(rows), pa.string()),
            "kind": pa.array([r[0] for r in rows], pa.string()),
            "agent": pa.array([r[1] for r in rows], pa.string()),
            "finding": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    with transaction(con):
        con.execute(
            "INSERT INTO insight_runs VALUES (?, ?, ?, ?, ?, ?)",
            [run.id, run.at, run.window_start, run.window_end, run.experiences, msgspec.json.encode(run.summary).decode()],
        )
        con.execute("INSERT INTO insights SELECT run_id, kind, agent, CAST(finding AS JSON) FROM found")
        old = 'SELECT id FROM insight_runs ORDER BY "at" DESC OFFSET ?'
        con.execute(f"DELETE FROM insights WHERE run_id IN ({old})", [keep])
        con.execute(f"DELETE FROM insight_runs WHERE id IN ({old})", [keep])


def latest(con: duckdb.DuckDBPyConnection, agent: str | None) -> tuple[Run, dict[str, list[dict[str, Any]]]] | None:
    """The newest run and its findings (those about ``agent`` and about no agent, when given)."""
    row = con.execute(
        'SELECT id, "at", window_start, window_end, experiences, CAST(summary AS VARCHAR) FROM insight_runs'
        ' ORDER BY "at" DESC LIMIT 1'
    ).fetchone()
    if row is None:
        return None
    run_id, at, start, end, experiences, summary = row
    run = Run(id=run_id, at=at, window_start=start, window_end=end, experiences=experiences, summary=msgspec.json.decode(summary))
    found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    rows = con.execute(
        "SELECT kind, CAST(finding AS VARCHAR) FROM insights WHERE run_id = $run"
        " AND ($agent IS NULL OR agent IS NULL OR agent = $agent) ORDER BY rowid",
        {"run": run_id, "agent": agent},
    ).fetchall()
    for kind, finding in rows:
        found[kind].append(msgspec.json.decode(finding))
    return run, found


def forget(con: duckdb.DuckDBPyConnection, agent: str) -> int:
    """Delete the findings about ``agent`` from every run kept, and the runs' notes that name it
    (inside the caller's transaction)."""
    (removed,) = con.execute("DELETE FROM insights WHERE agent = ?", [agent]).fetchone()
    for run_id, raw in con.execute("SELECT id, CAST(summary AS VARCHAR) FROM insight_runs").fetchall():
        summary = msgspec.json.decode(raw)
        notes = summary.get("notes") or []
        kept = [n for n in notes if agent not in n]
        if kept != notes:
            summary["notes"] = kept
            con.execute("UPDATE insight_runs SET summary = ? WHERE id = ?", [msgspec.json.encode(summary).decode(), run_id])
    return removed

"""Loading spool segments into the experience tables, exactly once per event id."""

from __future__ import annotations

from pathlib import Path

import duckdb
import msgspec

from reflexd.service.store.db import EXPERIENCE_TABLES, transaction


class WriteResult(msgspec.Struct, frozen=True, kw_only=True):
    """Rows a batch added; ``duplicates`` are events already stored or repeated in the batch."""

    inserted: int
    duplicates: int
    # decisions not stored because another decision holds their id (another agent's, or one that
    # chose another action): dead-lettered (code ``id_taken``), counted in neither ``inserted`` nor ``duplicates``
    taken: int = 0
    decisions: int = 0
    outcomes: int = 0
    steps: int = 0
    events: int = 0


_SPOOL_COLUMNS = {
    "received_at": "DOUBLE",
    "line": "BIGINT",
    "decisions": "STRUCT(id VARCHAR, agent VARCHAR, context JSON, actions JSON, chosen VARCHAR, prob DOUBLE,"
    " probs JSON, model_version VARCHAR, strategy VARCHAR, ts DOUBLE, slot INTEGER, slate VARCHAR,"
    " episode VARCHAR)[]",
    "outcomes": "STRUCT(id VARCHAR, decision_id VARCHAR, agent VARCHAR, reward DOUBLE, ts DOUBLE)[]",
    "steps": 'STRUCT(id VARCHAR, agent VARCHAR, episode VARCHAR, "index" INTEGER, observation JSON,'
    " action VARCHAR, reward DOUBLE, done BOOLEAN, ts DOUBLE)[]",
    "events": "STRUCT(id VARCHAR, agent VARCHAR, kind VARCHAR, data JSON, ts DOUBLE)[]",
}
# DuckDB sets aside twice maximum_object_size per read, within store.memory_limit_mb, so it is
# the segment's longest line (the spool keeps lines to spool.LINE_BYTES unless one event is bigger).
_READ_SPOOL = f"""
    CREATE OR REPLACE TEMP TABLE spooled AS
    SELECT * FROM read_json($path, format='newline_delimited', maximum_object_size=$longest,
                            columns={{{", ".join(f"'{k}': '{v}'" for k, v in _SPOOL_COLUMNS.items())}}})
"""
# An event sent without an id is named after its place in the spool, so loading again is a no-op.
_SPOOL_ID = "coalesce(e.id, $segment || '.' || line || '.' || i)"
_FROM_SPOOL = "FROM (SELECT received_at, line, unnest({name}) AS e, unnest(range(len({name}))) AS i FROM spooled)"
_LOAD = {
    "decisions": f"""
        INSERT OR IGNORE INTO decisions BY NAME
        SELECT e.id, e.agent, coalesce(e.ts, received_at) AS ts, received_at, e.context, e.actions, e.chosen,
               e.prob, e.probs, e.model_version, e.strategy, e.slot, e.slate, e.episode
        {_FROM_SPOOL.format(name="decisions")}
    """,
    "outcomes": f"""
        INSERT OR IGNORE INTO outcomes BY NAME
        SELECT {_SPOOL_ID} AS id, e.decision_id, e.agent, e.reward, coalesce(e.ts, received_at) AS ts, received_at
        {_FROM_SPOOL.format(name="outcomes")}
    """,
    "steps": f"""
        INSERT OR IGNORE INTO steps BY NAME
        SELECT {_SPOOL_ID} AS id, e.agent, e.episode, e."index" AS idx, e.observation, e.action, e.reward, e.done,
               coalesce(e.ts, received_at) AS ts, received_at
        {_FROM_SPOOL.format(name="steps")}
    """,
    "events": f"""
        INSERT OR IGNORE INTO events BY NAME
        SELECT {_SPOOL_ID} AS id, e.agent, e.kind, coalesce(e.data, 'null') AS data,
               coalesce(e.ts, received_at) AS ts, received_at
        {_FROM_SPOOL.format(name="events")}
    """,
}
# A decision whose id another decision holds (another agent's, or one of the same agent's that
# chose another action) is no resend of it: INSERT OR IGNORE skipped it, and it is kept as a dead
# letter saying so, without raw bytes (the socket's to keep or not, by socket.dead_letter_bytes).
# Once: a segment loaded again after a crash adds no second letter (the same receipt time and
# reason), and the one stored first keeps the id, whoever sent it.
_TAKEN = """
    INSERT INTO dead_letters
    SELECT DISTINCT received_at, NULL, NULL, 'id_taken', reason, ''::BLOB, size FROM (
        SELECT s.received_at,
            'decision ' || to_json(s.e.id) || ' of agent ' || to_json(s.e.agent) || ' (chose ' || to_json(s.e.chosen)
                || ') not stored: a decision of agent ' || to_json(d.agent) || ' (chose ' || to_json(d.chosen)
                || ') has that id (an id names one decision, across agents)' AS reason,
            strlen(CAST(to_json(s.e) AS VARCHAR)) AS size
        FROM (SELECT received_at, unnest(decisions) AS e FROM spooled) s
        JOIN decisions d ON d.id = s.e.id AND (d.agent <> s.e.agent OR d.chosen <> s.e.chosen)
    ) t
    WHERE NOT EXISTS (
        SELECT 1 FROM dead_letters x WHERE x.code = 'id_taken' AND x.received_at = t.received_at AND x.reason = t.reason
    )
"""
_SPOOLED_COUNTS = "SELECT " + ", ".join(f"coalesce(sum(len({t})), 0)" for t in EXPERIENCE_TABLES) + " FROM spooled"


def _longest_line(path: Path) -> int:
    """The length of a file's longest line: what DuckDB's JSON reader must hold at once."""
    longest = pending = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                longest = max(longest, pending + end + 1 - start)
                pending, start = 0, end + 1
            pending += len(chunk) - start
    return max(longest, pending, 1)


def load_segment(con: duckdb.DuckDBPyConnection, segment: Path) -> WriteResult:
    """Load one spool segment (``reflexd.service.spool``) in one transaction, with DuckDB's JSON reader.

    Events whose id is already stored (or repeats in the segment) are skipped, which makes a
    resend after a lost acknowledgement, and loading a segment again after a crash, exactly-once.
    """
    inserted: dict[str, int] = {}
    with transaction(con):
        con.execute(_READ_SPOOL, {"path": str(segment), "longest": _longest_line(segment)})
        (counts,) = con.execute(_SPOOLED_COUNTS).fetchall()
        for name, count in zip(EXPERIENCE_TABLES, counts):
            if count:
                params = {"segment": segment.stem} if "$segment" in _LOAD[name] else {}
                (inserted[name],) = con.execute(_LOAD[name], params).fetchone()
        taken = con.execute(_TAKEN).fetchone()[0] if counts[EXPERIENCE_TABLES.index("decisions")] else 0
        con.execute("DROP TABLE spooled")
    total = sum(inserted.values())
    return WriteResult(inserted=total, duplicates=int(sum(counts)) - total - taken, taken=taken, **inserted)

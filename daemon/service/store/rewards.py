"""The reward join: which decisions have matured, their joined rewards, snapshots for training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa

from reflexd.config import Config
from reflexd.learning import join
from reflexd.service.store.db import sql_path


class RewardStats(msgspec.Struct, frozen=True, kw_only=True):
    """Joined rewards of the matured decisions one model version made."""

    count: int
    mean: float
    variance: float  # sample variance (ddof=1); 0 with fewer than 2 decisions


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True):
    rows: int
    window_start: float
    window_end: float


# ---- loading spool segments ----------------------------------------------------------------

# The reward join's SQL lives in reflexd.learning.join, which ``reflexd fleet train`` runs on hosts'
# Parquet archives too: one join, wherever the experience is.
_MATURED = join.MATURED
_REWARDS = join.REWARDS
_JOINED_REWARD = join.JOINED_REWARD
_EXPERIENCES = join.EXPERIENCES

# Live reward per model version: every matured decision a version made, joined as for training.
_LIVE_REWARDS = f"""
    WITH recent AS (
        SELECT * FROM ({_MATURED}) WHERE model_version IN (SELECT version FROM wanted)
    ),
    {_REWARDS}
    SELECT m.model_version, count(*), avg({_JOINED_REWARD}), coalesce(var_samp({_JOINED_REWARD}), 0.0)
    FROM recent m LEFT JOIN rewards r ON r.id = m.id
    GROUP BY m.model_version
"""

_reward_rules = join.reward_rules


# ---- files ---------------------------------------------------------------------------------


def matured_count(
    con: duckdb.DuckDBPyConnection, since: float, now: float, config: Config, agents: Sequence[str] | None = None
) -> int:
    """Decisions received after ``since`` whose reward wait window has closed by ``now`` (only
    ``agents``' when given: a model line's)."""
    rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
    (n,) = con.execute(
        f"SELECT count(*) FROM ({_MATURED}) WHERE received_at > $since"
        " AND ($agents IS NULL OR list_contains($agents, agent))",
        {"now": now, "since": since, "agents": None if agents is None else list(agents)},
    ).fetchone()
    return n


def matured_counts(
    con: duckdb.DuckDBPyConnection, lines: Sequence[tuple[float, Sequence[str] | None]], now: float, config: Config
) -> list[int]:
    """``matured_count`` of each of ``lines`` (since, agents), in one pass over the decisions for
    every line that names its agents: a daemon with thousands of agents' lines counts them all at
    once rather than in a query each."""
    rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
    counts = [0] * len(lines)
    named = [(k, since, agents) for k, (since, agents) in enumerate(lines) if agents is not None]
    for k, (since, agents) in enumerate(lines):
        if agents is None:  # every agent's: the shared line
            counts[k] = matured_count(con, since, now, config)
    pairs = [(k, agent, since) for k, since, agents in named for agent in agents]
    if not pairs:
        return counts
    cut = pa.table(  # noqa: F841 -- read by the SQL below
        {
            "line": pa.array([k for k, _, _ in pairs], pa.int64()),
            "agent": pa.array([a for _, a, _ in pairs], pa.string()),
            "since": pa.array([t for _, _, t in pairs], pa.float64()),
        }
    )
    rows = con.execute(
        f"SELECT c.line, count(*) FROM ({_MATURED}) m JOIN cut c ON c.agent = m.agent AND m.received_at > c.since"
        " WHERE m.received_at > $floor GROUP BY c.line",
        {"now": now, "floor": min(t for _, _, t in pairs)},
    ).fetchall()
    for k, n in rows:
        counts[k] = n
    return counts


def live_rewards(
    con: duckdb.DuckDBPyConnection, versions: Sequence[str], now: float, config: Config
) -> dict[str, RewardStats]:
    """Count, mean and variance of the joined reward of each version's matured decisions.

    The same join as ``snapshot`` (wait window, default reward, aggregation, per-agent rules);
    a version that made no matured decision is absent from the result.
    """
    rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
    wanted = pa.table({"version": pa.array(list(versions), pa.string())})  # noqa: F841
    rows = con.execute(_LIVE_REWARDS, {"now": now}).fetchall()
    return {v: RewardStats(count=n, mean=float(mean), variance=float(var)) for v, n, mean, var in rows}


def snapshot(
    con: duckdb.DuckDBPyConnection,
    dest: Path,
    now: float,
    config: Config,
    max_rows: int,
    *,
    agent: str | None = None,
    since: float | None = None,
    until: float | None = None,
    model_version: str | None = None,
    agents: Sequence[str] | None = None,
    after: float | None = None,
) -> SnapshotInfo:
    """Write the newest ``max_rows`` matured decisions with their joined reward to one Parquet file.

    ``agent``, ``since``/``until`` (the decision's own ``ts``: from ``since``, before ``until``) and
    ``model_version`` narrow it to a window, ``agents`` to a model line's agents, ``after`` to the
    decisions received after it; each is off when None.

    The file appears at ``dest`` complete or not at all, so a trainer never reads half of it.
    """
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        con.execute(
            f"COPY ({_EXPERIENCES}) TO {sql_path(partial)} (FORMAT parquet)",
            {
                "now": now, "max_rows": max_rows, "agent": agent, "since": since, "until": until,
                "version": model_version, "agents": None if agents is None else list(agents), "after": after,
            },
        )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    rows, start, end = con.execute(
        "SELECT count(*), coalesce(min(received_at), 0), coalesce(max(received_at), 0) FROM read_parquet(?)",
        [str(dest)],
    ).fetchone()
    return SnapshotInfo(rows=rows, window_start=start, window_end=end)

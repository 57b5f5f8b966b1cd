"""The reward join: which decisions have matured, their joined rewards, snapshots for training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa

from reflexd.config import Config
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

_MATURED = """
    SELECT d.*, r.wait_window, r.default_reward, r.aggregation
    FROM decisions d
    LEFT JOIN rules own ON own.agent = d.agent
    JOIN rules r ON r.agent = coalesce(own.agent, '')
    WHERE d.received_at <= $now - r.wait_window
"""

# The reward join, shared by training snapshots and live rewards: given a CTE `recent` of matured
# decisions, `rewards` aggregates each one's outcomes within its wait window, and _JOINED_REWARD
# (over `recent m LEFT JOIN rewards r`) falls back to the default reward when none came.
# Outcomes sharing a received_at (one ingest batch) are ordered by the agent's ts, then id, so
# first/last are deterministic. Rewards are aggregated before joining back, so the wide JSON
# columns are never grouped on.
_REWARDS = """
    rewards AS (
        SELECT m.id,
            CASE m.aggregation
                WHEN 'sum' THEN sum(o.reward)
                WHEN 'mean' THEN avg(o.reward)
                WHEN 'min' THEN min(o.reward)
                WHEN 'max' THEN max(o.reward)
                WHEN 'first' THEN arg_min(o.reward, (o.received_at, o.ts, o.id))
                WHEN 'last' THEN arg_max(o.reward, (o.received_at, o.ts, o.id))
            END AS reward,
            count(*) AS outcomes
        FROM recent m
        JOIN outcomes o ON o.decision_id = m.id AND o.received_at <= m.received_at + m.wait_window
        GROUP BY m.id, m.aggregation
    )
"""
_JOINED_REWARD = "coalesce(r.reward, m.default_reward)"

_EXPERIENCES = f"""
    WITH recent AS (
        SELECT * FROM ({_MATURED})
        -- a window of them (reflexd evaluate, the rollback monitor): each filter is off when NULL
        WHERE ($agent IS NULL OR agent = $agent) AND ($since IS NULL OR ts >= $since)
            AND ($until IS NULL OR ts < $until) AND ($version IS NULL OR model_version = $version)
        ORDER BY received_at DESC, ts DESC, id DESC LIMIT $max_rows
    ),
    {_REWARDS}
    SELECT
        m.id, m.agent, m.received_at,
        CAST(m.context AS VARCHAR) AS context,
        CAST(m.actions AS VARCHAR) AS actions,
        m.chosen, m.prob,
        {_JOINED_REWARD} AS reward,
        m.model_version,
        CAST(coalesce(r.outcomes, 0) AS INTEGER) AS outcomes,
        m.slot, m.slate
    FROM recent m LEFT JOIN rewards r ON r.id = m.id
    -- decisions spooled in one ingest batch share received_at; their own ts keeps them in the
    -- order they were made, where their random ids would shuffle them (and the model trained)
    ORDER BY m.received_at, m.ts, m.id
"""

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


def _reward_rules(config: Config) -> pa.Table:
    rules = {"": config.rewards} | {agent: override.rewards for agent, override in config.agents.items()}
    return pa.table(
        {
            "agent": list(rules),
            "wait_window": [r.wait_window for r in rules.values()],
            "default_reward": [r.default for r in rules.values()],
            "aggregation": [r.aggregation for r in rules.values()],
        }
    )


# ---- files ---------------------------------------------------------------------------------


def matured_count(con: duckdb.DuckDBPyConnection, since: float, now: float, config: Config) -> int:
    """Decisions received after ``since`` whose reward wait window has closed by ``now``."""
    rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
    (n,) = con.execute(
        f"SELECT count(*) FROM ({_MATURED}) WHERE received_at > $since", {"now": now, "since": since}
    ).fetchone()
    return n


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
) -> SnapshotInfo:
    """Write the newest ``max_rows`` matured decisions with their joined reward to one Parquet file.

    ``agent``, ``since``/``until`` (the decision's own ``ts``: from ``since``, before ``until``) and
    ``model_version`` narrow it to a window; each is off when None.

    The file appears at ``dest`` complete or not at all, so a trainer never reads half of it.
    """
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    rules = _reward_rules(config)  # noqa: F841 -- read by the SQL below
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        con.execute(
            f"COPY ({_EXPERIENCES}) TO {sql_path(partial)} (FORMAT parquet)",
            {"now": now, "max_rows": max_rows, "agent": agent, "since": since, "until": until, "version": model_version},
        )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    rows, start, end = con.execute(
        "SELECT count(*), coalesce(min(received_at), 0), coalesce(max(received_at), 0) FROM read_parquet(?)",
        [str(dest)],
    ).fetchone()
    return SnapshotInfo(rows=rows, window_start=start, window_end=end)
